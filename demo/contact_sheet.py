"""demo.html: a self-contained contact sheet of queries and the hits the service returned.

Thumbnails are embedded as data URIs so the page can be mailed or archived on its own; a picture
that cannot be read becomes a grey box rather than failing the report.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from demo.queries import Answer, hit_label

QUERY, RIGHT, WRONG = "#3573d9", "#1a9641", "#d7191c"  # border colours
THUMB_PX = 96

STYLE = f"""\
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.row {{ display: flex; gap: 6px; margin: 6px 0; align-items: flex-start; }}
.cell {{ border: 4px solid #ccc; width: {THUMB_PX}px; text-align: center; font-size: 11px; }}
.cell img {{ display: block; width: {THUMB_PX}px; height: {THUMB_PX}px; object-fit: cover; }}
.cap {{ padding: 2px; overflow-wrap: anywhere; }}
.missing {{ width: {THUMB_PX}px; height: {THUMB_PX}px; background: #eee; line-height: {THUMB_PX}px; }}
.err {{ color: {WRONG}; font-size: 12px; }}
"""


@dataclass
class Section:
    """One heading of the sheet: these answers, their hits' ids resolved under gallery_root."""
    title: str
    blurb: str
    answers: list[Answer]
    gallery_root: Path
    k: int


def thumbnail(path: str, cache: dict, size: int = THUMB_PX) -> str | None:
    """A small base64 JPEG data URI of an image (cached per path); None when unreadable."""
    if path in cache:
        return cache[path]
    from PIL import Image, ImageOps

    uri = None
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:  # noqa: BLE001 - a missing thumbnail must not fail the report
        uri = None
    cache[path] = uri
    return uri


def _cell(uri: str | None, border: str, caption: str, title: str) -> str:
    img = (f'<img src="{uri}" alt="{html.escape(title)}" title="{html.escape(title)}">' if uri
           else '<div class="missing">no image</div>')
    return f'<div class="cell" style="border-color:{border}">{img}<div class="cap">{caption}</div></div>'


def _rows(section: Section, names: dict[int, str], cache: dict, short: Callable[[str], str]) -> str:
    out = []
    for a in section.answers:
        qname = names.get(a.label, str(a.label))
        cells = [_cell(thumbnail(a.path, cache), QUERY, f"<b>query</b><br>{html.escape(qname)}", short(a.path))]
        if a.error:
            cells.append(f'<div class="err">{html.escape(a.error)}</div>')
        for rank, h in enumerate(a.hits[:section.k], 1):
            lab = hit_label(h)
            name = h.metadata.get("class") or names.get(lab, str(lab))
            p = os.path.normpath(section.gallery_root / h.id)
            cap = f"#{rank} d={h.distance}<br>{html.escape(name)}"
            cells.append(_cell(thumbnail(p, cache), RIGHT if lab == a.label else WRONG, cap, short(p)))
        out.append(f'<div class="row">{"".join(cells)}</div>')
    return "\n".join(out)


def _headline(summary: dict) -> str:
    r, lat, shop = summary["retrieval"], summary["retrieval"]["latency_ms"], summary.get("snap_to_shop") or {}
    return (f"<p>{html.escape(summary['model'])}: mAP@10 <b>{r['mAP@10']:.4f}</b> over {r['queries']} served queries, "
            f"latency p50 {lat['p50']} ms / p90 {lat['p90']} ms / p99 {lat['p99']} ms "
            f"(concurrency {lat['concurrency']}, {lat['throughput_qps']} queries/s)"
            + (f"; snap-to-shop top-1 <b>{shop['top1']:.4f}</b>, top-5 <b>{shop['top5']:.4f}</b>" if shop else "")
            + ". Borders: blue query, green right class, red wrong class.</p>")


def write_html(path: Path, summary: dict, sections: list[Section], names: dict[int, str],
               short: Callable[[str], str]) -> None:
    """Write the sheet: the summary's headline figures, then each section's rows."""
    cache: dict = {}
    body = []
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2><p>{html.escape(s.blurb)}</p>")
        body.append(_rows(s, names, cache, short))
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hashret demo</title>
<style>
{STYLE}</style></head><body>
<h1>hashret demo: snap to shop</h1>
{_headline(summary)}
{"".join(body)}
</body></html>
"""
    from hashret.fsutil import atomic_write

    atomic_write(path, lambda f: f.write(doc), mode="w")

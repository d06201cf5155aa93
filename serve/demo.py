"""`hashret demo`: the whole job end to end on the Grocery data.

train (hash head on cached backbone features) -> export (ONNX, INT8) -> index build (database
split, and the 81 iconic catalogue images) -> serve on 127.0.0.1 (in-process BackgroundServer on
a free port) -> query it over gRPC with the test photos -> mAP@10 from the served results, latency
percentiles, example hits, an HTML contact sheet, and the snap-to-shop view (photos against the
catalogue: top-1 / top-5 accuracy). Every stage runs through its own public `run(args)`; this
module only chains them, queries, and reports.

Outputs live in --workdir: run/, export/, gallery/, gallery-iconic/, summary.json, queries.jsonl,
demo.html and steps.json (what each finished step was made from: a re-run reuses a step whose
inputs and options are unchanged and whose outputs exist; --fresh redoes everything).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hashret.codes import check_bits
from hashret.errors import BadInput, HashretError, MissingArtifact

GROCERY_REPO = "https://github.com/marcusklasson/GroceryStoreDataset"
GROCERY_ZIP = GROCERY_REPO + "/archive/refs/heads/master.zip"
URL_ENV = "HASHRET_GROCERY_URL"  # override the archive address (mirrors, tests)
NO_DOWNLOAD_ENV = "HASHRET_NO_DOWNLOAD"  # 1: never try the network
STATE = "steps.json"
K_RETRIEVAL = 10
K_SHOP = 5


def add_args(p: argparse.ArgumentParser) -> None:
    from hashret.models import BACKBONES
    from serve.cli import BACKENDS
    from train.losses import LOSSES

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "The whole job end to end on the Grocery data: train, export, index, serve, query over gRPC,\n"
        "report mAP@10 / latency / snap-to-shop accuracy and write an HTML contact sheet."
    )
    p.epilog = (
        "examples:\n"
        "  hashret demo                                  # everything, defaults (long on a small CPU)\n"
        "  hashret demo --limit 60 --epochs 5 --queries 60 --workdir /tmp/quick   # a quick look\n\n"
        "Data: --data, else $HASHRET_DATA, else ../shared/datasets/grocery beside the checkout, else\n"
        f"WORKDIR/data/grocery; when none holds the dataset it is downloaded from {GROCERY_REPO}\n"
        f"(set {NO_DOWNLOAD_ENV}=1 to never touch the network).\n"
        "Re-running reuses every finished step whose options are unchanged; --fresh redoes them all\n"
        "(the backbone feature cache, $HASHRET_CACHE or ~/.cache/hashret, is always reused)."
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="GroceryStoreDataset folder (default: $HASHRET_DATA, else ../shared/datasets/grocery)")
    g.add_argument("--workdir", default="hashret-demo", metavar="DIR",
                   help="where every artifact and report goes (default: ./hashret-demo)")
    g.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N images per split, spread evenly over the classes (quick trials) (default: all)")
    g.add_argument("--download-timeout", type=float, default=10.0, metavar="S",
                   help="network timeout in seconds when the dataset has to be downloaded (default: 10)")
    g = p.add_argument_group("training and export")
    g.add_argument("--backbone", default="efficientnet-lite0", choices=BACKBONES.names(),
                   help="(default: efficientnet-lite0)")
    g.add_argument("--method", default="dch", choices=LOSSES.names(), help="(default: dch)")
    g.add_argument("--bits", type=int, default=64, help="code length, a multiple of 8 (default: 64)")
    g.add_argument("--epochs", type=int, default=60, help="head training epochs (default: 60)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")
    g.add_argument("--formats", default="onnx,onnx-int8", metavar="LIST",
                   help="export formats, see `hashret export --help` (default: onnx,onnx-int8)")
    g.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"),
                   help="torch.onnx exporter, passed to `hashret export` (legacy is faster) (default: auto)")
    g.add_argument("--parity", type=int, default=100, metavar="N",
                   help="query images in the export's parity table (database 3N); 0 skips it (default: 100)")
    g = p.add_argument_group("serving and queries")
    g.add_argument("--backend", default="ort", choices=BACKENDS, help="engine the server runs (default: ort)")
    g.add_argument("--queries", type=int, default=None, metavar="N",
                   help="test photos sent to the server, spread evenly over the classes (default: all 2,485)")
    g.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="Search calls in flight at once; latency is measured per call (default: 4)")
    g.add_argument("--sheet", type=int, default=40, metavar="N",
                   help="queries shown in demo.html, spread evenly; 0 shows all (default: 40)")
    g.add_argument("--examples", type=int, default=3, metavar="N", help="example hits printed (default: 3)")


# ----------------------------------------------------------------------------- progress
class Steps:
    """Numbered step lines with elapsed times, and steps.json: what each finished step was made of."""

    def __init__(self, workdir: Path, total: int, fresh: bool):
        self.workdir, self.total, self.n = workdir, total, 0
        self.path = workdir / STATE
        self.state: dict = {}
        if not fresh and self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.state = {}
        self.timings: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    def begin(self, name: str, what: str) -> float:
        self.n += 1
        print(f"[{self.n}/{self.total}] {name}: {what}", flush=True)
        return time.perf_counter()

    def end(self, name: str, t: float, reused: bool = False, note: str = "") -> None:
        dt = time.perf_counter() - t
        self.timings[name] = {"seconds": round(dt, 2), "reused": reused}
        tail = f" ({note})" if note else ""
        print(f"      {name} {'reused' if reused else 'done'} in {dt:.1f} s{tail}", flush=True)

    def reusable(self, name: str, params: dict, outputs: list[Path]) -> bool:
        return self.state.get(name, {}).get("params") == params and all(o.exists() for o in outputs)

    def record(self, name: str, params: dict) -> None:
        from hashret.fsutil import write_json_atomic

        self.state[name] = {"params": params, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json_atomic(self.path, self.state)

    def forget(self, name: str) -> None:
        if self.state.pop(name, None) is not None:
            from hashret.fsutil import write_json_atomic

            write_json_atomic(self.path, self.state)


def _stage_args(module, argv: list[str]) -> argparse.Namespace:
    """Parse argv with the stage's own parser, exactly as `hashret STAGE argv` would."""
    p = argparse.ArgumentParser(prog=f"hashret {module.__name__}")
    module.add_args(p)
    ns = p.parse_args([str(a) for a in argv])
    ns.verbose = False
    return ns


def _run_stage(module, argv: list[str]) -> None:
    rc = int(module.run(_stage_args(module, argv)) or 0)
    if rc:
        raise HashretError(f"{module.__name__} {' '.join(map(str, argv))} | exited with {rc}")


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------- data
def _is_grocery(root: str | os.PathLike | None) -> bool:
    if not root:
        return False
    r = Path(root)
    return (r / "dataset" / "train.txt").is_file() or (r / "train.txt").is_file()


def instructions(looked: list[str], why: str) -> str:
    where = ", ".join(looked) or "nowhere"
    return (
        f"Grocery data | not found (looked in {where}) and {why}: get it with\n"
        f"    git clone {GROCERY_REPO}.git\n"
        f"  (or download and unzip {GROCERY_ZIP}), then run\n"
        "    hashret demo --data PATH/GroceryStoreDataset\n"
        "  or set HASHRET_DATA=PATH/GroceryStoreDataset, or place it at ../shared/datasets/grocery "
        "beside the checkout"
    )


def resolve_data(args, workdir: Path) -> tuple[Path, str]:
    """A folder holding GroceryStoreDataset, and how it was found; downloads it when absent."""
    from hashret.datasets import default_data_root

    given = args.data or os.environ.get("HASHRET_DATA") or None
    fallback = workdir / "data" / "grocery"
    candidates = [given] if given else [default_data_root(), str(fallback)]
    looked = [str(c) for c in candidates if c]
    for c in candidates:
        if _is_grocery(c):
            return Path(c), "found"
    target = Path(given) if given else fallback
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MissingArtifact(instructions(
            looked, f"{target} is not empty, so nothing was downloaded into it (it needs dataset/train.txt)"))
    if os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        raise MissingArtifact(instructions(looked, f"downloading is disabled ({NO_DOWNLOAD_ENV} is set)"))
    download_grocery(target, timeout=args.download_timeout, looked=looked)
    return target, "downloaded"


def download_grocery(target: Path, timeout: float = 10.0, looked: list[str] | None = None) -> Path:
    """Fetch the GroceryStoreDataset zip archive and unpack it so that target/dataset/train.txt exists."""
    url = os.environ.get(URL_ENV) or GROCERY_ZIP
    looked = looked or [str(target)]
    print(f"Grocery data not found: downloading GroceryStoreDataset from {url} into {target} "
          f"(set {NO_DOWNLOAD_ENV}=1 to skip)", flush=True)
    part = target / ".download.zip.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            target.mkdir(parents=True, exist_ok=True)
            out = open(part, "wb")
            size = int(resp.headers.get("Content-Length") or 0)
            got, shown, t0 = 0, time.monotonic(), time.monotonic()
            with out:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    if time.monotonic() - shown > 5:
                        shown = time.monotonic()
                        of = f" of {size / 1e6:.0f}" if size else ""
                        print(f"  {got / 1e6:.0f}{of} MB ({got / 1e6 / max(1e-9, shown - t0):.1f} MB/s)", flush=True)
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise MissingArtifact(instructions(looked, f"the download from {url} failed ({reason}); offline?")) from None
    staging = target / ".unpacking"
    _clear(staging)
    try:
        with zipfile.ZipFile(part) as z:
            z.extractall(staging)
    except zipfile.BadZipFile:
        raise MissingArtifact(instructions(looked, f"{url} did not return a zip archive")) from None
    finally:
        part.unlink(missing_ok=True)
    found = next((p.parent for p in sorted(staging.rglob("train.txt")) if p.parent.name == "dataset"), None)
    if found is None:
        _clear(staging)
        raise MissingArtifact(instructions(looked, f"the archive from {url} holds no dataset/train.txt"))
    for item in found.parent.iterdir():
        os.replace(item, target / item.name)
    _clear(staging)
    print(f"  unpacked into {target}", flush=True)
    return target


def _spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (it is sorted by class, so every class is represented)."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def write_subset(real_root: Path, out: Path, limit: int) -> Path:
    """A GroceryStoreDataset-shaped folder with at most `limit` images per split (absolute paths)."""
    from hashret.datasets import grocery_dataset_dir

    ds = grocery_dataset_dir(real_root)
    dst = out / "dataset"
    dst.mkdir(parents=True, exist_ok=True)

    def lines(name):
        f = ds / f"{name}.txt"
        return [ln for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []

    def absolute(ln):
        rel, rest = ln.split(",", 1)
        return f"{(ds / rel.strip()).resolve()},{rest}"

    (dst / "train.txt").write_text("".join(absolute(ln) + "\n" for ln in _spread(lines("train") + lines("val"), limit)))
    (dst / "val.txt").write_text("")
    (dst / "test.txt").write_text("".join(absolute(ln) + "\n" for ln in _spread(lines("test"), limit)))
    shutil.copyfile(ds / "classes.csv", dst / "classes.csv")
    return out


# ----------------------------------------------------------------------------- querying
@dataclass
class Answer:
    path: str
    label: int
    hits: list = field(default_factory=list)  # serve.client.Hit
    ms: float = float("nan")
    error: str | None = None


def query_server(addr: str, queries, k: int, concurrency: int, what: str) -> tuple[list[Answer], float]:
    """Search each query image (one Search call each, `concurrency` in flight); per-call latency."""
    import grpc

    from serve.client import RetrievalClient

    answers = [Answer(s.path, int(s.label)) for s in queries]
    done = [0]
    t_start = time.perf_counter()
    last = [t_start]

    with RetrievalClient(addr, timeout=120.0) as client:
        def one(a: Answer) -> None:
            try:
                data = Path(a.path).read_bytes()
            except OSError as e:
                a.error = f"cannot read ({e.strerror})"
                return
            for attempt in range(5):
                t = time.perf_counter()
                try:
                    a.hits = client.search(data, k=k)
                    a.ms = (time.perf_counter() - t) * 1e3
                    a.error = None
                    break
                except grpc.RpcError as e:
                    a.error = f"{e.code().name}: {e.details()}"
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                    time.sleep(0.05 * 2 ** attempt)
            done[0] += 1
            now = time.perf_counter()
            if now - last[0] > 15:
                last[0] = now
                print(f"      {what}: {done[0]}/{len(answers)} queries", flush=True)

        with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="hashret-demo-query") as pool:
            list(pool.map(one, answers))
    return answers, time.perf_counter() - t_start


def _hit_label(h) -> int | None:
    try:
        return int(h.metadata.get("label"))
    except (TypeError, ValueError):
        return None


def average_precision_at_k(rel: list[bool]) -> float:
    """AP@k of a ranked relevance list, the convention of hashret.metrics: (1/R_k) sum P(i) rel(i),
    R_k = relevant items in the top k; 0 when none is relevant."""
    hits, s = 0, 0.0
    for i, r in enumerate(rel, 1):
        if r:
            hits += 1
            s += hits / i
    return s / hits if hits else 0.0


def retrieval_metrics(answers: list[Answer], k: int = K_RETRIEVAL) -> dict:
    ok = [a for a in answers if a.error is None]
    aps, p_at_k, top1 = [], [], []
    for a in ok:
        rel = [_hit_label(h) == a.label for h in a.hits[:k]]
        aps.append(average_precision_at_k(rel))
        p_at_k.append(sum(rel) / k)
        top1.append(bool(rel[:1] and rel[0]))
    mean = (lambda xs: float(np.mean(xs)) if xs else float("nan"))
    return {"queries": len(answers), "failed": len(answers) - len(ok), f"mAP@{k}": mean(aps),
            f"precision@{k}": mean(p_at_k), "top1": mean(top1)}


def accuracy_metrics(answers: list[Answer]) -> dict:
    ok = [a for a in answers if a.error is None]
    t1 = [bool(a.hits) and _hit_label(a.hits[0]) == a.label for a in ok]
    t5 = [any(_hit_label(h) == a.label for h in a.hits[:K_SHOP]) for a in ok]
    mean = (lambda xs: float(np.mean(xs)) if xs else float("nan"))
    return {"queries": len(answers), "failed": len(answers) - len(ok), "top1": mean(t1), "top5": mean(t5)}


def latency_stats(answers: list[Answer], wall_s: float, concurrency: int) -> dict:
    ms = np.array([a.ms for a in answers if a.error is None], dtype=float)
    if not len(ms):
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None,
                "throughput_qps": 0.0, "concurrency": concurrency}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2),
            "mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2),
            "throughput_qps": round(len(ms) / max(wall_s, 1e-9), 2), "concurrency": concurrency}


# ----------------------------------------------------------------------------- reports
class Shorten:
    """Paths for display: relative to the real dataset folder when inside it."""

    def __init__(self, root: Path):
        self.root = os.path.normpath(str(root))

    def __call__(self, path: str | os.PathLike) -> str:
        p = os.path.normpath(str(path))
        return os.path.relpath(p, self.root) if p.startswith(self.root + os.sep) else p


def _thumb(path: str, cache: dict, size: int = 96) -> str | None:
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


def _rows(answers: list[Answer], gallery_root: Path, names: dict[int, str], k: int, cache: dict,
          short: Shorten) -> str:
    out = []
    for a in answers:
        qname = names.get(a.label, str(a.label))
        cells = [_cell(_thumb(a.path, cache), "#3573d9", f"<b>query</b><br>{html.escape(qname)}", short(a.path))]
        if a.error:
            cells.append(f'<div class="err">{html.escape(a.error)}</div>')
        for rank, h in enumerate(a.hits[:k], 1):
            lab = _hit_label(h)
            right = lab == a.label
            name = h.metadata.get("class") or names.get(lab, str(lab))
            p = os.path.normpath(gallery_root / h.id)
            cap = f"#{rank} d={h.distance}<br>{html.escape(name)}"
            cells.append(_cell(_thumb(p, cache), "#1a9641" if right else "#d7191c", cap, short(p)))
        out.append(f'<div class="row">{"".join(cells)}</div>')
    return "\n".join(out)


def write_html(path: Path, summary: dict, sections: list[tuple[str, str, list[Answer], Path, int]],
               names: dict[int, str], short: Shorten) -> None:
    cache: dict = {}
    r, lat, shop = summary["retrieval"], summary["retrieval"]["latency_ms"], summary.get("snap_to_shop") or {}
    head = (f"<p>{html.escape(summary['model'])}: mAP@10 <b>{r['mAP@10']:.4f}</b> over {r['queries']} served queries, "
            f"latency p50 {lat['p50']} ms / p90 {lat['p90']} ms / p99 {lat['p99']} ms "
            f"(concurrency {lat['concurrency']}, {lat['throughput_qps']} queries/s)"
            + (f"; snap-to-shop top-1 <b>{shop['top1']:.4f}</b>, top-5 <b>{shop['top5']:.4f}</b>" if shop else "")
            + ". Borders: blue query, green right class, red wrong class.</p>")
    body = []
    for title, blurb, answers, root, k in sections:
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(blurb)}</p>")
        body.append(_rows(answers, root, names, k, cache, short))
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hashret demo</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.row {{ display: flex; gap: 6px; margin: 6px 0; align-items: flex-start; }}
.cell {{ border: 4px solid #ccc; width: 96px; text-align: center; font-size: 11px; }}
.cell img {{ display: block; width: 96px; height: 96px; object-fit: cover; }}
.cap {{ padding: 2px; overflow-wrap: anywhere; }}
.missing {{ width: 96px; height: 96px; background: #eee; line-height: 96px; }}
.err {{ color: #d7191c; font-size: 12px; }}
</style></head><body>
<h1>hashret demo: snap to shop</h1>
{head}
{"".join(body)}
</body></html>
"""
    from hashret.fsutil import atomic_write

    atomic_write(path, lambda f: f.write(doc), mode="w")


def _fmt_hit(h, names, path: str) -> str:
    lab = _hit_label(h)
    return f"{path}  d={h.distance}  {h.metadata.get('class') or names.get(lab, lab)}"


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    from hashret.datasets import grocery_class_names, grocery_dataset_dir, read_dataset
    from hashret.fsutil import write_json_atomic
    from serve import index_cli
    from serve.server import BackgroundServer, ServeConfig
    from export import cli as export_cli
    from train import train as train_mod

    for name in ("limit", "queries"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BadInput(f"--{name} {v} | must be at least 1 (leave it out for all)")
    if args.epochs < 1:
        raise BadInput(f"--epochs {args.epochs} | must be at least 1")
    if args.concurrency < 1:
        raise BadInput(f"--concurrency {args.concurrency} | must be at least 1")
    check_bits(args.bits, "--bits")

    t_all = time.perf_counter()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are about CPU flags
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    steps = Steps(workdir, total=8, fresh=args.fresh)
    quiet = not sys.stderr.isatty()

    # 1. data
    t = steps.begin("data", "locating the Grocery dataset")
    real_root, how = resolve_data(args, workdir)
    real_root = real_root.resolve()
    data_root = real_root
    if args.limit:
        data_root = write_subset(real_root, workdir / "subset", args.limit)
    splits = read_dataset(data_root, "grocery")
    ds_dir = grocery_dataset_dir(data_root)
    real_ds = grocery_dataset_dir(real_root)
    names = grocery_class_names(real_ds)
    short = Shorten(real_ds)
    queries = _spread(splits.query, args.queries)
    steps.end("data", t, note=f"{how} {real_root}: {len(splits.train)} train/database, {len(splits.query)} test photos"
              + (f" (--limit {args.limit})" if args.limit else "") + f"; {len(queries)} queries")

    fingerprint = splits.fingerprint()
    run_dir, exp_dir = workdir / "run", workdir / "export"
    gal_dir, icon_dir = workdir / "gallery", workdir / "gallery-iconic"
    if args.fresh:
        for d in (run_dir, exp_dir, gal_dir, icon_dir):
            _clear(d)

    # 2. train
    train_p = {"data": fingerprint, "backbone": args.backbone, "method": args.method, "bits": args.bits,
               "epochs": args.epochs, "seed": args.seed}
    t = steps.begin("train", f"{args.method} {args.bits} bits on {args.backbone} features, {args.epochs} epochs")
    if steps.reusable("train", train_p, [run_dir / "manifest.json", run_dir / "model.pt"]):
        steps.end("train", t, reused=True, note=str(run_dir))
    else:
        steps.forget("train")
        _clear(run_dir)
        _run_stage(train_mod, ["--data", data_root, "--format", "grocery", "--backbone", args.backbone,
                               "--method", args.method, "--bits", args.bits, "--epochs", args.epochs,
                               "--seed", args.seed, "--out", run_dir] + (["--no-progress"] if quiet else []))
        steps.record("train", train_p)
        steps.end("train", t, note=str(run_dir))
    run_metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}

    # 3. export
    n_train = len(splits.train)
    calib = min(256, n_train)
    golden = min(256, n_train + len(splits.query))
    export_p = {"train": train_p, "formats": args.formats, "exporter": args.exporter, "calib": calib,
                "golden": golden, "parity": args.parity}
    t = steps.begin("export", f"{args.formats} (+ golden set{', parity table' if args.parity else ''})")
    if steps.reusable("export", export_p, [exp_dir / "manifest.json", exp_dir / "model.onnx"]):
        steps.end("export", t, reused=True, note=str(exp_dir))
    else:
        steps.forget("export")
        _clear(exp_dir)
        argv = [run_dir, "--out", exp_dir, "--formats", args.formats, "--data", data_root, "--format", "grocery",
                "--calib", calib, "--golden", golden, "--exporter", args.exporter]
        if args.parity:
            argv += ["--parity-queries", args.parity, "--parity-database", 3 * args.parity, "--latency-runs", 10]
        else:
            argv += ["--no-parity"]
        _run_stage(export_cli, argv)
        steps.record("export", export_p)
        steps.end("export", t, note=str(exp_dir))

    # 4./5. galleries
    for name, out, extra, root, what in (
        ("index", gal_dir, ["--split", "database"], data_root, "the database split"),
        ("index-iconic", icon_dir, ["--iconic"], real_root, "the 81 iconic catalogue images"),
    ):
        params = {"export": export_p, "args": extra, "data": fingerprint if root == data_root else str(root)}
        t = steps.begin(name, f"gallery of {what}")
        if steps.reusable(name, params, [out]):  # index build is atomic: present means complete
            steps.end(name, t, reused=True, note=str(out))
            continue
        steps.forget(name)
        _clear(out)
        _run_stage(index_cli, ["build", exp_dir, "--data", root, "--format", "grocery", *extra, "--out", out,
                               "--backend", "ort"] + (["--no-progress"] if quiet else []))
        steps.record(name, params)
        steps.end(name, t, note=str(out))

    def serve_and_query(gallery: Path, k: int, what: str):
        cfg = ServeConfig(model=exp_dir, gallery=gallery, host="127.0.0.1", port=0, backend=args.backend, grace_s=5.0)
        with BackgroundServer(cfg) as srv:
            print(f"      serving {gallery.name} on {srv.address} ({args.backend})", flush=True)
            answers, wall = query_server(srv.address, queries, k, args.concurrency, what)
            print(f"      stopping the server on {srv.address} (graceful)", flush=True)
        return answers, wall

    # 6. serve + retrieval
    t = steps.begin("serve+query", f"{len(queries)} test photos against the database gallery over gRPC "
                                   f"(concurrency {args.concurrency})")
    answers, wall = serve_and_query(gal_dir, K_RETRIEVAL, "retrieval")
    retrieval = retrieval_metrics(answers)
    retrieval["latency_ms"] = latency_stats(answers, wall, args.concurrency)
    retrieval["wall_s"] = round(wall, 2)
    steps.end("serve+query", t, note=f"{retrieval['failed']} failed")

    # 7. snap to shop
    t = steps.begin("snap-to-shop", f"{len(queries)} test photos against the iconic catalogue over gRPC")
    shop_answers, shop_wall = serve_and_query(icon_dir, K_SHOP, "snap-to-shop")
    shop = accuracy_metrics(shop_answers)
    shop["latency_ms"] = latency_stats(shop_answers, shop_wall, args.concurrency)
    steps.end("snap-to-shop", t, note=f"{shop['failed']} failed")

    # 8. report
    t = steps.begin("report", "summary.json, queries.jsonl, demo.html")
    sheet = _spread(list(range(len(queries))), args.sheet or None)
    model = f"{args.method} {args.bits} bits, {args.backbone}, served by {args.backend}"
    summary = {
        "model": model,
        "data": {"root": str(real_root), "found": how, "limit": args.limit, "train": n_train,
                 "database": len(splits.database), "test": len(splits.query), "queries": len(queries)},
        "config": {k: getattr(args, k) for k in ("backbone", "method", "bits", "epochs", "seed", "formats",
                                                 "backend", "queries", "limit", "concurrency", "parity")},
        "retrieval": retrieval,
        "offline": {**{k: run_metrics.get(k) for k in ("mAP@10", "mAP@all", "precision@10") if k in run_metrics},
                    "source": "the training run's metrics.json: torch codes, every test photo",
                    "queries": len(splits.query)},
        "snap_to_shop": shop,
        "examples": [
            {"query": answers[i].path, "class": names.get(answers[i].label, str(answers[i].label)),
             "hits": [{"id": h.id, "path": os.path.normpath(ds_dir / h.id), "distance": h.distance,
                       "class": h.metadata.get("class", "")} for h in answers[i].hits[:K_SHOP]]}
            for i in sheet[: max(0, args.examples)]
        ],
        "steps": steps.timings,
        "files": {"html": str(workdir / "demo.html"), "queries": str(workdir / "queries.jsonl"),
                  "run": str(run_dir), "export": str(exp_dir), "gallery": str(gal_dir),
                  "gallery_iconic": str(icon_dir)},
    }
    with open(workdir / "queries.jsonl", "w") as f:
        for a, s in zip(answers, shop_answers):
            f.write(json.dumps({
                "query": a.path, "label": a.label, "error": a.error, "ms": round(a.ms, 3),
                "hits": [[h.id, h.distance, _hit_label(h)] for h in a.hits],
                "shop_hits": [[h.id, h.distance, _hit_label(h)] for h in s.hits], "shop_error": s.error,
            }) + "\n")
    write_html(workdir / "demo.html", summary, [
        ("Retrieval: test photo -> database (top 5)",
         f"{len(sheet)} of {len(queries)} served queries; ids are gallery items, d the Hamming distance.",
         [answers[i] for i in sheet], ds_dir, K_SHOP),
        ("Snap to shop: test photo -> iconic catalogue image (top 5)",
         "The same photos searched against the 81 catalogue images.",
         [shop_answers[i] for i in sheet], grocery_dataset_dir(real_root), K_SHOP),
    ], names, short)
    steps.end("report", t)
    summary["steps"] = steps.timings
    summary["total_s"] = round(time.perf_counter() - t_all, 2)
    write_json_atomic(workdir / "summary.json", summary)
    for f in ("summary.json", "demo.html", "queries.jsonl", STATE):
        (workdir / f).chmod(0o644)  # reports are for sharing (atomic writes create 0600 files)

    # the printout
    lat = retrieval["latency_ms"]
    print()
    print(f"model      {model}")
    print(f"retrieval  mAP@10 {retrieval['mAP@10']:.4f}  precision@10 {retrieval['precision@10']:.4f}  "
          f"top-1 {retrieval['top1']:.4f}  ({retrieval['queries']} served queries vs {len(splits.database)} "
          f"database images, {retrieval['failed']} failed)"
          + (f"; offline torch mAP@10 {run_metrics['mAP@10']:.4f} over all {len(splits.query)} test photos"
             if "mAP@10" in run_metrics else ""))
    print(f"latency    per query p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
          f"({lat['throughput_qps']} queries/s at concurrency {lat['concurrency']})")
    print(f"snap2shop  top-1 {shop['top1']:.4f}  top-5 {shop['top5']:.4f}  (vs the 81 iconic catalogue images)")
    for ex, i in zip(summary["examples"], sheet):
        print(f"example    {short(ex['query'])} ({ex['class']}) -> top-{K_SHOP}:")
        for h in answers[i].hits[:K_SHOP]:
            print(f"             {_fmt_hit(h, names, short(ds_dir / h.id))}")
    print("steps      " + ", ".join(f"{k} {v['seconds']:.1f}s{' (reused)' if v['reused'] else ''}"
                                   for k, v in steps.timings.items()) + f"; total {summary['total_s']:.0f}s")
    print(f"wrote      {workdir / 'summary.json'}, {workdir / 'demo.html'}")
    failed = retrieval["failed"] + shop["failed"]
    if failed:
        print(f"error: {failed} queries failed (see {workdir / 'queries.jsonl'})", file=sys.stderr)
        return 1
    return 0

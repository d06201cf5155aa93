"""The demo's reports: summary.json, queries.jsonl and the figures printed at the end."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from demo.queries import K_SHOP, Answer, hit_label


class Shorten:
    """Paths for display: relative to the real dataset folder when inside it."""

    def __init__(self, root: Path):
        self.root = os.path.normpath(str(root))

    def __call__(self, path: str | os.PathLike) -> str:
        p = os.path.normpath(str(path))
        return os.path.relpath(p, self.root) if p.startswith(self.root + os.sep) else p


def examples(answers: list[Answer], picked: list[int], names: dict[int, str], ds_dir: Path) -> list[dict]:
    """The picked queries with their first K_SHOP hits, for summary.json."""
    return [
        {"query": answers[i].path, "class": names.get(answers[i].label, str(answers[i].label)),
         "hits": [{"id": h.id, "path": os.path.normpath(ds_dir / h.id), "distance": h.distance,
                   "class": h.metadata.get("class", "")} for h in answers[i].hits[:K_SHOP]]}
        for i in picked
    ]


def write_queries(path: Path, answers: list[Answer], shop_answers: list[Answer]) -> None:
    """One JSON line per query: its retrieval hits and its snap-to-shop hits as [id, distance, label]."""
    with open(path, "w") as f:
        f.writelines(json.dumps({
            "query": a.path, "label": a.label, "error": a.error, "ms": round(a.ms, 3),
            "hits": [[h.id, h.distance, hit_label(h)] for h in a.hits],
            "shop_hits": [[h.id, h.distance, hit_label(h)] for h in s.hits], "shop_error": s.error,
        }) + "\n" for a, s in zip(answers, shop_answers))


def _fmt_hit(h, names: dict[int, str], path: str) -> str:
    lab = hit_label(h)
    score = getattr(h, "score", None)
    cos = f"  cos={score:.3f}" if score is not None else ""
    return f"{path}  d={h.distance}{cos}  {h.metadata.get('class') or names.get(lab, lab)}"


def print_results(summary: dict, answers: list[Answer], picked: list[int], names: dict[int, str],
                  ds_dir: Path, short: Shorten, n_database: int, n_test: int, workdir: Path) -> None:
    """The closing printout: model, served retrieval against the offline figure, latency,
    snap-to-shop accuracy, example hits, step times and where the reports went."""
    retrieval, shop, offline = summary["retrieval"], summary["snap_to_shop"], summary["offline"]
    lat = retrieval["latency_ms"]
    print()
    print(f"model      {summary['model']}")
    print(f"retrieval  mAP@10 {retrieval['mAP@10']:.4f}  precision@10 {retrieval['precision@10']:.4f}  "
          f"top-1 {retrieval['top1']:.4f}  ({retrieval['queries']} served queries vs {n_database} "
          f"database images, {retrieval['failed']} failed)"
          + (f"; offline torch mAP@10 {offline['mAP@10']:.4f} over all {n_test} test photos"
             if "mAP@10" in offline else ""))
    same = retrieval.get("offline_same_engine") or {}
    binary = retrieval.get("binary") or {}
    if binary and "mAP@10(rerank)" in same:
        agree = (abs(same["mAP@10(rerank)"] - retrieval["mAP@10"]) < 1e-9
                 and abs(same["mAP@10"] - binary["mAP@10"]) < 1e-9)
        print(f"re-rank    served mAP@10 {binary['mAP@10']:.4f} Hamming order -> {retrieval['mAP@10']:.4f} re-ranked "
              f"by cosine; offline (same engine, gallery's stored codes and activations) {same['mAP@10']:.4f} -> "
              f"{same['mAP@10(rerank)']:.4f}: served {'equals' if agree else 'DIFFERS FROM'} offline"
              + (f"; torch run {offline['mAP@10']:.4f} -> {offline['mAP@10(rerank)']:.4f}"
                 if "mAP@10(rerank)" in offline else ""))
    print(f"latency    per query p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  "
          f"({lat['throughput_qps']} queries/s at concurrency {lat['concurrency']})")
    print(f"snap2shop  top-1 {shop['top1']:.4f}  top-5 {shop['top5']:.4f}  (vs the 81 iconic catalogue images)")
    for ex, i in zip(summary["examples"], picked):
        print(f"example    {short(ex['query'])} ({ex['class']}) -> top-{K_SHOP}:")
        for h in answers[i].hits[:K_SHOP]:
            print(f"             {_fmt_hit(h, names, short(ds_dir / h.id))}")
    print("steps      " + ", ".join(f"{k} {v['seconds']:.1f}s{' (reused)' if v['reused'] else ''}"
                                   for k, v in summary["steps"].items()) + f"; total {summary['total_s']:.0f}s")
    print(f"wrote      {workdir / 'summary.json'}, {workdir / 'demo.html'}")
    failed = retrieval["failed"] + shop["failed"]
    if failed:
        print(f"error: {failed} queries failed (see {workdir / 'queries.jsonl'})", file=sys.stderr)

"""`python -m benchmarks.extract_bench`: first feature extraction, torch eager against the trunk engines.

Times what `hashret train` pays on a cache miss, over every image of a dataset (Grocery: 5,421), for
torch eager (train.features.extract, the reference) and each engine path (train.fast_features:
trunk export to ONNX, engine load, the 32-image check against torch, then the batched extraction
with threaded decoding), one after the other in the same process, so the machine and its load are
shared. Every engine's features are also compared with torch's on all images (per-image cosine).

    python -m benchmarks.extract_bench --data ../shared/datasets/grocery
    python -m benchmarks.extract_bench --limit 64 --out /tmp/extract.json      # a quick trial
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import machine
from benchmarks.cli import run_main, standalone_parser

# The bar: the engine's first extraction takes at most this share of torch eager's.
RATIO_BAR = 0.4


def default_out(backbone: str) -> str:
    return f"benchmarks/results/extract-{backbone.replace('efficientnet-', 'effnet-')}.json"


def add_args(p: argparse.ArgumentParser) -> None:
    from hashret.cliargs import add_data_args
    from hashret.models import BACKBONES
    from train.fast_features import CHECK_IMAGES, ENGINE_ORDER

    add_data_args(p)
    p.add_argument("--backbone", default="efficientnet-lite0", choices=BACKBONES.names(), metavar="BACKBONE",
                   help=f"backbone whose trunk is timed, one of {', '.join(BACKBONES.names())} "
                        "(default: efficientnet-lite0)")
    p.add_argument("--engines", type=machine.str_list, default=["torch", *ENGINE_ORDER],
                   help="comma-separated paths to time, in order: torch (eager, the reference; needed for the "
                        f"ratio and the cosines), openvino, ort (default: torch,{','.join(ENGINE_ORDER)})")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N images (sorted by path), for trials (default: all)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass, every path (default: 64)")
    p.add_argument("--check-images", type=int, default=CHECK_IMAGES,
                   help=f"images of the engine's check against torch before extracting (default: {CHECK_IMAGES})")
    p.add_argument("--out", default=None, metavar="FILE.json",
                   help="where to write the results JSON (default: benchmarks/results/extract-effnet-lite0.json, "
                        "named after --backbone)")
    machine.add_allow_dirty_arg(p)


def dataset_images(data, fmt: str, limit: int | None):
    """Every image of the dataset once (train, database and query), sorted by path as train does."""
    from hashret.datasets import default_data_root, read_dataset

    splits = read_dataset(data or default_data_root(), fmt)
    uniq = sorted({s.path: s for s in splits.train + splits.database + splits.query}.values(), key=lambda s: s.path)
    return uniq[:limit] if limit else uniq


def time_torch(samples, backbone, batch: int) -> tuple[dict, np.ndarray]:
    from train.features import extract, num_workers

    t0 = time.perf_counter()
    f, kept, _ = extract(samples, backbone, batch_size=batch, progress=False)
    s = time.perf_counter() - t0
    return {"engine": "torch", "images": len(kept), "seconds": round(s, 2), "img_per_s": round(len(kept) / s, 1),
            "decode_workers": num_workers()}, f


def time_engine(name: str, samples, backbone, batch: int, check_images: int) -> tuple[dict, np.ndarray | None]:
    """Export (into a fresh folder, as a first run does), load, check, extract; each step timed."""
    from train import fast_features as ff

    with tempfile.TemporaryDirectory(prefix="hashret-extract-bench-") as tmp:
        t0 = time.perf_counter()
        path = ff.export_trunk(backbone, Path(tmp) / "trunk.onnx")
        t_export = time.perf_counter() - t0
        eng = ff.open_trunk_engine(name, path, backbone)
        t_load = time.perf_counter() - t0 - t_export
        chk = ff.check_engine(eng, backbone, samples, n=check_images)
        t_check = time.perf_counter() - t0 - t_export - t_load
        run = ff.extract_with_engine(samples, backbone, eng, batch_size=batch, progress=False)
        eng.close()
        total = time.perf_counter() - t0
    return {"engine": name, "images": len(run.kept), "seconds": round(total, 2),
            "img_per_s": round(len(run.kept) / total, 1), "export_s": round(t_export, 2), "load_s": round(t_load, 2),
            "check_s": round(t_check, 2), "extract_s": run.info["seconds"], "check_images": chk.images,
            "check_min_cosine": round(chk.min_cosine, 8), "check_passed": chk.passed}, run.features


def run(args) -> int:
    import torch

    from hashret.models import build_backbone
    from train.fast_features import FEATURE_ENGINES, cosines

    bad = [e for e in args.engines if e not in FEATURE_ENGINES or e == "auto"]
    if bad:
        from hashret.errors import BadInput

        raise BadInput(f"--engines {','.join(bad)} | unknown: choose from torch, openvino, ort")
    out = args.out or default_out(args.backbone)
    machine.check_results_write(out)
    samples = dataset_images(args.data, args.format, args.limit)
    backbone = build_backbone(args.backbone)
    print(f"{len(samples)} images, {args.backbone}, batch {args.batch}: {', '.join(args.engines)}", flush=True)
    rows, feats = [], {}
    for name in args.engines:
        # the paths run one after another: a load that changed in between shows here
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        row, f = time_torch(samples, backbone, args.batch) if name == "torch" else \
            time_engine(name, samples, backbone, args.batch, args.check_images)
        rows.append({**row, "load_avg_1m_at_start": load})
        feats[name] = f
        print(f"  {name}: {row['seconds']:.1f} s ({row['img_per_s']:.1f} img/s)", flush=True)
    bars = []
    ref = next((r for r in rows if r["engine"] == "torch"), None)
    for r in rows:
        if r["engine"] == "torch" or ref is None:
            continue
        c = cosines(feats[r["engine"]], feats["torch"])
        r["all_min_cosine"] = round(float(c.min()), 8)
        r["ratio_to_torch"] = round(r["seconds"] / ref["seconds"], 3)
        met = r["ratio_to_torch"] <= RATIO_BAR and r["check_passed"]
        bars.append({"text": f"first extraction of {r['images']} images through {r['engine']} (export, check and "
                             f"extraction included) <= {RATIO_BAR}x torch eager's in the same run: {r['seconds']:.1f} "
                             f"s vs {ref['seconds']:.1f} s = {r['ratio_to_torch']:.3f}x, feature check "
                             f"{'passed' if r['check_passed'] else 'FAILED'} (min cosine {r['check_min_cosine']:.7f} "
                             f"on {r['check_images']} images, {r['all_min_cosine']:.7f} on all)", "met": met})
    machine.print_table(["engine", "images", "seconds", "img/s", "x torch", "min cosine (all)"],
                        [[r["engine"], r["images"], r["seconds"], r["img_per_s"], r.get("ratio_to_torch", "-"),
                          r.get("all_min_cosine", "-")] for r in rows])
    for b in bars:
        print(f"bar: {b['text']}: {'met' if b['met'] else 'not met'}")
    doc = {**machine.run_meta("extract", threads={"torch": torch.get_num_threads()}),
           "config": {"backbone": args.backbone, "batch": args.batch, "limit": args.limit, "data": str(args.data),
                      "engines": args.engines, "check_images": args.check_images},
           "results": rows, "bars": bars}
    print(f"wrote {machine.write_result(doc, out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(standalone_parser("python -m benchmarks.extract_bench", __doc__, add_args), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

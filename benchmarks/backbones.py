"""`python -m benchmarks.backbones`: which backbone to pick: extraction time, engine speed and mAP, side by side.

For each backbone, in one process on one machine: the first extraction of every dataset image through
`hashret train`'s feature path (fresh cache: trunk export, the check against torch, extraction), the
trunk's latency on real images through the fp32 engines at batch 1 and its throughput at larger batches
(the exported hash model adds one small matrix product to the trunk), and `hashret train`'s mAP with
the quality table's best method (default csq, 64 bits) from those features. The README's "which
backbone" paragraph is rendered from the JSON (benchmarks/report.py, block `backbones`).

    python -m benchmarks.backbones --data ../shared/datasets/grocery
    python -m benchmarks.backbones --limit 40 --seeds 0 --out /tmp/backbones.json   # a quick trial
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import machine
from benchmarks.cli import run_main, standalone_parser
from benchmarks.extract_bench import dataset_images

DEFAULT_BACKBONES = "efficientnet-lite0,efficientnet-lite1,efficientnet-lite2"
RESULT = "backbones"


def add_args(p: argparse.ArgumentParser) -> None:
    from hashret.cliargs import add_data_args
    from train.fast_features import ENGINE_ORDER

    add_data_args(p)
    p.add_argument("--backbones", type=machine.str_list, default=machine.str_list(DEFAULT_BACKBONES),
                   help=f"comma-separated backbones to compare (default: {DEFAULT_BACKBONES})")
    p.add_argument("--feature-engine", default="auto", choices=("auto", "torch", *ENGINE_ORDER),
                   help="extraction path, as hashret train --feature-engine (default: auto)")
    p.add_argument("--engines", type=machine.str_list, default=list(ENGINE_ORDER),
                   help=f"fp32 engines whose latency is measured (default: {','.join(ENGINE_ORDER)})")
    p.add_argument("--batches", type=machine.int_list, default=[1, 8, 32, 64],
                   help="batch sizes timed; 1 gives the latency, the best img/s of the others the throughput "
                        "(default: 1,8,32,64)")
    p.add_argument("--seconds", type=float, default=3.0,
                   help="time spent per engine x batch after one warm-up call (default: 3)")
    p.add_argument("--method", default=None, help="loss to train (default: hashret train's default, csq)")
    p.add_argument("--bits", type=int, default=64, help="code length trained (default: 64)")
    p.add_argument("--seeds", type=machine.int_list, default=[0],
                   help="seeds trained per backbone; mAP is their mean (default: 0)")
    p.add_argument("--limit", type=int, default=None,
                   help="trials: first N images of each split for training, and of the image list for extraction "
                        "(default: all)")
    machine.add_out_arg(p, RESULT)
    p.add_argument("--readme", default=None,
                   help="also rewrite the README's `backbones` block from the JSON (default: none; "
                        "`hashret bench report` does the same for every block)")
    p.add_argument("--from-json", action="store_true",
                   help="measure nothing: render --out into --readme and print it (default: off)")


def time_engine(eng, images: np.ndarray, batches: list[int], seconds: float) -> list[dict]:
    rows = []
    for b in batches:
        x = np.ascontiguousarray(images[np.arange(b) % len(images)])
        eng.encode(x)  # warm-up: first-call allocations and kernel choices
        ms = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(ms) < 3:
            t0 = time.perf_counter()
            eng.encode(x)
            ms.append((time.perf_counter() - t0) * 1e3)
        p = machine.percentiles(ms)
        rows.append({"batch": b, "p50_ms": p["p50_ms"], "img_per_s": round(b * 1e3 / p["p50_ms"], 1), "n": p["n"]})
    return rows


def measure(name: str, args, data, tmp: Path) -> dict:
    from hashret.cli import main as hashret
    from hashret.images import load_image
    from hashret.models import backbone_card, build_backbone
    from train import fast_features as ff
    from train.features import cached_features
    from train.train import DEFAULT_METHOD

    backbone = build_backbone(name)
    card = backbone_card(name)
    row: dict = {"backbone": name, "crop": backbone.spec.crop, "resize": backbone.spec.resize, "dim": backbone.dim,
                 "gflops": card.gflops if card else None}
    cache = tmp / name / "features"
    # the image list hashret train extracts (its --limit applies per split)
    samples = dataset_images(data, args.format, None)
    if args.limit:
        from hashret.datasets import read_dataset

        splits = read_dataset(data, args.format)
        keep = {s.path for part in (splits.train, splits.database, splits.query) for s in part[: args.limit]}
        samples = [s for s in samples if s.path in keep]
    info: dict = {}
    t0 = time.perf_counter()
    _, kept, _, _ = cached_features(samples, backbone, cache, engine=args.feature_engine, info=info, progress=False)
    row.update({"images": len(kept), "extract_s": round(time.perf_counter() - t0, 2),
                "extract_engine": info.get("engine"),
                "check_min_cosine": (info.get("check") or {}).get("min_cosine")})
    print(f"  {name}: extracted {len(kept)} images via {row['extract_engine']} in {row['extract_s']:.1f} s", flush=True)
    images = np.stack([load_image(s.path, backbone.spec) for s in samples[:max(args.batches)]])
    trunk = ff.ensure_trunk(backbone, cache)
    row["latency"] = {}
    for engine in args.engines:
        eng = ff.open_trunk_engine(engine, trunk, backbone)
        try:
            timings = time_engine(eng, images, args.batches, args.seconds)
        finally:
            eng.close()
        one = next((t for t in timings if t["batch"] == 1), None)
        best = max((t for t in timings if t["batch"] > 1), key=lambda t: t["img_per_s"], default=None)
        row["latency"][engine] = timings
        row[f"{engine}_bs1_ms"] = one["p50_ms"] if one else None
        row[f"{engine}_best_batch"] = best["batch"] if best else None
        row[f"{engine}_best_img_s"] = best["img_per_s"] if best else None
    method = args.method or DEFAULT_METHOD
    runs = []
    for seed in args.seeds:
        out = tmp / name / f"{method}{args.bits}-s{seed}"
        code = hashret(["train", "--data", str(data), "--format", args.format, "--backbone", name,
                        "--method", method, "--bits", str(args.bits), "--seed", str(seed), "--out", str(out),
                        "--cache-dir", str(cache), "--feature-engine", args.feature_engine, "--no-progress",
                        *(["--limit", str(args.limit)] if args.limit else [])])
        if code:
            from hashret.errors import CheckFailed

            raise CheckFailed(f"hashret train --backbone {name} --seed {seed} | exited {code}: see above")
        m = json.loads((out / "metrics.json").read_text())
        runs.append({"seed": seed, "mAP@all": m["mAP@all"], "mAP@10": m["mAP@10"],
                     "mAP@10(rerank)": m.get("mAP@10(rerank)")})
    row.update({"method": method, "bits": args.bits, "runs": runs,
                "mAP@all": round(statistics.fmean(r["mAP@all"] for r in runs), 4),
                "mAP@10": round(statistics.fmean(r["mAP@10"] for r in runs), 4)})
    return row


def run(args) -> int:
    if args.from_json:
        doc = load(args.out)
    else:
        import torch

        from hashret.datasets import default_data_root

        data = args.data or default_data_root()
        rows = []
        with tempfile.TemporaryDirectory(prefix="hashret-backbones-") as tmp:
            for name in args.backbones:
                rows.append(measure(name, args, data, Path(tmp)))
        doc = {**machine.run_meta(RESULT, threads={"torch": torch.get_num_threads()}),
               "config": {"data": str(data), "backbones": args.backbones, "feature_engine": args.feature_engine,
                          "engines": args.engines, "batches": args.batches, "method": rows[0]["method"],
                          "bits": args.bits, "seeds": args.seeds, "limit": args.limit},
               "results": rows}
        print(f"wrote {machine.write_result(doc, args.out)}")
    md = render_markdown(doc, Path(args.out).name)
    print(md)
    if args.readme:
        from benchmarks import report

        report.write_readme(args.readme, Path(args.out).parent)
    return 0


def load(path) -> dict:
    from hashret.errors import BadInput, MissingArtifact

    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingArtifact(f"{path} | not found: run python -m benchmarks.backbones first, or pass --out") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} | not a readable results file ({e}): re-run python -m benchmarks.backbones") from None
    if doc.get("benchmark") != RESULT or not isinstance(doc.get("results"), list):
        raise BadInput(f"{path} | not a backbones result: re-run python -m benchmarks.backbones")
    return doc


def report_table(doc: dict) -> tuple[list[str], list[list]]:
    """The comparison table (also RESULTS.md's section for this file)."""
    rows = doc["results"]
    engines = (doc.get("config") or {}).get("engines") or []
    head = ["backbone", "input px", "GFLOPs", "first extraction s", "via"]
    for e in engines:
        head += [f"{e} bs=1 ms", f"{e} best img/s (batch)"]
    method, bits = (doc.get("config") or {}).get("method", "?"), (doc.get("config") or {}).get("bits", "?")
    head += [f"{method}-{bits} mAP@all", f"{method}-{bits} mAP@10"]
    out = []
    for r in rows:
        line = [r["backbone"], r["crop"], r.get("gflops"), f"{r['extract_s']:.0f} ({r['images']} img)",
                r.get("extract_engine")]
        for e in engines:
            best = r.get(f"{e}_best_img_s")
            bs1 = r.get(f"{e}_bs1_ms")
            line += [f"{bs1:.1f}" if bs1 else "-", f"{best:.0f} ({r.get(f'{e}_best_batch')})" if best else "-"]
        line += [f"{r['mAP@all']:.4f}", f"{r['mAP@10']:.4f}"]
        out.append(line)
    return head, out


def render_markdown(doc: dict, file: str = f"{RESULT}.json") -> str:
    """The README's 'which backbone' block: the table, then which one to pick for which budget."""
    from benchmarks.report import md_table

    head, rows = report_table(doc)
    res = doc["results"]
    cfg = doc.get("config") or {}
    seeds = cfg.get("seeds") or []
    best = max(res, key=lambda r: r["mAP@all"])
    fastest = min(res, key=lambda r: r["extract_s"])
    lines = [md_table(head, rows), ""]
    text = (f"From `benchmarks/results/{file}` (`{doc.get('command', 'python -m benchmarks.backbones')}`, "
            f"{str(doc.get('date', '?'))[:10]}, {machine.describe(doc)}; mAP is the mean of seed(s) "
            f"{', '.join(map(str, seeds))}"
            + (f", first {cfg['limit']} images of each split" if cfg.get("limit") else "") + "). ")
    if best is fastest:
        text += f"**{best['backbone']}** is both the most accurate and the cheapest here: pick it."
    else:
        gain = best["mAP@all"] - fastest["mAP@all"]
        cost = best["extract_s"] / max(fastest["extract_s"], 1e-9)
        e = (cfg.get("engines") or [None])[0]
        lat = ""
        if e and best.get(f"{e}_bs1_ms") and fastest.get(f"{e}_bs1_ms"):
            lat = (f" and {best[f'{e}_bs1_ms'] / fastest[f'{e}_bs1_ms']:.1f}x its {e} latency at batch 1 "
                   f"({best[f'{e}_bs1_ms']:.1f} vs {fastest[f'{e}_bs1_ms']:.1f} ms)")
        text += (f"For the best retrieval pick **{best['backbone']}**: {gain:+.4f} mAP@all over "
                 f"{fastest['backbone']} for {cost:.1f}x the first extraction{lat}. Where encoding latency or "
                 f"CPU per image is the budget (a busy server, a small device), **{fastest['backbone']}** is the "
                 "cheapest; features are cached, so the extraction cost is paid once per image list.")
    lines.append(text)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(standalone_parser("python -m benchmarks.backbones", __doc__, add_args), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""`hashret bench parity`: the export parity table across every backend and code length.

For each model: does every backend give the same hash codes as the torch fp32 reference, and what
does that do to retrieval? Models come from one of:

* ``--exps EXP,...``  export folders (read only: nothing is written into them);
* ``--runs RUN,...``  training run folders, exported first (`hashret export RUN`) into a temp folder;
* ``--bits 16,32,64`` one training run per code length (`hashret train --bits B` on the cached
  backbone features, --epochs each), then exported, all in a temp folder.

The parity numbers themselves come from export/parity.py (`parity_rows` on each export's golden
set: bit agreement with torch, mAP@all / mAP@10 and their delta, top-10 overlap, share of
activations near 0, bs=1 latency), so this table and `hashret export`'s agree by construction.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.machine import add_out_arg, int_list, print_table, str_list, write_result
from hashret.cliargs import add_data_args, add_device_arg
from hashret.errors import BadInput, HashretError, MissingArtifact

log = logging.getLogger("hashret.bench.parity")


def _hashret(args: list[str], log_path: Path, timeout: float) -> None:
    """Run `python -m hashret ARGS` (a fresh process: the same code path a user runs)."""
    cmd = [sys.executable, "-m", "hashret", *args]
    with open(log_path, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-2500:]
        what = "timed out" if rc is None else f"exited with {rc}"
        raise HashretError(f"`hashret {shlex.join(args)}` | {what}:\n{tail}")


def train_runs(bits_list: list[int], workdir: Path, args, progress=print) -> list[dict[str, Any]]:
    out = []
    for bits in bits_list:
        run = workdir / f"run-{bits}"
        cmd = ["train", "--bits", str(bits), "--out", str(run), "--epochs", str(args.epochs),
               "--seed", str(args.seed), "--no-progress"]
        if args.method:
            cmd += ["--method", args.method]
        if args.data:
            cmd += ["--data", args.data]
        cmd += shlex.split(args.train_args)
        progress(f"train {bits} bits: hashret {shlex.join(cmd)}")
        t0 = time.perf_counter()
        _hashret(cmd, workdir / f"train-{bits}.log", args.step_timeout)
        out.append({"run": str(run), "bits": bits, "train_s": round(time.perf_counter() - t0, 1),
                    "train_command": "hashret " + shlex.join(cmd)})
    return out


def export_run(run: Path, workdir: Path, args, progress=print) -> tuple[Path, dict[str, Any]]:
    exp = workdir / f"{run.name}-export"
    cmd = ["export", str(run), "--out", str(exp), "--no-parity", "--golden", str(args.golden),
           "--calib", str(args.calib)]
    if args.formats:
        cmd += ["--formats", args.formats]
    if args.data:
        cmd += ["--data", args.data]
    cmd += shlex.split(args.export_args)
    progress(f"export {run}: hashret {shlex.join(cmd)}")
    t0 = time.perf_counter()
    _hashret(cmd, workdir / f"export-{run.name}.log", args.step_timeout)
    return exp, {"export_s": round(time.perf_counter() - t0, 1), "export_command": "hashret " + shlex.join(cmd)}


def backends_for(exp: Path, manifest: dict, wanted: list[str] | None) -> list[str]:
    """torch first, then every backend whose file this export holds (the export's own parity list)."""
    if wanted:
        return wanted if "torch" in [w.split(":")[0] for w in wanted] else ["torch", *wanted]
    from export.cli import parity_backends

    formats = list(((manifest.get("export") or {}).get("formats") or {}).keys())
    if formats:
        return parity_backends(formats)
    from hashret.engines import ENGINES, backend_spec

    files = (manifest.get("export") or {}).get("files") or {}
    return ["torch"] + [b for b in ENGINES.names() if b != "torch" and backend_spec(b).file in files]


# --split -> (queries, database) drawn from the run's dataset; None = all of them. "subset" is the
# sample `hashret export` takes for its parity.json, so the two tables describe the same images.
SPLITS: dict[str, tuple[int | None, int | None]] = {"golden": (0, 0), "subset": (500, 1000), "full": (None, None)}


def dataset_images(m: dict, split: str, data: str | None):
    """(images, labels, is_query, facts) of the run's dataset for --split subset/full, sampled
    with the seeds `export.parity.parity_report` uses."""
    import numpy as np

    from export.data import load_images, pick, run_splits
    from hashret.images import PreprocessSpec

    nq, nd = SPLITS[split]
    splits = run_splits(m, data)
    q = pick(splits.query, nq if nq is not None else len(splits.query), 0)
    qs = set(q)
    rest = [s for s in splits.database if s not in qs]
    d = pick(rest, nd if nd is not None else len(rest), 1)
    images = load_images(q + d, PreprocessSpec.from_dict(m["preprocessing"]), "parity images")
    labels = np.array([s.label for s in q + d], dtype=np.int64)
    is_query = np.array([True] * len(q) + [False] * len(d))
    return images, labels, is_query, {"split": split, "root": str(splits.root), "queries": len(q), "database": len(d)}


def parity_for_exp(exp: Path, backends: list[str] | None, device: str, latency_runs: int,
                   split: str = "golden", data: str | None = None) -> dict[str, Any]:
    """Parity rows of one export (export.parity.parity_rows) on its golden set, or on a sample
    (`subset`) or all (`full`) of its run's query/database split."""
    from export.golden import GOLDEN, load_golden
    from export.parity import json_safe, parity_rows
    from hashret.manifest import load_manifest

    m = load_manifest(exp, kind="export")
    golden_path = exp / GOLDEN
    if not golden_path.is_file():
        raise MissingArtifact(f"{golden_path} | not found: re-export with `hashret export` and --golden N > 0")
    g = load_golden(golden_path)
    bl = backends_for(exp, m, backends)
    if split == "golden":
        rows = parity_rows(exp, bl, g["images"], g["labels"], g["is_query"], reference=g["activations"],
                           device=device, latency_runs=latency_runs, progress=False)
        facts = {"split": "golden", "queries": int(g["is_query"].sum()), "database": int((~g["is_query"]).sum())}
    else:  # the torch row is the reference, computed on these images
        images, labels, is_query, facts = dataset_images(m, split, data)
        rows = parity_rows(exp, bl, images, labels, is_query, device=device, latency_runs=latency_runs,
                           progress=False)
    return json_safe({"exp": str(exp), "bits": int(m["bits"]), "method": (m.get("method") or {}).get("name"),
                      "backbone": (m.get("backbone") or {}).get("name"),
                      "golden": {"n": int(len(g["labels"])), "queries": int(g["is_query"].sum()),
                                 "reference_mAP@all": float(g["map_all"])},
                      "dataset": facts, "backends": bl, "rows": rows})


# --------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (one of)")
    g.add_argument("--exps", type=str_list, metavar="EXP,EXP", help="export folders, used as they are (default: none)")
    g.add_argument("--runs", type=str_list, metavar="RUN,RUN",
                   help="training run folders, exported into a temp folder first (default: none)")
    g.add_argument("--bits", type=int_list, metavar="B,B",
                   help="train one run per code length on the cached features, then export (default: none)")
    g = p.add_argument_group("training and export (for --bits / --runs)")
    g.add_argument("--epochs", type=int, default=20, help="training epochs per code length (default: 20)")
    g.add_argument("--method", default=None, help="training method, e.g. dch or hashnet (default: train's default)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    add_data_args(g, with_format=False)  # handed to `hashret train`, which resolves the default
    g.add_argument("--formats", default=None,
                   help="export formats (default: every format this machine can produce)")
    g.add_argument("--golden", type=int, default=256, help="golden-set images per export (default: 256)")
    g.add_argument("--calib", type=int, default=128, help="INT8 calibration images per export (default: 128)")
    g.add_argument("--train-args", default="", metavar="'ARGS'", help="extra `hashret train` flags (default: none)")
    g.add_argument("--export-args", default="", metavar="'ARGS'", help="extra `hashret export` flags (default: none)")
    g.add_argument("--workdir", default=None, metavar="DIR",
                   help="keep runs and exports here instead of a temp folder that is deleted (default: temp)")
    g.add_argument("--step-timeout", type=float, default=1800, help="seconds allowed per train/export (default: 1800)")
    g = p.add_argument_group("parity")
    g.add_argument("--backends", type=str_list, default=None, metavar="B,B",
                   help="backends to compare, name[:opt=v] as in export (default: those the export holds)")
    add_device_arg(g, default="cpu", help="device for the non-reference backends")
    g.add_argument("--latency-runs", type=int, default=10, help="timed bs=1 encodes per backend (default: 10)")
    g.add_argument("--split", choices=tuple(SPLITS), default="golden",
                   help="images compared: each export's golden set; subset = 500 queries x 1,000 database "
                        "images of the run's dataset (the sample `hashret export` takes); full = every query "
                        "and database image, read from --data or the run's dataset (default: golden)")
    add_out_arg(p, "parity")


COLUMNS = ["bits", "backend", "status", "bit agree", "mAP@all", "ΔmAP", "mAP@10", "top10 overlap", "at risk",
           "max |Δz|", "bs1 ms"]


def _f(v, fmt="{:.4f}"):
    return "-" if v is None else fmt.format(v)


def report_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    rows = []
    for model in doc.get("results", []):
        for r in model.get("rows", []):
            status = r.get("status", "")
            rows.append([model.get("bits"), r.get("backend"), status if len(status) <= 40 else status[:37] + "...",
                         _f(r.get("bit_agreement"), "{:.5f}"), _f(r.get("mAP@all")), _f(r.get("mAP_delta"), "{:+.4f}"),
                         _f(r.get("mAP@10")), _f(r.get("top10_overlap"), "{:.3f}"), _f(r.get("at_risk"), "{:.4f}"),
                         _f(r.get("max_abs_diff"), "{:.2e}"), _f(r.get("latency_ms_bs1"), "{:.2f}")])
    return COLUMNS, rows


def plot(doc: dict[str, Any], path: Path) -> bool:
    """mAP@all and bit agreement vs code length, one line per backend."""
    from benchmarks.report import pyplot, save_figure

    plt = pyplot()
    series: dict[str, list[tuple[int, float, float]]] = {}
    for model in doc.get("results", []):
        for r in model.get("rows", []):
            if r.get("status") == "ok" and r.get("mAP@all") is not None:
                series.setdefault(r["backend"], []).append((model["bits"], r["mAP@all"], r.get("bit_agreement") or 0))
    if plt is None or not series:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, pts in series.items():
        pts.sort()
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    for ax, yl, t in ((a1, "mAP@all (golden set)", "mAP vs bits"), (a2, "bit agreement with torch fp32",
                                                                   "code parity vs bits")):
        ax.set_xscale("log", base=2)
        bits = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(bits)
        ax.set_xticklabels([str(b) for b in bits])
        ax.set_xlabel("code length (bits)")
        ax.set_ylabel(yl)
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def run(args) -> int:
    given = [x for x in (args.exps, args.runs, args.bits) if x]
    if len(given) != 1:
        raise BadInput("models | pass exactly one of --exps, --runs or --bits")
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="hashret-bench-parity-")
        workdir = Path(tmp.name)
    models: list[dict[str, Any]] = []
    try:
        if args.exps:
            for e in args.exps:
                models.append({"exp": e})
        else:
            runs = train_runs(args.bits, workdir, args) if args.bits else [{"run": r} for r in args.runs]
            for r in runs:
                if not Path(r["run"]).is_dir():
                    raise MissingArtifact(f"--runs {r['run']} | not found: pass training run folders")
                exp, facts = export_run(Path(r["run"]), workdir, args)
                models.append({**r, "exp": str(exp), **facts})
        results = []
        for mdl in models:
            print(f"parity: {mdl['exp']}", flush=True)
            res = parity_for_exp(Path(mdl["exp"]), args.backends, args.device, args.latency_runs,
                                 getattr(args, "split", "golden"), args.data)
            results.append({**{k: v for k, v in mdl.items() if k != "exp"}, **res})
    finally:
        if tmp is not None:
            tmp.cleanup()
    meta = machine.run_meta("parity", threads={"engines": "library defaults"}, argv=getattr(args, "_argv", None))
    config = {"source": "exps" if args.exps else "runs" if args.runs else "bits",
              "bits": args.bits, "epochs": args.epochs if args.bits else None, "method": args.method,
              "golden": args.golden, "calib": args.calib, "formats": args.formats, "device": args.device,
              "latency_runs": args.latency_runs, "split": getattr(args, "split", "golden"), "workdir": str(workdir) if args.workdir else "temp (deleted)",
              "data": args.data or os.environ.get("HASHRET_DATA")}
    notes = ["Parity rows from export/parity.py: reference = torch fp32 activations stored in each golden.npz.",
             "bit agree = share of code bits equal to torch's; ΔmAP = mAP@all minus torch's on the golden split; "
             "at risk = share of activations with |z| < 0.05 (one small perturbation from flipping)."]
    doc = {**meta, "config": config, "results": results, "notes": notes}
    print()
    head, rows = report_table(doc)
    print_table(head, rows)
    path = write_result(doc, args.out)
    print(f"wrote {path}")
    return 0

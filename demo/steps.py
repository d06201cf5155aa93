"""The demo's steps. Each stage runs through its own public entry point, with the flags a user
would type (`hashret train ...`, `hashret export ...`, `hashret index build ...`), and the
service through serve.server's BackgroundServer; this module only chains them and keeps the
record of what each finished step was made from (see demo.ledger).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from demo.data import clear, resolve_data, spread, write_subset
from demo.ledger import STATE, Ledger
from demo.queries import (
    K_RETRIEVAL,
    K_SHOP,
    Answer,
    accuracy_scores,
    latency_stats,
    offline_scores,
    query_server,
    retrieval_scores,
)
from demo.report import Shorten, examples, write_queries
from hashret.errors import HashretError
from hashret.manifest import now_iso
from hashret.provenance import check_results_write, result_fields

if TYPE_CHECKING:
    from hashret.datasets import Sample, Splits

TOTAL_STEPS = 8


@dataclass
class Demo:
    """What every step reads: the options, the work folder and the ledger of finished steps."""
    args: argparse.Namespace
    workdir: Path
    ledger: Ledger
    quiet: bool  # no progress bars from the stages when nobody watches the terminal
    params: dict[str, dict] = field(default_factory=dict)  # each step's inputs, nested into the next one's

    @classmethod
    def start(cls, args: argparse.Namespace) -> Demo:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(args, workdir, Ledger(workdir, TOTAL_STEPS, fresh=args.fresh), quiet=not sys.stderr.isatty())

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def exp_dir(self) -> Path:
        return self.workdir / "export"

    @property
    def gal_dir(self) -> Path:
        return self.workdir / "gallery"

    @property
    def icon_dir(self) -> Path:
        return self.workdir / "gallery-iconic"

    def clear_outputs(self) -> None:
        """--fresh: no folder of an earlier run may survive a step that fails part way."""
        for d in (self.run_dir, self.exp_dir, self.gal_dir, self.icon_dir):
            clear(d)

    def progress_flag(self) -> list[str]:
        return ["--no-progress"] if self.quiet else []


@dataclass
class Data:
    """The dataset as the stages will read it (`root`: the real folder, or the --limit subset)."""
    real_root: Path
    root: Path
    how: str  # "found" or "downloaded"
    splits: Splits
    fingerprint: str  # of the splits (it stats every file, so it is taken once)
    queries: list[Sample]  # the test photos sent to the server
    names: dict[int, str]  # class id -> name
    ds_dir: Path  # root's dataset/ folder: gallery ids are relative to it
    real_ds_dir: Path
    short: Shorten


@dataclass
class Served:
    """What the service answered, and the scores of those answers."""
    answers: list[Answer]
    scores: dict


# ----------------------------------------------------------------------------- running a stage
def _stage_args(command: str, module: ModuleType, argv: list) -> argparse.Namespace:
    """Parse argv with the stage's own parser, exactly as `hashret COMMAND argv` would."""
    p = argparse.ArgumentParser(prog=f"hashret {command}")
    module.add_args(p)
    ns = p.parse_args([str(a) for a in argv])
    ns.verbose = False  # the flag `hashret` itself adds before dispatching to a stage
    return ns


def run_stage(command: str, module: ModuleType, argv: list) -> None:
    """Run one stage through its public `run(args)`; a non-zero exit stops the demo."""
    rc = int(module.run(_stage_args(command, module, argv)) or 0)
    if rc:
        raise HashretError(f"hashret {command} {' '.join(map(str, argv))} | exited with {rc}: "
                           "see its messages above, fix the cause and run the demo again (finished steps are reused)")


# ----------------------------------------------------------------------------- the steps
def locate_data(demo: Demo) -> Data:
    """Step 1: find (or download) the dataset, cut the --limit subset, pick the queries."""
    from hashret.datasets import grocery_class_names, grocery_dataset_dir, read_dataset

    args = demo.args
    t = demo.ledger.begin("data", "locating the Grocery dataset")
    real_root, how = resolve_data(args.data, demo.workdir, args.download_timeout)
    real_root = real_root.resolve()
    root = write_subset(real_root, demo.workdir / "subset", args.limit) if args.limit else real_root
    splits = read_dataset(root, "grocery")
    real_ds = grocery_dataset_dir(real_root)
    data = Data(real_root=real_root, root=root, how=how, splits=splits, fingerprint=splits.fingerprint(),
                queries=spread(splits.query, args.queries), names=grocery_class_names(real_ds),
                ds_dir=grocery_dataset_dir(root), real_ds_dir=real_ds, short=Shorten(real_ds))
    demo.ledger.end("data", t, note=f"{how} {real_root}: {len(splits.train)} train/database, "
                                    f"{len(splits.query)} test photos"
                    + (f" (--limit {args.limit})" if args.limit else "") + f"; {len(data.queries)} queries")
    return data


def train(demo: Demo, data: Data) -> None:
    """Step 2: `hashret train` on the data into run/."""
    from train import train as train_stage

    a = demo.args
    params = {"data": data.fingerprint, "backbone": a.backbone, "method": a.method, "bits": a.bits,
              "epochs": a.epochs, "seed": a.seed}
    demo.params["train"] = params
    demo.ledger.make(
        "train", f"{a.method} {a.bits} bits on {a.backbone} features, {a.epochs} epochs", params, demo.run_dir,
        [demo.run_dir / "manifest.json", demo.run_dir / "model.pt"],
        lambda: run_stage("train", train_stage, [
            "--data", data.root, "--format", "grocery", "--backbone", a.backbone, "--method", a.method,
            "--bits", a.bits, "--epochs", a.epochs, "--seed", a.seed, "--out", demo.run_dir,
            *demo.progress_flag()]))


def export(demo: Demo, data: Data) -> None:
    """Step 3: `hashret export` of run/ into export/, with its golden set and parity table."""
    from export import cli as export_stage

    a = demo.args
    n_train = len(data.splits.train)
    calib = min(256, n_train)
    golden = min(256, n_train + len(data.splits.query))
    params = {"train": demo.params["train"], "formats": a.formats, "exporter": a.exporter, "calib": calib,
              "golden": golden, "parity": a.parity}
    demo.params["export"] = params
    argv = [demo.run_dir, "--out", demo.exp_dir, "--formats", a.formats, "--data", data.root, "--format", "grocery",
            "--calib", calib, "--golden", golden, "--exporter", a.exporter]
    if a.parity:
        argv += ["--parity-queries", a.parity, "--parity-database", 3 * a.parity, "--latency-runs", 10]
    else:
        argv += ["--no-parity"]
    demo.ledger.make("export", f"{a.formats} (+ golden set{', parity table' if a.parity else ''})", params,
                     demo.exp_dir, [demo.exp_dir / "manifest.json", demo.exp_dir / "model.onnx"],
                     lambda: run_stage("export", export_stage, argv))


def build_galleries(demo: Demo, data: Data) -> None:
    """Steps 4 and 5: `hashret index build` of the database split, and of the iconic catalogue."""
    from serve import index_cli

    for name, out, extra, root, what in (
        ("index", demo.gal_dir, ["--split", "database"], data.root, "the database split"),
        ("index-iconic", demo.icon_dir, ["--iconic"], data.real_root, "the 81 iconic catalogue images"),
    ):
        params = {"export": demo.params["export"], "args": extra,
                  "data": data.fingerprint if root == data.root else str(root)}
        argv = ["build", demo.exp_dir, "--data", root, "--format", "grocery", *extra, "--out", out,
                "--backend", "ort", *demo.progress_flag()]
        # index build writes atomically, so a gallery folder that exists is a complete one
        demo.ledger.make(name, f"gallery of {what}", params, out, [out],
                         lambda argv=argv: run_stage("index", index_cli, argv))


def _serve_and_query(demo: Demo, data: Data, gallery: Path, k: int, what: str,
                     binary_too: bool = False) -> tuple[list[Answer], float, list[Answer] | None]:
    """Serve `gallery` and search it with every query (re-ranked, the server's default); with
    `binary_too`, once more with re-ranking off (rerank_factor 0), to show what it adds."""
    from serve.server import BackgroundServer, ServeConfig

    a = demo.args
    cfg = ServeConfig(model=demo.exp_dir, gallery=gallery, host="127.0.0.1", port=0, backend=a.backend, grace_s=5.0)
    binary = None
    with BackgroundServer(cfg) as srv:
        print(f"      serving {gallery.name} on {srv.address} ({a.backend})", flush=True)
        answers, wall = query_server(srv.address, data.queries, k, a.concurrency, what)
        if binary_too:
            binary, _ = query_server(srv.address, data.queries, k, a.concurrency, f"{what} (Hamming order)",
                                     rerank_factor=0)
        print(f"      stopping the server on {srv.address} (graceful)", flush=True)
    return answers, wall, binary


def search_database(demo: Demo, data: Data) -> Served:
    """Step 6: serve the database gallery and search it with every query photo: mAP@10, latency."""
    t = demo.ledger.begin("serve+query", f"{len(data.queries)} test photos against the database gallery over gRPC "
                                         f"(concurrency {demo.args.concurrency})")
    answers, wall, binary = _serve_and_query(demo, data, demo.gal_dir, K_RETRIEVAL, "retrieval", binary_too=True)
    scores = retrieval_scores(answers)
    scores["latency_ms"] = latency_stats(answers, wall, demo.args.concurrency)
    scores["wall_s"] = round(wall, 2)
    # The served answers are re-ranked; the same queries in Hamming order, and both computed
    # offline from the gallery's own codes and activations, show the gain and that serving adds
    # nothing of its own.
    scores["binary"] = retrieval_scores(binary)
    print("      offline check: encoding the query photos with the served engine", flush=True)
    scores["offline_same_engine"] = offline_scores(demo.exp_dir, demo.gal_dir, data.queries, demo.args.backend)
    demo.ledger.end("serve+query", t, note=f"{scores['failed']} failed")
    return Served(answers, scores)


def snap_to_shop(demo: Demo, data: Data) -> Served:
    """Step 7: the same photos against the iconic catalogue gallery: top-1 / top-5 accuracy."""
    t = demo.ledger.begin("snap-to-shop", f"{len(data.queries)} test photos against the iconic catalogue over gRPC")
    answers, wall, _ = _serve_and_query(demo, data, demo.icon_dir, K_SHOP, "snap-to-shop")
    scores = accuracy_scores(answers)
    scores["latency_ms"] = latency_stats(answers, wall, demo.args.concurrency)
    demo.ledger.end("snap-to-shop", t, note=f"{scores['failed']} failed")
    return Served(answers, scores)


def write_reports(demo: Demo, data: Data, retrieval: Served, shop: Served, t_start: float) -> tuple[dict, list[int]]:
    """Step 8: summary.json, queries.jsonl and demo.html. Returns the summary and the queries shown."""
    from demo.contact_sheet import Section, write_html
    from hashret.fsutil import write_json_atomic

    a, w = demo.args, demo.workdir
    t = demo.ledger.begin("report", "summary.json, queries.jsonl, demo.html")
    picked = spread(list(range(len(data.queries))), a.sheet or None)
    metrics_file = demo.run_dir / "metrics.json"
    run_metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    summary = {
        "model": f"{a.method} {a.bits} bits, {a.backbone}, served by {a.backend}",
        "data": {"root": str(data.real_root), "found": data.how, "limit": a.limit, "train": len(data.splits.train),
                 "database": len(data.splits.database), "test": len(data.splits.query), "queries": len(data.queries)},
        "config": {k: getattr(a, k) for k in ("backbone", "method", "bits", "epochs", "seed", "formats",
                                              "backend", "queries", "limit", "concurrency", "parity")},
        "retrieval": retrieval.scores,
        "offline": {**{k: run_metrics[k] for k in ("mAP@10", "mAP@all", "precision@10", "mAP@10(rerank)",
                                                   "mAP@all(rerank)") if k in run_metrics},
                    "source": "the training run's metrics.json: torch codes, every test photo",
                    "queries": len(data.splits.query)},
        "snap_to_shop": shop.scores,
        "examples": examples(retrieval.answers, picked[: max(0, a.examples)], data.names, data.ds_dir),
        "steps": demo.ledger.timings,
        "files": {"html": str(w / "demo.html"), "queries": str(w / "queries.jsonl"), "run": str(demo.run_dir),
                  "export": str(demo.exp_dir), "gallery": str(demo.gal_dir), "gallery_iconic": str(demo.icon_dir)},
    }
    write_queries(w / "queries.jsonl", retrieval.answers, shop.answers)
    write_html(w / "demo.html", summary, [
        Section("Retrieval: test photo -> database (top 5)",
                f"{len(picked)} of {len(data.queries)} served queries; ids are gallery items, d the Hamming distance.",
                [retrieval.answers[i] for i in picked], data.ds_dir, K_SHOP),
        Section("Snap to shop: test photo -> iconic catalogue image (top 5)",
                "The same photos searched against the 81 catalogue images.",
                [shop.answers[i] for i in picked], data.real_ds_dir, K_SHOP),
    ], data.names, data.short)
    demo.ledger.end("report", t)
    summary["steps"] = demo.ledger.timings
    summary["total_s"] = round(time.perf_counter() - t_start, 2)
    summary["code"] = {k: v for k, v in result_fields().items() if k != "allow_dirty"}  # which code made it
    write_json_atomic(w / "summary.json", summary)
    for f in ("summary.json", "demo.html", "queries.jsonl", STATE):
        (w / f).chmod(0o644)  # reports are for sharing (atomic writes create 0600 files)
    return summary, picked


def command_line() -> str:
    """This process's command as typed: `hashret demo ...` for the entry point and `python -m hashret`."""
    head = Path(sys.argv[0]).name if sys.argv else ""
    if head in ("hashret", "__main__.py"):
        return shlex.join(["hashret", *sys.argv[1:]])
    return shlex.join(sys.argv)


def write_results_file(path: str | Path, summary: dict, allow_dirty: bool = False) -> Path:
    """--results: the summary with the command and the code that ran, the shape of benchmarks/results/*.json.

    Refused inside benchmarks/results/ from a checkout with uncommitted edits unless allow_dirty.
    """
    from hashret.fsutil import write_json_atomic

    check_results_write(path, allow_dirty)
    doc = {"benchmark": "demo", "command": command_line(), "date": now_iso(), **result_fields(allow_dirty),
           "note": f"summary.json of `hashret demo` ({summary['model']}), unchanged under 'summary'",
           "summary": summary}
    write_json_atomic(path, doc)
    Path(path).chmod(0o644)
    return Path(path)

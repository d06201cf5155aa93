"""`hashret export RUN`: turn a training RUN folder into a self-contained EXP folder.

EXP holds model.onnx (the source of every other format), the optional INT8 / FP16 / TensorRT
/ Triton artifacts, model.pt (for the torch backend), golden.npz (for `hashret check`),
parity.json and a manifest listing every file's sha256. `_run` is the list of steps; the
formats come from the table in export/formats.py, whose rows carry their own flags and build
step, so nothing here names a format. A format this machine cannot produce is skipped (when
defaulted) or refused (when asked for).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from hashret.cliargs import add_data_args, add_output_args
from hashret.errors import BadInput
from hashret.fsutil import atomic_write
from hashret.images import PreprocessSpec
from hashret.manifest import file_entry, load_manifest, now_iso, versions, write_manifest

from export import formats as F
from export.job import ExportJob
from export.onnx_format import INPUT, OUTPUT

TOOLS = ("onnx", "onnxruntime", "openvino", "onnxslim", "onnxscript", "tensorrt")


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = F.help_text() + (
        "\n\nexample:\n  hashret export runs/dch64 --out exports/dch64\n"
        "  hashret export runs/dch64 --formats onnx,onnx-int8 --calib 128 --out exports/dch64\n"
        "then: hashret check exports/dch64 --backend ort")
    p.add_argument("run", metavar="RUN", help="training run folder (manifest.json + model.pt) from `hashret train`")
    add_output_args(p, metavar="EXP", help="export folder to write (default: RUN-export beside RUN)",
                    progress=False, title=None)
    p.add_argument("--formats", metavar="LIST",
                   help=f"comma-separated formats among {F.names_text()}, see below (default: every format "
                        "this machine can produce; the others are listed as skipped)")
    g = add_data_args(p, title="data (INT8 calibration, golden set, parity)", default_format=None,
                      format_dest="data_format",
                      data_help="dataset location (default: the run's dataset.root, else HASHRET_DATA)")
    g.add_argument("--golden", type=int, default=256, metavar="N",
                   help="images in golden.npz, the regression set `hashret check` uses; 0 skips it (default: 256)")
    g.add_argument("--parity-queries", type=int, default=500, metavar="N",
                   help="query images for the dataset parity table; 0 skips it (default: 500)")
    g.add_argument("--parity-database", type=int, default=1000, metavar="N",
                   help="database images for the dataset parity table (default: 1000)")
    g.add_argument("--latency-runs", type=int, default=20, metavar="N",
                   help="timed bs=1 runs per backend in the parity table (default: 20)")
    g.add_argument("--no-parity", action="store_true", help="skip the parity table (default: run it)")
    F.add_format_args(p)
    # the batch range every batched artifact accepts (TensorRT profile, Triton max_batch_size)
    t = F.arg_group(p, F.BATCH_GROUP)
    t.add_argument("--min-batch", type=int, default=1, help="smallest batch the engine accepts (default: 1)")
    t.add_argument("--opt-batch", type=int, default=8, help="batch TensorRT tunes for; Triton's preferred (default: 8)")
    t.add_argument("--max-batch", type=int, default=64, help="largest batch; Triton's max_batch_size (default: 64)")


def _say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def quiet_third_party():
    """Hide INFO chatter that onnxscript and onnxruntime.quantization log through the root logger
    (hundreds of lines per export) unless -v asked for debug output."""
    root = logging.getLogger()
    old = root.level
    if old > logging.DEBUG:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(old)


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        raise BadInput(f"--min-batch/--opt-batch/--max-batch | need 1 <= {args.min_batch} <= {args.opt_batch} "
                       f"<= {args.max_batch}")
    for name in ("golden", "parity_queries", "parity_database", "latency_runs"):
        if getattr(args, name) < 0:
            flag = "--" + name.replace("_", "-")
            raise BadInput(f"{flag} {getattr(args, name)} | must not be negative: pass 0 or more")
    F.check_format_args(args)


def run(args: argparse.Namespace) -> int:
    with quiet_third_party():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    t0 = time.time()
    job = open_job(args)
    find_images(job)
    build_formats(job)
    copy_weights_and_golden(job)
    manifest = write_export_manifest(job)
    from hashret.engines import model_id

    _say(f"wrote {job.exp} ({len(manifest['export']['files'])} files, model id {model_id(manifest)[:12]}) "
         f"in {time.time() - t0:.0f} s")
    parity_table(job)
    return 0


def open_job(args: argparse.Namespace) -> ExportJob:
    """Check the flags, read RUN, choose the formats and create EXP; refusals come before any work."""
    from hashret.models import load_encoder

    check_args(args)
    run_dir = Path(args.run)
    m = load_manifest(run_dir, kind=("run", "export"))
    exp = Path(args.out) if args.out else run_dir.parent / f"{run_dir.name}-export"
    if exp.resolve() == run_dir.resolve():
        raise BadInput(f"--out {exp} | is the RUN folder itself: choose another folder")
    chosen, skipped = F.select_formats(args.formats)
    for name, why in skipped.items():
        _say(f"skipped {name}: {why}")
    encoder, _ = load_encoder(run_dir)
    job = ExportJob(args=args, run_dir=run_dir, exp=exp, run_manifest=m, encoder=encoder,
                    spec=PreprocessSpec.from_dict(m["preprocessing"]), bits=int(m["bits"]), chosen=chosen,
                    skipped=skipped)
    exp.mkdir(parents=True, exist_ok=True)
    return job


def find_images(job: ExportJob) -> None:
    """The run's dataset, for the golden set and the formats whose build reads images (INT8
    calibration). Without one, formats that were only defaulted are skipped (with those built
    from them); a golden set or a format asked for by name makes it an error."""
    from export.data import run_splits

    needing = [f for f in job.chosen if f.needs_data]
    if not needing and job.args.golden <= 0:
        return
    required = job.args.golden > 0 or bool(job.args.formats)
    job.splits = run_splits(job.run_manifest, job.args.data, job.args.data_format, required=required)
    if job.splits is not None:
        return
    for f in list(job.chosen):
        if f.needs_data:
            why = f"no dataset reachable for {f.needs_data} (pass --data DIR --format FMT)"
        else:
            why = next((f"built from {a}, which is skipped" for a in f.after if a in job.skipped), None)
        if why:
            job.chosen.remove(f)
            job.skipped[f.name] = why
            _say(f"skipped {f.name}: {why}")


def build_formats(job: ExportJob) -> None:
    """Each chosen row's build step, in table order (a row's sources come before it)."""
    job.total_steps = len(job.chosen) + 2  # + weights/golden + manifest
    for f in job.chosen:
        job.stage(f"{f.name}: {f.step or 'building ' + f.file}")
        if not job.has(f.name):  # an earlier step may have required it already
            job.build(f)


def copy_weights_and_golden(job: ExportJob) -> None:
    """model.pt (the torch backend's file) and golden.npz (what `hashret check` re-encodes)."""
    from hashret.models import WEIGHTS_FILE

    job.stage("model.pt and golden set")
    src_weights = job.run_dir / job.run_manifest.get("weights", WEIGHTS_FILE)
    if src_weights.resolve() != job.path(WEIGHTS_FILE).resolve():
        atomic_write(job.path(WEIGHTS_FILE), lambda f: f.write(src_weights.read_bytes()))
    if job.args.golden > 0:
        from export.golden import GOLDEN, golden_from_run

        job.golden = g = golden_from_run(job.encoder, job.spec, job.splits, job.path(GOLDEN), n=job.args.golden)
        job.wrote(GOLDEN)
        _say(f"  golden.npz: {g['n']} images ({g['queries']} queries), torch mAP@all "
             f"{g['mAP@all']:.4f}, mAP@10 {g['mAP@10']:.4f}")
    job.wrote(WEIGHTS_FILE)


def write_export_manifest(job: ExportJob) -> dict:
    """The run's manifest plus the export section: every written file with its sha256."""
    from hashret.models import WEIGHTS_FILE

    job.stage("manifest")
    h = w = job.spec.crop
    manifest = {
        **{k: v for k, v in job.run_manifest.items() if k not in ("export", "created")},
        "kind": "export",
        "created": now_iso(),
        "weights": WEIGHTS_FILE,
        "export": {
            "files": {f: file_entry(job.path(f)) for f in job.files},
            "formats": job.built,
            "skipped": job.skipped,
            "opset": job.built[F.BASE]["opset"],
            "inputs": [{"name": INPUT, "dtype": "uint8", "shape": ["N", h, w, 3]}],
            "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": ["N", job.bits]}],
            "golden": job.golden,
            "tools": versions(*TOOLS),
            "source_run": str(job.run_dir.resolve()),
            "source_run_kind": job.run_manifest.get("kind"),
            "created": now_iso(),
        },
    }
    write_manifest(job.exp, manifest)
    return manifest


def parity_table(job: ExportJob) -> None:
    """Every built format's backends against torch fp32, on the golden set and a dataset split."""
    a = job.args
    if a.no_parity or a.golden <= 0:
        return
    from export.golden import GOLDEN, load_golden
    from export.parity import format_table, parity_report

    backends = parity_backends(list(job.built))
    _say(f"parity vs torch fp32: {', '.join(backends)}")
    report = parity_report(job.exp, backends, load_golden(job.path(GOLDEN)), splits=job.splits, spec=job.spec,
                           max_query=a.parity_queries, max_database=a.parity_database,
                           latency_runs=a.latency_runs)
    _say(f"golden set ({report['golden']['n']} images):")
    _say(format_table(report["golden"]["rows"]))
    if "dataset" in report:
        d = report["dataset"]
        _say(f"dataset {d['format']} ({d['queries']} queries x {d['database']} database):")
        _say(format_table(d["rows"]))
    _say(f"parity written to {job.exp / 'parity.json'}")


def parity_backends(format_names: list[str]) -> list[str]:
    """torch (the reference) + every backend of the built formats; plus OpenVINO in bf16 when the
    CPU would pick bf16 by default, to show what that default costs in flipped bits. Names no
    longer in the table (an export made with a plug-in format) add no rows."""
    out = ["torch"]
    for n in format_names:
        if n in F.FORMATS:
            out += [b for b in F.get(n).backends if b not in out]
    if "openvino" in out and _openvino_defaults_to_bf16():
        out.insert(out.index("openvino") + 1, "openvino:precision=bf16")
    return out


def _openvino_defaults_to_bf16() -> bool:
    try:
        import openvino as ov

        hint = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")).lower()
    except Exception:  # no openvino, or no CPU plugin
        return False
    return "bf16" in hint or "bfloat16" in hint

"""`hashret export RUN`: turn a training RUN folder into a self-contained EXP folder.

EXP holds model.onnx (the source of every other format), the optional INT8 / FP16 / TensorRT
/ Triton artifacts, model.pt (for the torch backend), golden.npz (for `hashret check`),
parity.json and a manifest listing every file's sha256. Steps run in dependency order; a format
this machine cannot produce is skipped (when defaulted) or refused (when asked for).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from hashret.errors import BadInput, Unavailable
from hashret.fsutil import atomic_write
from hashret.images import PreprocessSpec
from hashret.manifest import file_entry, load_manifest, now_iso, versions, write_manifest

from export import formats as F
from export.onnx_format import DEFAULT_OPSET, INPUT, OUTPUT

TOOLS = ("onnx", "onnxruntime", "openvino", "onnxslim", "onnxscript", "tensorrt")


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = F.help_text() + (
        "\n\nexample:\n  hashret export runs/dch64 --out exports/dch64\n"
        "  hashret export runs/dch64 --formats onnx,onnx-int8 --calib 128 --out exports/dch64\n"
        "then: hashret check exports/dch64 --backend ort")
    p.add_argument("run", metavar="RUN", help="training run folder (manifest.json + model.pt) from `hashret train`")
    p.add_argument("--out", metavar="EXP", help="export folder to write (default: RUN-export beside RUN)")
    p.add_argument("--formats", metavar="LIST",
                   help="comma-separated formats, see below (default: every format this machine can produce; "
                        "the others are listed as skipped)")
    g = p.add_argument_group("data (INT8 calibration, golden set, parity)")
    g.add_argument("--data", metavar="DIR", help="dataset location (default: the run's dataset.root, else HASHRET_DATA)")
    g.add_argument("--format", dest="data_format", metavar="FMT",
                   help="dataset format: grocery, digix, folder or csv (default: the run's)")
    g.add_argument("--calib", type=int, default=256, metavar="N",
                   help="training images used to calibrate INT8 scales (default: 256)")
    g.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile", "entropy"),
                   help="how INT8 activation ranges are chosen (default: minmax)")
    g.add_argument("--int8-exclude", default="hash-layer", choices=("hash-layer", "head", "none"),
                   help="layers kept in float in the INT8 model: only the final hash layer and tanh, the "
                        "whole hash head, or none (default: hash-layer)")
    g.add_argument("--golden", type=int, default=256, metavar="N",
                   help="images in golden.npz, the regression set `hashret check` uses; 0 skips it (default: 256)")
    g.add_argument("--parity-queries", type=int, default=500, metavar="N",
                   help="query images for the dataset parity table; 0 skips it (default: 500)")
    g.add_argument("--parity-database", type=int, default=1000, metavar="N",
                   help="database images for the dataset parity table (default: 1000)")
    g.add_argument("--latency-runs", type=int, default=20, metavar="N",
                   help="timed bs=1 runs per backend in the parity table (default: 20)")
    g.add_argument("--no-parity", action="store_true", help="skip the parity table (default: run it)")
    o = p.add_argument_group("ONNX")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    o.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"),
                   help="torch.onnx exporter: auto tries dynamo then legacy (default: auto)")
    o.add_argument("--no-slim", action="store_true", help="skip onnxslim (default: slim when outputs stay identical)")
    t = p.add_argument_group("TensorRT and Triton (batch profile)")
    t.add_argument("--min-batch", type=int, default=1, help="smallest batch the engine accepts (default: 1)")
    t.add_argument("--opt-batch", type=int, default=8, help="batch TensorRT tunes for; Triton's preferred (default: 8)")
    t.add_argument("--max-batch", type=int, default=64, help="largest batch; Triton's max_batch_size (default: 64)")
    t.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace in GiB (default: 4)")
    t.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to reuse and update (default: none)")
    t.add_argument("--tensorrt-precision", default="fp16", choices=("fp16", "fp32"),
                   help="TensorRT engine precision (default: fp16)")
    t.add_argument("--triton-name", default="hashret", help="Triton model name (default: hashret)")
    t.add_argument("--triton-kind", default="gpu", choices=("gpu", "cpu"),
                   help="Triton instance kind for the ONNX model (default: gpu)")


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


def select_formats(text: str | None) -> tuple[list[F.Format], dict[str, str]]:
    """Explicit formats must all be producible (Unavailable otherwise); by default, skip those that are not."""
    if text:
        chosen = F.parse_formats(text)
        for f in chosen:
            why = F.unavailable_reason(f)
            if why:
                raise Unavailable(f"format {f.name} | cannot be produced on this machine: {why}")
        return chosen, {}
    chosen, skipped = [], {}
    for f in F.FORMATS:
        why = F.unavailable_reason(f)
        if why:
            skipped[f.name] = why
        else:
            chosen.append(f)
    return chosen, skipped


def _check_batches(args) -> None:
    if not 1 <= args.min_batch <= args.opt_batch <= args.max_batch:
        raise BadInput(f"--min-batch/--opt-batch/--max-batch | need 1 <= {args.min_batch} <= {args.opt_batch} "
                       f"<= {args.max_batch}")
    for name in ("calib", "golden", "parity_queries", "parity_database", "latency_runs"):
        if getattr(args, name) < 0:
            raise BadInput(f"--{name.replace('_', '-')} {getattr(args, name)} | must not be negative")


def run(args: argparse.Namespace) -> int:
    with quiet_third_party():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from hashret.models import WEIGHTS_FILE, load_encoder

    t0 = time.time()
    _check_batches(args)
    run_dir = Path(args.run)
    m = load_manifest(run_dir, kind=("run", "export"))
    exp = Path(args.out) if args.out else run_dir.parent / f"{run_dir.name}-export"
    if exp.resolve() == run_dir.resolve():
        raise BadInput(f"--out {exp} | is the RUN folder itself: choose another folder")
    chosen, skipped = select_formats(args.formats)
    names = [f.name for f in chosen]
    for name, why in skipped.items():
        _say(f"skipped {name}: {why}")
    encoder, _ = load_encoder(run_dir)
    spec = PreprocessSpec.from_dict(m["preprocessing"])
    bits = int(m["bits"])
    exp.mkdir(parents=True, exist_ok=True)
    produced: dict[str, dict] = {}
    extra_files: list[str] = []

    from export.data import calibration_images, run_splits

    splits = None
    if "onnx-int8" in names or args.golden > 0:
        # calibration and the golden set need images; without them only a defaulted INT8 is dropped
        required = args.golden > 0 or bool(args.formats)
        splits = run_splits(m, args.data, args.data_format, required=required)
        if splits is None:
            names.remove("onnx-int8")
            skipped["onnx-int8"] = "no dataset reachable for calibration (pass --data DIR --format FMT)"
            _say(f"skipped onnx-int8: {skipped['onnx-int8']}")

    step, last = 0, [time.time()]
    total = len(names) + 2  # + weights/golden + manifest

    def stage(what: str) -> None:
        nonlocal step
        if step:
            _say(f"      done in {time.time() - last[0]:.1f} s")
        step += 1
        last[0] = time.time()
        _say(f"[{step}/{total}] {what}")

    from export.onnx_format import onnx_from_run

    stage(f"onnx: exporting {m['backbone']['name']} ({bits} bits) to {exp / 'model.onnx'}")
    produced["onnx"] = onnx_from_run(run_dir, exp / "model.onnx", args.opset, exporter=args.exporter,
                                     slim=not args.no_slim, encoder=encoder)
    if "onnx-int8" in names:
        from export.data import batches
        from export.int8 import int8_from_onnx

        stage(f"onnx-int8: calibrating on {args.calib} training images")
        calib = calibration_images(splits, spec, args.calib)
        produced["onnx-int8"] = int8_from_onnx(exp / "model.onnx", exp / "model.int8.onnx", list(batches(calib, 16)),
                                               exclude=args.int8_exclude, method=args.calib_method)
        produced["onnx-int8"]["calibration_images"] = int(len(calib))
    if "onnx-fp16" in names:
        from export.fp16 import fp16_from_onnx

        stage("onnx-fp16: converting")
        produced["onnx-fp16"] = fp16_from_onnx(exp / "model.onnx", exp / "model.fp16.onnx")
    if "tensorrt" in names:
        from export.tensorrt import engine_from_onnx, source_onnx_for
        from hashret.engines.tensorrt_engine import import_tensorrt

        trt = import_tensorrt()
        src, strongly = source_onnx_for(args.tensorrt_precision, exp, trt)
        if src.name == "model.fp16.onnx" and "onnx-fp16" not in names:  # TensorRT 11 builds from it
            from export.fp16 import fp16_from_onnx

            produced["onnx-fp16"] = fp16_from_onnx(exp / "model.onnx", src)
            extra_files.append(src.name)
        stage(f"tensorrt: building a {args.tensorrt_precision} engine from {src.name} (minutes)")
        produced["tensorrt"] = engine_from_onnx(
            src, exp / "model.plan", precision=args.tensorrt_precision, strongly_typed=strongly,
            min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
            workspace_gb=args.workspace_gb, timing_cache=args.timing_cache)
        extra_files.append("engine.json")
    if "triton" in names:
        from export.triton import triton_from_exp

        stage("triton: writing the model repository")
        tfiles = triton_from_exp(exp, size=spec.crop, bits=bits, name=args.triton_name, max_batch=args.max_batch,
                                 opt_batch=args.opt_batch, kind="KIND_GPU" if args.triton_kind == "gpu" else "KIND_CPU",
                                 with_plan="tensorrt" in names)
        produced["triton"] = {"files": tfiles, "model_name": args.triton_name}
        extra_files += tfiles

    stage("model.pt and golden set")
    src_weights = run_dir / m.get("weights", WEIGHTS_FILE)
    if src_weights.resolve() != (exp / WEIGHTS_FILE).resolve():
        atomic_write(exp / WEIGHTS_FILE, lambda f: f.write(src_weights.read_bytes()))
    golden_info = None
    if args.golden > 0:
        from export.golden import GOLDEN, golden_from_run

        golden_info = golden_from_run(encoder, spec, splits, exp / GOLDEN, n=args.golden)
        extra_files.append(GOLDEN)
        _say(f"  golden.npz: {golden_info['n']} images ({golden_info['queries']} queries), torch mAP@all "
             f"{golden_info['mAP@all']:.4f}, mAP@10 {golden_info['mAP@10']:.4f}")

    stage("manifest")
    listed = [F.get(n).file for n in names if n != "triton"] + extra_files + [WEIGHTS_FILE]
    files = {f: file_entry(exp / f) for f in dict.fromkeys(listed)}
    h = w = spec.crop
    manifest = {
        **{k: v for k, v in m.items() if k not in ("export", "created")},
        "kind": "export",
        "created": now_iso(),
        "weights": WEIGHTS_FILE,
        "export": {
            "files": files,
            "formats": produced,
            "skipped": skipped,
            "opset": produced["onnx"]["opset"],
            "inputs": [{"name": INPUT, "dtype": "uint8", "shape": ["N", h, w, 3]}],
            "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": ["N", bits]}],
            "golden": golden_info,
            "tools": versions(*TOOLS),
            "source_run": str(run_dir.resolve()),
            "source_run_kind": m.get("kind"),
            "created": now_iso(),
        },
    }
    write_manifest(exp, manifest)
    from hashret.engines import model_id

    _say(f"wrote {exp} ({len(files)} files, model id {model_id(manifest)[:12]}) in {time.time() - t0:.0f} s")

    if not args.no_parity and args.golden > 0:
        from export.golden import load_golden
        from export.parity import format_table, parity_report

        backends = parity_backends(names)
        _say(f"parity vs torch fp32: {', '.join(backends)}")
        report = parity_report(exp, backends, load_golden(exp / "golden.npz"), splits=splits, spec=spec,
                               max_query=args.parity_queries, max_database=args.parity_database,
                               latency_runs=args.latency_runs)
        _say(f"golden set ({report['golden']['n']} images):")
        _say(format_table(report["golden"]["rows"]))
        if "dataset" in report:
            d = report["dataset"]
            _say(f"dataset {d['format']} ({d['queries']} queries x {d['database']} database):")
            _say(format_table(d["rows"]))
        _say(f"parity written to {exp / 'parity.json'}")
    return 0


def parity_backends(format_names: list[str]) -> list[str]:
    """torch (the reference) + every backend of the built formats; plus OpenVINO in bf16 when the
    CPU would pick bf16 by default, to show what that default costs in flipped bits."""
    out = ["torch"]
    for n in format_names:
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

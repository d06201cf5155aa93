"""ONNX -> model.plan + engine.json with the TensorRT Python API (10.x and 11.x).

Version differences are handled by the major version, backed by feature checks (a member missing
from the bindings counts as removed):
* 10.x: NetworkDefinitionCreationFlag has EXPLICIT_BATCH = 0 (deprecated and ignored: every
  network is explicit batch) and STRONGLY_TYPED = 1 (opt-in); precision comes from
  BuilderFlag.FP16 on the fp32 ONNX ("weak typing") unless strongly typed is asked for.
* 11.x: weak typing is gone (no BuilderFlag.FP16/INT8, no calibrators) and so is EXPLICIT_BATCH;
  STRONGLY_TYPED = 0 remains only for API compatibility (ignored: always on), so no creation flag
  is set. Precision comes from the ONNX file, so fp16 builds parse model.fp16.onnx.
No INT8 engines: TensorRT's explicit quantization wants symmetric int8 activations, while
model.int8.onnx uses asymmetric uint8 activations, which is what ONNX Runtime on CPUs runs fastest.
engine.json records what a runtime must match (TensorRT version, compute capability), which
hashret.engines.tensorrt_engine checks before deserializing.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hashret.engines.tensorrt_engine import ENGINE_INFO, cuda_device_facts, import_tensorrt
from hashret.errors import BadInput, CheckFailed
from hashret.fsutil import atomic_write, sha256_file, write_json_atomic
from hashret.manifest import now_iso

from export.formats import BATCH_GROUP, arg_group

if TYPE_CHECKING:  # annotations only: build steps are handed a job, they never make one
    from export.job import ExportJob

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")


def _flag(enum, name: str):
    return getattr(enum, name, None)


def trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0  # an unparsable version: let the feature checks decide


def strongly_typed_only(trt) -> bool:
    """True on TensorRT 11+, where BuilderFlag.FP16 no longer exists."""
    return trt_major(trt) >= 11 or _flag(trt.BuilderFlag, "FP16") is None


def source_onnx_for(precision: str, exp_dir: Path, trt) -> tuple[Path, bool]:
    """Which ONNX file to parse and whether to build a strongly typed network."""
    if precision not in PRECISIONS:
        raise BadInput(f"--tensorrt-precision {precision!r} | choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and strongly_typed_only(trt):
        return exp_dir / "model.fp16.onnx", True
    return exp_dir / "model.onnx", strongly_typed_only(trt)


def engine_from_onnx(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *, precision: str = "fp16",
                     strongly_typed: bool | None = None, min_batch: int = 1, opt_batch: int = 8, max_batch: int = 64,
                     workspace_gb: float = 4.0, timing_cache: str | os.PathLike | None = None) -> dict:
    """Build and serialize an engine; write plan_path and engine.json beside it. Returns engine.json.

    `strongly_typed` defaults to what this TensorRT allows: True on 11.x (the only mode there),
    False on 10.x (fp16 through BuilderFlag.FP16 on the fp32 graph)."""
    trt = import_tensorrt()
    only_strong = strongly_typed_only(trt)
    if strongly_typed is None:
        strongly_typed = only_strong
    elif not strongly_typed and only_strong:
        raise BadInput(f"tensorrt {trt.__version__} | builds strongly typed networks only (no BuilderFlag.FP16): "
                       "pass strongly_typed=True with model.fp16.onnx for fp16 engines")
    facts = cuda_device_facts()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise BadInput(f"--min-batch/--opt-batch/--max-batch | need 1 <= {min_batch} <= {opt_batch} <= {max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    explicit = _flag(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    if explicit is not None and trt_major(trt) < 10:  # 8.x/9.x: implicit batch unless asked
        flags |= 1 << int(explicit)
    if strongly_typed and not only_strong:  # on 11.x the flag is deprecated and implied
        st = _flag(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if st is None:
            raise BadInput(f"tensorrt {trt.__version__} | has no strongly typed networks: upgrade TensorRT to 10.x")
        flags |= 1 << int(st)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"{onnx_path} | TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    inp = network.get_input(0)
    _, h, w, c = tuple(inp.shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (min_batch, h, w, c), (opt_batch, h, w, c), (max_batch, h, w, c))
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building TensorRT %s engine from %s (takes minutes)", precision, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"{onnx_path} | TensorRT engine build failed (see the TensorRT log above)")
    plan_path = Path(plan_path)
    atomic_write(plan_path, lambda f: f.write(memoryview(serialized)))
    if cache is not None:
        updated = config.get_timing_cache() or cache  # the builder extends it in place
        data = bytes(memoryview(updated.serialize()))
        atomic_write(timing_cache, lambda f: f.write(data))
    info = {
        "tensorrt_version": trt.__version__,
        **facts,
        "precision": precision,
        "strongly_typed": bool(strongly_typed),
        "profile": {"input": inp.name, "min": [min_batch, h, w, c], "opt": [opt_batch, h, w, c],
                    "max": [max_batch, h, w, c]},
        "workspace_gb": workspace_gb,
        "source_onnx": Path(onnx_path).name,
        "source_onnx_sha256": sha256_file(onnx_path),
        "created": now_iso(),
    }
    write_json_atomic(plan_path.with_name(ENGINE_INFO), info)
    return info


def add_args(p) -> None:
    t = arg_group(p, BATCH_GROUP)
    t.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace in GiB (default: 4)")
    t.add_argument("--timing-cache", metavar="PATH", help="TensorRT timing cache to reuse and update (default: none)")
    t.add_argument("--tensorrt-precision", default="fp16", choices=PRECISIONS,
                   help="TensorRT engine precision (default: fp16)")


def build(job: ExportJob, out: Path) -> dict:
    """The `tensorrt` row's build step (export/formats.py): model.plan and engine.json."""
    trt = import_tensorrt()
    a = job.args
    src, strongly = source_onnx_for(a.tensorrt_precision, job.exp, trt)
    if src.name != "model.onnx":
        job.require("onnx-fp16", f"TensorRT {trt.__version__} builds {a.tensorrt_precision} engines from {src.name}")
    job.say(f"      a {a.tensorrt_precision} engine from {src.name}")
    info = engine_from_onnx(src, out, precision=a.tensorrt_precision, strongly_typed=strongly,
                            min_batch=a.min_batch, opt_batch=a.opt_batch, max_batch=a.max_batch,
                            workspace_gb=a.workspace_gb, timing_cache=a.timing_cache)
    job.wrote(ENGINE_INFO)
    return info

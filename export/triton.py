"""EXP/triton/: a Triton Inference Server model repository for the exported encoder.

`tritonserver --model-repository EXP/triton` serves model `<name>` (ONNX Runtime backend) and,
when a TensorRT plan was built, `<name>_trt`. The batch dimension is implicit (max_batch_size >
0), so dims are per image: input `images` UINT8 [H, W, 3], output `codes` FP32 [bits].
Dynamic batching groups concurrent single-image requests into the preferred batch sizes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hashret.fsutil import atomic_write

from export.formats import BATCH_GROUP, arg_group

if TYPE_CHECKING:  # annotations only: build steps are handed a job, they never make one
    from export.job import ExportJob

DEFAULT_NAME = "hashret"
DEFAULT_QUEUE_DELAY_US = 1000


def config_pbtxt(name: str, platform: str, *, size: int, bits: int, max_batch: int,
                 preferred: list[int], queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                 kind: str = "KIND_GPU", count: int = 1) -> str:
    """Text of config.pbtxt (protobuf text format)."""
    preferred = sorted({b for b in preferred if 1 <= b <= max_batch}) or [max_batch]
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "images"
    data_type: TYPE_UINT8
    dims: [ {size}, {size}, 3 ]
  }}
]
output [
  {{
    name: "codes"
    data_type: TYPE_FP32
    dims: [ {bits} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: {queue_delay_us}
}}
instance_group [
  {{
    count: {count}
    kind: {kind}
  }}
]
"""


def _place(src: Path, dst: Path) -> None:
    """Hard-link when possible (no second copy of a 100 MB model), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def triton_from_exp(exp_dir: str | os.PathLike, *, size: int, bits: int, name: str = DEFAULT_NAME,
                    max_batch: int = 64, opt_batch: int = 8, kind: str = "KIND_GPU",
                    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, with_plan: bool = False) -> list[str]:
    """Write EXP/triton/ afresh (a stale model from an earlier export must not be served);
    returns the written files relative to EXP (for the manifest)."""
    exp_dir = Path(exp_dir)
    root = exp_dir / "triton"
    shutil.rmtree(root, ignore_errors=True)
    written = []
    models = [(name, "onnxruntime_onnx", "model.onnx", kind)]
    if with_plan:
        models.append((f"{name}_trt", "tensorrt_plan", "model.plan", "KIND_GPU"))
    for model_name, platform, file, k in models:
        d = root / model_name
        text = config_pbtxt(model_name, platform, size=size, bits=bits, max_batch=max_batch,
                            preferred=[opt_batch, max_batch], queue_delay_us=queue_delay_us, kind=k)
        atomic_write(d / "config.pbtxt", lambda f, t=text: f.write(t), mode="w")
        _place(exp_dir / file, d / "1" / file)
        written += [str((d / "config.pbtxt").relative_to(exp_dir)), str((d / "1" / file).relative_to(exp_dir))]
    return written


def add_args(p) -> None:
    t = arg_group(p, BATCH_GROUP)
    t.add_argument("--triton-name", default=DEFAULT_NAME, help=f"Triton model name (default: {DEFAULT_NAME})")
    t.add_argument("--triton-kind", default="gpu", choices=("gpu", "cpu"),
                   help="Triton instance kind for the ONNX model (default: gpu)")


def build(job: ExportJob, out: Path) -> dict:
    """The `triton` row's build step (export/formats.py): serves every model this export built that
    Triton runs, so it comes after them in the table."""
    a = job.args
    files = triton_from_exp(job.exp, size=job.spec.crop, bits=job.bits, name=a.triton_name,
                            max_batch=a.max_batch, opt_batch=a.opt_batch,
                            kind="KIND_GPU" if a.triton_kind == "gpu" else "KIND_CPU",
                            with_plan=job.has("tensorrt"))
    job.wrote(*files)
    return {"files": files, "model_name": a.triton_name}

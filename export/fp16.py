"""model.onnx -> model.fp16.onnx: float16 weights and compute, uint8 in and float32 out.

For GPU execution providers and TensorRT 11, whose strongly typed networks take precision from
the ONNX file instead of builder flags. keep_io_types leaves the graph's interface unchanged
(the uint8 input needs no cast: the graph's own Cast(uint8 -> float) becomes Cast(-> float16)),
and the output is cast back to float32 so callers never see fp16. Tanh stays in fp16: its
output's sign equals its input's, so it cannot flip a bit.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from hashret.errors import Unavailable
from hashret.fsutil import atomic_write

if TYPE_CHECKING:  # annotations only: build steps are handed a job, they never make one
    from pathlib import Path

    from export.job import ExportJob


def _converter():
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        return convert_float_to_float16
    except ImportError:
        pass
    try:
        from onnxconverter_common.float16 import convert_float_to_float16
        return convert_float_to_float16
    except ImportError:
        raise Unavailable("format onnx-fp16 | needs onnxruntime (or onnxconverter-common): pip install onnxruntime") from None


def fp16_from_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Convert to fp16 (atomic write); returns facts for the manifest."""
    import onnx

    convert = _converter()
    model = onnx.load(str(onnx_path))
    m16 = convert(model, keep_io_types=True)
    onnx.checker.check_model(m16)
    ins = [(i.name, i.type.tensor_type.elem_type) for i in m16.graph.input]
    outs = [(o.name, o.type.tensor_type.elem_type) for o in m16.graph.output]
    if ins[0][1] != onnx.TensorProto.UINT8 or outs[0][1] != onnx.TensorProto.FLOAT:
        raise RuntimeError(f"fp16 conversion changed the interface: inputs {ins}, outputs {outs}")
    data = m16.SerializeToString()
    atomic_write(out_path, lambda f: f.write(data))
    return {"converter": convert.__module__, "keep_io_types": True}


def build(job: ExportJob, out: Path) -> dict:
    """The `onnx-fp16` row's build step (export/formats.py)."""
    return fp16_from_onnx(job.path("model.onnx"), out)

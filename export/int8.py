"""model.onnx -> model.int8.onnx: ONNX Runtime static QDQ quantization, calibrated on real images.

Static (not dynamic) quantization, because convolutions dominate and only static scales let them
run as int8 kernels (VNNI on x86, DP4A/IMMA on GPUs; OpenVINO and TensorRT both read QDQ graphs).
QDQ format, per-channel int8 weights, uint8 activations ("U8S8"). Measured on an AVX512-VNNI
CPU with ONNX Runtime 1.32: with U8S8 every Conv fuses into QLinearConv (VNNI's VPDPBUSD
multiplies unsigned by signed bytes): ResNet50 bs=1 on one thread took 25.5 ms vs 78.8 ms fp32
(0.32x). With int8 activations ("S8S8") 20 of its 53 convolutions stayed as DequantizeLinear ->
float Conv -> QuantizeLinear and it took 53.9 ms (0.68x). (On x86 CPUs without VNNI, U8S8 can
saturate: pass reduce_range=True there.)
`quant_pre_process` runs first (shape inference + graph optimization), as ONNX Runtime advises.

Only the final hash layer (its Gemm and tanh) stays in float by default: the code is the sign of
its output, and a quantized output rounds values within half a step of 0 to exactly 0, which
binarizes as +1. Measured on 64-bit DCH Grocery (efficientnet-lite0, 2485 queries x 2936
database, 256 calibration images): bit agreement vs fp32 was 0.9963 with nothing excluded,
0.9964 with the hash layer excluded and 0.9963 with the whole head excluded (mAP@all -0.000,
-0.001, -0.002: noise), so the backbone, not the head, sets the error; the guard is free.
Percentile calibration gave 0.9965 at 6x the calibration time, so MinMax is the default.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from hashret.errors import BadInput, Unavailable

from export.formats import arg_group

if TYPE_CHECKING:  # annotations only: build steps are handed a job, they never make one
    from export.job import ExportJob

log = logging.getLogger(__name__)

EXCLUDE_CHOICES = ("head", "hash-layer", "none")
POOL_OPS = {"ReduceMean", "GlobalAveragePool"}


def calibration_reader(input_name: str, batches: Iterable[np.ndarray]):
    """An onnxruntime CalibrationDataReader yielding {input_name: uint8 batch} (imported lazily)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {input_name: b}

    return _Reader()


def head_nodes(model, which: str = "hash-layer") -> list[str]:
    """Names of the nodes to keep in float.

    "head": every node after the backbone's global pooling (hidden layer, hash layer, tanh);
    "hash-layer": only the last Gemm/MatMul(+Add) and tanh; "none": nothing.
    """
    if which not in EXCLUDE_CHOICES:
        raise BadInput(f"--int8-exclude {which!r} | choose one of {', '.join(EXCLUDE_CHOICES)}")
    if which == "none":
        return []
    nodes = list(model.graph.node)
    if which == "head":
        pools = [i for i, n in enumerate(nodes) if n.op_type in POOL_OPS]
        if not pools:
            log.warning("int8: no global pooling node found; quantizing the whole graph")
            return []
        # nodes are topologically sorted: everything downstream of the last pooling node
        produced = set(nodes[pools[-1]].output)
        keep = [nodes[pools[-1]].name]
        for n in nodes[pools[-1] + 1:]:
            if any(i in produced for i in n.input):
                produced.update(n.output)
                keep.append(n.name)
        return keep
    # hash-layer: walk back from the graph output through Tanh/Add to the last Gemm/MatMul
    by_output = {o: n for n in nodes for o in n.output}
    keep, name = [], model.graph.output[0].name
    while name in by_output:
        n = by_output[name]
        keep.append(n.name)
        if n.op_type in ("Gemm", "MatMul"):
            break
        name = n.input[0]
    return keep


def int8_from_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                   calib_batches: Sequence[np.ndarray] | Iterable[np.ndarray], *,
                   per_channel: bool = True, exclude: str = "hash-layer", method: str = "minmax",
                   reduce_range: bool = False) -> dict:
    """Quantize `onnx_path` into `out_path` (atomic); returns facts for the manifest."""
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                              quantize_static)
    except ImportError:
        raise Unavailable("format onnx-int8 | onnxruntime is not installed: pip install onnxruntime") from None
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise BadInput(f"--calib-method {method!r} | choose one of {', '.join(methods)}")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="hashret-int8-", dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        # ONNX's own shape inference suffices (only the batch dim is dynamic); the symbolic pass
        # is meant for transformer graphs and costs ~20x more here
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        excluded = head_nodes(model, exclude)
        input_name = model.graph.input[0].name
        tmp_out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre), str(tmp_out), calibration_reader(input_name, calib_batches),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range,
            nodes_to_exclude=excluded, calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        q = onnx.load(str(tmp_out))
        onnx.checker.check_model(q)
        n_q = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
        from hashret.fsutil import atomic_write

        data = q.SerializeToString()
        atomic_write(out_path, lambda f: f.write(data))
    return {"per_channel": per_channel, "format": "QDQ", "activations": "uint8", "weights": "int8",
            "reduce_range": reduce_range,
            "calibration": method, "excluded_nodes": excluded, "exclude": exclude, "quantize_nodes": n_q}


def add_args(p) -> None:
    g = arg_group(p, "INT8 (onnx-int8)")
    g.add_argument("--calib", type=int, default=256, metavar="N",
                   help="training images used to calibrate INT8 scales (default: 256)")
    g.add_argument("--calib-method", default="minmax", choices=("minmax", "percentile", "entropy"),
                   help="how INT8 activation ranges are chosen (default: minmax)")
    g.add_argument("--int8-exclude", default="hash-layer", choices=("hash-layer", "head", "none"),
                   help="layers kept in float in the INT8 model: only the final hash layer and tanh, the "
                        "whole hash head, or none (default: hash-layer)")


def check_args(args) -> None:
    if args.calib < 0:
        raise BadInput(f"--calib {args.calib} | must not be negative: pass a number of images (default: 256)")


def build(job: ExportJob, out: Path) -> dict:
    """The `onnx-int8` row's build step (export/formats.py): calibrate on the run's training images."""
    from export.data import batches, calibration_images

    a = job.args
    calib = calibration_images(job.splits, job.spec, a.calib)
    job.say(f"      {len(calib)} images, {a.calib_method} ranges, kept in float: {a.int8_exclude}")
    facts = int8_from_onnx(job.path("model.onnx"), out, list(batches(calib, 16)), exclude=a.int8_exclude,
                           method=a.calib_method)
    facts["calibration_images"] = int(len(calib))
    return facts

"""ONNX Runtime backends: "ort" (model.onnx), "ort-int8" (model.int8.onnx), "ort-fp16" (model.fp16.onnx).

One runner for all three: they differ only in the file. Device "cpu" uses the CPU execution
provider; "cuda" the CUDA EP and "tensorrt" the TensorRT EP (each falling back to CPU for nodes
it cannot take), when the installed onnxruntime build has them (onnxruntime-gpu). A session
whose accelerator provider failed to start is refused, never run on the CPU under a CUDA label.
"""
from __future__ import annotations

import numpy as np

from hashret.engines.base import Engine
from hashret.errors import BadInput, Unavailable

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise Unavailable("backend ort | onnxruntime is not installed: pip install onnxruntime") from None
    return ort


def providers_for(device: str) -> list[str]:
    """Execution providers for `device`, refusing one this onnxruntime build lacks."""
    ort = _import_ort()
    dev = device.split(":")[0]
    if dev not in _PROVIDERS:
        raise BadInput(f"device {device!r} | unknown for ONNX Runtime: choose {', '.join(_PROVIDERS)}")
    wanted = _PROVIDERS[dev]
    have = ort.get_available_providers()
    if wanted[0] not in have:
        raise Unavailable(
            f"backend ort | {wanted[0]} is not in this onnxruntime build (has {', '.join(have)}): "
            "pip install onnxruntime-gpu for CUDA/TensorRT, or use --device cpu"
        )
    return [p for p in wanted if p in have]


def check_providers_in_force(got: list[str], asked: list[str], device: str) -> None:
    """Refuse a session that dropped the accelerator provider it was asked for.

    ONNX Runtime registers a provider it cannot initialise (CUDA libraries missing, wrong CUDA
    major, no driver) with only a log line and runs everything on the CPU, so a timing or parity
    row labelled cuda would silently be a CPU result.
    """
    missing = [p for p in asked if p != "CPUExecutionProvider" and p not in got]
    if missing:
        raise Unavailable(
            f"backend ort --device {device} | onnxruntime fell back to {', '.join(got) or 'nothing'}: "
            f"{', '.join(missing)} did not initialise: install onnxruntime-gpu built for this CUDA "
            "(with its cuDNN/CUDA libraries on the library path), or use --device cpu"
        )


class OrtEngine(Engine):
    """An onnxruntime.InferenceSession on one model file.

    Options: `intra_op_threads` (int, default: onnxruntime's choice, all physical cores) and
    `inter_op_threads`; fewer threads per session suits a server running several in parallel.
    """

    name = "ort"

    def _load(self) -> None:
        ort = _import_ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for key, attr in (("intra_op_threads", "intra_op_num_threads"), ("inter_op_threads", "inter_op_num_threads")):
            v = self.options.get(key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise BadInput(f"option {key} | {v!r} is not a non-negative integer (0 = onnxruntime default)")
                setattr(so, attr, v)
        so.log_severity_level = 3
        providers = providers_for(self.device)
        opts = []
        for p in providers:
            if p == "CUDAExecutionProvider" and ":" in self.device:
                opts.append({"device_id": int(self.device.split(":")[1])})
            else:
                opts.append({})
        try:
            self.session = ort.InferenceSession(self.model_path, so, providers=providers, provider_options=opts)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BadInput(f"{self.model_path} | onnxruntime cannot load it ({type(e).__name__}: {e})") from None
        check_providers_in_force(self.session.get_providers(), providers, self.device)
        inp = self.session.get_inputs()[0]
        if inp.type != "tensor(uint8)":
            raise BadInput(f"{self.model_path} | input {inp.name} is {inp.type}, expected uint8 images: re-export")
        self.input_name = inp.name
        self.output_name = self.session.get_outputs()[0].name

    def _encode(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def _close(self) -> None:
        self.session = None

    def describe(self) -> dict:
        d = super().describe()
        if getattr(self, "session", None) is not None:
            d["providers"] = self.session.get_providers()
        return d

"""OpenVINO backends: "openvino" (model.onnx) and "openvino-int8" (model.int8.onnx; QDQ -> int8 kernels).

Precision matters for hash codes: on CPUs with bf16 support (AMX, or AVX512_BF16 as on AMD Zen 4)
OpenVINO's default INFERENCE_PRECISION_HINT is bf16, whose 8-bit mantissa flips the sign of
near-zero activations. Measured on an AMD EPYC (AVX512_BF16, no AMX), 64-bit DCH Grocery,
efficientnet-lite0: f32 agreed with torch on 100% of bits; bf16 on 99.88% (mAP@all within
noise) at ~1.7x the speed (bs=1: 3.8 vs 6.1 ms, 2 threads; resnet50 20.7 vs 41.6 ms). We default
to `precision="f32"` so `hashret check`'s 0.1% bit-flip gate holds, and let callers opt into
"bf16" for speed (parity.json shows both).
"""
from __future__ import annotations

import numpy as np

from hashret.engines.base import Engine
from hashret.errors import BadInput, Unavailable

PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16", "default": None}


class OpenVinoEngine(Engine):
    """Options: `precision` ("f32" default | "bf16" | "f16" | "default" = OpenVINO's choice),
    `threads` (INFERENCE_NUM_THREADS), `hint` (PERFORMANCE_HINT, default "LATENCY")."""

    name = "openvino"

    def _load(self) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise Unavailable("backend openvino | openvino is not installed: pip install openvino") from None
        prec = str(self.options.get("precision", "f32")).lower()
        if prec not in PRECISIONS:
            raise BadInput(f"option precision | {prec!r}: choose f32, bf16, f16 or default")
        dev = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}.get(self.device.lower(), self.device.upper())
        core = ov.Core()
        if dev.split(".")[0] not in [d.split(".")[0] for d in core.available_devices]:
            raise Unavailable(
                f"backend openvino | device {self.device} not available (have {', '.join(core.available_devices)})"
            )
        config = {"PERFORMANCE_HINT": str(self.options.get("hint", "LATENCY"))}
        if PRECISIONS[prec]:
            config["INFERENCE_PRECISION_HINT"] = PRECISIONS[prec]
        if self.options.get("threads"):
            config["INFERENCE_NUM_THREADS"] = int(self.options["threads"])
        try:
            model = core.read_model(self.model_path)
            self.compiled = core.compile_model(model, dev, config)
        except Exception as e:  # OpenVINO raises RuntimeError with the plugin's text
            raise BadInput(f"{self.model_path} | OpenVINO cannot compile it ({type(e).__name__}: {e})") from None
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        used = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision_used = used.get_type_name() if hasattr(used, "get_type_name") else str(used)

    def _encode(self, images: np.ndarray) -> np.ndarray:
        res = self.request.infer({0: images}, share_inputs=True)
        return np.array(res[self.output], dtype=np.float32, copy=True)

    def _close(self) -> None:
        self.request = None
        self.compiled = None

    def describe(self) -> dict:
        d = super().describe()
        if getattr(self, "compiled", None) is not None:
            d["inference_precision"] = self.precision_used
        return d

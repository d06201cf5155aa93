"""The one table of export formats: it drives --formats validation, --help text and parity rows.

Adding a format is one row here plus one module that writes its file.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from hashret.errors import BadInput


@dataclass(frozen=True)
class Format:
    name: str  # what --formats takes
    file: str  # what it writes inside EXP/
    needs_gpu: bool
    precision: str
    description: str
    backends: tuple[str, ...]  # hashret.engines backends that run it (parity rows)
    needs: tuple[str, ...] = ()  # modules the export step imports ("a|b": either one)
    after: tuple[str, ...] = ()  # formats it is built from (added automatically)
    pip: str = ""  # what to install when a module is missing


FORMATS: tuple[Format, ...] = (
    Format("onnx", "model.onnx", False, "fp32",
           "ONNX graph, uint8 images in, tanh codes out; runs on ONNX Runtime, OpenVINO and Triton, "
           "and every other format is built from it",
           ("ort", "openvino"), ("onnx", "onnxruntime"), pip="onnx onnxruntime"),
    Format("onnx-int8", "model.int8.onnx", False, "int8",
           "INT8 (static QDQ, per-channel) ONNX calibrated on --calib training images: the fast CPU "
           "model (ONNX Runtime, OpenVINO)",
           ("ort-int8", "openvino-int8"), ("onnxruntime.quantization",), ("onnx",), pip="onnxruntime"),
    Format("onnx-fp16", "model.fp16.onnx", False, "fp16",
           "FP16 ONNX (uint8 in, float32 out) for GPU execution providers and TensorRT strongly typed builds",
           ("ort-fp16",), ("onnx", "onnxruntime.transformers.float16|onnxconverter_common.float16"), ("onnx",),
           pip="onnxruntime"),
    Format("tensorrt", "model.plan", True, "fp16",
           "TensorRT engine + engine.json for NVIDIA GPUs; tied to the GPU architecture and TensorRT "
           "version that built it",
           ("tensorrt",), ("tensorrt",), ("onnx",), pip="tensorrt (NVIDIA GPU hosts only)"),
    Format("triton", "triton", False, "as built",
           "Triton Inference Server model repository (triton/) holding the ONNX model, and the "
           "TensorRT plan when built",
           (), (), ("onnx",)),
)
BY_NAME = {f.name: f for f in FORMATS}


def get(name: str) -> Format:
    try:
        return BY_NAME[name]
    except KeyError:
        raise BadInput(f"--formats {name!r} | unknown format: choose from {', '.join(BY_NAME)}") from None


def parse_formats(text: str) -> list[Format]:
    """Comma list -> formats in table order, with prerequisites (onnx) added."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BadInput("--formats | empty: name at least one of " + ", ".join(BY_NAME))
    wanted = {get(n).name for n in names}
    for n in list(wanted):
        wanted.update(get(n).after)
    return [f for f in FORMATS if f.name in wanted]


def unavailable_reason(fmt: Format) -> str | None:
    """Why this machine cannot produce `fmt` (None when it can)."""
    for need in fmt.needs:
        alternatives = need.split("|")
        errs = []
        for mod in alternatives:
            try:
                importlib.import_module(mod)
                break
            except Exception as e:  # ImportError, or a broken install raising anything
                errs.append(f"{mod}: {type(e).__name__}: {e}")
        else:
            return f"{alternatives[0].split('.')[0]} not installed: pip install {fmt.pip} ({'; '.join(errs)})"
    if fmt.needs_gpu:
        import torch

        if not torch.cuda.is_available():
            return "needs an NVIDIA GPU: no CUDA device visible (torch.cuda.is_available() is False)"
    return None


def help_text() -> str:
    width = max(len(f.name) for f in FORMATS)
    lines = [f"  {f.name:<{width}}  {f.file:<16} {f.precision:<8} {'GPU ' if f.needs_gpu else ''}{f.description}"
             for f in FORMATS]
    return "formats (name, file in EXP/, precision, description):\n" + "\n".join(lines)

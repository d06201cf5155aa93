"""The one table of export formats: it drives --formats, --help, the build steps and the parity rows.

Adding a format is one module that builds its file plus one row registered here (or, for a
plug-in, `register_format(Format(...))` from its own module). `hashret export` derives everything
else from the row: the `--formats` choices and help, the flags the format adds, which formats it
is built from, why this machine cannot produce it, whether it needs the dataset, the step that
builds it and the backends of its parity rows.
"""
from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hashret.errors import BadInput, Unavailable
from hashret.registry import Registry

# a callable, or "module:function" imported when first used (keeps `hashret export --help` light)
Hook = str | Callable[..., Any] | None


@dataclass(frozen=True)
class Format:
    """One export format.

    build(job, out) writes the format's files (out = job.exp / file) and returns facts for the
    manifest's export.formats[name]; `file` is listed in export.files when it is a file (a step that writes
    more, or a folder, names those with job.wrote). add_args(parser) adds the format's own flags
    and check_args(args) rejects bad values before any work starts; both run whether or not the
    format is chosen, since its flags always exist.
    """

    name: str  # what --formats takes
    file: str  # what it writes inside EXP/
    needs_gpu: bool
    precision: str
    description: str
    backends: tuple[str, ...]  # hashret.engines backends that run it (parity rows)
    needs: tuple[str, ...] = ()  # modules the build step imports ("a|b": either one)
    after: tuple[str, ...] = ()  # formats it is built from (added automatically, built first)
    pip: str = ""  # what to install when a module is missing
    needs_data: str = ""  # what the run's images are for, when the build needs them ("" = none)
    step: str = ""  # the progress line shown when its build starts
    build: Hook = None
    add_args: Hook = None
    check_args: Hook = None

    def hook(self, which: str) -> Callable[..., Any] | None:
        """The `build`, `add_args` or `check_args` callable, imported on first use."""
        ref = getattr(self, which)
        if ref is None or callable(ref):
            return ref
        module, _, func = ref.partition(":")
        return getattr(importlib.import_module(module), func)


FORMATS: Registry[Format] = Registry("export format")
BASE = "onnx"  # every export holds model.onnx: the other formats are built from it, its sha256 is the model id
BATCH_GROUP = "TensorRT and Triton (batch profile)"


def register_format(row: Format) -> Format:
    """Add a row to the table. The formats it is built from must be registered already, so the
    table's order is always an order the rows can be built in."""
    missing = [a for a in row.after if a not in FORMATS]
    if missing:
        raise ValueError(f"export format {row.name!r} is built from {missing}, which are not registered")
    if row.build is None:
        raise ValueError(f"export format {row.name!r} has no build step")
    return FORMATS.register(row.name)(row)


for _row in (
    Format("onnx", "model.onnx", False, "fp32",
           "ONNX graph, uint8 images in, tanh codes out; runs on ONNX Runtime, OpenVINO and Triton, "
           "and every other format is built from it",
           ("ort", "openvino"), ("onnx", "onnxruntime"), pip="onnx onnxruntime",
           step="exporting the encoder", build="export.onnx_format:build",
           add_args="export.onnx_format:add_args"),
    Format("onnx-int8", "model.int8.onnx", False, "int8",
           "INT8 (static QDQ, per-channel) ONNX calibrated on --calib training images: the fast CPU "
           "model (ONNX Runtime, OpenVINO)",
           ("ort-int8", "openvino-int8"), ("onnxruntime.quantization",), ("onnx",), pip="onnxruntime",
           needs_data="calibration", step="calibrating on --calib training images",
           build="export.int8:build", add_args="export.int8:add_args", check_args="export.int8:check_args"),
    Format("onnx-fp16", "model.fp16.onnx", False, "fp16",
           "FP16 ONNX (uint8 in, float32 out) for GPU execution providers and TensorRT strongly typed builds",
           ("ort-fp16",), ("onnx", "onnxruntime.transformers.float16|onnxconverter_common.float16"), ("onnx",),
           pip="onnxruntime", step="converting", build="export.fp16:build"),
    Format("tensorrt", "model.plan", True, "fp16",
           "TensorRT engine + engine.json for NVIDIA GPUs; tied to the GPU architecture and TensorRT "
           "version that built it",
           ("tensorrt",), ("tensorrt",), ("onnx",), pip="tensorrt (NVIDIA GPU hosts only)",
           step="building an engine (minutes)", build="export.tensorrt:build", add_args="export.tensorrt:add_args"),
    Format("triton", "triton", False, "as built",
           "Triton Inference Server model repository (triton/) holding the ONNX model, and the "
           "TensorRT plan when built",
           (), (), ("onnx",), step="writing the model repository", build="export.triton:build",
           add_args="export.triton:add_args"),
):
    register_format(_row)


def rows() -> list[Format]:
    """Every registered format, in table (= build) order."""
    return [row for _, row in FORMATS.items()]


def get(name: str) -> Format:
    if name not in FORMATS:
        raise BadInput(f"--formats {name!r} | unknown format: choose from {', '.join(r.name for r in rows())}")
    return FORMATS.get(name)


def parse_formats(text: str) -> list[Format]:
    """Comma list -> formats in table order, with the formats they are built from added."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BadInput("--formats | empty: name at least one of " + ", ".join(r.name for r in rows()))
    wanted: set[str] = set()
    todo = [BASE] + [get(n).name for n in names]
    while todo:
        n = todo.pop()
        if n not in wanted:
            wanted.add(n)
            todo += get(n).after
    return [f for f in rows() if f.name in wanted]


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


def select_formats(text: str | None) -> tuple[list[Format], dict[str, str]]:
    """Explicit formats must all be producible (Unavailable otherwise); by default, every format
    this machine can produce, with the others (and those built from them) returned as skipped."""
    if text:
        chosen = parse_formats(text)
        for f in chosen:
            why = unavailable_reason(f)
            if why:
                raise Unavailable(f"format {f.name} | cannot be produced on this machine: {why}")
        return chosen, {}
    chosen, skipped = [], {}
    for f in rows():
        why = unavailable_reason(f) or next((f"built from {a}, which is skipped" for a in f.after if a in skipped),
                                            None)
        if why:
            skipped[f.name] = why
        else:
            chosen.append(f)
    return chosen, skipped


def add_format_args(p: argparse.ArgumentParser) -> None:
    """Every row's own flags, in table order."""
    for row in rows():
        add = row.hook("add_args")
        if add:
            add(p)


def check_format_args(args: argparse.Namespace) -> None:
    for row in rows():
        check = row.hook("check_args")
        if check:
            check(args)


def arg_group(p: argparse.ArgumentParser, title: str):
    """The parser's argument group with this title, created on first use, so formats that share
    options (TensorRT and Triton share the batch profile) show them under one heading."""
    for g in p._action_groups:  # argparse keeps no public lookup by title
        if g.title == title:
            return g
    return p.add_argument_group(title)


def names_text() -> str:
    return ", ".join(r.name for r in rows())


def help_text() -> str:
    width = max(len(f.name) for f in rows())
    lines = [f"  {f.name:<{width}}  {f.file:<16} {f.precision:<8} {'GPU ' if f.needs_gpu else ''}{f.description}"
             for f in rows()]
    return "formats (name, file in EXP/, precision, description):\n" + "\n".join(lines)

"""Inference backends ("engines") behind one runner interface, and the one way to open them.

Every backend runs the same exported encoder: uint8 images [N, H, W, 3] -> float32 tanh
activations [N, bits]. `open_engine(EXP, backend)` reads EXP/manifest.json, refuses a file whose
sha256 differs from the manifest (so the server never serves a model other than the one its
gallery was encoded with), and returns a loaded Engine. Backend modules are imported lazily, and
each imports its own package lazily, so a missing optional package costs nothing until used.

Adding a backend is one runner module (an `Engine` subclass) plus one `register_backend(BackendSpec(...))`:
every command's backend choices (`serve`, `check`, `bench engine`, ...), the benchmark lists and the
mapping of the generic thread count (`serve --engine-threads`, `bench engine --threads`) onto the
runner's own option come from that entry.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from hashret.engines.base import Engine, out_of_memory
from hashret.errors import ArtifactMismatch, MissingArtifact, Unavailable
from hashret.manifest import load_manifest, verify_file
from hashret.registry import Registry

__all__ = ["ENGINES", "BackendSpec", "Engine", "open_engine", "model_id", "available_backends",
           "backend_spec", "register_backend", "unavailable_reason", "out_of_memory"]

MODEL_ONNX = "model.onnx"


@dataclass(frozen=True)
class BackendSpec:
    """One backend: which EXP file it runs, where its runner lives, which package it needs."""

    name: str
    file: str  # inside EXP/
    module: str  # module holding the Engine subclass
    cls: str
    package: str  # import name checked by available_backends()
    pip: str  # what to pip install when the package is missing
    needs_gpu: bool = False
    options: tuple[tuple[str, object], ...] = ()  # fixed constructor options (e.g. precision)
    # The runner's own keyword for "use N CPU threads": the libraries name it differently, and
    # serve/bench only know the generic count. None: the backend has no such knob (TensorRT).
    threads_option: str | None = None

    def load_class(self) -> type[Engine]:
        return getattr(importlib.import_module(self.module), self.cls)

    def thread_options(self, threads: int | None) -> dict[str, int]:
        """The constructor options that ask for `threads` CPU threads; {} for None or no such option."""
        if threads is None or self.threads_option is None:
            return {}
        return {self.threads_option: int(threads)}


ENGINES: Registry[BackendSpec] = Registry("backend")


def register_backend(spec: BackendSpec) -> BackendSpec:
    """Add a backend; a name already taken is refused. Entries keep registration order in tables."""
    return ENGINES.register(spec.name)(spec)


# Registration order is the order of benchmark tables: reference first, then by library.
_ORT, _OV = "hashret.engines.ort", "hashret.engines.openvino_engine"
register_backend(BackendSpec("torch", "model.pt", "hashret.engines.torch_engine", "TorchEngine", "torch", "torch",
                             threads_option="threads"))
register_backend(BackendSpec("ort", "model.onnx", _ORT, "OrtEngine", "onnxruntime", "onnxruntime",
                             threads_option="intra_op_threads"))
register_backend(BackendSpec("ort-fp16", "model.fp16.onnx", _ORT, "OrtEngine", "onnxruntime", "onnxruntime",
                             threads_option="intra_op_threads"))
register_backend(BackendSpec("ort-int8", "model.int8.onnx", _ORT, "OrtEngine", "onnxruntime", "onnxruntime",
                             threads_option="intra_op_threads"))
register_backend(BackendSpec("openvino", "model.onnx", _OV, "OpenVinoEngine", "openvino", "openvino",
                             threads_option="threads"))
register_backend(BackendSpec("openvino-int8", "model.int8.onnx", _OV, "OpenVinoEngine", "openvino", "openvino",
                             threads_option="threads"))
register_backend(BackendSpec("tensorrt", "model.plan", "hashret.engines.tensorrt_engine", "TensorRTEngine",
                             "tensorrt", "tensorrt (NVIDIA GPU hosts only)", needs_gpu=True))


def backend_spec(name: str) -> BackendSpec:
    return ENGINES.get(name)


def _importable(package: str) -> str | None:
    """None when `package` imports, else the reason (the import error text)."""
    try:
        importlib.import_module(package)
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"{type(e).__name__}: {e}"
    return None


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run on this machine (None when it can)."""
    spec = backend_spec(name)
    err = _importable(spec.package)
    if err:
        return f"{spec.package} not installed: pip install {spec.pip} ({err})"
    if spec.needs_gpu:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible (torch.cuda.is_available() is False)"
    return None


def available_backends(exp_dir: str | os.PathLike | None = None) -> list[str]:
    """Backends whose packages (and GPU, where needed) are here; with EXP, whose file it holds."""
    names = [n for n in ENGINES.names() if unavailable_reason(n) is None]
    if exp_dir is not None:
        files = load_manifest(exp_dir, kind="export").get("export", {}).get("files", {})
        names = [n for n in names if backend_spec(n).file in files]
    return names


def model_id(exp_manifest: dict) -> str:
    """The id galleries are bound to: sha256 of model.onnx, the same for every backend of one export.

    Every backend file is derived from model.onnx (or, for torch, from the same weights), so a
    gallery encoded through one backend stays valid for any other backend of that export.
    """
    files = (exp_manifest.get("export") or {}).get("files") or {}
    entry = files.get(MODEL_ONNX)
    if not isinstance(entry, dict) or not entry.get("sha256"):
        raise ArtifactMismatch(
            "export manifest | has no export.files['model.onnx'].sha256: re-export with hashret export"
        )
    return str(entry["sha256"])


def open_engine(exp_dir: str | os.PathLike, backend: str = "ort", device: str = "cpu", *,
                verify: bool = True, manifest: dict | None = None, **options) -> Engine:
    """Open EXP's file for `backend`, sha256-verified against the manifest, loaded and ready.

    `manifest`: EXP's manifest when the caller has already read it (serve start-up), so it is read
    once. Raises MissingArtifact when the export lacks the backend's file, ArtifactMismatch when the
    file differs from the manifest, Unavailable when the backend's package or GPU is missing.
    """
    exp_dir = Path(exp_dir)
    m = manifest if manifest is not None else load_manifest(exp_dir, kind="export")
    spec = backend_spec(backend)
    files = (m.get("export") or {}).get("files") or {}
    entry = files.get(spec.file)
    if entry is None:
        raise MissingArtifact(
            f"{exp_dir / spec.file} | export has no {spec.file} for backend {backend!r}: "
            f"re-export with hashret export {exp_dir} (formats: {', '.join(sorted(files)) or 'none'})"
        )
    path = verify_file(exp_dir, spec.file, entry) if verify else exp_dir / spec.file
    reason = unavailable_reason(backend)
    if reason:
        raise Unavailable(f"backend {backend} | {reason}")
    try:
        size, bits = int(m["preprocessing"]["crop"]), int(m["bits"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactMismatch(f"{exp_dir}/manifest.json | lacks preprocessing.crop or bits: re-export") from None
    cls = spec.load_class()
    opts = {**dict(spec.options), **options}
    eng = cls(str(path), size=size, bits=bits, device=device, **opts)
    eng.name = backend
    return eng.load()

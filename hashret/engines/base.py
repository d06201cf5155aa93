"""The runner interface every inference backend implements (Polygraphy-style).

`load()` / `encode(batch)` / `close()`; input checked once here, subclasses write `_load`,
`_encode` and optionally `_close`. Usable as a context manager.
"""
from __future__ import annotations

import sys

import numpy as np

from hashret.errors import BadInput, HashretError

# What the engine libraries' errors say when an allocation failed: ONNX Runtime's arena and CUDA
# provider, OpenVINO, the CUDA runtime and driver, C++'s std::bad_alloc.
_OOM_PHRASES = ("out of memory", "failed to allocate memory", "bad_alloc", "cudaerrormemoryallocation",
                "cuda_error_out_of_memory")


def torch_oom_errors() -> tuple[type[BaseException], ...]:
    """torch's out-of-memory exception types (for `except`), or () where torch is not loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    kinds = (getattr(torch, "OutOfMemoryError", None), getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
    return tuple(dict.fromkeys(t for t in kinds if isinstance(t, type)))


def out_of_memory(error: BaseException) -> bool:
    """Whether an engine's error means it ran out of (device or host) memory: a smaller batch may fit.

    Our own errors (bad input, missing artifacts) never count, whatever their text says.
    """
    if isinstance(error, HashretError):
        return False
    if isinstance(error, MemoryError):
        return True
    kinds = torch_oom_errors()
    if kinds and isinstance(error, kinds):
        return True
    text = str(error).lower()
    return any(p in text for p in _OOM_PHRASES)


class Engine:
    """uint8 images [N, H, W, 3] -> float32 activations [N, bits] (tanh outputs; sign gives the code)."""

    name = "engine"

    def __init__(self, model_path: str, *, size: int, bits: int, device: str = "cpu", **options):
        self.model_path = str(model_path)
        self.size = int(size)
        self.bits = int(bits)
        self.device = device
        self.options = options
        self.loaded = False

    # --- public API -------------------------------------------------------------
    def load(self) -> "Engine":
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def encode(self, images: np.ndarray) -> np.ndarray:
        if not self.loaded:
            self.load()
        images = self._check(images)
        out = np.asarray(self._encode(images), dtype=np.float32)
        if out.shape != (images.shape[0], self.bits):
            raise RuntimeError(f"{self.name} engine returned shape {out.shape}, expected {(images.shape[0], self.bits)}")
        return out

    def close(self) -> None:
        if self.loaded:
            self._close()
            self.loaded = False

    def describe(self) -> dict:
        """What to record next to timings and in Info responses."""
        return {"engine": self.name, "model": self.model_path, "device": self.device, **self.options}

    def __enter__(self) -> "Engine":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- for subclasses ---------------------------------------------------------
    def _load(self) -> None:
        raise NotImplementedError

    def _encode(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        expected = (self.size, self.size, 3)
        if images.dtype != np.uint8:
            raise BadInput(f"{self.name} engine | input dtype {images.dtype}, expected uint8 images")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != expected or images.shape[0] < 1:
            raise BadInput(f"{self.name} engine | input shape {images.shape}, expected [N, {self.size}, {self.size}, 3]")
        return np.ascontiguousarray(images)

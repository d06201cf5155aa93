"""Backbone features through an inference engine (OpenVINO or ONNX Runtime fp32) instead of torch eager.

The pooled trunk (normalization inside, as in every exported graph: uint8 [N, H, W, 3] in, float32
[N, dim] out) is exported once to ONNX under `$HASHRET_CACHE/trunks/`, keyed by backbone, a digest of
its weights and the preprocessing, and run through the same runner classes that serve exported models
(hashret.engines). Decoding runs in a thread pool one batch ahead of the engine (Pillow releases the
GIL while it decodes and resizes).

torch stays the reference: before an engine's features are used, torch and the engine encode the same
sample of images and every per-image cosine must reach `MIN_COSINE`; otherwise the caller falls back
to torch (train.features.cached_features). Engines run fp32 only: int8 or bf16 features would train
a head on inputs the exported fp32 model never produces.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hashret.datasets import Sample
from hashret.errors import BadInput, HashretError, Unavailable
from hashret.fsutil import atomic_write
from hashret.images import PreprocessSpec, load_image
from hashret.models import Backbone, Normalize

log = logging.getLogger(__name__)

# `--feature-engine` choices; "auto" tries ENGINE_ORDER, then torch.
FEATURE_ENGINES = ("auto", "torch", "openvino", "ort")
# OpenVINO first: on the 2-core AVX-512 development VM it ran the Lite0 trunk at batch 64 faster than
# ORT (`python -m benchmarks.extract_bench` times both in one run).
ENGINE_ORDER = ("openvino", "ort")
MIN_COSINE = 0.9999
CHECK_IMAGES = 32
TRUNK_OPSET = 18
# Bump when the exported trunk graph changes, so stale ONNX files in caches are not reused.
TRUNK_VERSION = 1


def trunk_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where exported trunks live: beside the feature cache (`<root>/features` -> `<root>/trunks`)."""
    if cache_dir is None:
        return Path(os.environ.get("HASHRET_CACHE", Path.home() / ".cache" / "hashret")) / "trunks"
    cache_dir = Path(cache_dir)
    return cache_dir.parent / "trunks" if cache_dir.name == "features" else cache_dir / "trunks"


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over parameter and buffer bytes: two trunks share a file only if they compute the same thing."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def trunk_module(backbone: Backbone) -> torch.nn.Module:
    """uint8 NHWC images -> pooled features: what is exported and what torch runs for the check."""
    return torch.nn.Sequential(Normalize(backbone.spec), backbone.net).eval()


def trunk_path(backbone: Backbone, cache_dir: str | os.PathLike | None = None) -> Path:
    what = {"v": TRUNK_VERSION, "backbone": backbone.name, "weights": weights_digest(backbone.net),
            "spec": backbone.spec.to_dict(), "opset": TRUNK_OPSET}
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return trunk_cache_dir(cache_dir) / f"{backbone.name}-{key}.onnx"


def export_trunk(backbone: Backbone, path: str | os.PathLike) -> Path:
    """Export the pooled trunk to `path` (atomic), with a dynamic batch dimension.

    The TorchScript exporter: it takes a few seconds where torch.export takes about a minute for these
    trunks, and the check against torch below guards the result either way.
    """
    try:
        import onnx
    except ImportError:
        raise Unavailable("feature engine | onnx is not installed: pip install onnx") from None
    path = Path(path)
    net = trunk_module(backbone)
    size = backbone.spec.crop
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="hashret-trunk-") as tmp, warnings.catch_warnings():
        # the exporter warns about constant folding of the static same-padding slices; the result is
        # checked against torch before any feature is used, so its warnings only add noise to a run
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "trunk.onnx"
        torch.onnx.export(net, (example,), str(raw), dynamo=False, opset_version=TRUNK_OPSET,
                          input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "N"}, "features": {0: "N"}})
        model = onnx.load(str(raw))
    data = model.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return path


def ensure_trunk(backbone: Backbone, cache_dir: str | os.PathLike | None = None) -> Path:
    """The trunk's ONNX file, exported on first use."""
    path = trunk_path(backbone, cache_dir)
    if not path.is_file():
        t0 = time.perf_counter()
        export_trunk(backbone, path)
        log.info("trunk of %s exported to %s in %.1f s", backbone.name, path, time.perf_counter() - t0)
    return path


def open_trunk_engine(engine: str, path: str | os.PathLike, backbone: Backbone, threads: int | None = None):
    """A loaded hashret Engine running the trunk file, fp32. Raises Unavailable or BadInput."""
    if engine == "ort":
        from hashret.engines.ort import OrtEngine

        opts = {"intra_op_threads": threads} if threads else {}
        eng = OrtEngine(str(path), size=backbone.spec.crop, bits=backbone.dim, **opts)
    elif engine == "openvino":
        from hashret.engines.openvino_engine import OpenVinoEngine

        opts = {"threads": threads} if threads else {}
        eng = OpenVinoEngine(str(path), size=backbone.spec.crop, bits=backbone.dim, precision="f32", **opts)
    else:
        raise BadInput(f"--feature-engine {engine} | not an engine for features: choose {', '.join(FEATURE_ENGINES)}")
    return eng.load()


def engine_importable(engine: str) -> str | None:
    """None when `engine`'s package imports, else why not."""
    package = {"ort": "onnxruntime", "openvino": "openvino"}[engine]
    try:
        __import__(package)
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"{package} not installed: pip install {package} ({type(e).__name__}: {e})"
    return None


def candidates(choice: str) -> list[str]:
    """Engines to try for `--feature-engine choice`, best first (torch, the fallback, not listed)."""
    if choice not in FEATURE_ENGINES:
        raise BadInput(f"--feature-engine {choice} | unknown: choose {', '.join(FEATURE_ENGINES)}")
    if choice == "torch":
        return []
    if choice == "auto":
        return [e for e in ENGINE_ORDER if engine_importable(e) is None]
    why = engine_importable(choice)
    if why:
        raise Unavailable(f"--feature-engine {choice} | {why}; or pass --feature-engine auto or torch")
    return [choice]


# ----------------------------------------------------------------------------- decoding
def decode_batches(samples: list[Sample], spec: PreprocessSpec, batch_size: int,
                   threads: int | None = None) -> Iterator[tuple[list[int], np.ndarray | None, list[str]]]:
    """(indices, uint8 [n, crop, crop, 3] or None, error notes) per batch, in order.

    A thread pool decodes the next batch while the caller runs the current one.
    """
    def load(i: int):
        s = samples[i]
        try:
            return load_image(s.path, spec)
        except BadInput as e:
            where = f"{s.path} ({s.source})" if s.source and s.source != s.path else s.path
            return BadInput(f"{where} | {str(e).split(' | ', 1)[-1]}")

    threads = threads or min(4, os.cpu_count() or 1)
    chunks = [list(range(s, min(len(samples), s + batch_size))) for s in range(0, len(samples), batch_size)]
    with ThreadPoolExecutor(threads, thread_name_prefix="hashret-feature-decode") as pool:
        pending = [pool.map(load, chunks[0])] if chunks else []
        for n, idx in enumerate(chunks):
            arrays = list(pending.pop(0))
            if n + 1 < len(chunks):
                pending.append(pool.map(load, chunks[n + 1]))
            good = [(i, a) for i, a in zip(idx, arrays) if not isinstance(a, Exception)]
            errs = [str(a) for a in arrays if isinstance(a, Exception)]
            x = np.stack([a for _, a in good]) if good else None
            yield [i for i, _ in good], x, errs


# ----------------------------------------------------------------------------- the check
def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row cosine of two [n, d] arrays (float64; a zero row against a zero row counts as 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = dot / (na * nb)
    return np.where(both_zero, 1.0, np.nan_to_num(c, nan=0.0))


@dataclass
class EngineCheck:
    """The comparison of an engine's features with torch's on a sample of images."""

    engine: str
    images: int
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    threshold: float
    passed: bool
    worst: str = ""  # the image with the lowest cosine

    def to_dict(self) -> dict:
        return {k: (round(v, 8) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def check_engine(eng, backbone: Backbone, samples: list[Sample], *, n: int = CHECK_IMAGES,
                 threshold: float = MIN_COSINE) -> EngineCheck:
    """Encode up to `n` readable images (spread over the list) with torch and with `eng`; compare."""
    if not samples:
        return EngineCheck(eng.name, 0, 1.0, 1.0, 0.0, threshold, True)
    picks = sorted({int(i) for i in np.linspace(0, len(samples) - 1, min(n, len(samples)))})
    imgs, names = [], []
    for i in picks:
        try:
            imgs.append(load_image(samples[i].path, backbone.spec))
            names.append(samples[i].path)
        except BadInput:  # reported by the extraction itself
            continue
    if not imgs:
        return EngineCheck(eng.name, 0, 1.0, 1.0, 0.0, threshold, True)
    x = np.stack(imgs)
    with torch.inference_mode():
        ref = trunk_module(backbone)(torch.from_numpy(x)).numpy()
    got = eng.encode(x)
    c = cosines(got, ref)
    k = int(np.argmin(c))
    return EngineCheck(eng.name, len(imgs), float(c.min()), float(c.mean()), float(np.abs(got - ref).max()),
                       threshold, bool(c.min() >= threshold), names[k])


# ----------------------------------------------------------------------------- extraction
@dataclass
class EngineRun:
    """Features through one engine, with what is recorded next to them."""

    features: np.ndarray
    kept: np.ndarray
    skipped: list[str]
    info: dict = field(default_factory=dict)


def extract_with_engine(samples: list[Sample], backbone: Backbone, eng, *, batch_size: int = 64,
                        skip_bad: bool = False, progress: bool = True,
                        decode_threads: int | None = None) -> EngineRun:
    """Pooled features of the readable samples through a loaded trunk engine."""
    from tqdm import tqdm

    feats, kept, skipped = [], [], []
    bar = tqdm(total=len(samples), desc=f"features {backbone.name} ({eng.name})", unit="img", disable=not progress)
    t0 = time.perf_counter()
    for idx, x, errs in decode_batches(samples, backbone.spec, batch_size, decode_threads):
        for err in errs:
            if not skip_bad:
                raise BadInput(f"{err} (use --skip-bad to skip unreadable images)")
            skipped.append(err)
        if idx:
            feats.append(eng.encode(x))
            kept.extend(idx)
        bar.update(len(idx) + len(errs))
    bar.close()
    out = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, backbone.dim), np.float32)
    return EngineRun(out, np.asarray(kept, dtype=np.int64), skipped,
                     {"engine": eng.name, "seconds": round(time.perf_counter() - t0, 2), "batch": batch_size})


def try_engines(samples: list[Sample], backbone: Backbone, engines: list[str], *,
                cache_dir: str | os.PathLike | None = None, threshold: float = MIN_COSINE,
                check_images: int = CHECK_IMAGES, batch_size: int = 64, skip_bad: bool = False,
                progress: bool = True, strict: bool = False) -> tuple[EngineRun | None, list[dict]]:
    """Features from the first engine that loads and passes the check against torch.

    Returns (the run or None when every engine failed, one note per engine tried). A failed check or
    an engine that cannot load is logged as a warning and the next one is tried; `strict` (an engine
    the user named) turns a load failure into an error, never a failed check: the issue's contract is
    that mismatching features fall back to torch.
    """
    notes: list[dict] = []
    if not engines:
        return None, notes
    try:
        path = ensure_trunk(backbone, cache_dir)
    except Exception as e:  # torch.onnx raises many types; torch still works
        if strict and isinstance(e, HashretError):
            raise
        log.warning("feature engine: exporting the %s trunk failed (%s: %s): using torch",
                    backbone.name, type(e).__name__, e)
        return None, [{"engine": "export", "error": f"{type(e).__name__}: {e}"}]
    for name in engines:
        try:
            eng = open_trunk_engine(name, path, backbone)
        except HashretError as e:
            if strict:
                raise
            log.warning("feature engine %s: cannot load the trunk (%s): trying the next", name, e)
            notes.append({"engine": name, "error": str(e)})
            continue
        try:
            chk = check_engine(eng, backbone, samples, n=check_images, threshold=threshold)
            notes.append({"check": chk.to_dict()})
            if not chk.passed:
                log.warning("feature engine %s: per-image cosine with torch down to %.6f (< %g, on %s) over %d "
                            "images: not using it", name, chk.min_cosine, threshold, chk.worst, chk.images)
                continue
            log.info("feature engine %s: min cosine with torch %.7f over %d images (>= %g)",
                     name, chk.min_cosine, chk.images, threshold)
            run = extract_with_engine(samples, backbone, eng, batch_size=batch_size, skip_bad=skip_bad,
                                      progress=progress)
            run.info.update({"check": chk.to_dict(), "trunk": str(path)})
            return run, notes
        finally:
            eng.close()
    return None, notes

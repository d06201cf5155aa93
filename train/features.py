"""Backbone feature extraction with an on-disk cache.

Pooled features are computed once per (image list, backbone, weights, preprocessing) and reused:
training the hash head then takes seconds instead of re-running the backbone every epoch.
`--finetune last-block` caches the last block's *input* instead (`at="last-block"`, float16
[N, C, H, W]), so the last block trains from the cache without decoding an image again.

Pooled features may come from an inference engine (train.fast_features: the trunk exported to ONNX,
run by OpenVINO or ONNX Runtime fp32, checked against torch per image first); torch eager (`extract`)
is the reference and the fallback. The engine is part of the cache key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hashret.datasets import Sample
from hashret.errors import BadInput
from hashret.fsutil import atomic_write, sha256_file
from hashret.images import PreprocessSpec, load_image
from hashret.models import Backbone, Normalize

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """HASHRET_CACHE, else ~/.cache/hashret/features."""
    return Path(os.environ.get("HASHRET_CACHE", Path.home() / ".cache" / "hashret")) / "features"


class ImageList(Dataset):
    """Decoded, resized, cropped uint8 images; a bad file yields None (kept or raised by the caller)."""

    def __init__(self, samples: list[Sample], spec: PreprocessSpec, flip: bool = False):
        self.samples, self.spec, self.flip = samples, spec, flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        try:
            img = load_image(s.path, self.spec)
        except BadInput as e:
            where = f"{s.path} ({s.source})" if s.source and s.source != s.path else s.path
            return i, None, f"{where} | {str(e).split(' | ', 1)[-1]}"
        if self.flip and torch.rand(()) < 0.5:
            img = np.ascontiguousarray(img[:, ::-1])
        return i, torch.from_numpy(img), None


def collate(batch):
    idx = [b[0] for b in batch]
    imgs = [b[1] for b in batch]
    errs = [b[2] for b in batch]
    good = [k for k, im in enumerate(imgs) if im is not None]
    x = torch.stack([imgs[k] for k in good]) if good else torch.empty(0, dtype=torch.uint8)
    return [idx[k] for k in good], x, [(idx[k], errs[k]) for k in range(len(batch)) if imgs[k] is None]


# Bump when feature extraction changes meaning (a backbone fix, a preprocessing change), so stale caches are not reused.
FEATURE_VERSION = 3


def cache_key(samples: list[Sample], backbone: Backbone, at: str = "pooled", engine: str = "torch") -> str:
    h = hashlib.sha256()
    h.update(f"v{FEATURE_VERSION}".encode())
    weights = backbone.weights
    if Path(weights).is_file():  # a local .pth: key on its content, not its name
        weights = sha256_file(weights)
    what = {"backbone": backbone.name, "weights": weights, "spec": backbone.spec.to_dict()}
    if at != "pooled":  # pooled keys stay as they were, so existing caches keep their hits
        what["at"] = f"{at}:{backbone.split}"
    if engine != "torch":  # likewise torch's keys: features another engine made are told apart
        what["engine"] = engine
    h.update(json.dumps(what).encode())
    for s in samples:
        try:
            st = os.stat(s.path)
            h.update(f"{s.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{s.path}\0missing\n".encode())
    return h.hexdigest()[:32]


def num_workers() -> int:
    """One decoding worker per spare core; 0 (inline) on a 1-2 core host where it only adds overhead."""
    return max(0, min(4, (os.cpu_count() or 1) - 2))


@torch.no_grad()
def extract(
    samples: list[Sample],
    backbone: Backbone,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    skip_bad: bool = False,
    progress: bool = True,
    at: str = "pooled",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features for the readable samples, their indices into `samples`, and skip notes.

    Features are [M, dim] float32 pooled features, or with ``at="last-block"`` the last block's
    input [M, C, H, W] as float16 (half the bytes; the block trains in float32 from it).
    """
    trunk = backbone.net
    if at == "last-block":
        if backbone.stem is None:
            raise BadInput(f"backbone {backbone.name} | has no split before its last block: "
                           "use --finetune none, or a backbone that defines one (efficientnet-lite0, resnet50)")
        trunk = backbone.stem
    net = torch.nn.Sequential(Normalize(backbone.spec), trunk).to(device).eval()
    loader = DataLoader(
        ImageList(samples, backbone.spec), batch_size=batch_size, shuffle=False,
        num_workers=num_workers(), collate_fn=collate,
    )
    feats, kept, skipped = [], [], []
    bar = tqdm(total=len(samples), desc=f"features {backbone.name}", unit="img", disable=not progress)
    for idx, x, errs in loader:
        for _, err in errs:
            if not skip_bad:
                raise BadInput(f"{err} (use --skip-bad to skip unreadable images)")
            skipped.append(err)
        if len(idx):
            y = net(x.to(device)).float().cpu().numpy()
            feats.append(y.astype(np.float16) if at == "last-block" else y)
            kept.extend(idx)
        bar.update(len(idx) + len(errs))
    bar.close()
    if at == "last-block":
        return (np.concatenate(feats) if feats else np.zeros((0, 0, 0, 0), np.float16),
                np.asarray(kept, dtype=np.int64), skipped)
    out = np.concatenate(feats) if feats else np.zeros((0, backbone.dim), np.float32)
    return out.astype(np.float32), np.asarray(kept, dtype=np.int64), skipped


def cache_path(samples: list[Sample], backbone: Backbone, cache_dir: Path, at: str = "pooled",
               engine: str = "torch") -> Path:
    prefix = backbone.name if at == "pooled" else f"{backbone.name}-{at}"
    if engine != "torch":
        prefix += f"-{engine}"
    return cache_dir / f"{prefix}-{cache_key(samples, backbone, at, engine)}.npz"


def _read_cache(path: Path, skip_bad: bool):
    """(features, kept, skipped, info) from a cache file, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            f, kept = z["features"], z["kept"]
            skipped = [str(s) for s in z["skipped"]]
            info = json.loads(str(z["info"])) if "info" in z.files else {}
    except (OSError, KeyError, ValueError) as e:
        log.warning("feature cache %s unreadable (%s): recomputing", path, e)
        return None
    if skipped and not skip_bad:
        raise BadInput(f"{skipped[0]} (use --skip-bad to skip unreadable images)")
    return f, kept, skipped, info


def cached_features(
    samples: list[Sample],
    backbone: Backbone,
    cache_dir: str | os.PathLike | None = None,
    at: str = "pooled",
    engine: str = "torch",
    info: dict | None = None,
    **kw,
) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """`extract` through the cache; returns (features, kept indices, skip notes, cache_hit).

    `engine` (pooled features only): torch, or auto / openvino / ort to extract through an engine
    (train.fast_features) whose features must match torch's per image first, falling back to torch
    with a warning when they do not. A cache made by torch is a hit for every choice (it is the
    reference). `info`, when given, is filled with where the features came from: engine, cache
    file, the engine check, extraction seconds.
    """
    from train import fast_features

    info = {} if info is None else info
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    engines = fast_features.candidates(engine) if at == "pooled" else []
    if engine == "auto" and str(kw.get("device", "cpu")) != "cpu":
        engines = []  # the trunk engines run on the CPU; a GPU runs torch faster
    skip_bad = kw.get("skip_bad", False)
    for name in [*engines, "torch"]:
        path = cache_path(samples, backbone, cache_dir, at, name)
        hit = _read_cache(path, skip_bad)
        if hit is not None:
            f, kept, skipped, stored = hit
            log.info("feature cache hit: %s (%d images)", path, len(kept))
            info.update({**stored, "engine": name, "cache": str(path), "cache_hit": True})
            return f, kept, skipped, True
    run = None
    if engines:
        run, notes = fast_features.try_engines(
            samples, backbone, engines, cache_dir=cache_dir, skip_bad=skip_bad,
            progress=kw.get("progress", True), batch_size=kw.get("batch_size", 64),
            strict=engine != "auto")
        if notes:
            info["tried"] = notes
        if run is None:
            log.warning("feature engine: no engine passed the check against torch; extracting with torch")
    t0 = time.perf_counter()
    if run is not None:
        f, kept, skipped = run.features, run.kept, run.skipped
        stored = run.info
    else:
        f, kept, skipped = extract(samples, backbone, at=at, **kw)
        stored = {"engine": "torch", "seconds": round(time.perf_counter() - t0, 2)}
    path = cache_path(samples, backbone, cache_dir, at, stored["engine"])

    def write(fh):
        np.savez(fh, features=f, kept=kept, skipped=np.asarray(skipped, dtype=str), info=json.dumps(stored))

    atomic_write(path, write)
    log.info("feature cache written: %s", path)
    info.update({**stored, "cache": str(path), "cache_hit": False})
    return f, kept, skipped, False

"""Where export finds images: the run's dataset (or --data), read through hashret.datasets and
preprocessed by hashret.images.load_image, the same routine training and serving use."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from hashret.datasets import Sample, Splits, default_data_root, read_dataset
from hashret.errors import BadInput, HashretError, MissingArtifact
from hashret.images import PreprocessSpec, load_image


def run_splits(manifest: dict, data: str | os.PathLike | None = None, fmt: str | None = None,
               required: bool = True) -> Splits | None:
    """The run's dataset: --data/--format if given, else the manifest's dataset.root/format,
    else HASHRET_DATA (or ../shared/datasets/grocery). None (or MissingArtifact if `required`)
    when no candidate is readable."""
    ds = manifest.get("dataset") or {}
    fmt = fmt or ds.get("format") or "grocery"
    candidates = [data] if data else [ds.get("root"), default_data_root()]
    errors = []
    for root in candidates:
        if not root or not Path(root).exists():
            continue
        try:
            return read_dataset(root, fmt)
        except HashretError as e:
            errors.append(str(e))
    if required:
        tried = ", ".join(str(c) for c in candidates if c) or "none"
        raise MissingArtifact(
            f"dataset | not readable (tried {tried}{'; ' + '; '.join(errors) if errors else ''}): "
            "pass --data DIR --format FMT with the run's images"
        )
    return None


def pick(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """A seeded sample of n items (all of them when n >= len), in a stable order."""
    if n <= 0:
        return []
    if n >= len(samples):
        return list(samples)
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), n, replace=False))
    return [samples[i] for i in idx]


def load_images(samples: Sequence[Sample], spec: PreprocessSpec, desc: str = "images") -> np.ndarray:
    """uint8 [N, crop, crop, 3] with a progress bar; a bad file is BadInput naming it."""
    from tqdm import tqdm

    out = np.empty((len(samples), spec.crop, spec.crop, 3), dtype=np.uint8)
    for i, s in enumerate(tqdm(samples, desc=desc, unit="img", leave=False, disable=len(samples) < 64)):
        out[i] = load_image(s.path, spec)
    return out


def batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), size):
        yield images[i:i + size]


def calibration_images(splits: Splits, spec: PreprocessSpec, n: int, seed: int = 0) -> np.ndarray:
    """n training images (the INT8 calibration set; never query images, so parity stays honest)."""
    if n < 1:
        raise BadInput(f"--calib {n} | must be at least 1 image (256 is a good default)")
    return load_images(pick(splits.train, n, seed), spec, "calibration images")

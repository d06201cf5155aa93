"""golden.npz: a small frozen regression set with the torch reference answers.

A few hundred preprocessed uint8 images drawn from the run's query and database splits (with
labels and a query/database marker), the torch fp32 activations and packed codes on them, and the
mAP@all / mAP@10 of the query part against the database part. `hashret check` re-encodes these
exact bytes with any backend and compares, so a check needs no dataset and no image decoding,
and a changed decoder or resize can never masquerade as a model regression.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from hashret.codes import pack
from hashret.datasets import Splits
from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact
from hashret.fsutil import atomic_write
from hashret.images import PreprocessSpec
from hashret.metrics import mean_average_precision

from export.data import batches, load_images, pick

GOLDEN = "golden.npz"
KEYS = ("images", "labels", "is_query", "paths", "activations", "codes", "bits", "map_all", "map_10")
QUERY_SHARE = 0.25


def encode_torch(encoder, images: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    encoder = encoder.eval()
    with torch.inference_mode():
        return np.concatenate([encoder(torch.from_numpy(b)).numpy() for b in batches(images, batch)])


def split_maps(acts: np.ndarray, labels: np.ndarray, is_query: np.ndarray) -> dict:
    """mAP@all and mAP@10 of the query rows against the database rows (Hamming ranking)."""
    B = pack(acts)
    q, d = B[is_query], B[~is_query]
    if len(q) == 0 or len(d) == 0:
        return {"mAP@all": float("nan"), "mAP@10": float("nan")}
    return {
        "mAP@all": mean_average_precision(q, d, labels[is_query], labels[~is_query]),
        "mAP@10": mean_average_precision(q, d, labels[is_query], labels[~is_query], topk=10),
    }


def golden_from_run(encoder, spec: PreprocessSpec, splits: Splits, out_path: str | os.PathLike,
                    n: int = 256, seed: int = 0) -> dict:
    """Draw n items (a quarter queries), encode with torch fp32, write golden.npz (atomic)."""
    if n < 2:
        raise BadInput(f"--golden {n} | need at least 2 images (1 query + 1 database item); default 256")
    nq = max(1, int(round(n * QUERY_SHARE)))
    query = pick(splits.query, nq, seed)
    taken = set(query)
    database = pick([s for s in splits.database if s not in taken], n - len(query), seed + 1)
    samples = query + database
    is_query = np.array([True] * len(query) + [False] * len(database))
    images = load_images(samples, spec, "golden images")
    acts = encode_torch(encoder, images)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    maps = split_maps(acts, labels, is_query)
    root = Path(splits.root)
    paths = np.array([os.path.relpath(s.path, root) for s in samples])
    arrays = dict(images=images, labels=labels, is_query=is_query, paths=paths,
                  activations=acts.astype(np.float32), codes=pack(acts), bits=np.int64(acts.shape[1]),
                  map_all=np.float64(maps["mAP@all"]), map_10=np.float64(maps["mAP@10"]))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(out_path, lambda f: f.write(buf.getvalue()))
    return {"n": len(samples), "queries": len(query), "database": len(database), **maps}


def load_golden(path: str | os.PathLike) -> dict:
    """Read golden.npz, refusing a file that lacks a key (written by another hashret?)."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifact(f"{path} | not found: re-export with hashret export (golden set)")
    try:
        with np.load(path, allow_pickle=False) as z:
            g = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ArtifactMismatch(f"{path} | not a readable .npz ({e}): re-export") from None
    missing = [k for k in KEYS if k not in g]
    if missing:
        raise ArtifactMismatch(f"{path} | lacks {missing}: re-export with this hashret")
    g["is_query"] = g["is_query"].astype(bool)
    return g

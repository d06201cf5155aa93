"""Galleries: packed binary codes + ids + metadata, searched by Hamming distance.

A gallery is a folder with a `manifest.json` naming the model it was built for and the
index kind that stores it ("faiss-flat", "faiss-hnsw", "milvus"). Open it with
`open_gallery(path, expect_bits=..., expect_model_sha256=...)` so a gallery built by
another model is refused instead of returning meaningless neighbours.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hashret.errors import ArtifactMismatch, BadInput

from serve.gallery.base import (
    INDEX_KINDS,
    MANIFEST,
    REBUILD,
    SCHEMA_VERSION,
    Gallery,
    Hit,
    check_bits,
    read_manifest,
    short_sha,
)
from serve.gallery import faiss_index as _faiss_index  # noqa: F401  (registers faiss-*)
from serve.gallery import milvus_index as _milvus_index  # noqa: F401  (registers milvus)

__all__ = [
    "INDEX_KINDS",
    "SCHEMA_VERSION",
    "Gallery",
    "Hit",
    "create_gallery",
    "open_gallery",
]


def create_gallery(
    path: str | os.PathLike, kind: str, bits: int, model_sha256: str, **options: Any
) -> Gallery:
    """Create an empty gallery folder for codes of `bits` bits made by model `model_sha256`.

    Options depend on the kind: faiss-hnsw takes `M`, `ef_construction`, `ef_search`;
    milvus takes `uri` (default GAL/milvus.db, embedded Milvus Lite), `collection`,
    `index_type` ("BIN_FLAT" or "BIN_IVF_FLAT"), `nlist`, `nprobe`.
    """
    path = Path(path)
    cls = INDEX_KINDS.get(kind)
    bits = check_bits(bits)
    if not isinstance(model_sha256, str) or not model_sha256:
        raise BadInput(f"model_sha256 {model_sha256!r} | must be the model's sha256 hex string")
    if (path / MANIFEST).exists():
        raise BadInput(f"gallery {path} | already exists: open it, or choose a new folder")
    path.mkdir(parents=True, exist_ok=True)
    return cls.create(path, bits, model_sha256, dict(options))


def open_gallery(
    path: str | os.PathLike,
    expect_bits: int | None = None,
    expect_model_sha256: str | None = None,
) -> Gallery:
    """Open a gallery, refusing one built for a different model or code length."""
    path = Path(path)
    manifest = read_manifest(path)
    bits = int(manifest["model"]["bits"])
    sha = str(manifest["model"]["sha256"])
    if (expect_bits is not None and int(expect_bits) != bits) or (
        expect_model_sha256 is not None and expect_model_sha256 != sha
    ):
        eb = expect_bits if expect_bits is not None else bits
        es = expect_model_sha256 if expect_model_sha256 is not None else sha
        raise ArtifactMismatch(
            f"gallery {path} | built for model {short_sha(sha)}({bits} bits), "
            f"engine is {short_sha(es)}({eb} bits): {REBUILD}"
        )
    cls = INDEX_KINDS.get(manifest["index"]["kind"])
    return cls.open(path, manifest)

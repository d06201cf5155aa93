"""Galleries: packed binary codes + ids + metadata, searched by Hamming distance.

A gallery is a folder with a `manifest.json` naming the model it was built for and the
index kind that stores it ("faiss-flat", "faiss-hnsw", "milvus", or any kind registered
in INDEX_KINDS). Open it with `open_gallery(path, expect_bits=..., expect_model_sha256=...)`,
or for an export with `open_gallery_for_export`, so a gallery built by another model is
refused instead of returning meaningless neighbours.

Index kinds: every module named `*_index` in this package is imported here, and registers
its kind with `@index_kind(...)` on import. A new kind is that one module and nothing else;
the naming convention keeps helpers in this package from being mistaken for kinds.
"""
from __future__ import annotations

import importlib
import logging
import os
import pkgutil
from pathlib import Path
from typing import Any

from hashret.codes import check_bits
from hashret.errors import ArtifactMismatch, BadInput
from hashret.manifest import EXPORT, GALLERY, KINDS, MANIFEST, load_manifest
from serve.gallery.base import (
    INDEX_KINDS,
    REBUILD,
    Gallery,
    Hit,
    index_kind,
    new_gallery_manifest,
    short_sha,
)

SCHEMA_VERSION = KINDS[GALLERY].version

log = logging.getLogger("hashret.gallery")

__all__ = [
    "INDEX_KINDS",
    "SCHEMA_VERSION",
    "Gallery",
    "Hit",
    "create_gallery",
    "index_kind",
    "new_gallery_manifest",
    "open_gallery",
    "open_gallery_for_export",
    "shared_mode",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name.endswith("_index"):
        importlib.import_module(f"{__name__}.{_module.name}")


def create_gallery(
    path: str | os.PathLike, kind: str, bits: int, model_sha256: str, **options: Any
) -> Gallery:
    """Create an empty gallery folder for codes of `bits` bits made by model `model_sha256`.

    Options depend on the kind: faiss-hnsw takes `M`, `ef_construction`, `ef_search`;
    milvus takes `uri` (default GAL/milvus.db, embedded Milvus Lite), `collection`,
    `index_type` ("BIN_FLAT" or "BIN_IVF_FLAT"), `nlist`, `nprobe`. `activations` (default
    True): keep each item's float16 activations for re-ranking, on kinds that can
    (`Gallery.ACTIVATIONS`); a kind that cannot ignores it and its searches are not re-ranked.
    """
    path = Path(path)
    cls = INDEX_KINDS.get(kind)
    activations = options.pop("activations", True)
    if not isinstance(activations, bool):
        raise BadInput(f"gallery option activations={activations!r} | must be True or False")
    if activations and cls.ACTIVATIONS:
        options["activations"] = True
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
    search_device: str | None = None,
    read_only: bool = False,
) -> Gallery:
    """Open a gallery, refusing one built for a different model or code length.

    The manifest is read (and migrated from an older schema) by hashret.manifest.
    `search_device` (cpu, cuda, cuda:N) overrides, for this process only, the device a kind
    that searches on one (torch-flat) was built for; other kinds refuse it. `read_only`: open a
    kind with Gallery.READ_ONLY_OPEN so that other processes may open it read-only too; writes
    then raise ReadOnly (other kinds refuse it).
    """
    path = Path(path)
    manifest = load_manifest(path, kind=GALLERY)
    bits, sha = int(manifest["bits"]), str(manifest["model_id"])
    if (expect_bits is not None and int(expect_bits) != bits) or (
        expect_model_sha256 is not None and expect_model_sha256 != sha
    ):
        eb = expect_bits if expect_bits is not None else bits
        es = expect_model_sha256 if expect_model_sha256 is not None else sha
        raise ArtifactMismatch(
            f"gallery {path} | built for model {short_sha(sha)}({bits} bits), "
            f"engine is {short_sha(es)}({eb} bits): {REBUILD}"
        )
    kind = manifest["index"]["kind"]
    if kind not in INDEX_KINDS:
        raise ArtifactMismatch(
            f"gallery {path} | index kind {kind!r} is not known here (known: {', '.join(INDEX_KINDS.names())}): "
            f"install the module that registers it, or {REBUILD}"
        )
    cls = INDEX_KINDS.get(kind)
    kwargs: dict[str, Any] = {}
    if read_only:
        if not cls.READ_ONLY_OPEN:
            raise BadInput(f"gallery {path} | a {kind} gallery cannot be opened read-only")
        kwargs["read_only"] = True
    if search_device is None:
        gallery = cls.open(path, manifest, **kwargs)
    elif getattr(cls, "SEARCH_DEVICE", False):
        gallery = cls.open(path, manifest, search_device=search_device, **kwargs)
    else:
        raise BadInput(f"--search-device {search_device} | gallery {path} is a {kind} gallery, which searches "
                       f"where its library does: drop the flag, or rebuild it with --kind torch-flat")
    if not gallery.has_activations:
        log.info(
            "gallery %s | stores no activations (built before re-ranking existed, with --no-activations, "
            "or kind %s keeps none): searches are not re-ranked; rebuild with hashret index build to turn "
            "re-ranking on", path, kind,
        )
    return gallery


def shared_mode(path: str | os.PathLike) -> str:
    """How several server processes serve the gallery at `path` at once (Gallery.shared_mode):
    "read-only" or "read-write"; BadInput when its kind cannot be shared. Reads only the manifest."""
    path = Path(path)
    manifest = load_manifest(path, kind=GALLERY)
    kind = manifest["index"]["kind"]
    if kind not in INDEX_KINDS:
        raise ArtifactMismatch(f"gallery {path} | index kind {kind!r} is not known here: {REBUILD}")
    return INDEX_KINDS.get(kind).shared_mode(path, manifest)


def open_gallery_for_export(
    path: str | os.PathLike, exp: str | os.PathLike, search_device: str | None = None, read_only: bool = False
) -> tuple[Gallery, dict[str, Any], str]:
    """The gallery at `path` opened for the model exported in EXP: (gallery, EXP manifest, model id).

    The one place serve start-up checks that model and gallery agree (model id and bits, with
    open_gallery's error). EXP/manifest.json is read once here; hand it on (open_engine's
    `manifest=`) instead of reading it again.
    """
    from hashret.engines import model_id

    manifest = load_manifest(exp, kind=EXPORT)
    mid = model_id(manifest)
    try:
        bits = check_bits(manifest.get("bits"))
    except BadInput:
        raise BadInput(
            f"{Path(exp) / MANIFEST} | bits {manifest.get('bits')!r} is missing or not a code length: "
            f"{KINDS[EXPORT].fix}"
        ) from None
    gallery = open_gallery(path, expect_bits=bits, expect_model_sha256=mid, search_device=search_device,
                           read_only=read_only)
    return gallery, manifest, mid

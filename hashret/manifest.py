"""manifest.json: the one artifact contract between stages (RUN/, EXP/, GAL/).

Every stage reads and writes these files through this module only. The kinds, their schema
versions, the checks on read and the migrations of older manifests all live here, so RUN/, EXP/
and GAL/ follow one policy:

* each kind has a current schema version (`KINDS`); it moves only when that kind's shape
  changes, so an EXP/ written today still opens in the hashret before this one;
* a manifest newer than this hashret, of an unknown kind or of another kind than the caller
  expects is refused with a message that names the file and the fix;
* an older one is migrated on read, one version at a time (`MIGRATIONS`), to today's shape.
  Opening never rewrites the file; the stage that owns the folder writes today's shape the
  next time it saves (a gallery on its next snapshot).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from hashret import __version__
from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact
from hashret.fsutil import read_json, sha256_file, write_json_atomic

MANIFEST = "manifest.json"
RUN, EXPORT, GALLERY = "run", "export", "gallery"


@dataclass(frozen=True)
class Kind:
    """One kind of artifact folder: its current schema version and how to make a fresh one."""

    name: str
    version: int
    command: str  # the command that writes such a folder
    fix: str  # what a message tells the user to do with a folder this hashret cannot use


KINDS: dict[str, Kind] = {
    RUN: Kind(RUN, 1, "hashret train", "re-run `hashret train`"),
    EXPORT: Kind(EXPORT, 1, "hashret export", "re-export with `hashret export`"),
    # 2: bits and model_id at the top level and `versions` as in RUN/EXP (1 nested them under
    # `model` and kept only `hashret_version`), and the checksum is gallery_checksum()
    GALLERY: Kind(GALLERY, 2, "hashret index build", "rebuild with `hashret index build`"),
}

#: The schema version of RUN/ and EXP/ manifests, for writers that stamp it themselves (GAL/ is
#: at KINDS["gallery"].version); new code asks schema_version(kind) or uses new_manifest(kind).
SCHEMA_VERSION = KINDS[RUN].version

#: (kind, version) -> a function taking a manifest of that version (and its path, for messages)
#: to the next version's shape. A version step that did not change a kind needs no entry.
MIGRATIONS: dict[tuple[str, int], Callable[[dict, Path], dict]] = {}

#: The gallery manifest fields its checksum seals, as dotted paths: every field that changes what
#: is served (code length, model, index kind and options, size, and the snapshot's generation,
#: WAL position and file list). Sealing more fields is a schema bump plus a migration that
#: re-seals the older manifests (see _gallery_1_to_2).
GALLERY_CHECKSUM_FIELDS: tuple[str, ...] = ("bits", "model_id", "index", "size", "snapshot")


def schema_version(kind: str) -> int:
    """The schema version this hashret writes for `kind`."""
    return KINDS[kind].version


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(*extra: str) -> dict:
    """Versions of python, hashret, numpy, torch and any `extra` packages that are installed."""
    out = {"python": platform.python_version(), "hashret": __version__, "git_commit": git_commit()}
    for name in ("numpy", "torch", "torchvision", *extra):
        out[name] = package_version(name)
    return out


def git_commit() -> str | None:
    """Commit of the hashret checkout, when it is one (an installed wheel has none)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def new_manifest(kind: str, **fields: Any) -> dict:
    """A manifest of `kind` in today's shape: schema_version, kind, created, `fields`, versions.

    `versions` defaults to versions(); pass it in `fields` to record more packages.
    """
    if "versions" not in fields:
        fields["versions"] = versions()
    return {"schema_version": schema_version(kind), "kind": kind, "created": now_iso(), **fields}


def load_manifest(folder: str | Path, kind: str | tuple[str, ...] | None = None) -> dict:
    """FOLDER/manifest.json (or that file itself) in today's shape.

    Refuses a missing folder, an unreadable file, an unknown or unexpected kind and a newer
    schema; migrates an older one (in memory only).
    """
    folder = Path(folder)
    expected = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if not folder.exists():
        make = f", or make it with `{KINDS[expected[0]].command}`" if len(expected) == 1 else ""
        raise MissingArtifact(f"{folder} | does not exist: check the path{make}")
    path = folder / MANIFEST if folder.is_dir() else folder
    if folder.is_dir() and not path.is_file() and len(expected) == 1:
        k = KINDS[expected[0]]
        raise MissingArtifact(f"{k.name} {folder} | has no {MANIFEST}: not a {k.name} folder; make one with `{k.command}`")
    m = read_json(path, "manifest")
    if not isinstance(m, dict):
        raise ArtifactMismatch(f"manifest {path} | not a JSON object: restore or regenerate it")
    name = m.get("kind")
    if expected and name not in expected:
        raise ArtifactMismatch(
            f"manifest {path} | kind is {name!r}, expected {' or '.join(expected)}: "
            "check that you passed the right folder"
        )
    if name not in KINDS:
        raise ArtifactMismatch(
            f"manifest {path} | kind {name!r} is unknown to this hashret (it knows {', '.join(KINDS)}): "
            "check that you passed the right folder, or upgrade hashret"
        )
    k = KINDS[name]
    v = m.get("schema_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ArtifactMismatch(f"{k.name} manifest {path} | has no valid schema_version ({v!r}): {k.fix}")
    if v > k.version:
        raise ArtifactMismatch(
            f"{k.name} manifest {path} | schema_version {v} is newer than this hashret supports "
            f"({k.version}): upgrade hashret or {k.fix}"
        )
    for step in range(v, k.version):
        migrate = MIGRATIONS.get((k.name, step))
        if migrate is not None:
            m = migrate(m, path)
        m["schema_version"] = step + 1
    _CHECKS.get(k.name, lambda m, path: None)(m, path)
    return m


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write FOLDER/manifest.json atomically (a crash leaves the old file or the new one)."""
    path = Path(folder) / MANIFEST
    write_json_atomic(path, manifest)
    return path


def file_entry(path: str | Path) -> dict:
    p = Path(path)
    return {"sha256": sha256_file(p), "size": p.stat().st_size}


def verify_file(folder: str | Path, name: str, entry: dict) -> Path:
    """Check FOLDER/name against its manifest entry {sha256, size}; return the path."""
    p = Path(folder) / name
    if not p.is_file():
        raise MissingArtifact(f"{p} | listed in the manifest but missing: re-run the stage that writes it")
    digest = sha256_file(p)
    if digest != entry.get("sha256"):
        raise ArtifactMismatch(
            f"{p} | sha256 {digest[:12]}… differs from the manifest's {str(entry.get('sha256'))[:12]}…: "
            "the file was modified, truncated or swapped; re-export it"
        )
    return p


# ---- GAL/ --------------------------------------------------------------------------------
def _field(manifest: dict, dotted: str) -> Any:
    value: Any = manifest
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def gallery_checksum(manifest: dict) -> str:
    """sha256 over GALLERY_CHECKSUM_FIELDS of a gallery manifest, as canonical JSON.

    It seals what a reader trusts without re-deriving it (the snapshot's files with their sha256s,
    the last WAL record they hold, the index options...), so a damaged or edited manifest, or one
    edited to paper over a bad file, is refused on read instead of serving other data.
    """
    sealed = {name: _field(manifest, name) for name in GALLERY_CHECKSUM_FIELDS}
    text = json.dumps(sealed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_gallery(m: dict, path: Path) -> None:
    from hashret.codes import check_bits

    index = m.get("index")
    try:
        check_bits(m.get("bits"), f"gallery manifest {path}")
    except BadInput as e:
        raise ArtifactMismatch(f"{e}; {KINDS[GALLERY].fix}") from None
    if not isinstance(m.get("model_id"), str) or not m["model_id"] or not (
        isinstance(index, dict) and isinstance(index.get("kind"), str)
    ):
        raise ArtifactMismatch(f"gallery manifest {path} | missing model_id or index.kind: {KINDS[GALLERY].fix}")
    if m.get("checksum") != gallery_checksum(m):
        sealed = ", ".join(GALLERY_CHECKSUM_FIELDS)
        raise ArtifactMismatch(
            f"gallery manifest {path} | checksum does not match its contents ({sealed}): the file was "
            f"damaged or edited; restore it or {KINDS[GALLERY].fix}"
        )


_CHECKS: dict[str, Callable[[dict, Path], None]] = {GALLERY: _check_gallery}


def _gallery_checksum_v1(files: Any) -> str | None:
    if not isinstance(files, dict):
        return None
    lines = "".join(f"{n} {s}\n" for n, s in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _gallery_1_to_2(m: dict, path: Path) -> dict:
    """Galleries of hashret <= 0.1.0: bits and the model's sha256 under `model`, `hashret_version`,
    and a checksum over "name sha256" lines of the snapshot files.

    The checksum is re-sealed only when the old one holds, so a v1 manifest whose file list was
    edited is still refused when the gallery opens.
    """
    old = dict(m)
    model = old.pop("model", None)
    model = model if isinstance(model, dict) else {}
    writer = old.pop("hashret_version", None)
    head = {k: old.pop(k) for k in ("schema_version", "kind", "created") if k in old}
    out = {**head, "bits": model.get("bits"), "model_id": model.get("sha256"), **old,
           "versions": {"hashret": writer}}
    files = _field(m, "snapshot.files")
    if m.get("checksum") is not None and m.get("checksum") == _gallery_checksum_v1(files):
        out["checksum"] = gallery_checksum(out)
    elif m.get("checksum") is None and "snapshot" not in m:
        out["checksum"] = gallery_checksum(out)  # a v1 Milvus gallery: that release sealed nothing of it
    return out


MIGRATIONS[(GALLERY, 1)] = _gallery_1_to_2

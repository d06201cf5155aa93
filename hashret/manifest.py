"""manifest.json: the one artifact contract between stages (RUN/, EXP/, GAL/).

A stage reads another stage's folder through these helpers only: schema and kind are checked
here, so every stage refuses a folder from a newer hashret or of the wrong kind the same way.
"""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from hashret import __version__
from hashret.errors import ArtifactMismatch, MissingArtifact
from hashret.fsutil import read_json, sha256_file, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


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


def load_manifest(folder: str | Path, kind: str | tuple[str, ...] | None = None) -> dict:
    """Read FOLDER/manifest.json, refusing a newer schema or an unexpected kind."""
    folder = Path(folder)
    if not folder.exists():
        raise MissingArtifact(f"{folder} | does not exist")
    path = folder / MANIFEST if folder.is_dir() else folder
    m = read_json(path, "manifest")
    if not isinstance(m, dict):
        raise ArtifactMismatch(f"manifest {path} | not a JSON object: regenerate it")
    v = m.get("schema_version")
    if not isinstance(v, int):
        raise ArtifactMismatch(f"manifest {path} | has no integer schema_version: regenerate it")
    if v > SCHEMA_VERSION:
        raise ArtifactMismatch(
            f"manifest {path} | schema_version {v} is newer than this hashret supports ({SCHEMA_VERSION}): "
            "upgrade hashret or re-create the artifact with this version"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and m.get("kind") not in kinds:
        raise ArtifactMismatch(
            f"manifest {path} | kind is {m.get('kind')!r}, expected {' or '.join(kinds)}: "
            "check that you passed the right folder"
        )
    return m


def write_manifest(folder: str | Path, manifest: dict) -> Path:
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

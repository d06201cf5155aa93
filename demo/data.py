"""The demo's data: find GroceryStoreDataset, download it when nowhere to be found, and cut a
small evenly spread subset for quick trials.

Only the demo downloads anything: the stages take a folder and never touch the network.
"""
from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from hashret.errors import MissingArtifact

GROCERY_REPO = "https://github.com/marcusklasson/GroceryStoreDataset"
GROCERY_ZIP = GROCERY_REPO + "/archive/refs/heads/master.zip"
URL_ENV = "HASHRET_GROCERY_URL"  # override the archive address (mirrors, tests)
NO_DOWNLOAD_ENV = "HASHRET_NO_DOWNLOAD"  # 1: never try the network


def clear(path: Path) -> None:
    """Remove a file, link or folder tree if present (a link is removed, never followed)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def is_grocery(root: str | os.PathLike | None) -> bool:
    if not root:
        return False
    r = Path(root)
    return (r / "dataset" / "train.txt").is_file() or (r / "train.txt").is_file()


def instructions(looked: list[str], why: str) -> str:
    """The message for a missing dataset: where we looked, why nothing came of it, how to get it."""
    where = ", ".join(looked) or "nowhere"
    return (
        f"Grocery data | not found (looked in {where}) and {why}: get it with\n"
        f"    git clone {GROCERY_REPO}.git\n"
        f"  (or download and unzip {GROCERY_ZIP}), then run\n"
        "    hashret demo --data PATH/GroceryStoreDataset\n"
        "  or set HASHRET_DATA=PATH/GroceryStoreDataset, or place it at ../shared/datasets/grocery "
        "beside the checkout"
    )


def resolve_data(given: str | None, workdir: Path, download_timeout: float) -> tuple[Path, str]:
    """A folder holding GroceryStoreDataset and how it was found ("found" or "downloaded").

    Looks at `given`, else $HASHRET_DATA, else the shared checkout location, else WORKDIR/data/grocery;
    downloads into the given folder (or the last fallback) only when that folder is absent or empty,
    so nothing of the user's is ever overwritten.
    """
    from hashret.datasets import default_data_root

    given = given or os.environ.get("HASHRET_DATA") or None
    fallback = workdir / "data" / "grocery"
    candidates = [given] if given else [default_data_root(), str(fallback)]
    looked = [str(c) for c in candidates if c]
    for c in candidates:
        if is_grocery(c):
            return Path(c), "found"
    target = Path(given) if given else fallback
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MissingArtifact(instructions(
            looked, f"{target} is not empty, so nothing was downloaded into it (it needs dataset/train.txt)"))
    if os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        raise MissingArtifact(instructions(looked, f"downloading is disabled ({NO_DOWNLOAD_ENV} is set)"))
    download_grocery(target, timeout=download_timeout, looked=looked)
    return target, "downloaded"


def download_grocery(target: Path, timeout: float = 10.0, looked: list[str] | None = None) -> Path:
    """Fetch the GroceryStoreDataset zip archive and unpack it so that target/dataset/train.txt exists.

    The archive lands in a .part file and is unpacked into a staging folder first, so an interrupted
    download never leaves something that looks like a dataset.
    """
    url = os.environ.get(URL_ENV) or GROCERY_ZIP
    looked = looked or [str(target)]
    print(f"Grocery data not found: downloading GroceryStoreDataset from {url} into {target} "
          f"(set {NO_DOWNLOAD_ENV}=1 to skip)", flush=True)
    part = target / ".download.zip.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            target.mkdir(parents=True, exist_ok=True)
            _save(resp, part)
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise MissingArtifact(instructions(looked, f"the download from {url} failed ({reason}); offline?")) from None
    staging = target / ".unpacking"
    clear(staging)
    try:
        with zipfile.ZipFile(part) as z:
            z.extractall(staging)
    except zipfile.BadZipFile:
        raise MissingArtifact(instructions(looked, f"{url} did not return a zip archive")) from None
    finally:
        part.unlink(missing_ok=True)
    found = next((p.parent for p in sorted(staging.rglob("train.txt")) if p.parent.name == "dataset"), None)
    if found is None:
        clear(staging)
        raise MissingArtifact(instructions(looked, f"the archive from {url} holds no dataset/train.txt"))
    for item in found.parent.iterdir():
        os.replace(item, target / item.name)
    clear(staging)
    print(f"  unpacked into {target}", flush=True)
    return target


def _save(resp, part: Path) -> None:
    """Stream a response into a file, with a progress line every few seconds on a slow link."""
    size = int(resp.headers.get("Content-Length") or 0)
    got, shown, t0 = 0, time.monotonic(), time.monotonic()
    with open(part, "wb") as out:
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            out.write(chunk)
            got += len(chunk)
            if time.monotonic() - shown > 5:
                shown = time.monotonic()
                of = f" of {size / 1e6:.0f}" if size else ""
                print(f"  {got / 1e6:.0f}{of} MB ({got / 1e6 / max(1e-9, shown - t0):.1f} MB/s)", flush=True)


def spread(items: list, n: int | None) -> list:
    """n items evenly spaced over the list (it is sorted by class, so every class is represented)."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        return []
    idx = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in idx]


def write_subset(real_root: Path, out: Path, limit: int) -> Path:
    """A GroceryStoreDataset-shaped folder with at most `limit` images per split (absolute paths).

    train and val are pooled into train (the Grocery protocol trains and indexes on both), so the
    subset's database matches what the full dataset's would be, only smaller.
    """
    from hashret.datasets import grocery_dataset_dir

    ds = grocery_dataset_dir(real_root)
    dst = out / "dataset"
    dst.mkdir(parents=True, exist_ok=True)

    def lines(name):
        f = ds / f"{name}.txt"
        return [ln for ln in f.read_text().splitlines() if ln.strip()] if f.is_file() else []

    def absolute(ln):
        rel, rest = ln.split(",", 1)
        return f"{(ds / rel.strip()).resolve()},{rest}"

    (dst / "train.txt").write_text("".join(absolute(ln) + "\n" for ln in spread(lines("train") + lines("val"), limit)))
    (dst / "val.txt").write_text("")
    (dst / "test.txt").write_text("".join(absolute(ln) + "\n" for ln in spread(lines("test"), limit)))
    shutil.copyfile(ds / "classes.csv", dst / "classes.csv")
    return out

"""Dataset readers: DIGIX 2020 label.txt, class folders, GroceryStoreDataset split files, CSV manifests.

Each reader returns `Splits` (train / database / query lists of `Sample`). Readers only parse
listings and check that files exist; decoding problems surface where images are read
(feature extraction, gallery building) with the same file names.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hashret.errors import BadInput, MissingArtifact
from hashret.registry import Registry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
FORMATS: Registry = Registry("dataset format")


@dataclass(frozen=True)
class Sample:
    path: str  # absolute path
    label: int
    source: str = ""  # "label.txt:12" for messages


@dataclass
class Splits:
    format: str
    root: str
    train: list[Sample]
    database: list[Sample]
    query: list[Sample]
    skipped: list[str] = field(default_factory=list)  # "file:line | reason" for --skip-bad
    class_names: dict[int, str] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "database": len(self.database), "query": len(self.query)}

    def get(self, split: str) -> list[Sample]:
        if split not in ("train", "database", "query"):
            raise BadInput(f"split {split!r} | unknown: choose train, database or query")
        return getattr(self, split)

    def fingerprint(self) -> str:
        """sha256 over (split, relative path, label, file size): changes when the data does."""
        h = hashlib.sha256()
        for split in ("train", "database", "query"):
            for s in getattr(self, split):
                try:
                    size = os.path.getsize(s.path)
                except OSError:
                    size = -1
                rel = os.path.relpath(s.path, self.root)
                h.update(f"{split}\0{rel}\0{s.label}\0{size}\n".encode())
        return h.hexdigest()


@dataclass(frozen=True)
class SplitOptions:
    """How formats without a fixed protocol are split; an explicit `split` column wins."""

    query_fraction: float = 0.2
    seed: int = 0
    skip_bad: bool = False


class _Collector:
    """Gathers samples, turning problems into errors or, with skip_bad, into a skipped list."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def problem(self, where: str, msg: str) -> None:
        if not self.skip_bad:
            raise BadInput(f"{where} | {msg} (use --skip-bad to skip such entries)")
        self.skipped.append(f"{where} | {msg}")

    def sample(self, path: Path, label_text: str, where: str) -> Sample | None:
        try:
            label = int(label_text.strip())
        except ValueError:
            self.problem(where, f"label {label_text.strip()!r} is not an integer")
            return None
        if not path.is_file():
            self.problem(where, f"image {path} not found")
            return None
        return Sample(str(path.resolve()), label, where)


def _random_split(samples: list[Sample], opts: SplitOptions) -> tuple[list[Sample], list[Sample]]:
    """Seeded query/database split; every label keeps at least one database item where possible."""
    if not 0.0 < opts.query_fraction < 1.0:
        raise BadInput(f"--query-fraction {opts.query_fraction} | must be between 0 and 1")
    rng = np.random.default_rng(opts.seed)
    order = rng.permutation(len(samples))
    n_query = int(round(len(samples) * opts.query_fraction))
    query_idx = set(order[:n_query].tolist())
    query = [s for i, s in enumerate(samples) if i in query_idx]
    database = [s for i, s in enumerate(samples) if i not in query_idx]
    return database, query


def _splits(fmt, root, samples, opts, collector, explicit=None, class_names=None) -> Splits:
    if not samples:
        raise BadInput(f"{fmt} dataset {root} | no usable samples found")
    root = Path(root).resolve()  # sample paths are resolved: keep ids relative to the same root
    if explicit is not None and any(explicit):
        by = {"train": [], "database": [], "query": []}
        for s, sp in zip(samples, explicit):
            by[sp].append(s)
        train = by["train"] or by["database"]
        return Splits(fmt, str(root), train, by["database"], by["query"], collector.skipped, class_names or {})
    database, query = _random_split(samples, opts)
    return Splits(fmt, str(root), database, database, query, collector.skipped, class_names or {})


@FORMATS.register("digix")
def read_digix(root: str | os.PathLike, opts: SplitOptions = SplitOptions()) -> Splits:
    """Huawei DIGIX 2020: `label.txt` with lines `relative_path,label` (root or root/train_data)."""
    root = Path(root)
    label_file = root / "label.txt"
    if not label_file.is_file() and (root / "train_data" / "label.txt").is_file():
        root = root / "train_data"
        label_file = root / "label.txt"
    if not label_file.is_file():
        raise MissingArtifact(f"digix dataset {root} | no label.txt: expected lines 'relative_path,label'")
    col = _Collector(opts.skip_bad)
    samples = []
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{label_file}:{n}"
        parts = line.split(",")
        if len(parts) != 2 or not parts[0].strip():
            col.problem(where, f"malformed line {line!r}: expected 'relative_path,label'")
            continue
        s = col.sample(root / parts[0].strip(), parts[1], where)
        if s:
            samples.append(s)
    return _splits("digix", root, samples, opts, col)


@FORMATS.register("folder")
def read_folder(root: str | os.PathLike, opts: SplitOptions = SplitOptions()) -> Splits:
    """Class folders: root/<class name>/**/image.jpg; labels are the sorted folder names' indices."""
    root = Path(root)
    if not root.is_dir():
        raise MissingArtifact(f"folder dataset {root} | not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise BadInput(f"folder dataset {root} | no class sub-folders found: expected root/<class>/<image>")
    col = _Collector(opts.skip_bad)
    samples = []
    for label, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(str(p.resolve()), label, str(p)))
    return _splits("folder", root, samples, opts, col, class_names=dict(enumerate(classes)))


def grocery_dataset_dir(root: str | os.PathLike) -> Path:
    """Accept the folder that holds `dataset/` or `dataset/` itself."""
    root = Path(root)
    if (root / "dataset" / "train.txt").is_file():
        return root / "dataset"
    if (root / "train.txt").is_file():
        return root
    raise MissingArtifact(
        f"grocery dataset {root} | no train.txt found (looked in {root} and {root / 'dataset'}): "
        "point --data at GroceryStoreDataset or its dataset/ folder"
    )


def _read_grocery_split(ds: Path, name: str, col: _Collector) -> list[Sample]:
    f = ds / f"{name}.txt"
    if not f.is_file():
        raise MissingArtifact(f"grocery split file {f} | not found")
    out = []
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{f}:{n}"
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0]:
            col.problem(where, f"malformed line {line!r}: expected 'relative/path.jpg, fine_id, coarse_id'")
            continue
        s = col.sample(ds / parts[0], parts[1], where)
        if s:
            out.append(s)
    return out


def grocery_class_names(ds: Path) -> dict[int, str]:
    f = ds / "classes.csv"
    if not f.is_file():
        return {}
    with open(f, newline="") as fh:
        rows = list(csv.reader(fh))
    return {int(r[1]): r[0] for r in rows[1:] if len(r) > 1 and r[1].strip().isdigit()}


def grocery_iconic(root: str | os.PathLike) -> list[Sample]:
    """The 81 iconic catalogue images (snap-to-shop gallery), labelled with the fine class id."""
    ds = grocery_dataset_dir(root)
    with open(ds / "classes.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    out = []
    for n, r in enumerate(rows[1:], 2):
        p = ds / r[4].lstrip("/")
        out.append(Sample(str(p.resolve()), int(r[1]), f"{ds / 'classes.csv'}:{n}"))
    return out


@FORMATS.register("grocery")
def read_grocery(root: str | os.PathLike, opts: SplitOptions = SplitOptions()) -> Splits:
    """GroceryStoreDataset, standard protocol: train+val are training set and database, test queries."""
    ds = grocery_dataset_dir(root)
    col = _Collector(opts.skip_bad)
    train = _read_grocery_split(ds, "train", col) + _read_grocery_split(ds, "val", col)
    query = _read_grocery_split(ds, "test", col)
    return Splits("grocery", str(ds.resolve()), train, list(train), query, col.skipped, grocery_class_names(ds))


@FORMATS.register("csv")
def read_csv(root: str | os.PathLike, opts: SplitOptions = SplitOptions()) -> Splits:
    """CSV with header `path,label[,split]`; paths relative to the CSV's folder or absolute."""
    f = Path(root)
    if f.is_dir():
        found = sorted(f.glob("*.csv"))
        if len(found) != 1:
            raise BadInput(f"csv dataset {f} | a folder: name the CSV file itself")
        f = found[0]
    if not f.is_file():
        raise MissingArtifact(f"csv manifest {f} | not found")
    col = _Collector(opts.skip_bad)
    samples, explicit = [], []
    with open(f, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "path" not in header or "label" not in header:
            raise BadInput(f"{f}:1 | header {header} must contain 'path' and 'label' (optional 'split')")
        ip, il = header.index("path"), header.index("label")
        isp = header.index("split") if "split" in header else None
        for n, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            where = f"{f}:{n}"
            if len(row) < len(header):
                col.problem(where, f"malformed row {row}: expected {len(header)} columns")
                continue
            split = row[isp].strip().lower() if isp is not None else ""
            if split not in ("", "train", "database", "query"):
                col.problem(where, f"split {split!r} is not one of train, database, query")
                continue
            p = Path(row[ip].strip())
            s = col.sample(p if p.is_absolute() else f.parent / p, row[il], where)
            if s:
                samples.append(s)
                explicit.append(split)
    if any(explicit) and not all(explicit):
        raise BadInput(f"{f} | some rows have a split and some do not: give every row a split or none")
    return _splits("csv", f.parent, samples, opts, col, explicit if any(explicit) else None)


def read_dataset(root: str | os.PathLike, fmt: str, opts: SplitOptions = SplitOptions()) -> Splits:
    """Read any supported format; the entry point every stage uses."""
    if root is None:
        raise BadInput("--data | not given: pass a dataset folder or set HASHRET_DATA")
    return FORMATS.get(fmt)(root, opts)


def default_data_root() -> str | None:
    """HASHRET_DATA, else ../shared/datasets/grocery beside the checkout when present."""
    env = os.environ.get("HASHRET_DATA")
    if env:
        return env
    here = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "grocery"
    return str(here) if here.is_dir() else None

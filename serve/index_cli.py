"""`hashret index build`: encode a dataset split (or Grocery's catalogue images) into a gallery.

The gallery is built in a temporary folder beside GAL and renamed into place only when
complete, so GAL is either absent, the old gallery, or the whole new one — never half built.
Images go through the same engine and the same decode/resize/crop (hashret.images) the server
uses, so a query photo of a gallery image lands at distance 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from hashret.cliargs import (
    add_data_args,
    add_engine_args,
    add_output_args,
    add_progress_arg,
)
from hashret.errors import BadInput, MissingArtifact

log = logging.getLogger("hashret.index")


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    b = sub.add_parser(
        "build",
        help="encode images into a new gallery",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Encode a dataset split with an exported model into a new gallery folder.\n\n"
            "example:\n"
            "  hashret index build runs/exp --data ../shared/datasets/grocery --format grocery \\\n"
            "      --split database --out galleries/grocery\n"
            "  hashret index build runs/exp --data ../shared/datasets/grocery --format grocery \\\n"
            "      --iconic --out galleries/catalogue      # the 81 catalogue images only\n\n"
            "Item ids are image paths relative to the dataset root; metadata holds the path,\n"
            "the label and, where the dataset names its classes, the class name."
        ),
    )
    b.add_argument("exp", metavar="EXP", help="export folder from `hashret export`")
    data = add_data_args(b)
    data.add_argument("--split", default="database", choices=["train", "database", "query"],
                      help="which split to put in the gallery (default: database)")
    data.add_argument("--iconic", action="store_true",
                      help="grocery only: the 81 catalogue (iconic) images instead of a split (default: off)")
    data.add_argument("--limit", type=int, default=None,
                      help="only the first N images, for quick trials (default: all)")
    data.add_argument("--skip-bad", action="store_true",
                      help="skip undecodable images and list them instead of failing (default: fail)")
    index = b.add_argument_group("index")
    add_kind_args(index)
    index.add_argument("--no-activations", dest="activations", action="store_false",
                       help="store only the packed codes, not each item's float16 tanh activations, so searches "
                            "are never re-ranked; saves 2*bits bytes per item (default: store them)")
    engine = add_engine_args(b, backend_help="engine that encodes the images")
    engine.add_argument("--batch", type=int, default=32, help="images per engine call (default: 32)")
    engine.add_argument("--decode-threads", type=int, default=None, metavar="N",
                        help="threads decoding images (default: min(4, CPUs))")
    out = add_output_args(b, metavar="GAL", required=True, help="gallery folder to create", progress=False)
    out.add_argument("--overwrite", action="store_true", help="replace GAL if it exists (default: refuse)")
    add_progress_arg(out)
    from serve.snapshots import add_compact_parser

    add_compact_parser(sub)


DEFAULT_KIND = "faiss-flat"


def add_kind_args(p) -> None:
    """`--kind` and each registered kind's own flags, all taken from the INDEX_KINDS registry."""
    from serve.gallery import INDEX_KINDS

    kinds = INDEX_KINDS.items()
    shown = "; ".join(f"{name} = {cls.summary or cls.__doc__ or name}" for name, cls in kinds)
    p.add_argument("--kind", default=DEFAULT_KIND, choices=[name for name, _ in kinds],
                   help=f"index kind: {shown} (default: {DEFAULT_KIND})")
    for _, cls in kinds:
        for flag, (_, kw) in cls.CLI_OPTIONS.items():
            p.add_argument(flag, **kw)


def kind_options(args: argparse.Namespace) -> dict:
    """The gallery options the kind-specific flags set; such a flag with another --kind is refused."""
    from serve.gallery import INDEX_KINDS

    opts = {}
    for name, cls in INDEX_KINDS.items():
        for flag, (option, _) in cls.CLI_OPTIONS.items():
            value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
            if value is None:
                continue
            if name != args.kind:
                raise BadInput(f"{flag} | only applies to --kind {name}: drop it, or pass --kind {name}")
            opts[option] = value
    return opts


def gallery_items(data: str | os.PathLike, fmt: str, split: str = "database", iconic: bool = False,
                   limit: int | None = None) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """(paths, ids, metadata) for a dataset split or the Grocery catalogue images."""
    from hashret import datasets

    if data is None:
        raise BadInput("--data | not given: pass a dataset folder or set HASHRET_DATA")
    if iconic:
        if fmt != "grocery":
            raise BadInput(f"--iconic | only the grocery format has catalogue images, not {fmt!r}")
        root = datasets.grocery_dataset_dir(data)
        samples = datasets.grocery_iconic(data)
        names = datasets.grocery_class_names(root)
    else:
        splits = datasets.read_dataset(data, fmt)
        root = Path(splits.root)
        samples = splits.get(split)
        names = splits.class_names
    if limit is not None:
        samples = samples[: max(0, int(limit))]
    if not samples:
        raise BadInput(f"{data} | no images in {'the catalogue' if iconic else f'split {split!r}'}")
    paths, ids, metas = [], [], []
    for s in samples:
        rel = Path(os.path.relpath(s.path, root)).as_posix()
        md = {"path": rel, "label": str(s.label)}
        if s.label in names:
            md["class"] = names[s.label]
        paths.append(s.path)
        ids.append(rel)
        metas.append(md)
    return paths, ids, metas


def encode_files(engine, spec, paths: list[str], batch: int = 32, decode_threads: int | None = None,
                 skip_bad: bool = False, progress: bool = True, activations: bool = False) -> tuple:
    """Packed codes of the decodable files, their indices, and 'path | reason' for skipped ones.

    With `activations`, a fourth element: the model's float32 outputs [len(kept), bits], the
    activations a gallery keeps for re-ranking. Decoding runs in a thread pool one batch
    ahead of the engine.
    """
    from tqdm import tqdm

    from hashret import codes as hcodes
    from hashret.errors import HashretError
    from hashret.images import load_image

    def load(p):
        try:
            return load_image(p, spec)
        except HashretError as e:
            if not skip_bad:
                raise
            return e

    threads = decode_threads or min(4, os.cpu_count() or 1)
    out, zs, kept, skipped = [], [], [], []
    bar = tqdm(total=len(paths), unit="img", desc="encoding", disable=not progress)
    with ThreadPoolExecutor(threads, thread_name_prefix="hashret-index-decode") as pool:
        chunks = [list(range(s, min(len(paths), s + batch))) for s in range(0, len(paths), batch)]
        pending = [pool.map(load, [paths[i] for i in chunks[0]])] if chunks else []
        for n, idx in enumerate(chunks):
            arrays = list(pending.pop(0))
            if n + 1 < len(chunks):
                pending.append(pool.map(load, [paths[i] for i in chunks[n + 1]]))
            good = [(i, a) for i, a in zip(idx, arrays) if not isinstance(a, Exception)]
            skipped += [str(a) for a in arrays if isinstance(a, Exception)]
            if good:
                z = engine.encode(np.stack([a for _, a in good]))
                out.append(hcodes.pack(z))
                zs.append(np.asarray(z, np.float32))
                kept += [i for i, _ in good]
            bar.update(len(idx))
    bar.close()
    codes = np.concatenate(out) if out else np.zeros((0, engine.bits // 8), np.uint8)
    if activations:
        Z = np.concatenate(zs) if zs else np.zeros((0, engine.bits), np.float32)
        return codes, kept, skipped, Z
    return codes, kept, skipped


def build(exp: str | os.PathLike, out: str | os.PathLike, paths: list[str], ids: list[str],
          metas: list[dict[str, str]], *, kind: str = "faiss-flat", gallery_options: dict | None = None,
          backend: str = "ort", device: str = "cpu", batch: int = 32, decode_threads: int | None = None,
          skip_bad: bool = False, overwrite: bool = False, progress: bool = True, engine=None,
          activations: bool = True) -> dict:
    """Encode `paths` with EXP's model into a new gallery at `out` (atomic); returns a summary.

    `activations` (default True): the gallery also keeps each item's float16 activations, so
    the server can re-rank a search's Hamming shortlist by cosine (`hashret serve --rerank-factor`).
    """
    from hashret.engines import model_id, open_engine
    from hashret.images import PreprocessSpec
    from hashret.manifest import load_manifest
    from serve.gallery import create_gallery

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BadInput(f"--batch {batch!r} | must be a positive integer")
    out = Path(out)
    if out.exists() and not overwrite:
        raise BadInput(f"--out {out} | already exists: choose a new folder or pass --overwrite")
    manifest = load_manifest(exp, kind="export")
    mid = model_id(manifest)
    spec = PreprocessSpec.from_dict(manifest.get("preprocessing") or {})
    own_engine = engine is None
    if own_engine:
        engine = open_engine(exp, backend, device)
    try:
        codes, kept, skipped, Z = encode_files(engine, spec, paths, batch, decode_threads, skip_bad, progress,
                                               activations=True)
    finally:
        if own_engine:
            engine.close()
    if not kept:
        raise BadInput(f"{len(paths)} images | none could be decoded: nothing to index")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent))
    try:
        g = create_gallery(tmp, kind, int(manifest["bits"]), mid, activations=bool(activations),
                           **(gallery_options or {}))
        try:
            g.upsert([ids[i] for i in kept], codes, [metas[i] for i in kept], Z if activations else None)
            g.save()
            size = g.size
        finally:
            g.close()
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from hashret.fsutil import fsync_dir

    fsync_dir(out.parent)
    return {"gallery": str(out), "kind": kind, "size": size, "skipped": skipped, "model_id": mid,
            "activations": bool(activations)}


def run(args: argparse.Namespace) -> int:
    from hashret.datasets import default_data_root

    if getattr(args, "index_command", None) == "compact":
        from serve.snapshots import run_compact

        return run_compact(args)
    if getattr(args, "index_command", None) != "build":
        raise BadInput("hashret index | choose a subcommand: build or compact (see hashret index --help)")
    if not Path(args.exp).exists():
        raise MissingArtifact(f"EXP {args.exp} | does not exist: run hashret export first")
    data = args.data or default_data_root()
    paths, ids, metas = gallery_items(data, args.format, args.split, args.iconic, args.limit)
    opts = kind_options(args)
    import sys

    summary = build(
        args.exp, args.out, paths, ids, metas, kind=args.kind, gallery_options=opts, backend=args.backend,
        device=args.device, batch=args.batch, decode_threads=args.decode_threads, skip_bad=args.skip_bad,
        overwrite=args.overwrite, progress=not args.no_progress and sys.stderr.isatty(),
        activations=getattr(args, "activations", True),
    )
    for s in summary["skipped"]:
        print(f"skipped: {s}", file=sys.stderr)
    print(f"gallery {summary['gallery']}: {summary['size']} items ({summary['kind']}, model {summary['model_id'][:12]}…"
          + (", with activations" if summary["activations"] else "") + ")"
          + (f", {len(summary['skipped'])} skipped" if summary["skipped"] else ""))
    return 0

"""Writes tests/data/gallery-v1-*/: galleries made by the release before the one manifest module.

Run with that release first on the path (it is kept for the record, the folders are committed):
    git worktree add /tmp/hashret-head 51ed4cb
    PYTHONPATH=/tmp/hashret-head python tests/data/make_gallery_v1.py tests/data
Each gallery holds a saved snapshot of four items plus, in its WAL only, two upserts (one new id,
one replacing an id) and a delete, so a reader has to migrate the manifest and replay the log.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from serve.gallery import create_gallery

SHA = "5eed" + "ab" * 30
BITS = 16


def make(out: Path, kind: str, **opts) -> None:
    shutil.rmtree(out, ignore_errors=True)
    g = create_gallery(out, kind, BITS, SHA, **opts)
    codes = np.array([[0, 0], [255, 0], [0, 255], [15, 240]], np.uint8)
    g.upsert(["a.jpg", "b.jpg", "c/ü.jpg", "d.jpg"], codes,
             [{"label": "0"}, {"label": "1"}, {"label": "2", "class": "Äpfel"}, {}])
    g.save()
    g.upsert(["e.jpg"], np.array([[1, 1]], np.uint8), [{"label": "4"}])
    g.upsert(["b.jpg"], np.array([[128, 128]], np.uint8), [{"label": "1", "note": "replaced"}])
    g.delete(["d.jpg"])
    g.close()
    (out / ".lock").unlink(missing_ok=True)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
    make(root / "gallery-v1-faiss-flat", "faiss-flat")
    make(root / "gallery-v1-faiss-hnsw", "faiss-hnsw", M=4, ef_construction=8, ef_search=8)

"""A new index kind is one module: here a throw-away one, registered from this file only.

`BruteGallery` is what a `serve/gallery/<kind>_index.py` module would hold: a Gallery subclass
decorated with `@index_kind(...)` (done by the fixture, so the registration can be undone). With
nothing else edited, `hashret index build --kind` offers it with its help line and its own flag,
builds a gallery with it through the real CLI path, `open_gallery` reopens it, and the real
server serves and updates it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact
from hashret.fsutil import write_json_atomic
from hashret.manifest import gallery_checksum, now_iso, write_manifest
from serve.gallery import (
    INDEX_KINDS,
    Gallery,
    Hit,
    index_kind,
    new_gallery_manifest,
    open_gallery,
)
from tests.test_fuzz import model_id_of, shared_exp

KIND = "test-numpy-brute"
N_IMAGES = 10


class BruteGallery(Gallery):
    """Brute-force Hamming search in NumPy over codes kept in memory and in one JSON file."""

    summary = "NumPy brute force over every code (a test plug-in)"
    CLI_OPTIONS = {
        "--brute-tag": ("tag", {"default": None, "help": f"{KIND} only: a label kept in the manifest (default: none)"}),
    }
    STATE = "brute.json"

    def __init__(self, path: Path, manifest: dict):
        super().__init__(path, manifest)
        self._items: list[str] = []
        self._meta: list[dict[str, str]] = []
        self._codes = np.zeros((0, self.nbytes), np.uint8)

    @classmethod
    def create(cls, path, bits, model_sha256, options):
        unknown = sorted(set(options) - {"tag"})
        if unknown:
            raise BadInput(f"index kind {cls.kind!r} | unknown option(s) {', '.join(unknown)}: allowed tag")
        g = cls(path, new_gallery_manifest(bits, model_sha256, {"kind": cls.kind, **options}))
        g._save()  # the manifest last: a failed create leaves none
        return g

    @classmethod
    def open(cls, path, manifest):
        g = cls(path, manifest)
        state_file = Path(path) / cls.STATE
        if not state_file.is_file():
            raise MissingArtifact(f"gallery {path} | {cls.STATE} missing")
        state = json.loads(state_file.read_text())
        g._items, g._meta = list(state["ids"]), list(state["meta"])
        raw = b"".join(bytes.fromhex(c) for c in state["codes"])
        g._codes = np.frombuffer(raw, np.uint8).reshape(-1, g.nbytes).copy()
        return g

    def _persist(self) -> None:  # every acknowledged write is on disk when it returns
        write_json_atomic(self._path / self.STATE, {
            "ids": self._items, "meta": self._meta, "codes": [c.tobytes().hex() for c in self._codes]})

    def _size(self):
        return len(self._items)

    def _upsert(self, ids, codes, metadata):
        pos = {i: p for p, i in enumerate(self._items)}
        for i, code, meta in zip(ids, codes, metadata):
            if i in pos:
                self._codes[pos[i]], self._meta[pos[i]] = code, meta
            else:
                pos[i] = len(self._items)
                self._items.append(i)
                self._meta.append(meta)
                self._codes = np.vstack([self._codes, code[None]])
        self._persist()

    def _missing(self, ids):
        return [i for i in ids if i not in set(self._items)]

    def _delete(self, ids):
        keep = [p for p, i in enumerate(self._items) if i not in set(ids)]
        self._items = [self._items[p] for p in keep]
        self._meta = [self._meta[p] for p in keep]
        self._codes = self._codes[keep]
        self._persist()

    def _search(self, queries, k):
        d = np.unpackbits(queries[:, None, :] ^ self._codes[None, :, :], axis=2).sum(2)
        out = []
        for row in d:
            order = np.lexsort((np.arange(len(row)), row))[:k]  # ties: first inserted first
            out.append([Hit(self._items[p], int(row[p]), dict(self._meta[p])) for p in order])
        return out

    def _get(self, id):
        if id not in self._items:
            return None
        p = self._items.index(id)
        return self._codes[p].copy(), dict(self._meta[p])

    def _ids(self):
        return list(self._items)

    def _save(self):
        self._persist()
        manifest = {**self._manifest, "size": len(self._items), "saved": now_iso()}
        manifest["checksum"] = gallery_checksum(manifest)  # every kind seals what it writes
        write_manifest(self._path, manifest)
        self._manifest = manifest

    def _close(self):
        pass


@pytest.fixture
def brute_kind():
    """What importing a kind module does, undone afterwards so no other test sees the kind."""
    index_kind(KIND)(BruteGallery)
    yield BruteGallery
    INDEX_KINDS.unregister(KIND)


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return shared_exp(tmp_path_factory)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A CSV dataset of synthetic JPEGs in two classes, all in the database split."""
    from benchmarks.soak import synthetic_images

    root = tmp_path_factory.mktemp("plugin-data")
    rows = ["path,label,split"]
    for i, data in enumerate(synthetic_images(N_IMAGES, (160, 120), seed=11)):
        (root / f"img{i:02d}.jpg").write_bytes(data)
        rows.append(f"img{i:02d}.jpg,{i % 2},database")
    (root / "items.csv").write_text("\n".join(rows) + "\n")
    return root / "items.csv"


def build(exp: Path, data: Path, out: Path, *extra: str) -> int:
    from hashret.cli import main

    return main(["index", "build", str(exp), "--data", str(data), "--format", "csv", "--out", str(out),
                 "--no-progress", *extra])


def test_kind_shows_in_the_cli_help_with_its_flag(brute_kind, capsys):
    from hashret.cli import main

    with pytest.raises(SystemExit) as e:
        main(["index", "build", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"{KIND} = NumPy brute force over every code (a test plug-in)" in out
    assert "faiss-flat," in out and f"{KIND}}}" in out  # in --kind's choices
    assert f"--brute-tag BRUTE_TAG {KIND} only: a label kept in the manifest (default: none)" in out


def test_cli_builds_serves_and_reopens_a_plugin_gallery(brute_kind, exp, dataset, tmp_path, capsys):
    from serve.client import Item, RetrievalClient
    from serve.server import BackgroundServer, ServeConfig

    gal = tmp_path / "brute"
    assert build(exp, dataset, gal, "--kind", KIND, "--brute-tag", "t1") == 0, capsys.readouterr().err
    assert f"{N_IMAGES} items ({KIND}," in capsys.readouterr().out
    ref = tmp_path / "flat"  # the same images through a built-in kind: the results must agree
    assert build(exp, dataset, ref) == 0

    m = json.loads((gal / "manifest.json").read_text())
    assert m["index"] == {"kind": KIND, "tag": "t1"} and m["size"] == N_IMAGES
    assert m["model_id"] == model_id_of(exp) and m["bits"] == 64
    with open_gallery(gal, expect_bits=64, expect_model_sha256=model_id_of(exp)) as g, open_gallery(ref) as f:
        assert isinstance(g, BruteGallery) and g.ids() == f.ids() == [f"img{i:02d}.jpg" for i in range(N_IMAGES)]
        codes = np.stack([f.get(i)[0] for i in f.ids()])
        assert [[(h.id, h.distance) for h in hits] for hits in g.search(codes, 4)] == \
               [[(h.id, h.distance) for h in hits] for hits in f.search(codes, 4)]
        assert g.get("img03.jpg")[1] == {"path": "img03.jpg", "label": "1"}

    image = (dataset.parent / "img04.jpg").read_bytes()
    cfg = ServeConfig(model=exp, gallery=gal, port=0, metrics_port=None, grace_s=0.5, decode_threads=1,
                      token="plug-in")
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address, token="plug-in") as c:
        assert c.info().gallery.kind == KIND and c.info().gallery.size == N_IMAGES
        top = c.search(image, k=3)[0]
        assert (top.id, top.distance) == ("img04.jpg", 0)
        code, _ = c.encode(image)
        assert c.upsert([Item("copy-of-4", code=code, metadata={"note": "by code"})]) == 1
        assert c.delete(["img00.jpg"]) == 1
    with open_gallery(gal) as g:  # the server's writes went through the plug-in's own storage
        assert g.size == N_IMAGES and "img00.jpg" not in g.ids() and g.get("copy-of-4")[1] == {"note": "by code"}


def test_a_kind_flag_with_another_kind_is_refused(brute_kind, exp, dataset, tmp_path, capsys):
    assert build(exp, dataset, tmp_path / "g", "--brute-tag", "x") == 2
    assert f"--brute-tag | only applies to --kind {KIND}" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_the_throwaway_kind_is_gone_afterwards(exp, dataset, tmp_path, capsys):
    """The fixture unregistered it: the CLI no longer offers it, and its galleries no longer open."""
    assert KIND not in INDEX_KINDS
    with pytest.raises(SystemExit):
        build(exp, dataset, tmp_path / "g", "--kind", KIND)
    assert "invalid choice" in capsys.readouterr().err
    index_kind(KIND)(BruteGallery)
    try:
        assert build(exp, dataset, tmp_path / "g", "--kind", KIND) == 0
    finally:
        INDEX_KINDS.unregister(KIND)
    with pytest.raises(ArtifactMismatch, match=f"index kind '{KIND}' is not known here"):
        open_gallery(tmp_path / "g")

"""Gallery semantics, exactness and crash safety on real FAISS and real Milvus Lite."""
from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from hashret.errors import (
    ArtifactMismatch,
    BadInput,
    MissingArtifact,
    NotFound,
    Unavailable,
)
from serve.gallery import SCHEMA_VERSION, Hit, create_gallery, open_gallery

try:
    import milvus_lite  # noqa: F401
    import pymilvus  # noqa: F401

    MILVUS_SKIP = ""
except Exception as e:  # ImportError, or pkg_resources missing
    MILVUS_SKIP = f"Milvus Lite unavailable: import pymilvus/milvus_lite failed ({e})"

milvus = pytest.mark.skipif(bool(MILVUS_SKIP), reason=MILVUS_SKIP or "-")
KINDS = ["faiss-flat", "faiss-hnsw", pytest.param("milvus", marks=milvus)]
FAISS_KINDS = ["faiss-flat", "faiss-hnsw"]
SHA = "3f2a" + "0" * 60
BITS = 64


def rand_codes(n: int, bits: int = BITS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, bits // 8), dtype=np.uint8)


def hamming(q: np.ndarray, codes: np.ndarray) -> np.ndarray:
    return np.unpackbits(q[None, :] ^ codes, axis=1).sum(1)


def brute_force(queries, codes, ids, k):
    """Reference ranking: by distance, ties by insertion position."""
    out = []
    for q in queries:
        d = hamming(q, codes)
        order = np.lexsort((np.arange(len(d)), d))[:k]
        out.append([(ids[i], int(d[i])) for i in order])
    return out


def pairs(hits: list[Hit]) -> list[tuple[str, int]]:
    return [(h.id, h.distance) for h in hits]


@pytest.fixture
def make(tmp_path):
    opened = []

    def _make(kind="faiss-flat", name="gal", bits=BITS, **opts):
        g = create_gallery(tmp_path / name, kind, bits, SHA, **opts)
        opened.append(g)
        return g

    yield _make
    for g in opened:
        g.close()


# ---- semantics ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_upsert_search_get_delete(make, kind):
    g = make(kind)
    codes = np.array([[0] * 8, [255] + [0] * 7, [255] * 8], np.uint8)
    g.upsert(["a", "b", "c"], codes, [{"f": "a.jpg"}, {}, {"f": "c.jpg"}])
    assert (g.size, g.ids()) == (3, ["a", "b", "c"])
    q = np.zeros((1, 8), np.uint8)
    assert pairs(g.search(q, 5)[0]) == [("a", 0), ("b", 8), ("c", 64)]
    assert g.search(q, 1)[0] == [Hit("a", 0, {"f": "a.jpg"})]
    assert pairs(g.search(q, 5, max_distance=8)[0]) == [("a", 0), ("b", 8)]
    # replacing keeps the id's place (first-insertion order breaks ties) and its new data
    g.upsert(["a", "d"], np.array([[255] * 8, [0] * 8], np.uint8), [{"f": "new"}, {}])
    assert g.ids() == ["a", "b", "c", "d"]
    code, meta = g.get("a")
    assert code.tolist() == [255] * 8 and meta == {"f": "new"}
    assert pairs(g.search(q, 5)[0]) == [("d", 0), ("b", 8), ("a", 64), ("c", 64)]
    assert g.delete(["b", "d"]) == 2
    assert (g.size, g.ids()) == (2, ["a", "c"])
    assert pairs(g.search(q, 5)[0]) == [("a", 64), ("c", 64)]
    with pytest.raises(NotFound, match="'b' not found"):
        g.get("b")
    assert g.search(np.zeros((0, 8), np.uint8), 3) == []


@pytest.mark.parametrize("kind", KINDS)
def test_delete_unknown_id_deletes_nothing(make, kind):
    g = make(kind)
    g.upsert(["a", "b"], rand_codes(2))
    with pytest.raises(NotFound, match=r"1 id\(s\) not found: 'zz'; nothing was deleted"):
        g.delete(["a", "zz"])
    assert g.ids() == ["a", "b"]


@pytest.mark.parametrize("bits,k", [(64, 10), (16, 1), (16, 300), (32, 2500), (128, 7)])
def test_flat_equals_brute_force(make, bits, k):
    """Exact ids, distances and tie order (16-bit codes tie a lot), k beyond the size included."""
    codes, ids = rand_codes(2000, bits, seed=1), [f"img{i}" for i in range(2000)]
    g = make("faiss-flat", bits=bits)
    g.upsert(ids, codes)
    queries = np.concatenate([codes[:5], rand_codes(15, bits, seed=2)])
    got = [pairs(h) for h in g.search(queries, k)]
    assert got == brute_force(queries, codes, ids, k)
    assert all(len(h) == min(k, 2000) for h in got)


@milvus
def test_faiss_flat_and_milvus_lite_agree(make):
    """Same top-k (ids and distances), ties included, after upserts, replaces and deletes."""
    codes, ids = rand_codes(2000, seed=3), [f"img{i}" for i in range(2000)]
    gals = [make("faiss-flat", "f"), make("milvus", "m")]
    for g in gals:
        g.upsert(ids, codes, [{"i": str(i)} for i in range(2000)])
        g.upsert(ids[:50], rand_codes(50, seed=4))
        g.delete(ids[50:100])
    final_ids = ids[:50] + ids[100:]
    final_codes = np.concatenate([rand_codes(50, seed=4), codes[100:]])
    queries = np.concatenate([codes[200:205], rand_codes(15, seed=5)])
    want = brute_force(queries, final_codes, final_ids, 20)
    flat, mil = (g.search(queries, 20) for g in gals)
    assert [pairs(h) for h in flat] == want
    assert [pairs(h) for h in mil] == want
    assert mil[0][0].metadata == {"i": "200"}
    within = [pairs(h) for h in gals[1].search(queries, 20, max_distance=25)]
    assert within == [[p for p in w if p[1] <= 25] for w in want]


@pytest.mark.parametrize("kind", KINDS)
def test_search_nowait_answers_only_when_cheap_and_free(make, kind, monkeypatch):
    """The event loop's shortcut: same hits as search, never waits behind a writer."""
    g = make(kind)
    codes, ids = rand_codes(300, seed=7), [f"i{n}" for n in range(300)]
    g.upsert(ids, codes)
    q = codes[:3] ^ np.uint8(1)
    g.search(q, 5)  # builds the FAISS index
    now = g.search_nowait(q, 5, max_distance=30)
    if kind == "milvus":
        assert now is None  # a network call: always from a thread
        return
    assert [pairs(h) for h in now] == [pairs(h) for h in g.search(q, 5, max_distance=30)]
    with pytest.raises(BadInput, match="expected packed uint8"):
        g.search_nowait(q[0], 5)  # refused like search refuses it

    held, release = threading.Event(), threading.Event()

    def writer():
        with g._lock:  # what an upsert does while it fsyncs the WAL
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    held.wait(10)
    try:
        assert g.search_nowait(q, 5) is None
    finally:
        release.set()
        t.join()
    assert g.search_nowait(q, 5) is not None
    if kind == "faiss-flat":
        monkeypatch.setattr(type(g), "CHEAP_SCAN_BYTES", 300 * 8 - 1)  # one scan just too big
        assert g.search_nowait(q[:1], 5) is None
        g.delete(["i0"])  # index must be rebuilt: not on the caller's thread
        monkeypatch.undo()
        assert g.search_nowait(q[:1], 5) is None
        g.search(q[:1], 5)
        assert g.search_nowait(q[:1], 5) is not None


@pytest.mark.parametrize("kind", [*KINDS, "torch-flat"])
def test_queries_in_one_call_are_answered_as_alone(make, kind):
    """The server searches the queries of one event-loop turn in one call (serve.service.
    _SearchTurn), so every kind must answer each query of a call exactly as it answers it alone:
    same ids, distances, metadata and re-ranking scores, ties and max_distance included."""
    opts = {"device": "cpu"} if kind == "torch-flat" else {}
    g = make(kind, **opts)
    rng = np.random.default_rng(11)
    base = rand_codes(40, seed=12)
    codes = np.concatenate([base, base, base[:20]])  # many exact ties
    ids = [f"i{n}" for n in range(len(codes))]
    acts = rng.standard_normal((len(codes), BITS)).astype(np.float32)
    g.upsert(ids, codes, [{"n": str(n)} for n in range(len(codes))], acts)
    queries = np.concatenate([base[:5] ^ np.uint8(3), rand_codes(3, seed=13)])
    qz = rng.standard_normal((len(queries), BITS)).astype(np.float32)

    def view(results):
        return [[(h.id, h.distance, h.metadata, getattr(h, "score", None)) for h in hits] for hits in results]

    for k, md, factor in ((7, None, 0), (7, 28, 0), (5, None, 10), (3, 30, 4)):
        z = qz if factor else None
        together = g.search(queries, k, md, z, factor)
        alone = [g.search(queries[i:i + 1], k, md, None if z is None else z[i:i + 1], factor)[0]
                 for i in range(len(queries))]
        assert view(together) == view(alone), (k, md, factor)


def test_hnsw_recall_vs_flat(make):
    """Clustered codes (like real image hashes); recall counts tied distances as hits."""
    rng = np.random.default_rng(6)
    centers = rng.integers(0, 2, (30, BITS), dtype=np.uint8)
    bits = centers[rng.integers(0, 30, 3000)] ^ (rng.random((3000, BITS)) < 0.1)
    codes = np.packbits(bits.astype(np.uint8), axis=1)
    ids = [str(i) for i in range(3000)]
    flat, hnsw = make("faiss-flat", "f"), make("faiss-hnsw", "h", M=16)
    for g in (flat, hnsw):
        g.upsert(ids, codes)
    queries = codes[rng.choice(3000, 100, replace=False)] ^ np.uint8(1)
    hits = 0
    for ref, got in zip(flat.search(queries, 10), hnsw.search(queries, 10)):
        kth = ref[-1].distance
        hits += sum(h.distance <= kth for h in got)
    assert hits / 1000 >= 0.9


def test_concurrent_upserts_and_searches(make):
    g = make("faiss-hnsw")
    errors = []

    def worker(t):
        try:
            for b in range(10):
                ids = [f"t{t}-{b}-{i}" for i in range(5)]
                g.upsert(ids, rand_codes(5, seed=100 * t + b))
                g.search(rand_codes(2, seed=t), 3)
                g.delete(ids[:1])
        except Exception as e:  # surfaced below; threads swallow exceptions
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and g.size == 4 * 10 * 4


# ---- persistence and crash safety ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_reopen_without_save_keeps_writes(tmp_path, kind):
    g = create_gallery(tmp_path / "g", kind, BITS, SHA)
    g.upsert(["a", "b", "c"], rand_codes(3), [{"x": "1"}, {}, {}])
    g.save()
    g.upsert(["d"], rand_codes(1, seed=9))
    g.upsert(["a"], rand_codes(1, seed=8), [{"x": "2"}])
    g.delete(["b"])
    g.close()  # no save(): FAISS replays wal.jsonl, Milvus persisted by itself
    with open_gallery(tmp_path / "g", BITS, SHA) as g2:
        assert g2.ids() == ["a", "c", "d"]
        assert g2.get("a")[1] == {"x": "2"}
        assert g2.get("a")[0].tolist() == rand_codes(1, seed=8)[0].tolist()
        assert pairs(g2.search(rand_codes(1, seed=9), 1)[0]) == [("d", 0)]


@pytest.mark.parametrize("kind", FAISS_KINDS)
def test_crash_after_manifest_before_wal_reset_applies_once(tmp_path, kind):
    g = create_gallery(tmp_path / "g", kind, BITS, SHA)
    g.upsert(["a", "b"], rand_codes(2))
    g.delete(["a"])
    g.upsert(["a"], rand_codes(1, seed=1))
    wal = (tmp_path / "g" / "wal.jsonl").read_bytes()
    g.save()
    g.close()
    (tmp_path / "g" / "wal.jsonl").write_bytes(wal)  # as if the WAL reset never happened
    with open_gallery(tmp_path / "g") as g2:
        assert g2.ids() == ["b", "a"]


@pytest.mark.parametrize("kind", FAISS_KINDS)
def test_torn_last_wal_line_is_ignored(tmp_path, kind, caplog):
    g = create_gallery(tmp_path / "g", kind, BITS, SHA)
    g.upsert(["a", "b"], rand_codes(2))
    g.close()
    wal = tmp_path / "g" / "wal.jsonl"
    with open(wal, "ab") as f:
        f.write(b'{"crc":"1234abcd","rec":{"seq":2,"op":"ups')  # crash mid-append
    with caplog.at_level(logging.WARNING, logger="hashret.gallery"):
        g2 = open_gallery(tmp_path / "g")
    assert "torn last line" in caplog.text
    assert g2.ids() == ["a", "b"]
    g2.upsert(["c"], rand_codes(1, seed=1))  # the log continues on a clean line
    g2.close()
    with open_gallery(tmp_path / "g") as g3:
        assert g3.ids() == ["a", "b", "c"]


def test_corrupt_wal_line_in_the_middle_is_refused(tmp_path):
    g = create_gallery(tmp_path / "g", "faiss-flat", BITS, SHA)
    g.upsert(["a"], rand_codes(1))
    g.upsert(["b"], rand_codes(1, seed=1))
    g.close()
    wal = tmp_path / "g" / "wal.jsonl"
    lines = wal.read_bytes().splitlines(keepends=True)
    wal.write_bytes(lines[0].replace(b'"a"', b'"x"') + lines[1])
    with pytest.raises(ArtifactMismatch, match=r"wal\.jsonl \| line 1 is corrupt"):
        open_gallery(tmp_path / "g")


@pytest.mark.parametrize("kind", FAISS_KINDS)
def test_truncated_snapshot_is_detected(tmp_path, kind):
    g = create_gallery(tmp_path / "g", kind, BITS, SHA)
    g.upsert([str(i) for i in range(50)], rand_codes(50))
    g.save()
    g.close()
    snap = tmp_path / "g" / "snapshot-000001.codes.npy"
    snap.write_bytes(snap.read_bytes()[:-7])
    with pytest.raises(ArtifactMismatch, match=r"snapshot-000001\.codes\.npy \| sha256 .* restore it or rebuild"):
        open_gallery(tmp_path / "g")


@pytest.mark.parametrize(
    "bits, sha, shown",
    [(128, SHA, r"3f2a0000…\(64 bits\), engine is 3f2a0000…\(128 bits\)"),
     (BITS, "9c1b" * 16, r"3f2a0000…\(64 bits\), engine is 9c1b9c1b…\(64 bits\)")],
)
def test_model_mismatch_is_refused(tmp_path, bits, sha, shown):
    create_gallery(tmp_path / "g", "faiss-flat", BITS, SHA).close()
    with pytest.raises(ArtifactMismatch, match=f"built for model {shown}: rebuild with `hashret index build`"):
        open_gallery(tmp_path / "g", expect_bits=bits, expect_model_sha256=sha)


def test_newer_schema_version_is_refused(tmp_path):
    create_gallery(tmp_path / "g", "faiss-flat", BITS, SHA).close()
    mpath = tmp_path / "g" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    mpath.write_text(json.dumps(m))
    newer = SCHEMA_VERSION + 1
    with pytest.raises(ArtifactMismatch, match=rf"manifest\.json \| schema_version {newer} is newer .*upgrade hashret"):
        open_gallery(tmp_path / "g")


def test_second_open_and_existing_folder_are_refused(tmp_path):
    g = create_gallery(tmp_path / "g", "faiss-flat", BITS, SHA)
    with pytest.raises(Unavailable, match="already open"):
        open_gallery(tmp_path / "g")
    with pytest.raises(BadInput, match="already exists"):
        create_gallery(tmp_path / "g", "faiss-flat", BITS, SHA)
    g.close()
    shutil.rmtree(tmp_path / "g")
    with pytest.raises(BadInput, match="unknown: choose one of faiss-flat, faiss-hnsw, milvus"):
        create_gallery(tmp_path / "g", "annoy", BITS, SHA)


# ---- input validation --------------------------------------------------------------------
BAD_CALLS = [
    ("upsert", (["a"], np.zeros((1, 16), np.uint8)), r"width 16 bytes \(128 bits\), gallery holds 8 bytes \(64 bits\)"),
    ("upsert", (["a"], np.zeros((1, 8), np.int64)), r"expected packed uint8\[N, 8\]"),
    ("upsert", (["a", "a"], np.zeros((2, 8), np.uint8)), "duplicate ids in one call: 'a'"),
    ("upsert", ([""], np.zeros((1, 8), np.uint8)), "ids must be non-empty strings"),
    ("upsert", (["a", "b"], np.zeros((1, 8), np.uint8)), "2 ids but 1 codes"),
    ("upsert", (["a"], np.zeros((1, 8), np.uint8), [{"n": 1}]), "dict of str -> str"),
    ("search", (np.zeros((1, 8), np.uint8), 0), "k 0 | must be an integer >= 1"),
    ("search", (np.zeros((1, 4), np.uint8), 3), r"width 4 bytes \(32 bits\)"),
    ("search", (np.zeros((1, 8), np.uint8), 3, -1), "max_distance -1"),
    ("delete", (["a", "a"],), "duplicate ids"),
]


@pytest.mark.parametrize("method, args, msg", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_is_refused(make, method, args, msg):
    g = make()
    g.upsert(["z"], rand_codes(1))
    with pytest.raises(BadInput, match=msg):
        getattr(g, method)(*args)
    assert g.ids() == ["z"]


@milvus
def test_milvus_topk_cap_and_odd_ids(make, monkeypatch):
    import serve.gallery.milvus_index as mi

    g = make("milvus")
    odd = ["O'Brien.jpg", 'say "hi"', "back\\slash", "50%", "ü"]
    g.upsert(odd, rand_codes(5))
    assert g.ids() == odd and g.get("O'Brien.jpg")[1] == {}
    assert g.delete(["back\\slash"]) == 1
    monkeypatch.setattr(mi, "TOPK_CAP", 5)  # Milvus' real cap is 16384
    assert len(g.search(rand_codes(1), 6)[0]) == 4  # k above the cap is fine if the gallery is smaller
    monkeypatch.setattr(mi, "TOPK_CAP", 2)
    with pytest.raises(BadInput, match="Milvus returns at most 2 hits per query"):
        g.search(rand_codes(1), 3)


# ---- manifests: one module, older galleries migrated on read ------------------------------
V1 = Path(__file__).parent / "data"  # made by tests/data/make_gallery_v1.py with the previous release
V1_SHA = "5eed" + "ab" * 30
V1_ITEMS = {  # what that release reads back: snapshot + the WAL's upserts (one replacing b.jpg) and delete
    "a.jpg": ([0, 0], {"label": "0"}),
    "b.jpg": ([128, 128], {"label": "1", "note": "replaced"}),
    "c/ü.jpg": ([0, 255], {"label": "2", "class": "Äpfel"}),
    "e.jpg": ([1, 1], {"label": "4"}),
}


def v1_copy(tmp_path, kind: str) -> Path:
    dst = tmp_path / f"v1-{kind}"
    shutil.copytree(V1 / f"gallery-v1-{kind}", dst)
    return dst


def contents(g) -> dict:
    return {i: (g.get(i)[0].tolist(), g.get(i)[1]) for i in g.ids()}


@pytest.mark.parametrize("kind", FAISS_KINDS)
def test_gallery_of_the_previous_release_opens_and_takes_writes(tmp_path, kind):
    from hashret.manifest import gallery_checksum

    gal = v1_copy(tmp_path, kind)
    on_disk = (gal / "manifest.json").read_bytes()
    assert json.loads(on_disk)["schema_version"] == 1 and "hashret_version" in json.loads(on_disk)
    with open_gallery(gal, expect_bits=16, expect_model_sha256=V1_SHA) as g:
        assert (g.kind, g.bits, g.model_sha256, g.size) == (kind, 16, V1_SHA, 4)
        assert list(contents(g)) == list(V1_ITEMS) and contents(g) == V1_ITEMS
        assert pairs(g.search(np.zeros((1, 2), np.uint8), 10)[0]) == [
            ("a.jpg", 0), ("b.jpg", 2), ("e.jpg", 2), ("c/ü.jpg", 8)]
        m = g.manifest
        assert (m["schema_version"], m["bits"], m["model_id"]) == (SCHEMA_VERSION, 16, V1_SHA)
        assert "model" not in m and "hashret_version" not in m and m["versions"] == {"hashret": "0.1.0"}
        g.upsert(["f.jpg", "a.jpg"], np.array([[7, 7], [9, 9]], np.uint8), [{"label": "5"}, {"label": "0b"}])
    assert (gal / "manifest.json").read_bytes() == on_disk  # opening and WAL writes never rewrite it
    with open_gallery(gal) as g:  # the WAL of the new release on top of the v1 snapshot
        assert contents(g)["a.jpg"] == ([9, 9], {"label": "0b"}) and g.ids()[-1] == "f.jpg"
        g.delete(["c/ü.jpg"])
        g.save()
    m = json.loads((gal / "manifest.json").read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["kind"] == "gallery" and m["size"] == 4
    assert (m["bits"], m["model_id"], m["index"]["kind"]) == (16, V1_SHA, kind)
    assert "model" not in m and m["checksum"] == gallery_checksum(m)
    with open_gallery(gal, expect_bits=16, expect_model_sha256=V1_SHA) as g:
        assert g.ids() == ["a.jpg", "b.jpg", "e.jpg", "f.jpg"]
        assert contents(g)["f.jpg"] == ([7, 7], {"label": "5"})
    with pytest.raises(ArtifactMismatch, match=r"built for model 5eedabab…\(16 bits\), engine is 5eedabab…\(64 bits\)"):
        open_gallery(gal, expect_bits=64)


def test_previous_release_gallery_with_an_edited_file_list_is_refused(tmp_path):
    """The v1 checksum is checked before the migration re-seals it, so tampering still shows."""
    gal = v1_copy(tmp_path, "faiss-flat")
    m = json.loads((gal / "manifest.json").read_text())
    name = next(iter(m["snapshot"]["files"]))
    m["snapshot"]["files"][name] = "0" * 64
    (gal / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match=r"checksum does not match its contents .*restore it or rebuild"):
        open_gallery(gal)


@pytest.mark.parametrize("edit, error, match", [
    (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), ArtifactMismatch,
     rf"gallery manifest .*manifest\.json \| schema_version {SCHEMA_VERSION + 1} is newer than this hashret "
     rf"supports \({SCHEMA_VERSION}\): upgrade hashret or rebuild with `hashret index build`"),
    (lambda m: m.update(schema_version="1"), ArtifactMismatch, r"has no valid schema_version \('1'\)"),
    (lambda m: m.update(kind="export"), ArtifactMismatch, "kind is 'export', expected gallery: check that you passed"),
    (lambda m: m.update(bits=12), ArtifactMismatch, "12 bits is not a multiple of 8.*rebuild with"),
    (lambda m: m.pop("model_id"), ArtifactMismatch, "missing model_id or index.kind: rebuild with"),
    (lambda m: m["index"].update(kind="annoy"), ArtifactMismatch,
     "index kind 'annoy' is not known here .*install the module that registers it, or rebuild"),
], ids=["newer-schema", "schema-not-int", "wrong-kind", "bad-bits", "no-model-id", "unknown-index-kind"])
def test_bad_gallery_manifests_are_refused(tmp_path, edit, error, match):
    from hashret.manifest import gallery_checksum

    create_gallery(tmp_path / "g", "faiss-flat", BITS, SHA).close()
    mpath = tmp_path / "g" / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    m["checksum"] = gallery_checksum(m)  # authentic, so the check under test is the one that refuses
    mpath.write_text(json.dumps(m))
    with pytest.raises(error, match=match):
        open_gallery(tmp_path / "g")


def test_missing_gallery_folder_and_manifest_name_the_fix(tmp_path):
    with pytest.raises(MissingArtifact, match=r"does not exist: check the path, or make it with `hashret index build`"):
        open_gallery(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingArtifact, match=r"gallery .*empty \| has no manifest\.json: not a gallery folder"):
        open_gallery(tmp_path / "empty")


def test_one_manifest_module_for_run_export_and_gallery(tmp_path):
    """RUN/, EXP/ and GAL/ are read by one function: the same refusals, each kind's own fix."""
    from hashret.manifest import KINDS, load_manifest, new_manifest, write_manifest

    for kind in KINDS.values():
        folder = tmp_path / kind.name
        write_manifest(folder, new_manifest(kind.name, bits=64) | {"schema_version": kind.version + 1})
        with pytest.raises(ArtifactMismatch, match=rf"{kind.name} manifest .* is newer .*upgrade hashret or {kind.fix}"):
            load_manifest(folder, kind=kind.name)
    write_manifest(tmp_path / "x", {"schema_version": 1, "kind": "playlist"})
    with pytest.raises(ArtifactMismatch, match="kind 'playlist' is unknown to this hashret"):
        load_manifest(tmp_path / "x")
    exp = new_manifest("export", bits=64)
    write_manifest(tmp_path / "exp", exp)
    assert load_manifest(tmp_path / "exp", kind=("run", "export")) == exp
    assert exp["schema_version"] == 1 and set(exp["versions"]) >= {"python", "hashret"}


def test_gallery_checksum_seals_exactly_its_fields(monkeypatch):
    """Sealing one more field is one entry in GALLERY_CHECKSUM_FIELDS (plus a migration)."""
    import hashret.manifest as hm

    m = {"size": 3, "saved": "t0", "snapshot": {"generation": 1, "wal_seq": 2, "files": {"a": "1" * 64}}}
    base = hm.gallery_checksum(m)
    assert hm.gallery_checksum({**m, "saved": "t1"}) == base
    assert hm.gallery_checksum({**m, "snapshot": {**m["snapshot"], "files": {"a": "2" * 64}}}) != base
    monkeypatch.setattr(hm, "GALLERY_CHECKSUM_FIELDS", (*hm.GALLERY_CHECKSUM_FIELDS, "saved"))
    assert hm.gallery_checksum({**m, "saved": "t1"}) != hm.gallery_checksum(m)

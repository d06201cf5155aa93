"""Re-ranking of the Hamming shortlist by cosine: the ordering rule, the offline metric, the gallery.

The offline metric (hashret.metrics.rerank_map) is checked against a plain-Python reference;
the gallery's re-ranked search against the same rule, through snapshots and WAL replay, so
that what a server answers is what evaluation reports.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from hashret.codes import pack
from hashret.errors import BadInput, HashretError
from hashret.metrics import (
    mean_average_precision,
    rerank_map,
    rerank_order,
    rerank_size,
)
from serve.gallery import create_gallery, open_gallery

DATA = Path(__file__).parent / "data"


# ---- the ordering rule ---------------------------------------------------------------------------
def test_rerank_order_by_cosine_hand_computed():
    q = np.array([1.0, 0.0])
    Z = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], np.float16)  # cos 0, 1/sqrt2, 1
    order, scores = rerank_order([0, 0, 3], q, Z)
    assert order.tolist() == [2, 1, 0]
    assert scores == pytest.approx([1.0, 1 / math.sqrt(2), 0.0], abs=1e-6)


def test_equal_scores_keep_hamming_order():
    q = np.array([1.0, 1.0])
    Z = np.array([[2.0, 2.0], [1.0, 1.0], [0.5, 0.5]], np.float16)  # all cos 1
    order, _ = rerank_order([0, 1, 1], q, Z)  # equal cosines: the Hamming order stands
    assert order.tolist() == [0, 1, 2]


def test_item_without_activations_follows_those_at_its_distance():
    q = np.array([1.0, 0.0])
    nan = [np.nan, np.nan]
    # distances 1, 1, 1, 2 ; item 1 has no activations; cos: a=0.0, c=1.0, d=0.6 (farther)
    Z = np.array([[0.0, 1.0], nan, [1.0, 0.0], [0.6, 0.8]], np.float16)
    order, scores = rerank_order([1, 1, 1, 2], q, Z)
    # lowest score among items with activations at distance <= 1 is item 0's (0.0): item 1 goes
    # right after it, and item 3 (0.6, farther) ranks above both by cosine
    assert order.tolist() == [2, 3, 0, 1]
    assert np.isnan(scores[-1]) and not np.isnan(scores[:-1]).any()


def test_item_without_activations_and_nothing_closer_stays_first():
    q = np.array([1.0, 0.0])
    Z = np.array([[np.nan, np.nan], [1.0, 0.0]], np.float16)
    order, _ = rerank_order([0, 1], q, Z)
    assert order.tolist() == [0, 1]


def test_shortlists_with_and_without_a_nan_row_rank_alike():
    """Shortlists where every item has activations take a shorter path through rerank_order; one
    item without them, appended farthest, sends the same shortlist through the general path. The
    others' order and scores must not change by a bit (ties, zero rows and a zero query included)."""
    rng = np.random.default_rng(3)
    for t in range(400):
        R, bits = int(rng.integers(1, 60)), 32
        Z = rng.standard_normal((R, bits)).astype(np.float16)
        if t % 4 == 0:
            Z[rng.integers(0, R)] = 0
        if t % 5 == 0:
            Z = np.round(Z)  # equal cosines: ties broken by the Hamming order
        q = np.zeros(bits) if t % 9 == 0 else rng.standard_normal(bits)
        d = np.sort(rng.integers(0, 12, R))
        fast_order, fast_scores = rerank_order(d, q, Z)
        order, scores = rerank_order(np.append(d, 99), q, np.vstack([Z, np.full((1, bits), np.nan, np.float16)]))
        assert order[-1] == R and np.isnan(scores[-1])
        assert order[:-1].tolist() == fast_order.tolist()
        assert np.array_equal(scores[:-1], fast_scores)


def test_rerank_size():
    assert rerank_size(10, 10, 1000) == 100
    assert rerank_size(10, 10, 50) == 50
    assert rerank_size(10, 1, 1000) == 10


# ---- the offline metric against a plain reference ----------------------------------------------------
def reference_rerank_map(qB, dB, qZ, dZ, qL, dL, k, factor):
    """Per query: Hamming sort (distance, index), top-R, cosine in float64 from float16, AP@k."""
    aps = []
    dZ = dZ.astype(np.float16).astype(np.float64)
    N = len(dB)
    for i in range(len(qB)):
        d = [int(np.unpackbits(qB[i] ^ dB[j]).sum()) for j in range(N)]
        short = sorted(range(N), key=lambda j: (d[j], j))[: (N if k is None else min(N, max(k * factor, k)))]
        q = qZ[i].astype(np.float64)

        def cos(j, q=q):
            z = dZ[j]
            den = math.sqrt(float(q @ q)) * math.sqrt(float(z @ z))
            return float(q @ z) / den if den else 0.0

        ranked = sorted(short, key=lambda j: (-cos(j), short.index(j)))[: (N if k is None else k)]
        rel = [qL[i] == dL[j] for j in ranked]
        hits, s = 0, 0.0
        for r, x in enumerate(rel, 1):
            if x:
                hits += 1
                s += hits / r
        aps.append(s / hits if hits else 0.0)
    return float(np.mean(aps))


def noisy_data(seed=0, n=120, bits=16, classes=4, nq=15):
    rng = np.random.default_rng(seed)
    centers = rng.choice([-1.0, 1.0], size=(classes, bits))
    L = rng.integers(0, classes, n + nq)
    Z = np.tanh(2 * centers[L] * 0.3 + rng.normal(0, 0.8, (n + nq, bits))).astype(np.float32)
    return Z[:nq], Z[nq:], L[:nq], L[nq:]


@pytest.mark.parametrize("k,factor", [(5, 4), (10, 10), (3, 1), (None, 10)])
def test_rerank_map_matches_reference(k, factor):
    qZ, dZ, qL, dL = noisy_data()
    got = rerank_map(pack(qZ), pack(dZ), qZ, dZ, qL, dL, topk=k, factor=factor)
    want = reference_rerank_map(pack(qZ), pack(dZ), qZ, dZ, qL, dL, k, factor)
    assert got == pytest.approx(want, abs=1e-12)


def test_factor_zero_is_the_binary_map_and_reranking_helps_on_noisy_codes():
    qZ, dZ, qL, dL = noisy_data(seed=1, n=400, nq=60)
    qB, dB = pack(qZ), pack(dZ)
    binary = mean_average_precision(qB, dB, qL, dL, topk=10)
    assert rerank_map(qB, dB, qZ, dZ, qL, dL, topk=10, factor=0) == binary
    assert rerank_map(qB, dB, qZ, dZ, qL, dL, topk=10, factor=10) > binary + 0.01


@pytest.mark.parametrize("bad,match", [
    (dict(factor=-1), "rerank factor"),
    (dict(qZ=np.zeros((15, 8), np.float32)), "query activations"),
    (dict(dZ=np.zeros((120, 16), np.int64)), "database activations"),
])
def test_rerank_map_bad_input(bad, match):
    qZ, dZ, qL, dL = noisy_data()
    kw = dict(qZ=qZ, dZ=dZ, factor=10)
    kw.update(bad)
    with pytest.raises(BadInput, match=match):
        rerank_map(pack(qZ), pack(dZ), kw["qZ"], kw["dZ"], qL, dL, topk=10, factor=kw["factor"])


# ---- the gallery ----------------------------------------------------------------------------------
def offline_lists(qZ, dZ, k, factor, ids):
    """Each query's re-ranked top-k ids, computed offline with the shared rule."""
    from hashret.codes import hamming

    dist = hamming(pack(qZ), pack(dZ))
    out = []
    for i in range(len(qZ)):
        short = np.argsort(dist[i], kind="stable")[: rerank_size(k, factor, len(dZ))]
        order, _ = rerank_order(dist[i, short], qZ[i], dZ[short].astype(np.float16))
        out.append([ids[j] for j in short[order[:k]]])
    return out


@pytest.fixture
def gallery(tmp_path):
    qZ, dZ, qL, dL = noisy_data(seed=2, n=200, nq=12)
    ids = [f"item{j:03d}" for j in range(len(dZ))]
    g = create_gallery(tmp_path / "g", "faiss-flat", 16, "m" * 64)
    g.upsert(ids, pack(dZ), [{"label": str(x)} for x in dL], dZ)
    yield g, qZ, dZ, ids
    g.close()


@pytest.mark.parametrize("kind", ["faiss-flat", "faiss-hnsw", "milvus"])
def test_gallery_search_equals_offline_rule(tmp_path, kind):
    qZ, dZ, _, _ = noisy_data(seed=3, n=150, nq=10)
    ids = [f"x{j}" for j in range(len(dZ))]
    opts = {"ef_search": 400} if kind == "faiss-hnsw" else {}
    with create_gallery(tmp_path / "g", kind, 16, "m" * 64, **opts) as g:
        assert g.has_activations
        g.upsert(ids, pack(dZ), None, dZ)
        hits = g.search(pack(qZ), 5, activations=qZ, rerank_factor=10)
        assert [[h.id for h in hs] for hs in hits] == offline_lists(qZ, dZ, 5, 10, ids)
        assert all(h.score is not None and -1 <= h.score <= 1 for hs in hits for h in hs)
        plain = g.search(pack(qZ), 5)
        assert all(h.score is None for hs in plain for h in hs)
        assert [[h.id for h in hs] for hs in plain] != [[h.id for h in hs] for hs in hits]
        g.upsert(["bycode"], pack(qZ[:1]))  # no activations: ranked after those at its distance
        hits = g.search(pack(qZ[:1]), 5, activations=qZ[:1], rerank_factor=10)[0]
        assert math.isnan(next(h.score for h in hits if h.id == "bycode")) if any(h.id == "bycode" for h in hits) else True
    with open_gallery(tmp_path / "g") as g:
        assert g.has_activations
        assert g.stored_activations(ids[:3]).tobytes() == dZ[:3].astype(np.float16).tobytes()


def test_activations_survive_snapshot_and_wal_replay(gallery, tmp_path):
    g, qZ, dZ, ids = gallery
    want = g.search(pack(qZ), 7, activations=qZ, rerank_factor=10)
    path = g.path
    g.close()  # no snapshot since the upsert: reopening replays the WAL's activations
    with open_gallery(path) as g2:
        assert g2.search(pack(qZ), 7, activations=qZ, rerank_factor=10) == want
        g2.save()
    with open_gallery(path) as g3:  # from the snapshot's activations file
        assert g3.search(pack(qZ), 7, activations=qZ, rerank_factor=10) == want
        m = json.loads((path / "manifest.json").read_text())
        assert m["index"]["activations"] is True
        assert any(n.endswith(".activations.npy") for n in m["snapshot"]["files"])


def test_upsert_by_code_ranks_after_items_at_its_distance(gallery):
    g, qZ, dZ, ids = gallery
    q = qZ[:1]
    g.upsert(["bycode"], pack(q))  # the query's own code, distance 0, no activations
    hits = g.search(pack(q), 200, activations=q, rerank_factor=10)[0]
    names = [h.id for h in hits]
    at0 = [h for h in hits if h.distance == 0 and h.id != "bycode"]
    assert names.index("bycode") > max(names.index(h.id) for h in at0) if at0 else names.index("bycode") == 0
    assert math.isnan(hits[names.index("bycode")].score)
    # with activations it is a perfect match: first
    g.upsert(["bycode"], pack(q), None, q)
    assert g.search(pack(q), 5, activations=q, rerank_factor=10)[0][0].id == "bycode"


def test_max_distance_applies_before_reranking(gallery):
    g, qZ, dZ, ids = gallery
    hits = g.search(pack(qZ), 50, max_distance=3, activations=qZ, rerank_factor=10)
    assert all(h.distance <= 3 for hs in hits for h in hs)


def test_delete_keeps_activations_aligned(gallery):
    g, qZ, dZ, ids = gallery
    g.delete(ids[:50])
    hits = g.search(pack(qZ), 5, activations=qZ, rerank_factor=10)
    assert [[h.id for h in hs] for hs in hits] == offline_lists(qZ, dZ[50:], 5, 10, ids[50:])


@pytest.mark.parametrize("bad,match", [
    (np.zeros((200, 8), np.float32), r"shape \[200, 8\]"),
    (np.full((200, 16), np.inf, np.float32), "inf"),
    ("no", "expected float"),
])
def test_bad_activations_refused(gallery, bad, match):
    g, qZ, dZ, ids = gallery
    with pytest.raises(BadInput, match=match):
        g.upsert(ids, pack(dZ), None, bad)


def test_query_activations_and_factor_checked(gallery):
    g, qZ, dZ, ids = gallery
    with pytest.raises(BadInput, match="query activations"):
        g.search(pack(qZ), 5, activations=qZ[:, :8], rerank_factor=10)
    with pytest.raises(BadInput, match="rerank_factor"):
        g.search(pack(qZ), 5, activations=qZ, rerank_factor=-1)


def test_gallery_without_activations_serves_in_hamming_order(tmp_path):
    qZ, dZ, _, _ = noisy_data(seed=4)
    with create_gallery(tmp_path / "g", "faiss-flat", 16, "m" * 64, activations=False) as g:
        assert not g.has_activations
        g.upsert([f"a{j}" for j in range(len(dZ))], pack(dZ), None, dZ)
        assert g.search(pack(qZ), 5, activations=qZ, rerank_factor=10) == g.search(pack(qZ), 5)
        assert not any(p.name.endswith(".activations.npy") for p in g.path.iterdir())


def test_old_gallery_opens_with_reranking_off_and_says_why(tmp_path, caplog):
    olds = sorted(p for p in DATA.glob("gallery-v1-*") if p.is_dir())
    if not olds:
        pytest.skip("no tests/data/gallery-v1-* folders")
    src = olds[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    with caplog.at_level(logging.INFO, logger="hashret.gallery"):
        with open_gallery(dst) as g:
            assert not g.has_activations
            if g.size:
                code, _ = g.get(g.ids()[0])
                z = np.ones((1, g.bits), np.float32)
                assert g.search(code[None], 3, activations=z, rerank_factor=10) == g.search(code[None], 3)
    assert "searches are not re-ranked" in caplog.text


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_damaged_activations_file_refused(gallery, damage):
    g, qZ, dZ, ids = gallery
    g.save()
    path = g.path
    g.close()
    f = next(path.glob("snapshot-*.activations.npy"))
    data = f.read_bytes()
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    else:
        f.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    with pytest.raises(HashretError, match=r"activations\.npy") as e:
        open_gallery(path)
    assert e.value.exit_code == 2


def test_activations_listed_but_not_in_manifest_refused(gallery):
    """A manifest sealed without the activations file (edited, re-sealed) is refused, not served without."""
    from hashret.manifest import gallery_checksum, write_manifest

    g, qZ, dZ, ids = gallery
    g.save()
    path = g.path
    g.close()
    m = json.loads((path / "manifest.json").read_text())
    m["snapshot"]["files"] = {n: s for n, s in m["snapshot"]["files"].items() if not n.endswith(".activations.npy")}
    m["checksum"] = gallery_checksum(m)
    write_manifest(path, m)
    with pytest.raises(HashretError, match="activations.npy"):
        open_gallery(path)


def test_parity_table_reports_reranked_maps():
    from export.parity import COLUMNS, compare

    qZ, dZ, qL, dL = noisy_data(seed=5)
    acts = np.concatenate([qZ, dZ])
    labels = np.concatenate([qL, dL])
    is_query = np.arange(len(acts)) < len(qZ)
    row = compare(acts, acts, labels, is_query)
    assert {"mAP@all(rerank)", "mAP@10(rerank)"} <= set(COLUMNS) & set(row)
    assert row["mAP@10(rerank)"] == rerank_map(pack(qZ), pack(dZ), qZ, dZ, qL, dL, topk=10)
    assert row["mAP@all(rerank)"] == rerank_map(pack(qZ), pack(dZ), qZ, dZ, qL, dL, topk=None)

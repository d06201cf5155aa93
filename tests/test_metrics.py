"""Tests for hashret.metrics against slow pure-Python references."""
import math

import numpy as np
import pytest

from hashret import metrics
from hashret.codes import pack
from hashret.errors import BadInput
from hashret.metrics import (
    evaluate,
    mean_average_precision,
    mean_average_precision_cosine,
    pr_curve,
    precision_at_k,
    precision_within_radius,
    synthetic_codes,
    tie_aware_map,
)

# --------------------------------------------------------------------------- references


def r_dist(a, b):
    return sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(a, b))


def r_rel(a, b):
    if isinstance(a, list):
        return any(x and y for x, y in zip(a, b))
    return a == b


def r_ranked(q, D, ql, DL):
    """Relevance list in rank order: distance ascending, then database index."""
    ds = [r_dist(q, d) for d in D]
    order = sorted(range(len(D)), key=lambda j: (ds[j], j))
    return [r_rel(ql, DL[j]) for j in order]


def r_ap(rels):
    hit, s = 0, 0.0
    for i, r in enumerate(rels, 1):
        if r:
            hit += 1
            s += hit / i
    return s / hit if hit else 0.0


def r_map(qB, dB, qL, dL, topk=None):
    qB, dB, qL, dL = qB.tolist(), dB.tolist(), qL.tolist(), dL.tolist()
    k = len(dB) if topk is None else min(topk, len(dB))
    return sum(r_ap(r_ranked(q, dB, ql, dL)[:k]) for q, ql in zip(qB, qL)) / len(qB)


def r_pk(qB, dB, qL, dL, k):
    qB, dB, qL, dL = qB.tolist(), dB.tolist(), qL.tolist(), dL.tolist()
    k = min(k, len(dB))
    return sum(sum(r_ranked(q, dB, ql, dL)[:k]) / k for q, ql in zip(qB, qL)) / len(qB)


def r_prad(qB, dB, qL, dL, r):
    qB, dB, qL, dL = qB.tolist(), dB.tolist(), qL.tolist(), dL.tolist()
    tot = 0.0
    for q, ql in zip(qB, qL):
        ret = [j for j, d in enumerate(dB) if r_dist(q, d) <= r]
        if ret:
            tot += sum(r_rel(ql, dL[j]) for j in ret) / len(ret)
    return tot / len(qB)


def r_pr(qB, dB, qL, dL):
    bits = qB.shape[1] * 8
    qB, dB, qL, dL = qB.tolist(), dB.tolist(), qL.tolist(), dL.tolist()
    P, R = [], []
    n_rel = sum(r_rel(ql, dl) for ql in qL for dl in dL)
    for r in range(bits + 1):
        ret = hit = 0
        for q, ql in zip(qB, qL):
            for d, dl in zip(dB, dL):
                if r_dist(q, d) <= r:
                    ret += 1
                    hit += r_rel(ql, dl)
        P.append(hit / ret if ret else 0.0)
        R.append(hit / n_rel if n_rel else 0.0)
    return P, R


def r_cos_map(qZ, dZ, qL, dL, topk=None):
    qZ, dZ, qL, dL = qZ.tolist(), dZ.tolist(), qL.tolist(), dL.tolist()
    k = len(dZ) if topk is None else min(topk, len(dZ))

    def cos(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return sum(x * y for x, y in zip(a, b)) / (na * nb) if na and nb else 0.0

    tot = 0.0
    for q, ql in zip(qZ, qL):
        s = [cos(q, d) for d in dZ]
        order = sorted(range(len(dZ)), key=lambda j: (-s[j], j))
        tot += r_ap([r_rel(ql, dL[j]) for j in order][:k])
    return tot / len(qZ)


# --------------------------------------------------------------------------- data


def make(Q, N, nbytes, n_classes, multi, seed, noise=0.3):
    """Random codes near class prototypes; labels int [n] or multi-hot [n, C]."""
    rng = np.random.default_rng(seed)
    bits = nbytes * 8
    proto = rng.random((n_classes, bits)) < 0.5
    if multi:
        L = (rng.random((Q + N, n_classes)) < 0.3).astype(np.int64)
        L[rng.random(Q + N) < 0.2] = 0  # some items with no label: no relevant items
        B = np.where(L[:, :1].astype(bool), proto[0], proto[-1]) ^ (rng.random((Q + N, bits)) < noise)
    else:
        L = rng.integers(0, n_classes, size=Q + N)
        B = proto[L] ^ (rng.random((Q + N, bits)) < noise)
    P = pack(B)
    return P[:Q], P[Q:], L[:Q], L[Q:]


CASES = [
    # Q, N, nbytes, classes, multi, seed
    (1, 1, 1, 2, False, 0),
    (5, 17, 1, 3, False, 1),  # 8 bits: many ties
    (7, 30, 2, 4, False, 2),
    (6, 25, 1, 5, True, 3),  # multi-hot + ties
    (4, 40, 4, 9, True, 4),  # multi-hot, 9 classes -> 2 label bytes
    (8, 21, 3, 6, False, 5),
    (3, 12, 8, 70, True, 6),  # 70 classes -> label words of uint16 x 9 bytes
]


@pytest.fixture(params=CASES, ids=lambda c: "Q{}N{}B{}C{}{}".format(*c[:4], "m" if c[4] else ""))
def case(request):
    return make(*request.param)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
def test_map_all_and_topk(case, chunk):
    qB, dB, qL, dL = case
    N = len(dB)
    assert mean_average_precision(qB, dB, qL, dL, chunk=chunk) == pytest.approx(r_map(qB, dB, qL, dL))
    for k in {1, 3, 10, N, N + 5}:
        got = mean_average_precision(qB, dB, qL, dL, topk=k, chunk=chunk)
        assert got == pytest.approx(r_map(qB, dB, qL, dL, k)), k


@pytest.mark.parametrize("chunk", [None, 3])
def test_precision_at_k(case, chunk):
    qB, dB, qL, dL = case
    for k in {1, 2, 5, 10, len(dB)}:
        assert precision_at_k(qB, dB, qL, dL, k, chunk=chunk) == pytest.approx(r_pk(qB, dB, qL, dL, k))


@pytest.mark.parametrize("chunk", [None, 2])
def test_precision_within_radius(case, chunk):
    qB, dB, qL, dL = case
    for r in (0, 1, 2, 5):
        got = precision_within_radius(qB, dB, qL, dL, r=r, chunk=chunk)
        assert got == pytest.approx(r_prad(qB, dB, qL, dL, r)), r


def test_pr_curve(case):
    qB, dB, qL, dL = case
    if qB.shape[1] > 2:
        qB, dB = qB[:, :2], dB[:, :2]  # keep the O(bits*Q*N) reference fast
    P, R = pr_curve(qB, dB, qL, dL, chunk=2)
    rP, rR = r_pr(qB, dB, qL, dL)
    bits = qB.shape[1] * 8
    assert P.shape == R.shape == (bits + 1,)
    assert P.tolist() == pytest.approx(rP) and R.tolist() == pytest.approx(rR)
    assert np.all(np.diff(R) >= 0)
    if any(rR):
        assert R[-1] == pytest.approx(1.0)  # radius = bits retrieves everything


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_evaluate_matches_functions(case, chunk):
    qB, dB, qL, dL = case
    m = evaluate(qB, dB, qL, dL, ks=(1, 10), chunk=chunk)
    assert set(m) == {"mAP@all", "mAP@1", "mAP@10", "precision@1", "precision@10", "precision@H<=2",
                      "mAP@all(tie-aware)", "mAP@1(tie-aware)", "mAP@10(tie-aware)"}
    assert all(type(v) is float for v in m.values())
    assert m["mAP@all"] == pytest.approx(r_map(qB, dB, qL, dL))
    assert m["mAP@10"] == pytest.approx(r_map(qB, dB, qL, dL, 10))
    assert m["mAP@1"] == pytest.approx(r_map(qB, dB, qL, dL, 1))
    assert m["precision@10"] == pytest.approx(r_pk(qB, dB, qL, dL, 10))
    assert m["precision@H<=2"] == pytest.approx(r_prad(qB, dB, qL, dL, 2))
    assert m["mAP@all(tie-aware)"] == pytest.approx(tie_aware_map(qB, dB, qL, dL))
    assert m["mAP@10(tie-aware)"] == pytest.approx(tie_aware_map(qB, dB, qL, dL, topk=10))


def test_evaluate_default_keys():
    qB, dB, qL, dL = make(4, 30, 2, 3, False, 9)
    m = evaluate(qB, dB, qL, dL)
    for key in ("mAP@all", "mAP@10", "precision@10", "precision@H<=2"):
        assert 0.0 <= m[key] <= 1.0
    assert m["mAP@10"] == pytest.approx(r_map(qB, dB, qL, dL, 10))


# --------------------------------------------------------------------------- conventions


def test_ties_broken_by_database_index():
    dB = np.zeros((4, 1), np.uint8)  # all at distance 0: a full tie
    qB = np.zeros((1, 1), np.uint8)
    dL = np.array([0, 1, 0, 1])
    # index order: relevant at ranks 2 and 4 -> (1/2 + 2/4) / 2 = 0.5 (reverse order would be 0.833)
    assert mean_average_precision(qB, dB, np.array([1]), dL) == pytest.approx(0.5)
    assert precision_at_k(qB, dB, np.array([1]), dL, 1) == 0.0
    assert precision_at_k(qB, dB, np.array([0]), dL, 1) == 1.0
    # a closer item outranks lower indices
    dB[:3] = 0b1  # distances 1, 1, 1, 0
    assert mean_average_precision(qB, dB, np.array([1]), dL, topk=1) == 1.0
    dB[:] = [[0], [1], [0], [0]]  # ranking 0, 2, 3, 1 -> relevant at rank 3 within top 3
    assert mean_average_precision(qB, dB, np.array([1]), dL, topk=3) == pytest.approx(1 / 3)


def test_queries_without_relevant_items_count_as_zero():
    dB = pack(np.array([[1.0] * 8, [-1.0] * 8]))
    qB = dB.copy()
    qL, dL = np.array([0, 7]), np.array([0, 1])  # query 1 has no relevant item
    assert mean_average_precision(qB, dB, qL, dL) == pytest.approx(0.5)
    assert precision_at_k(qB, dB, qL, dL, 1) == pytest.approx(0.5)
    # relevant item exists but not in the top-1: AP@1 = 0 for that query
    qL2 = np.array([0, 0])
    assert mean_average_precision(qB, dB, qL2, dL, topk=1) == pytest.approx(0.5)
    assert mean_average_precision(qB, dB, qL2, dL) == pytest.approx((1 + 0.5) / 2)


def test_radius_with_no_retrieval_counts_as_zero():
    dB = pack(np.array([[1.0] * 8]))
    qB = pack(np.array([[1.0] * 8, [-1.0] * 8]))  # second query is 8 bits away
    lab = np.array([0])
    assert precision_within_radius(qB, dB, np.array([0, 0]), lab, r=2) == pytest.approx(0.5)
    assert precision_within_radius(qB, dB, np.array([0, 0]), lab, r=8) == pytest.approx(1.0)


def test_multi_hot_share_one_label():
    qB = np.zeros((1, 1), np.uint8)
    dB = np.array([[0], [1], [3]], np.uint8)  # distances 0, 1, 2
    qL = np.array([[1, 0, 1]])
    dL = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 1]])  # not, shares c2, shares c0+c2
    assert mean_average_precision(qB, dB, qL, dL) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert mean_average_precision(qB, dB, qL.astype(bool), dL.astype(bool)) == pytest.approx(
        (1 / 2 + 2 / 3) / 2
    )
    P, R = pr_curve(qB, dB, qL, dL)
    assert P[:3].tolist() == pytest.approx([0.0, 0.5, 2 / 3]) and R[:3].tolist() == pytest.approx([0, 0.5, 1])


def test_default_chunking_never_builds_full_matrix(monkeypatch):
    qB, dB, qL, dL = make(23, 37, 2, 4, False, 11)
    want = evaluate(qB, dB, qL, dL)
    shapes = []
    real = metrics.hamming

    def spy(q, d, *a, **kw):
        shapes.append((len(q), len(d)))
        return real(q, d, *a, **kw)

    monkeypatch.setattr(metrics, "hamming", spy)
    monkeypatch.setattr(metrics, "CHUNK_ELEMENTS", 37 * 5)
    got = evaluate(qB, dB, qL, dL)
    assert got == pytest.approx(want)
    assert got["mAP@all"] == pytest.approx(r_map(qB, dB, qL, dL))
    assert max(q for q, _ in shapes) == 5 and sum(q for q, _ in shapes) == 23
    shapes.clear()
    assert mean_average_precision(qB, dB, qL, dL) == pytest.approx(want["mAP@all"])
    assert max(q * n for q, n in shapes) <= 37 * 5


def test_perfect_and_worst_retrieval():
    B, L = synthetic_codes(60, 32, 4, 0.0, seed=1)
    assert mean_average_precision(B, B, L, L) == pytest.approx(1.0)
    m = evaluate(B, B, L, L, ks=(5,))
    assert m["mAP@all"] == pytest.approx(1.0) and m["precision@5"] == pytest.approx(1.0)
    other = L + 10  # no query has a relevant item
    assert mean_average_precision(B, B, other, L) == 0.0


# --------------------------------------------------------------------------- cosine


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("chunk", [None, 2])
def test_cosine_map_matches_reference(multi, chunk):
    rng = np.random.default_rng(5 + multi)
    Q, N, D = 5, 19, 6
    qZ, dZ = rng.normal(size=(Q, D)), rng.normal(size=(N, D))
    if multi:
        qL = (rng.random((Q, 4)) < 0.4).astype(int)
        dL = (rng.random((N, 4)) < 0.4).astype(int)
    else:
        qL, dL = rng.integers(0, 3, Q), rng.integers(0, 3, N)
    for k in (None, 1, 4, 50):
        got = mean_average_precision_cosine(qZ, dZ, qL, dL, topk=k, chunk=chunk)
        assert got == pytest.approx(r_cos_map(qZ, dZ, qL, dL, k)), k
    got32 = mean_average_precision_cosine(qZ.astype(np.float32), dZ.astype(np.float32), qL, dL)
    assert got32 == pytest.approx(r_cos_map(qZ, dZ, qL, dL), abs=1e-6)


def test_cosine_ties_and_zero_vectors():
    qZ = np.array([[1.0, 0.0]])
    # sims: 0, 1, 1 (scaled copy), 0 (zero vector), -1
    dZ = np.array([[0.0, 3.0], [1.0, 0.0], [2.0, 0.0], [0.0, 0.0], [-1.0, 0.0]], np.float32)
    dL = np.array([1, 0, 1, 1, 1])
    # ranking: 1, 2 (tie, index order), 0, 3 (tie at 0), 4 -> relevant at ranks 2,3,4,5
    want = (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5) / 4
    assert mean_average_precision_cosine(qZ, dZ, np.array([1]), dL) == pytest.approx(want)
    assert mean_average_precision_cosine(qZ, dZ, np.array([1]), dL, topk=2) == pytest.approx(0.5)


def test_cosine_bad_input():
    with pytest.raises(BadInput, match="NaN"):
        mean_average_precision_cosine(np.array([[np.nan, 1.0]]), np.ones((2, 2)), [0], [0, 1])
    with pytest.raises(BadInput, match="dim 2, database dim 3"):
        mean_average_precision_cosine(np.ones((1, 2)), np.ones((2, 3)), [0], [0, 1])


# --------------------------------------------------------------------------- input errors


def test_bad_inputs():
    qB, dB, qL, dL = make(3, 10, 2, 3, False, 0)
    with pytest.raises(BadInput, match="2 bytes \\(16 bits\\), database codes 1 bytes \\(8 bits\\)"):
        mean_average_precision(qB, dB[:, :1], qL, dL)
    with pytest.raises(BadInput, match="uint8"):
        evaluate(qB.astype(np.float32), dB, qL, dL)
    with pytest.raises(BadInput, match="have 9 rows for 10 codes"):
        precision_at_k(qB, dB, qL, dL[:9], 1)
    with pytest.raises(BadInput, match="1-D, database labels 2-D"):
        mean_average_precision(qB, dB, qL, np.eye(10, 3, dtype=int))
    with pytest.raises(BadInput, match="3 classes, database labels 4"):
        mean_average_precision(qB, dB, np.eye(3, dtype=int), np.eye(10, 4, dtype=int))
    with pytest.raises(BadInput, match="must be 0/1"):
        mean_average_precision(qB, dB, qL[:, None], dL[:, None])
    with pytest.raises(BadInput, match="topk"):
        mean_average_precision(qB, dB, qL, dL, topk=0)
    with pytest.raises(BadInput, match="not a positive integer"):
        precision_at_k(qB, dB, qL, dL, 2.5)
    with pytest.raises(BadInput, match="radius"):
        precision_within_radius(qB, dB, qL, dL, r=-1)
    with pytest.raises(BadInput, match="chunk"):
        evaluate(qB, dB, qL, dL, chunk=0)
    with pytest.raises(BadInput, match="need at least one"):
        evaluate(qB[:0], dB, qL[:0], dL)
    with pytest.raises(BadInput, match="ks"):
        evaluate(qB, dB, qL, dL, ks=(10, -1))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_codes():
    B, L = synthetic_codes(50, 24, 5, 0.1, seed=3)
    B2, L2 = synthetic_codes(50, 24, 5, 0.1, seed=3)
    B3, _ = synthetic_codes(50, 24, 5, 0.1, seed=4)
    assert B.dtype == np.uint8 and B.shape == (50, 3) and L.shape == (50,)
    assert np.array_equal(B, B2) and np.array_equal(L, L2) and not np.array_equal(B, B3)
    assert set(L.tolist()) <= set(range(5))
    # more noise -> worse retrieval
    Bn, Ln = synthetic_codes(80, 32, 4, 0.45, seed=3)
    Bc, Lc = synthetic_codes(80, 32, 4, 0.02, seed=3)
    assert mean_average_precision(Bc, Bc, Lc, Lc) > mean_average_precision(Bn, Bn, Ln, Ln) + 0.2
    with pytest.raises(BadInput, match="12 bits"):
        synthetic_codes(10, 12, 2, 0.1, 0)
    with pytest.raises(BadInput, match="noise"):
        synthetic_codes(10, 16, 2, 1.5, 0)
    with pytest.raises(BadInput, match="n_classes"):
        synthetic_codes(10, 16, 0, 0.1, 0)


# --------------------------------------------------------------------------- ranked lists


@pytest.mark.parametrize("k", [1, 3, 10])
def test_ranked_map_matches_map_on_codes(case, k):
    """Ranking the codes ourselves and scoring the lists gives mAP@k of the codes."""
    qB, dB, qL, dL = case
    rel = [r_ranked(q, dB.tolist(), ql, dL.tolist())[:k] for q, ql in zip(qB.tolist(), qL.tolist())]
    got = metrics.mean_average_precision_ranked(np.array(rel))
    assert math.isclose(got, mean_average_precision(qB, dB, qL, dL, topk=k), abs_tol=1e-12)
    assert math.isclose(got, r_map(qB, dB, qL, dL, topk=k), abs_tol=1e-12)


def test_ranked_map_by_hand_and_padding():
    # AP of [0,1,1] is (1/2 + 2/3) / 2; a list with nothing relevant counts as 0
    assert math.isclose(metrics.mean_average_precision_ranked([[0, 1, 1], [0, 0, 0]]), (0.5 + 2 / 3) / 4)
    # padding a short answer list with non-relevant entries leaves its AP unchanged
    assert metrics.mean_average_precision_ranked([[True]]) == metrics.mean_average_precision_ranked([[1, 0, 0]]) == 1.0


@pytest.mark.parametrize("rel, match", [
    ([1, 0, 1], r"shape \(3,\)"),
    (np.zeros((0, 5)), r"shape \(0, 5\)"),
    ([[0, 2]], "0/1"),
    ([["a", "b"]], "0/1"),
])
def test_ranked_map_bad_input(rel, match):
    with pytest.raises(BadInput, match=match):
        metrics.mean_average_precision_ranked(rel)

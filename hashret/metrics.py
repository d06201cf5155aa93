"""Retrieval metrics on binary hash codes (and on continuous codes for reference).

Conventions (all functions):

* Codes qB [Q, bits//8], dB [N, bits//8] are packed uint8 (see `hashret.codes`).
* Ranking: database items by Hamming distance ascending, ties broken by
  database index ascending (a stable sort of the distances). The cosine variant
  ranks by cosine similarity descending with the same tie rule. The re-ranked variant
  (`rerank_map`) re-orders each query's Hamming top-R by cosine (`rerank_order`, the rule
  the server uses too).
* Relevance: labels are either a vector [N] (relevant iff equal labels) or
  multi-hot [N, C] of 0/1 (relevant iff the two items share >= 1 label).
* Every metric is a mean over all queries; nothing is averaged over a subset.
* Work is chunked over queries: `chunk` queries at a time, by default so that
  chunk * N <= CHUNK_ELEMENTS; no full [Q, N] matrix is ever built.
"""
from __future__ import annotations

import math

import numpy as np

from hashret.codes import _as_words, check_bits, check_packed, hamming, pack
from hashret.errors import BadInput

# Query-chunk budget: chunk * N elements per [chunk, N] temporary (~25 bytes each).
CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- inputs


def _labels(L, n: int, what: str) -> np.ndarray:
    """Validate labels: a vector [n] or multi-hot 0/1 [n, C] (returned as bool)."""
    L = np.asarray(L)
    if L.ndim not in (1, 2):
        raise BadInput(f"{what} | shape {L.shape} is not [N] or [N, C]: pass class ids or multi-hot")
    if L.shape[0] != n:
        raise BadInput(f"{what} | have {L.shape[0]} rows for {n} codes: pass one label row per code")
    if L.ndim == 2:
        if L.shape[1] == 0:
            raise BadInput(f"{what} | multi-hot labels have 0 classes: pass [N, C] with C >= 1")
        if L.dtype != np.bool_:
            if not np.issubdtype(L.dtype, np.number) or not np.isin(L, (0, 1)).all():
                raise BadInput(
                    f"{what} | multi-hot labels must be 0/1: pass class ids as a vector [N] instead"
                )
            L = L != 0
    return L


def _relevance(qL, dL, Q: int, N: int):
    """A function sl -> bool [len(sl), N]: rel[i, j] = query i and item j are relevant."""
    qL = _labels(qL, Q, "query labels")
    dL = _labels(dL, N, "database labels")
    if qL.ndim != dL.ndim:
        raise BadInput(
            f"labels | query labels are {qL.ndim}-D, database labels {dL.ndim}-D: "
            "use class ids [N] for both or multi-hot [N, C] for both"
        )
    if qL.ndim == 1:
        return lambda sl: qL[sl, None] == dL[None, :]
    if qL.shape[1] != dL.shape[1]:
        raise BadInput(
            f"labels | query labels have {qL.shape[1]} classes, database labels {dL.shape[1]}: "
            "use the same class list for both"
        )
    qw = _as_words(np.packbits(qL, axis=1))
    dwT = np.ascontiguousarray(_as_words(np.packbits(dL, axis=1)).T)  # [w, N]

    def rel(sl):
        r = (qw[sl, 0, None] & dwT[0][None, :]) != 0
        for k in range(1, dwT.shape[0]):
            r |= (qw[sl, k, None] & dwT[k][None, :]) != 0
        return r

    return rel


def _prepare(qB, dB, qL, dL):
    """Validate packed codes + labels; return (qB, dB, relevance function)."""
    qB = check_packed(qB, what="query codes")
    dB = check_packed(dB, what="database codes")
    if qB.shape[1] != dB.shape[1]:
        hamming(qB[:0], dB[:0])  # raises the shared width-mismatch BadInput
    if qB.shape[0] == 0 or dB.shape[0] == 0:
        raise BadInput(
            f"codes | {qB.shape[0]} queries, {dB.shape[0]} database items: need at least one of each"
        )
    return qB, dB, _relevance(qL, dL, qB.shape[0], dB.shape[0])


def _slices(Q: int, N: int, chunk):
    """Query slices of `chunk` rows (default: CHUNK_ELEMENTS // N, at least 1)."""
    if chunk is None:
        chunk = max(1, CHUNK_ELEMENTS // N)
    elif isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise BadInput(f"metrics chunk | {chunk!r} is not a positive integer: pass e.g. 64")
    for s in range(0, Q, int(chunk)):
        yield slice(s, min(Q, s + int(chunk)))


def _k(k, N: int, what: str = "k") -> int:
    """Validate a cut-off k >= 1; k > N is clamped to N."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise BadInput(f"{what} | {k!r} is not a positive integer: pass e.g. 10 or 1000")
    return min(int(k), N)


# --------------------------------------------------------------------------- kernels


def _rank(dist: np.ndarray) -> np.ndarray:
    """Ranking [c, N]: distance ascending, ties by database index (stable sort)."""
    return np.argsort(dist, axis=1, kind="stable")


def _ap(rs: np.ndarray) -> np.ndarray:
    """AP per query of ranked relevance rs [c, k]: (1/R_k) sum_i P(i) rel(i); 0 if R_k = 0."""
    cum = np.cumsum(rs, axis=1, dtype=np.int64)
    rows, cols = np.nonzero(rs)
    s = np.bincount(rows, weights=cum[rows, cols] / (cols + 1.0), minlength=rs.shape[0])
    R = cum[:, -1]
    return np.where(R > 0, s / np.maximum(R, 1), 0.0)


def _prec_radius(dist: np.ndarray, rel: np.ndarray, r: int) -> np.ndarray:
    """Precision per query among items with d_H <= r; 0 when none are retrieved."""
    within = dist <= r
    ret = within.sum(axis=1)
    hit = (within & rel).sum(axis=1)
    return np.where(ret > 0, hit / np.maximum(ret, 1), 0.0)


# --------------------------------------------------------------------------- metrics


def mean_average_precision(qB, dB, qL, dL, topk: int | None = None, chunk: int | None = None) -> float:
    """mAP@k over Hamming ranking.

    AP@k = (1/R_k) * sum_{i<=k} P(i) * rel(i), R_k = #relevant in the top k,
    P(i) = #relevant in the top i / i. A query with R_k = 0 has AP 0 and still
    counts in the mean. That is DeepHash-pytorch's convention; HashNet's own evaluation leaves
    such queries out instead. We keep them in so that a model which finds nothing relevant in
    its top k is penalised rather than excused (on Grocery every query has relevant database
    items, so mAP@all is the same under both). topk=None means
    all N items (mAP@all); topk > N is clamped to N.
    """
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    k = N if topk is None else _k(topk, N, "topk")
    ap = np.empty(Q)
    for sl in _slices(Q, N, chunk):
        order = _rank(hamming(qB[sl], dB))[:, :k]
        ap[sl] = _ap(np.take_along_axis(rel(sl), order, axis=1))
    return float(ap.mean())


def precision_at_k(qB, dB, qL, dL, k: int, chunk: int | None = None) -> float:
    """P@k = mean over queries of (#relevant in the top k) / k (k > N clamped to N)."""
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    k = _k(k, N)
    hits = np.empty(Q)
    for sl in _slices(Q, N, chunk):
        order = _rank(hamming(qB[sl], dB))[:, :k]
        hits[sl] = np.take_along_axis(rel(sl), order, axis=1).sum(axis=1)
    return float((hits / k).mean())


def precision_within_radius(qB, dB, qL, dL, r: int = 2, chunk: int | None = None) -> float:
    """P@H<=r: mean over queries of precision among items with d_H <= r.

    A query that retrieves nothing within radius r counts as precision 0.
    """
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise BadInput(f"radius | {r!r} is not a non-negative integer: pass e.g. 2")
    p = np.empty(Q)
    for sl in _slices(Q, N, chunk):
        p[sl] = _prec_radius(hamming(qB[sl], dB), rel(sl), int(r))
    return float(p.mean())


def pr_curve(qB, dB, qL, dL, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall [bits+1] at Hamming radius r = 0..bits, micro-averaged.

    Micro-average over all (query, item) pairs:
    P(r) = sum_q hit_q(r) / sum_q ret_q(r), R(r) = sum_q hit_q(r) / sum_q rel_q,
    with ret = #items with d_H <= r and hit = #relevant among them; a 0/0 is 0.
    """
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    bits = qB.shape[1] * 8
    n_ret = np.zeros(bits + 1, dtype=np.int64)
    n_hit = np.zeros(bits + 1, dtype=np.int64)
    n_rel = 0
    for sl in _slices(Q, N, chunk):
        dist = hamming(qB[sl], dB)
        rs = rel(sl)
        n_ret += np.bincount(dist.ravel(), minlength=bits + 1)
        n_hit += np.bincount(dist[rs], minlength=bits + 1)
        n_rel += int(rs.sum())
    ret, hit = np.cumsum(n_ret), np.cumsum(n_hit)
    precision = np.where(ret > 0, hit / np.maximum(ret, 1), 0.0)
    recall = hit / n_rel if n_rel > 0 else np.zeros(bits + 1)
    return precision, recall


def evaluate(qB, dB, qL, dL, ks=(10,), radius: int = 2, chunk: int | None = None) -> dict:
    """All headline metrics in one pass: the metrics.json of a training run.

    Keys: "mAP@all", "mAP@{k}" and "precision@{k}" for k in ks,
    "precision@H<={radius}", and the tie-aware "mAP@all(tie-aware)" and "mAP@{k}(tie-aware)"
    (see `tie_aware_map`); values are floats (conventions as in the functions above).
    """
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    kc = [_k(k, N, "ks") for k in ks]
    ks = [int(k) for k in ks]
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise BadInput(f"radius | {radius!r} is not a non-negative integer: pass e.g. 2")
    ap_all = np.empty(Q)
    ap_k = np.empty((len(ks), Q))
    p_k = np.empty((len(ks), Q))
    p_r = np.empty(Q)
    ta_all = np.empty(Q)
    ta_k = np.empty((len(ks), Q))
    D, H = qB.shape[1] * 8 + 1, _harmonic(N)
    for sl in _slices(Q, N, chunk):
        dist = hamming(qB[sl], dB)
        rs = rel(sl)
        p_r[sl] = _prec_radius(dist, rs, int(radius))
        hist_n, hist_r = _distance_histograms(dist, rs, D)
        ta_all[sl] = _tie_aware_ap(hist_n, hist_r, N, H)
        for j, k in enumerate(kc):
            ta_k[j, sl] = _tie_aware_ap(hist_n, hist_r, k, H)
        ranked = np.take_along_axis(rs, _rank(dist), axis=1)
        ap_all[sl] = _ap(ranked)
        for j, k in enumerate(kc):
            ap_k[j, sl] = _ap(ranked[:, :k])
            p_k[j, sl] = ranked[:, :k].sum(axis=1) / k
    out = {"mAP@all": float(ap_all.mean())}
    for j, k in enumerate(ks):
        out[f"mAP@{k}"] = float(ap_k[j].mean())
        out[f"precision@{k}"] = float(p_k[j].mean())
    out[f"precision@H<={int(radius)}"] = float(p_r.mean())
    out["mAP@all(tie-aware)"] = float(ta_all.mean())
    for j, k in enumerate(ks):
        out[f"mAP@{k}(tie-aware)"] = float(ta_k[j].mean())
    return out


def mean_average_precision_cosine(
    qZ, dZ, qL, dL, topk: int | None = None, chunk: int | None = None
) -> float:
    """mAP@k ranking by cosine similarity of continuous codes (no-binarization reference).

    cos(q, b) = q.b / (|q| |b|), ranked descending, ties by database index; a zero
    vector has similarity 0 to everything. AP convention as `mean_average_precision`.
    """
    qZ, dZ = np.asarray(qZ), np.asarray(dZ)
    for Z, what in ((qZ, "query embeddings"), (dZ, "database embeddings")):
        if Z.ndim != 2 or not (np.issubdtype(Z.dtype, np.floating) or np.issubdtype(Z.dtype, np.integer)):
            raise BadInput(f"{what} | shape {Z.shape} dtype {Z.dtype} is not numeric [N, D]: pass float codes")
        if Z.shape[0] == 0:
            raise BadInput(f"{what} | empty: need at least one row")
        if not np.isfinite(Z).all():
            raise BadInput(f"{what} | contain NaN or inf: check the model output")
    if qZ.shape[1] != dZ.shape[1]:
        raise BadInput(
            f"embeddings | query dim {qZ.shape[1]}, database dim {dZ.shape[1]}: use the same model"
        )
    dt = np.float64 if np.float64 in (qZ.dtype, dZ.dtype) else np.float32

    def unit(Z):
        Z = Z.astype(dt)
        n = np.linalg.norm(Z, axis=1, keepdims=True)
        return Z / np.where(n > 0, n, 1)

    qn, dn = unit(qZ), unit(dZ)
    Q, N = qn.shape[0], dn.shape[0]
    rel = _relevance(qL, dL, Q, N)
    k = N if topk is None else _k(topk, N, "topk")
    ap = np.empty(Q)
    for sl in _slices(Q, N, chunk):
        order = np.argsort(-(qn[sl] @ dn.T), axis=1, kind="stable")[:, :k]
        ap[sl] = _ap(np.take_along_axis(rel(sl), order, axis=1))
    return float(ap.mean())


def mean_average_precision_ranked(rel) -> float:
    """mAP@k of lists someone else already ranked, e.g. a running service's top-k answers.

    rel [Q, k]: rel[i, r] = 1 when query i's answer at rank r+1 is relevant (0/1 or bool); pad a
    shorter answer list with 0, which leaves its AP unchanged. AP convention as
    `mean_average_precision`: (1/R_k) * sum_{i<=k} P(i) * rel(i), and 0 when R_k = 0.
    """
    rel = np.asarray(rel)
    if rel.ndim != 2 or rel.shape[0] == 0 or rel.shape[1] == 0:
        raise BadInput(f"ranked relevance | shape {rel.shape} is not [Q, k] with Q, k >= 1: "
                       "pass one row of 0/1 per query, best answer first")
    if rel.dtype != np.bool_:
        if not np.issubdtype(rel.dtype, np.number) or not np.isin(rel, (0, 1)).all():
            raise BadInput("ranked relevance | values must be 0/1 or bool: pass whether each answer is relevant")
        rel = rel != 0
    return float(_ap(rel).mean())


# --------------------------------------------------------------------------- tie-aware


def _harmonic(n: int) -> np.ndarray:
    """H[i] = sum_{j=1..i} 1/j for i = 0..n (float64)."""
    h = np.zeros(n + 1)
    np.cumsum(1.0 / np.arange(1, n + 1), out=h[1:])
    return h


def _group_sum(R0, N0, r, n, H):
    """Expected sum of P(i) over the relevant items of a tie group, over its orderings.

    The group holds n items (r relevant) after N0 items (R0 relevant). A relevant item at
    position j of the group has, on average, (j-1)(r-1)/(n-1) relevant group-mates before it, so
        E = (r/n) * sum_{j=1..n} (R0 + 1 + (j-1)(r-1)/(n-1)) / (N0 + j),
    summed with harmonic numbers: sum_j 1/(N0+j) = H[N0+n] - H[N0] and
    sum_j (j-1)/(N0+j) = n - (N0+1)(H[N0+n] - H[N0]). Works elementwise on arrays.
    """
    R0, N0, r, n = (np.asarray(a, dtype=np.float64) for a in (R0, N0, r, n))
    n_safe = np.maximum(n, 1.0)
    dH = H[(N0 + n).astype(np.int64)] - H[N0.astype(np.int64)]
    slope = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1.0), 0.0)
    return np.where(n > 0, (r / n_safe) * ((R0 + 1) * dH + slope * (n - (N0 + 1) * dH)), 0.0)


def _distance_histograms(dist: np.ndarray, rs: np.ndarray, D: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, how many items (and how many relevant ones) sit at each distance 0..D-1."""
    c = dist.shape[0]
    flat = dist.astype(np.int64) + np.arange(c, dtype=np.int64)[:, None] * D
    hist_n = np.bincount(flat.ravel(), minlength=c * D).reshape(c, D)
    hist_r = np.bincount(flat[rs], minlength=c * D).reshape(c, D)
    return hist_n, hist_r


def _tie_aware_ap(hist_n: np.ndarray, hist_r: np.ndarray, k: int, H: np.ndarray) -> np.ndarray:
    """Expected AP@k per query from per-distance counts: items hist_n [c, D], relevant hist_r [c, D].

    Groups that end inside the top k contribute `_group_sum`. The group that straddles k has
    m = k - N0 of its n places in the top k; the number x of relevant items among them is
    hypergeometric, and given x they sit at a uniform x-subset of those m places, so the group adds
    (x/m) * sum_{j<=m} (R0 + 1 + (j-1)(x-1)/(m-1)) / (N0+j). As AP@k divides by R_k = R0 + x, the
    expectation is taken over x exactly (sum over its support), not of a ratio of means.
    """
    N0 = np.cumsum(hist_n, axis=1) - hist_n  # items before each group
    R0 = np.cumsum(hist_r, axis=1) - hist_r
    full = (N0 + hist_n) <= k
    s_full = np.where(full, _group_sum(R0, N0, hist_r, hist_n, H), 0.0).sum(axis=1)
    R_full = np.where(full, hist_r, 0).sum(axis=1)
    ap = np.where(R_full > 0, s_full / np.maximum(R_full, 1), 0.0)
    # the straddling group, where there is one: N0 < k < N0 + n
    cut = (N0 < k) & (N0 + hist_n > k)
    for i, g in zip(*np.nonzero(cut)):
        n, r, n0, r0 = int(hist_n[i, g]), int(hist_r[i, g]), int(N0[i, g]), int(R0[i, g])
        m = k - n0
        total = 0.0
        for x in range(max(0, m - (n - r)), min(r, m) + 1):
            p = math.comb(r, x) * math.comb(n - r, m - x) / math.comb(n, m)
            if r0 + x == 0:
                continue
            s_in = float(_group_sum(r0, n0, x, m, H)) if x > 0 else 0.0
            total += p * (s_full[i] + s_in) / (r0 + x)
        ap[i] = total
    return ap


def tie_aware_map(qB, dB, qL, dL, topk: int | None = None, chunk: int | None = None) -> float:
    """Expected mAP@k over all orderings of items tied at the same Hamming distance.

    The plain mAP breaks ties by database index, so its value depends on the order the gallery
    was built in; hashing codes tie a lot (a 64-bit code has only 65 distances). This is the mean
    over queries of E[AP@k] when every tie group is ordered uniformly at random, in closed form
    per group (see `_group_sum` and `_tie_aware_ap`; the tie-aware AP of McFee & Lanckriet, as
    recommended for hashing in arXiv 1905.10951). AP conventions as `mean_average_precision`
    (R_k in the denominator, 0 when a query has no relevant item in its top k).
    """
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    k = N if topk is None else _k(topk, N, "topk")
    D = qB.shape[1] * 8 + 1
    H = _harmonic(N)
    ap = np.empty(Q)
    for sl in _slices(Q, N, chunk):
        hist_n, hist_r = _distance_histograms(hamming(qB[sl], dB), rel(sl), D)
        ap[sl] = _tie_aware_ap(hist_n, hist_r, k, H)
    return float(ap.mean())


# --------------------------------------------------------------------------- re-ranking

#: the default re-ranking factor: the Hamming top-(k * factor) is re-ordered by cosine
RERANK_FACTOR = 10


def rerank_size(k: int, factor: int, n: int) -> int:
    """R = max(k * factor, k), at most n: how many Hamming neighbours the re-ranking looks at.

    Callers skip re-ranking altogether when factor is 0 (off).
    """
    return min(max(int(k) * int(factor), int(k)), int(n))


def rerank_order(d, qz, Z) -> tuple[np.ndarray, np.ndarray]:
    """Order of a Hamming shortlist after re-ranking by cosine: (order [R], scores [R]).

    d [R]: the shortlist's Hamming distances in Hamming order (distance, then gallery/database
    order). qz [bits]: the query's tanh activations. Z [R, bits]: the stored activations of each
    item (float16 as a gallery stores them), a NaN row for an item that has none (upserted by code).

    An item with activations scores s = q.z / (|q| |z|), computed in float64 from the stored
    values (0 when either vector is zero). Items are ranked by s descending, ties by their
    Hamming place. An item without activations gets the lowest score of the items with
    activations at the same or a smaller distance (+inf when there are none), and at an equal
    score an item with activations goes first: it is ranked right after every item with
    activations that is at least as close, so it never overtakes a closer or equally close
    item that was re-ranked. Its returned score is NaN.

    The server (serve.gallery) and `rerank_map` both call this on one query at a time, so a
    served ranking equals the offline one bit for bit.
    """
    d = np.asarray(d, np.int64)
    Z = np.asarray(Z).astype(np.float64)
    q = np.asarray(qz).astype(np.float64).reshape(-1)
    R = len(d)
    if R == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    qn = math.sqrt(float((q * q).sum()))
    if not np.isnan(Z).any():
        # Every item has activations (the usual case; a served search runs this per request):
        # the same arithmetic as below without the masks, so the same scores, bit for bit.
        zn = np.sqrt((Z * Z).sum(axis=1))
        dots = (Z * q).sum(axis=1)
        denom = zn * qn
        s = dots / denom if (denom > 0).all() else np.where(denom > 0, dots / np.where(denom > 0, denom, 1.0), 0.0)
        order = np.lexsort((np.arange(R), d, -s))
        return order, s[order]
    has = ~np.isnan(Z).any(axis=1)
    Zh = np.where(has[:, None], Z, 0.0)
    zn = np.sqrt((Zh * Zh).sum(axis=1))
    dots = (Zh * q).sum(axis=1)
    denom = zn * qn
    s = np.where(has & (denom > 0), dots / np.where(denom > 0, denom, 1.0), 0.0)
    eff = s.copy()
    if not has.all():
        # lowest score among items with activations at distance <= d, per distinct distance
        dist_vals = np.unique(d)
        low = np.full(len(dist_vals), np.inf)
        for j, v in enumerate(dist_vals):
            m = has & (d == v)
            if m.any():
                low[j] = s[m].min()
        low = np.minimum.accumulate(low)
        eff[~has] = low[np.searchsorted(dist_vals, d[~has])]
    order = np.lexsort((np.arange(R), ~has, d, -eff))
    return order, np.where(has, s, np.nan)[order]


def rerank_map(qB, dB, qZ, dZ, qL, dL, topk: int | None = 10, factor: int = RERANK_FACTOR) -> float:
    """mAP@k after re-ranking each query's Hamming top-R by cosine (`rerank_order`).

    R = max(k * factor, k) (`rerank_size`); the shortlist is the Hamming ranking of
    `mean_average_precision` (ties by database index, as a gallery built in database order
    returns them). dZ is stored as float16 first, exactly as `hashret index build` stores it,
    so this is the ranking a server over that gallery returns. topk=None ranks all N items
    (R = N): mAP@all(rerank). factor 0 gives the binary mAP@k. AP convention as
    `mean_average_precision`.
    """
    qB, dB, rel = _prepare(qB, dB, qL, dL)
    Q, N = qB.shape[0], dB.shape[0]
    qZ, dZ = np.asarray(qZ), np.asarray(dZ)
    bits = qB.shape[1] * 8
    for Z, n, what in ((qZ, Q, "query activations"), (dZ, N, "database activations")):
        if Z.ndim != 2 or Z.shape != (n, bits) or not np.issubdtype(Z.dtype, np.floating):
            raise BadInput(
                f"{what} | shape {Z.shape} dtype {Z.dtype}, expected float [{n}, {bits}]: pass the model's "
                f"tanh outputs, one row per code"
            )
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 0:
        raise BadInput(f"rerank factor | {factor!r} is not an integer >= 0: pass e.g. {RERANK_FACTOR}, or 0 for off")
    if factor == 0:
        return mean_average_precision(qB, dB, qL, dL, topk)
    k = N if topk is None else _k(topk, N, "topk")
    R = N if topk is None else rerank_size(k, factor, N)
    dZ16 = dZ.astype(np.float16)
    ap = np.empty(Q)
    for sl in _slices(Q, N, None):
        dist = hamming(qB[sl], dB)
        short = _rank(dist)[:, :R]
        rs = rel(sl)
        ranked = np.empty((short.shape[0], k), bool)
        for r, i in enumerate(range(sl.start, sl.stop)):
            cand = short[r]
            order, _ = rerank_order(dist[r, cand], qZ[i], dZ16[cand])
            ranked[r] = rs[r, cand[order[:k]]]
        ap[sl] = _ap(ranked)
    return float(ap.mean())


# --------------------------------------------------------------------------- data


def synthetic_codes(n: int, bits: int, n_classes: int, noise: float, seed: int = 0, *,
                    chunk: int | None = None):
    """Seeded synthetic codes: class prototypes with bits flipped w.p. `noise`.

    Returns (packed uint8 [n, bits//8], labels int64 [n]); labels ~ U{0..n_classes-1}.
    `chunk`: draw that many rows at a time, with float32 uniforms, so memory stays near the
    packed size (millions of codes for a benchmark). The same model and prototypes, but a
    different draw than chunk=None; a prefix of the rows does not depend on `n`.
    """
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise BadInput(f"synthetic chunk | {chunk!r} is not a positive integer: pass e.g. 262144, or None")
    for v, what in ((n, "n"), (n_classes, "n_classes")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise BadInput(f"synthetic {what} | {v!r} is not a positive integer: pass e.g. 1000")
    try:
        ok = 0.0 <= float(noise) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BadInput(f"synthetic noise | {noise!r} is not in [0, 1]: pass a bit-flip probability")
    bits = check_bits(bits, "synthetic bits")
    rng = np.random.default_rng(seed)
    proto = rng.random((n_classes, bits)) < 0.5
    if chunk is None:
        L = rng.integers(0, n_classes, size=n, dtype=np.int64)
        B = proto[L] ^ (rng.random((n, bits)) < float(noise))
        return pack(B), L
    # Each chunk draws labels and flips from streams of its own, keyed by the chunk's index, so a
    # row depends only on the seed and its position, never on how many rows follow it.
    entropy = np.random.SeedSequence(seed).entropy
    L = np.empty(n, np.int64)
    packed = np.empty((n, bits // 8), np.uint8)
    for c, a in enumerate(range(0, n, int(chunk))):
        b = min(n, a + int(chunk))
        labels, flips = (np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(c, s))) for s in (0, 1))
        L[a:b] = labels.integers(0, n_classes, size=b - a, dtype=np.int64)
        packed[a:b] = pack(proto[L[a:b]] ^ (flips.random((b - a, bits), dtype=np.float32) < np.float32(noise)))
    return packed, L

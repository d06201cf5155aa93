"""Tie-aware mAP: the closed form equals the brute-force mean over every ordering of tied items."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hashret.codes import hamming
from hashret.errors import BadInput
from hashret.metrics import mean_average_precision, mean_average_precision_ranked, tie_aware_map


def brute_force_tie_aware(qB, dB, qL, dL, k: int | None) -> float:
    """Mean over queries of the AP@k averaged over all permutations inside each distance group."""
    aps = []
    for i in range(len(qB)):
        dist = hamming(qB[i:i + 1], dB)[0]
        rel = dL == qL[i]
        groups = [np.flatnonzero(dist == d) for d in np.unique(dist)]
        kk = len(dB) if k is None else min(k, len(dB))
        total, count = 0.0, 0
        for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
            order = np.concatenate(perms)[:kk]
            total += mean_average_precision_ranked(rel[order][None])
            count += 1
        aps.append(total / count)
    return float(np.mean(aps))


def small_case(seed: int):
    rng = np.random.default_rng(seed)
    N = int(rng.integers(1, 8))
    dB = rng.integers(0, 4, (N, 1)).astype(np.uint8)  # 2 bits in use: many ties
    qB = rng.integers(0, 4, (3, 1)).astype(np.uint8)
    return qB, dB, rng.integers(0, 3, 3), rng.integers(0, 3, N), int(rng.integers(1, N + 1))


@pytest.mark.parametrize("seed", range(60))
def test_tie_aware_matches_brute_force(seed):
    qB, dB, qL, dL, k = small_case(seed)
    for topk in (None, k):
        got = tie_aware_map(qB, dB, qL, dL, topk=topk)
        assert got == pytest.approx(brute_force_tie_aware(qB, dB, qL, dL, topk), abs=1e-12)


def test_no_ties_equals_plain_map():
    # distinct distances everywhere: there is one ordering, so both metrics agree exactly
    dB = np.array([[0b00000000], [0b10000000], [0b11000000], [0b11100000], [0b11110000]], np.uint8)
    qB = np.zeros((1, 1), np.uint8)
    dL, qL = np.array([1, 0, 1, 1, 0]), np.array([1])
    for k in (None, 1, 3, 5):
        assert tie_aware_map(qB, dB, qL, dL, topk=k) == pytest.approx(
            mean_average_precision(qB, dB, qL, dL, topk=k), abs=1e-12)


def test_gallery_order_changes_plain_map_not_tie_aware():
    # every item at distance 0: the plain mAP@2 depends on insertion order, the tie-aware one not
    dB = np.zeros((4, 1), np.uint8)
    qB = np.zeros((1, 1), np.uint8)
    qL = np.array([1])
    a, b = np.array([1, 1, 0, 0]), np.array([0, 0, 1, 1])
    assert mean_average_precision(qB, dB, qL, a, topk=2) == 1.0
    assert mean_average_precision(qB, dB, qL, b, topk=2) == 0.0
    ta, tb = tie_aware_map(qB, dB, qL, a, topk=2), tie_aware_map(qB, dB, qL, b, topk=2)
    assert ta == tb
    # hand value: x relevant in the top 2 ~ hypergeometric(4, 2, 2): P(x=0)=1/6, P(1)=4/6, P(2)=1/6;
    # AP is 1 when x = 2, and 1/1 or 1/2 (first or second place) when x = 1
    assert ta == pytest.approx(1 / 6 * 1.0 + 4 / 6 * (0.5 * 1 + 0.5 * 0.5))


def test_multi_hot_and_chunks_agree():
    rng = np.random.default_rng(7)
    dB = rng.integers(0, 256, (40, 2)).astype(np.uint8)
    qB = rng.integers(0, 256, (9, 2)).astype(np.uint8)
    dL, qL = rng.integers(0, 2, (40, 3)), rng.integers(0, 2, (9, 3))
    ref = tie_aware_map(qB, dB, qL, dL, topk=10)
    assert tie_aware_map(qB, dB, qL, dL, topk=10, chunk=2) == pytest.approx(ref, abs=1e-12)
    assert 0.0 <= ref <= 1.0


def test_bad_topk_is_refused():
    with pytest.raises(BadInput, match="topk"):
        tie_aware_map(np.zeros((1, 1), np.uint8), np.zeros((2, 1), np.uint8), [0], [0, 1], topk=0)

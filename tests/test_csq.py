"""CSQ: hash centers (Hadamard or random), the loss against hand-computed values, and a run through the CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hashret.cli import main as cli
from hashret.errors import BadInput
from hashret.fsutil import sha256_file
from hashret.manifest import load_manifest
from tests.test_train import _subset_csv
from train.losses import (
    LOSSES,
    CSQLoss,
    DCHLoss,
    build_loss,
    hadamard,
    hash_centers,
    max_codes,
    min_distance,
    similarity,
)


def _distances(C: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances counted bit by bit (independent of the inner-product shortcut)."""
    return (C[:, None, :] != C[None, :, :]).sum(-1)


# ----------------------------------------------------------------------------- centers
@pytest.mark.parametrize("n", [1, 2, 4, 8, 64])
def test_hadamard_rows_are_orthogonal(n):
    H = hadamard(n)
    assert H.dtype == np.int8 and set(np.unique(H)) <= {-1, 1}
    assert np.array_equal(H.astype(int) @ H.T.astype(int), n * np.eye(n, dtype=int))


@pytest.mark.parametrize("n", [0, 3, 12, 48])
def test_hadamard_needs_a_power_of_two(n):
    with pytest.raises(BadInput, match=rf"hadamard order \| {n} is not a power of 2"):
        hadamard(n)


@pytest.mark.parametrize("n_classes, bits", [(10, 16), (16, 16), (81, 64), (128, 64), (3, 8)])
def test_hadamard_centers_are_half_the_bits_apart(n_classes, bits):
    C, record = hash_centers(n_classes, bits, seed=0)
    assert C.shape == (n_classes, bits) and C.dtype == np.int8
    assert record["kind"] == "hadamard" and record["min_distance"] == bits // 2
    d = _distances(C)
    H = hadamard(bits)
    for i in range(n_classes):
        for j in range(n_classes):
            if i == j:
                assert d[i, j] == 0
            elif abs(i - j) == bits:  # a Hadamard row and its own negation
                assert d[i, j] == bits
            else:
                assert d[i, j] == bits // 2, (i, j)
    assert np.array_equal(C[: min(n_classes, bits)], H[: min(n_classes, bits)])  # rows of H first
    if n_classes > bits:
        assert np.array_equal(C[bits:], -H[: n_classes - bits])  # then their negations
    # nothing random about it
    assert np.array_equal(hash_centers(n_classes, bits, seed=5)[0], C)


@pytest.mark.parametrize("n_classes, bits, why", [
    (81, 32, "2 x 32 bits < 81 classes"),
    (81, 16, "2 x 16 bits < 81 classes"),  # whole fresh sets would almost never get there (e^-34)
    (81, 48, "48 bits is not a power of 2"),
    (20, 24, "24 bits is not a power of 2"),
])
def test_random_centers_meet_the_minimum_distance(n_classes, bits, why):
    C, record = hash_centers(n_classes, bits, seed=3)
    assert C.shape == (n_classes, bits) and set(np.unique(C)) == {-1, 1}
    d = _distances(C)[~np.eye(n_classes, dtype=bool)]
    assert d.min() >= bits // 4
    assert record["kind"] == "random" and why in record["why"]
    assert record["min_distance"] == d.min() == min_distance(C)
    assert record["required_min_distance"] == bits // 4 and record["seed"] == 3 and record["draws"] >= n_classes
    # the seed decides them: same seed, same centers; another seed, others
    assert np.array_equal(hash_centers(n_classes, bits, seed=3)[0], C)
    assert not np.array_equal(hash_centers(n_classes, bits, seed=4)[0], C)


@pytest.mark.parametrize("n_classes, bits, why, shorter, choose", [
    (200, 8, r"impossible, at most 128 codes are that far apart", 16, 128),  # only the even-weight bytes
    (5000, 16, r"impossible, at most 2048 codes are that far apart", 56, 4096),
    (120, 8, r"center \d+ found no place in 1024 random draws", 16, 64),  # 128 exist; random draws stall earlier
])
def test_inseparable_centers_name_the_bits_to_choose(n_classes, bits, why, shorter, choose):
    with pytest.raises(BadInput, match=rf"^csq centers \| {n_classes} classes in {bits} bits, pairwise Hamming "
                                       rf"distance >= {bits // 4} \(bits/4\): {why}: choose --bits {shorter} "
                                       rf"\(random centers fit\) or --bits {choose} \(Hadamard centers"):
        hash_centers(n_classes, bits, seed=0)
    # and the lengths it names do work
    assert hash_centers(n_classes, choose, seed=0)[1]["kind"] == "hadamard"
    if n_classes <= 2000:  # the longer-length trial only draws for that many (more are told from a bound)
        assert hash_centers(n_classes, shorter, seed=0)[1]["min_distance"] >= shorter // 4


def test_max_codes_is_exact_where_the_answer_is_known():
    assert max_codes(8, 2) == 128 and max_codes(16, 4) == 2048 and max_codes(8, 1) == 256
    assert max_codes(7, 3) == 16  # the perfect Hamming(7,4) code


# ----------------------------------------------------------------------------- loss by hand
H4 = [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]  # Sylvester, order 4


def _csq_by_hand(h, targets, quant_weight):
    """-mean[t log p + (1-t) log(1-p)] with p = (tanh h + 1)/2, t = (c + 1)/2, plus lambda mean (|tanh h| - 1)^2."""
    bce = quant = 0.0
    count = 0
    for row, c in zip(h, targets):
        for x, ck in zip(row, c):
            p = (math.tanh(x) + 1) / 2
            t = (ck + 1) / 2
            bce -= t * math.log(p) + (1 - t) * math.log(1 - p)
            quant += (abs(math.tanh(x)) - 1) ** 2
            count += 1
    return bce / count + quant_weight * quant / count


HB = [[0.5, -1.0, 2.0, 0.1], [-0.3, 0.2, 0.7, -1.5], [1.2, -0.4, -0.9, 0.0]]


@pytest.mark.parametrize("quant_weight", [0.0, 1e-4, 0.5])
def test_csq_hand_value_class_ids(quant_weight):
    loss = CSQLoss(quant_weight=quant_weight)
    # class ids need not be 0..C-1: the centers follow the sorted distinct ids
    record = loss.setup(torch.tensor([7, 3, 3, 11, 7]), bits=4, seed=0)["centers"]
    assert record["classes"] == [3, 7, 11] and record["kind"] == "hadamard" and record["min_distance"] == 2
    labels = torch.tensor([7, 3, 11])
    expected = _csq_by_hand(HB, [H4[1], H4[0], H4[2]], quant_weight)
    got = loss(torch.tensor(HB, dtype=torch.float64), labels)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert loss.batch_loss(torch.tensor(HB, dtype=torch.float64), labels).item() == pytest.approx(expected, rel=1e-12)


def test_csq_multi_hot_center_is_the_sign_of_the_sum_ties_plus_one():
    loss = CSQLoss(quant_weight=0.25)
    loss.setup(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]]), bits=4, seed=0)
    labels = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1]])
    # sums: H0+H1 = [2,0,2,0] -> [1,1,1,1]; H1+H2 = [2,0,0,-2] -> [1,1,1,-1]; H0+H1+H2 = [3,1,1,-1]
    want = [[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, 1, -1]]
    assert loss.targets(labels).tolist() == want
    assert loss.targets(torch.tensor([[0, 1, 0]])).tolist() == [H4[1]]
    got = loss(torch.tensor(HB, dtype=torch.float64), labels)
    assert got.item() == pytest.approx(_csq_by_hand(HB, want, 0.25), rel=1e-12)
    with pytest.raises(BadInput, match="a sample has no class"):
        loss(torch.zeros(1, 4), torch.tensor([[0, 0, 0]]))


def test_csq_gradients_finite_when_saturated():
    loss = CSQLoss(quant_weight=1.0)
    loss.setup(torch.tensor([0, 1]), bits=4, seed=0)
    h = torch.tensor([[50.0, -50.0, 50.0, 50.0], [-50.0, 50.0, -50.0, 50.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    value = loss(h, torch.tensor([0, 1, 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(h.grad).all()
    # a wrong saturated bit costs about 2|h| (its logit is 2h), never inf
    assert value.item() > 20


def test_batch_loss_gives_pairwise_losses_S_and_csq_labels():
    torch.manual_seed(0)
    h = torch.randn(6, 8, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    dch = DCHLoss()
    assert dch.batch_loss(h, labels).item() == dch(h, similarity(labels).double()).item()
    assert not DCHLoss.wants_labels and CSQLoss.wants_labels
    assert dch.setup(labels, 8, 0) == {} and dch.run_files() == {}


def test_a_setup_record_may_not_overwrite_a_hyper_parameter():
    from train.train import method_record

    loss = CSQLoss()
    assert method_record(loss, {"centers": {"kind": "hadamard"}}) == {
        "name": "csq", "quant_weight": 1e-4, "centers": {"kind": "hadamard"}}
    for key in ("quant_weight", "name", "files"):
        with pytest.raises(ValueError, match=rf"setup record keys \['{key}'\] repeat a hyper-parameter"):
            method_record(loss, {key: 1})


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda fn: fn(torch.zeros(2, 8), torch.tensor([0, 1])), r"no hash centers yet: call setup"),
        (lambda fn: (fn.setup(torch.tensor([0, 1]), 8, 0), fn(torch.zeros(2, 8), torch.tensor([0, 5])))[1],
         r"class 5 has no hash center"),
        (lambda fn: (fn.setup(torch.tensor([0, 1]), 8, 0), fn(torch.zeros(2, 16), torch.tensor([0, 1])))[1],
         r"centers have 8 bits, the codes 16"),
        (lambda fn: (fn.setup(torch.tensor([0, 1]), 8, 0), fn(torch.zeros(3, 8), torch.tensor([0, 1])))[1],
         r"2 labels for a batch of 3"),
        (lambda fn: (fn.setup(torch.tensor([0, 1]), 8, 0), fn(torch.zeros(2, 8), torch.tensor([[1, 0], [0, 1]])))[1],
         r"expected class ids \[B\] like the training labels"),
        (lambda fn: CSQLoss(quant_weight=-1.0), r"csq quant_weight \| -1.0 is not >= 0"),
    ],
)
def test_csq_bad_input(call, match):
    with pytest.raises(BadInput, match=match):
        call(CSQLoss())


def test_csq_learns_a_separable_problem():
    torch.manual_seed(0)
    n, dim, bits = 60, 16, 16
    y = torch.arange(n) % 3
    x = torch.randn(3, dim)[y] + 0.3 * torch.randn(n, dim)
    model = torch.nn.Linear(dim, bits)
    loss = build_loss("csq")
    loss.setup(y, bits, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = loss(model(x), y).item()
    for _ in range(60):
        value = loss(model(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
    with torch.no_grad():
        b = torch.where(model(x) >= 0, 1.0, -1.0)  # export-time codes: sign, 0 -> +1
    assert loss(model(x), y).item() < first / 4
    assert torch.equal(b, loss.targets(y))  # every code sits on its class's center


# ----------------------------------------------------------------------------- through `hashret train`
def test_csq_trains_through_the_cli_and_keeps_its_centers(grocery_root, tmp_path):
    csv = _subset_csv(grocery_root, tmp_path)
    out = tmp_path / "csq"
    assert cli(["train", "--data", str(csv), "--format", "csv", "--method", "csq", "--bits", "16", "--epochs", "30",
                "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out)]) == 0
    m = load_manifest(out, "run")
    assert m["training"]["epochs"] == 30 and m["training"]["lr"] == 1e-3  # csq's own lr
    method = m["method"]
    assert method["name"] == "csq" and method["quant_weight"] == 1e-4
    centers = method["centers"]
    assert centers["kind"] == "hadamard" and centers["min_distance"] == 8 and centers["count"] == 8
    assert "classes" not in centers and centers["file"] == "centers.npy"  # row r is class r
    C = np.load(out / "centers.npy")
    assert C.dtype == np.int8 and C.shape == (8, 16)
    assert np.array_equal(C, hadamard(16)[:8])
    assert method["files"]["centers.npy"]["sha256"] == sha256_file(out / "centers.npy")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mAP@all"] > 0.3  # 8 classes: chance is about 0.13

    # a flag of its own, shared by name with DCH's
    assert cli(["train", "--data", str(csv), "--format", "csv", "--method", "csq", "--bits", "16", "--epochs", "2",
                "--batch-size", "16", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--quant-weight", "0.5",
                "--out", str(tmp_path / "q")]) == 0
    assert load_manifest(tmp_path / "q", "run")["method"]["quant_weight"] == 0.5


def test_csq_is_registered_with_its_defaults():
    assert LOSSES.get("csq") is CSQLoss
    assert dict(CSQLoss.train_defaults) == {"epochs": 60, "lr": 1e-3}
    assert build_loss("csq").hparams() == {"name": "csq", "quant_weight": 1e-4}

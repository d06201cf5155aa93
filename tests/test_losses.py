"""Tests for train/losses.py: hand-computed values, gradient safety, schedules, registry."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hashret.errors import BadInput
from train.losses import LOSSES, DCHLoss, HashNetLoss, build_loss, similarity

H3 = [[0.5, -1.0], [0.3, 0.2], [-0.7, 0.4]]
LABELS3 = [0, 0, 1]


def _weights(S):
    """Balanced weights over ordered off-diagonal pairs, by hand."""
    n = len(S)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    n_sim = sum(1 for i, j in pairs if S[i][j] == 1)
    n_dis = len(pairs) - n_sim
    w = {}
    for i, j in pairs:
        w[(i, j)] = len(pairs) / n_sim if S[i][j] == 1 else len(pairs) / n_dis
    return w


def _hashnet_by_hand(h, labels, alpha, beta):
    z = [[math.tanh(beta * v) for v in row] for row in h]
    S = [[1 if a == b else 0 for b in labels] for a in labels]
    w = _weights(S)
    num = den = 0.0
    for (i, j), wij in w.items():
        ip = sum(a * b for a, b in zip(z[i], z[j]))
        loss = math.log(1 + math.exp(alpha * ip)) - alpha * S[i][j] * ip
        num += wij * loss
        den += wij
    return num / den


def _hamming_by_hand(a, b):
    k = len(a)
    cos = sum(x * y for x, y in zip(a, b)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )
    return k / 2 * (1 - cos)


def _dch_by_hand(h, labels, gamma, quant_weight):
    z = [[math.tanh(v) for v in row] for row in h]
    S = [[1 if a == b else 0 for b in labels] for a in labels]
    w = _weights(S)
    num = den = 0.0
    for (i, j), wij in w.items():
        d = _hamming_by_hand(z[i], z[j])
        # paper form: s log(d/gamma) + log(1 + gamma/d)
        loss = S[i][j] * math.log(d / gamma) + math.log(1 + gamma / d)
        num += wij * loss
        den += wij
    q = [math.log(1 + _hamming_by_hand([abs(v) for v in zi], [1.0] * len(zi)) / gamma) for zi in z]
    return num / den + quant_weight * sum(q) / len(q)


def _inputs(h=H3, labels=LABELS3):
    return torch.tensor(h, dtype=torch.float64), similarity(torch.tensor(labels)).double()


# ----------------------------------------------------------------------------- similarity
def test_similarity_int_and_multihot():
    S = similarity(torch.tensor([0, 1, 0]))
    assert S.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert S.dtype == torch.float32
    mh = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert similarity(mh).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert similarity(torch.tensor([0, 1]), torch.tensor([1, 1, 2])).tolist() == [[0, 0, 0], [1, 1, 0]]
    with pytest.raises(BadInput):
        similarity(torch.tensor([0, 1]), mh)


# ----------------------------------------------------------------------------- hand values
def test_hashnet_hand_value_default_alpha():
    h, S = _inputs()
    got = HashNetLoss()(h, S).item()
    assert got == pytest.approx(_hashnet_by_hand(H3, LABELS3, alpha=10 / 2, beta=1.0), rel=1e-9)


def test_hashnet_hand_value_after_schedule():
    h, S = _inputs()
    loss = HashNetLoss(alpha=0.7)
    for _ in range(100):
        loss.advance()
    assert loss.beta == pytest.approx(math.sqrt(1 + 0.005 * 100))
    got = loss(h, S).item()
    assert got == pytest.approx(_hashnet_by_hand(H3, LABELS3, alpha=0.7, beta=math.sqrt(1.5)), rel=1e-9)


def test_dch_hand_value():
    h = [[0.5, -1.0, 0.2], [0.3, 0.2, -0.4], [-0.7, 0.4, 0.9]]
    labels = [1, 1, 2]
    ht, S = _inputs(h, labels)
    got = DCHLoss(gamma=2.0, quant_weight=0.5, eps=1e-12)(ht, S).item()
    assert got == pytest.approx(_dch_by_hand(h, labels, gamma=2.0, quant_weight=0.5), rel=1e-7)


def test_dch_default_hparams_hand_value():
    ht, S = _inputs()
    got = DCHLoss(eps=1e-12)(ht, S).item()
    assert got == pytest.approx(_dch_by_hand(H3, LABELS3, gamma=20.0, quant_weight=0.1), rel=1e-7)


# ----------------------------------------------------------------------------- gradients
def _grad(loss, h, S):
    h = h.clone().requires_grad_(True)
    value = loss(h, S)
    value.backward()
    return value, h.grad


LOSS_FACTORIES = [HashNetLoss, DCHLoss]


@pytest.mark.parametrize("factory", LOSS_FACTORIES)
@pytest.mark.parametrize(
    "case",
    ["saturated", "identical_dissimilar", "identical_similar", "all_similar", "all_dissimilar", "single"],
)
def test_gradients_finite_at_extremes(factory, case):
    torch.manual_seed(0)
    if case == "saturated":
        h = torch.tensor([[50.0, -50.0, 50.0, 50.0], [-50.0, -50.0, 50.0, -50.0], [50.0, -50.0, 50.0, 50.0]])
        labels = [0, 1, 1]
    elif case == "identical_dissimilar":
        h = torch.tensor([[0.3, -0.2, 0.8, 0.1]] * 3)
        labels = [0, 1, 2]
    elif case == "identical_similar":
        h = torch.tensor([[0.3, -0.2, 0.8, 0.1]] * 3)
        labels = [4, 4, 4]
    elif case == "all_similar":
        h = torch.randn(4, 4)
        labels = [2, 2, 2, 2]
    elif case == "all_dissimilar":
        h = torch.randn(4, 4)
        labels = [0, 1, 2, 3]
    else:
        h = torch.randn(1, 4)
        labels = [0]
    S = similarity(torch.tensor(labels))
    loss = factory()
    for _ in range(1000):  # a sharper continuation for HashNet
        loss.advance()
    value, grad = _grad(loss, h, S)
    assert torch.isfinite(value)
    assert torch.isfinite(grad).all()
    if case == "single":
        assert value.item() == 0.0 or factory is DCHLoss  # DCH keeps its quantization term


@pytest.mark.parametrize("factory", LOSS_FACTORIES)
def test_one_sided_batch_is_plain_mean(factory):
    torch.manual_seed(1)
    h = torch.randn(4, 8, dtype=torch.float64)
    S = similarity(torch.tensor([0, 1, 2, 3])).double()
    loss = factory(**({"quant_weight": 0.0} if factory is DCHLoss else {}))
    z = loss.codes(h)
    off = ~torch.eye(4, dtype=torch.bool)
    if factory is HashNetLoss:
        ip = (10 / 8) * z @ z.t()
        expected = torch.log1p(torch.exp(ip))[off].mean()
    else:
        d = 4 * (1 - torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(z, dim=1).t())
        expected = torch.log1p(20 / (d + 1e-4))[off].mean()
    assert loss(h, S).item() == pytest.approx(expected.item(), rel=1e-9)


# ----------------------------------------------------------------------------- HashNet schedule
def test_hashnet_beta_really_grows_and_changes_loss():
    torch.manual_seed(0)
    h = torch.randn(6, 16)
    S = similarity(torch.tensor([0, 0, 1, 1, 2, 2]))
    loss = HashNetLoss()
    beta0, value0 = loss.beta, loss(h, S).item()
    assert beta0 == 1.0
    for _ in range(500):
        loss.advance()
    assert loss.iteration == 500
    assert loss.beta == pytest.approx((1 + 0.005 * 500) ** 0.5)
    assert loss.beta > beta0
    assert loss(h, S).item() != pytest.approx(value0, rel=1e-4)
    # the codes are sharper (closer to sign) after continuation
    assert loss.codes(h).abs().mean() > torch.tanh(h).abs().mean()


def test_hashnet_beta_step_and_resume():
    loss = HashNetLoss(beta_init=2.0, beta_gamma=0.1, beta_power=1.0, beta_step=10)
    loss.advance(9)
    assert loss.beta == 2.0
    loss.advance()
    assert loss.beta == pytest.approx(2.0 * (1 + 0.1 * 10))
    state = loss.state_dict()
    fresh = HashNetLoss(beta_init=2.0, beta_gamma=0.1, beta_power=1.0, beta_step=10)
    fresh.load_state_dict(state)
    assert fresh.iteration == 10 and fresh.beta == loss.beta
    fresh.step(0)
    assert fresh.beta == 2.0


def test_bad_hparams_and_shapes():
    with pytest.raises(BadInput):
        HashNetLoss(beta_step=0)
    with pytest.raises(BadInput):
        DCHLoss(gamma=0)
    with pytest.raises(BadInput):
        HashNetLoss()(torch.zeros(3, 4), torch.zeros(2, 2))


# ----------------------------------------------------------------------------- learning
@pytest.mark.parametrize("name", ["hashnet", "dch"])
def test_loss_decreases_on_separable_problem(name):
    torch.manual_seed(0)
    n, dim, bits = 24, 16, 8
    y = torch.arange(n) % 2
    centers = torch.randn(2, dim)
    x = centers[y] + 0.3 * torch.randn(n, dim)
    S = similarity(y)
    model = torch.nn.Linear(dim, bits)
    loss = LOSSES.get(name)()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = None
    for _ in range(50):
        value = loss(model(x), S)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
        loss.advance()
    with torch.no_grad():
        final = loss(model(x), S).item()
        b = torch.sign(torch.tanh(model(x)))  # export-time codes
    assert final < first
    agree = (b @ b.t()) / bits
    same = S.bool() & ~torch.eye(n, dtype=torch.bool)
    diff = ~S.bool()
    assert agree[same].mean() > agree[diff].mean() + 0.5


# ----------------------------------------------------------------------------- registry
def test_registry_and_hparams_roundtrip():
    assert LOSSES.get("hashnet") is HashNetLoss
    assert LOSSES.get("dch") is DCHLoss
    with pytest.raises(BadInput) as e:
        LOSSES.get("nope")
    assert "dch" in str(e.value) and "hashnet" in str(e.value)
    for name in LOSSES.names():
        hp = build_loss(name).hparams()
        assert hp["name"] == name
        json.dumps(hp)
        kwargs = {k: v for k, v in hp.items() if k != "name"}
        assert build_loss(name, **kwargs).hparams() == hp
    with pytest.raises(BadInput):
        build_loss("dch", beta=3)


def test_every_loss_entry_describes_itself():
    """What `hashret train` derives from an entry is there and consistent for every registered loss."""
    from train.losses import keyword_names

    for name, cls in LOSSES.items():
        assert cls.name == name and cls.summary, name
        keywords = keyword_names(cls)
        for f in cls.flags:
            assert f.name in keywords and f.flag == "--" + f.name.replace("_", "-"), (name, f)
        assert list(build_loss(name).hparams()) == ["name", *keywords]


def test_builtin_entries_keep_the_cli_defaults():
    """The values `hashret train` used before the registry carried them (tuned on Grocery, README)."""
    assert dict(HashNetLoss.train_defaults) == {"epochs": 100, "lr": 3e-4}
    assert dict(DCHLoss.train_defaults) == {"epochs": 60, "lr": 1e-3}
    assert {f.name: f.default for f in HashNetLoss.flags} == {"alpha": None, "beta_gamma": 0.3, "beta_power": None}
    assert {f.name: f.default for f in DCHLoss.flags} == {"gamma": None, "quant_weight": None}
    assert [n for n, _ in LOSSES.items()] == ["hashnet", "dch", "csq"]  # CSQ's own entry: tests/test_csq.py


def test_registered_is_temporary():
    class Tmp(DCHLoss):
        name = "tmp-dch"

    with LOSSES.registered("tmp-dch", Tmp):
        assert build_loss("tmp-dch", gamma=5.0).hparams() == {"name": "tmp-dch", "gamma": 5.0, "quant_weight": 0.1,
                                                              "eps": 1e-4}
        with pytest.raises(ValueError, match="already registered"):
            LOSSES.register("tmp-dch")(Tmp)
    assert "tmp-dch" not in LOSSES
    with pytest.raises(ValueError, match="'tmp-dch' is not registered"):
        LOSSES.unregister("tmp-dch")

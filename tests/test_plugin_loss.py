"""A loss added from outside the train stage is one class plus its registration.

The loss below lives only in this file. Registered for the length of a test, it must show up in
`hashret train --help` (choice, summary, flag, defaults) and train through the real CLI path,
with the run manifest recording its name, its hyper-parameters and its training defaults.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hashret.cli import build_parser
from hashret.cli import main as cli
from hashret.errors import BadInput
from hashret.manifest import load_manifest
from tests.test_train import _subset_csv
from train.losses import LOSSES, HashLoss, HParamFlag

NAME = "test-contrastive"


class ContrastiveLoss(HashLoss):
    r"""Cosine contrastive loss on ``z = tanh(h)``, ``c_ij = cos(z_i, z_j)``::

        l_ij = s_ij (1 - c_ij) + (1 - s_ij) max(0, c_ij - margin)
        L    = scale * mean_{i != j} l_ij

    Similar pairs are pulled to the same code, dissimilar ones pushed below cosine ``margin``.
    """

    name = NAME
    summary = "cosine contrastive loss with a margin (test plug-in)"
    # the CLI default differs from the keyword default, as HashNet's beta_gamma does
    flags = (HParamFlag("contrast_margin", float, "cosine below which dissimilar pairs stop pushing", default=0.2),)
    train_defaults = {"epochs": 3, "lr": 5e-3}

    def __init__(self, contrast_margin: float = 0.0, contrast_scale: float = 2.0) -> None:
        super().__init__()
        if not -1.0 <= contrast_margin < 1.0:
            raise BadInput(f"{NAME} contrast_margin | {contrast_margin} is outside [-1, 1): pass a cosine")
        self.contrast_margin = float(contrast_margin)
        self.contrast_scale = float(contrast_scale)

    def forward(self, h: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.codes(h), dim=1)
        c = z @ z.t()
        s = S.to(c.dtype)
        pair = s * (1.0 - c) + (1.0 - s) * (c - self.contrast_margin).clamp(min=0.0)
        off = ~torch.eye(len(h), dtype=torch.bool, device=h.device)
        return self.contrast_scale * pair[off].mean() if off.any() else pair.sum() * 0.0


@pytest.fixture()
def plugin_loss():
    with LOSSES.registered(NAME, ContrastiveLoss):
        yield ContrastiveLoss
    assert NAME not in LOSSES


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli(["train", "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_the_plugin_only_while_registered(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens too, which would split the name
    with LOSSES.registered(NAME, ContrastiveLoss):
        text = _help(capsys)
        assert f"--method {{csq,dch,hashnet,{NAME}}}" in text
        assert "dch: Deep Cauchy Hashing; csq: Central Similarity Quantization" in text
        assert f"; {NAME}: cosine contrastive loss with a margin (test plug-in) (default: csq)" in text
        assert ("--contrast-margin CONTRAST_MARGIN cosine below which dissimilar pairs stop pushing "
                "(default: 0.2)") in text
        assert f"(default: csq 60, dch 60, hashnet 100, {NAME} 3)" in text
        assert f"(default: csq 0.001, dch 0.001, hashnet 0.0003, {NAME} 0.005)" in text
    text = _help(capsys)
    assert NAME not in text and "--contrast-margin" not in text
    assert "(default: csq 60, dch 60, hashnet 100)" in text


def test_plugin_trains_through_the_cli(plugin_loss, grocery_root, tmp_path):
    csv = _subset_csv(grocery_root, tmp_path)
    common = ["train", "--data", str(csv), "--format", "csv", "--bits", "16", "--batch-size", "16",
              "--limit", "16", "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--method", NAME]
    assert cli([*common, "--contrast-margin", "0.4", "--out", str(tmp_path / "a")]) == 0
    m = load_manifest(tmp_path / "a", "run")
    assert m["method"] == {"name": NAME, "contrast_margin": 0.4, "contrast_scale": 2.0}
    assert m["training"]["epochs"] == 3 and m["training"]["lr"] == 5e-3  # the loss's own defaults
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP@all"] <= 1.0

    # flag left out: the entry's CLI default is passed, not the keyword's 0.0; explicit training flags win
    assert cli([*common, "--epochs", "2", "--out", str(tmp_path / "b")]) == 0
    m = load_manifest(tmp_path / "b", "run")
    assert m["method"]["contrast_margin"] == 0.2 and m["training"]["epochs"] == 2
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["feature_cache_hit"] is True

    # its own input checks reach the user as a bad-input exit
    assert cli([*common, "--contrast-margin", "1.5", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.parametrize(
    "flag, defaults, match",
    [
        (HParamFlag("lr", float, "x"), {}, r"flag --lr is a training option: set it in train_defaults"),
        (HParamFlag("margin", float, "x"), {}, r"flag --margin is not a keyword of Broken"),
        (HParamFlag("seed", int, "x"), {}, r"flag --seed clashes with a `hashret train` flag"),  # added after
        (HParamFlag("bits", int, "x"), {}, r"flag --bits clashes with a `hashret train` flag"),  # added before
        (HParamFlag("gamma", int, "x"), {}, r"flag --gamma is also declared by loss '(dch|broken)' with another type"),
        (None, {"beta_gamma": 0.3}, r"train_defaults \['beta_gamma'\] are not training options"),
    ],
)
def test_a_broken_entry_fails_when_the_parser_is_built(flag, defaults, match):
    class Broken(ContrastiveLoss):
        name = "broken"
        flags = (flag,) if flag else ()
        train_defaults = defaults

        def __init__(self, contrast_margin: float = 0.0, lr: float = 0.0, seed: int = 0, gamma: int = 1,
                     bits: int = 8) -> None:
            super().__init__(contrast_margin)

    with LOSSES.registered("broken", Broken), pytest.raises(ValueError, match=match):
        build_parser("train")

"""The backbone registry: EfficientNet-Lite1/Lite2 next to Lite0, their preprocessing, their cost cards,
and a Lite2 model through export and `hashret check` like Lite0."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hashret.cli import main as cli
from hashret.errors import BadInput
from hashret.models import BACKBONES, backbone_card, build_backbone

LITE = [  # name, crop, resize, last block input (channels, side)
    ("efficientnet-lite0", 224, 256, (192, 7)),
    ("efficientnet-lite1", 240, 274, (192, 8)),
    ("efficientnet-lite2", 260, 297, (208, 9)),
]


@pytest.mark.parametrize("name, crop, resize, block", LITE)
def test_lite_builds_with_packaged_weights_and_its_own_input_size(name, crop, resize, block):
    bb = build_backbone(name, "imagenet")
    assert bb.name == name and bb.dim == 1280 and bb.weights == "imagenet"
    s = bb.spec
    assert (s.crop, s.resize) == (crop, resize)
    # (x - 127) / 128 in pixel units, the Lite models' training normalization, for every variant
    assert s.mean == pytest.approx((127 / 255,) * 3) and s.std == pytest.approx((128 / 255,) * 3)
    assert s.crop / s.resize == pytest.approx(0.875, abs=0.002)
    bb.net.eval()
    x = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = bb.net(x)
        mid = bb.stem(x)
        assert f.shape == (2, 1280) and torch.isfinite(f).all()
        assert tuple(mid.shape[1:]) == (block[0], block[1], block[1])
        assert torch.allclose(bb.tail(mid), f, atol=1e-5)  # --finetune last-block splits it exactly


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_packaged_weights_are_loaded_not_random(name):
    trained = build_backbone(name, "imagenet").net.state_dict()
    random = build_backbone(name, "none").net.state_dict()
    key = next(k for k in trained if k.endswith("_bn0.running_var"))
    assert not torch.equal(trained[key], random[key])  # a fresh BatchNorm has running_var 1


@pytest.mark.parametrize("name", BACKBONES.names())
def test_cost_card_matches_a_fresh_count(name):
    card = backbone_card(name)
    bb = build_backbone(name, "none")
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        out = bb.net.eval()(torch.zeros(1, 3, card.crop, card.crop))
    assert card.crop == bb.spec.crop and card.dim == bb.dim == out.shape[1]
    assert counter.get_total_flops() / 1e9 == pytest.approx(card.gflops, abs=0.006)


def test_train_help_lists_each_backbone_with_its_cost(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in BACKBONES.names():
        assert f"{name} ({backbone_card(name).describe()})" in text
    assert "efficientnet-lite2 (260 px, 1.72 GFLOPs, 1280-d)" in text


def test_lite0_spec_is_unchanged_so_its_feature_caches_stay_valid():
    assert build_backbone("efficientnet-lite0", "none").spec.to_dict() == {
        "resize": 256, "crop": 224, "mean": [127 / 255] * 3, "std": [128 / 255] * 3, "interpolation": "bilinear"}


def test_unknown_backbone_names_the_choices():
    with pytest.raises(BadInput, match=r"backbone 'efficientnet-lite9' \| unknown: choose one of .*efficientnet-lite2"):
        build_backbone("efficientnet-lite9")


def test_weights_of_another_variant_are_refused_with_the_reason(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(build_backbone("efficientnet-lite0", "none").net.trunk.m.state_dict(), path)
    with pytest.raises(BadInput, match=r"does not fit this backbone"):
        build_backbone("efficientnet-lite2", str(path))


@pytest.mark.slow
def test_lite2_exports_and_passes_the_regression_check(tmp_path, capsys):
    """A Lite2 RUN (real weights, seeded head, 40 real photos) exports to ONNX at 260 px and checks clean."""
    from tests.test_export import make_run, small_csv

    data = small_csv(tmp_path / "data")
    run, exp = tmp_path / "run", tmp_path / "exp"
    make_run(run, data, backbone="efficientnet-lite2")
    assert cli(["export", str(run), "--out", str(exp), "--formats", "onnx", "--golden", "16",
                "--parity-queries", "0", "--latency-runs", "2"]) == 0
    m = json.loads((exp / "manifest.json").read_text())
    assert m["backbone"]["name"] == "efficientnet-lite2" and m["preprocessing"]["crop"] == 260
    assert m["export"]["inputs"][0]["shape"][1:] == [260, 260, 3]
    rows = {r["backend"]: r for r in json.loads((exp / "parity.json").read_text())["golden"]["rows"]}
    assert rows["ort"]["status"] == "ok" and rows["ort"]["bit_agreement"] == 1.0
    capsys.readouterr()
    assert cli(["check", str(exp), "--backend", "ort"]) == 0
    # the served engine takes 260 px images and nothing else
    from hashret.engines import open_engine

    with open_engine(exp, "ort") as eng:
        assert eng.encode(np.zeros((2, 260, 260, 3), np.uint8)).shape == (2, 32)
        with pytest.raises(BadInput, match=r"expected \[N, 260, 260, 3\]"):
            eng.encode(np.zeros((1, 224, 224, 3), np.uint8))


def test_table_adds_rows_for_further_backbones_with_a_backbone_column(grocery_root, tmp_path, monkeypatch):
    """train.table: the first backbone gets every --methods entry, the others --backbone-methods."""
    from tests.test_train import _subset_csv
    from train import table

    monkeypatch.setenv("HASHRET_CACHE", str(tmp_path / "cache"))
    csv = _subset_csv(grocery_root, tmp_path, per_class=2, classes=4)
    out, runs = tmp_path / "table.json", tmp_path / "runs"
    assert table.main(["--data", str(csv), "--format", "csv", "--bits", "64", "--methods", "dch,csq",
                       "--backbones", "efficientnet-lite0,efficientnet-lite1", "--backbone-methods", "csq",
                       "--repeats", "1", "--epochs", "2", "--out", str(out), "--keep-runs", str(runs)]) == 0
    t = json.loads(out.read_text())
    assert t["backbone"] == "efficientnet-lite0" and t["backbones"] == ["efficientnet-lite0", "efficientnet-lite1"]
    assert [(r["backbone"], r["method"]) for r in t["rows"]] == [
        ("efficientnet-lite0", "dch"), ("efficientnet-lite0", "csq"), ("efficientnet-lite1", "csq")]
    # Lite0's run folders keep the names earlier tables used; others carry the backbone
    assert (runs / "csq64-s0").is_dir() and (runs / "efficientnet-lite1-csq64-s0").is_dir()
    assert json.loads((runs / "efficientnet-lite1-csq64-s0" / "manifest.json").read_text())["backbone"]["name"] \
        == "efficientnet-lite1"
    md = table.render_markdown(t)
    assert "| efficientnet-lite1 | csq | 64 |" in md and md.startswith("| backbone | method | bits |")
    # the method comparison stays within the first backbone; the backbone comparison is its own line
    assert t["best_64"] in ("dch", "csq")
    assert ("Backbones at 64-bit csq: efficientnet-lite0 " in md) == (t["best_64"] == "csq")
    # a further run resumes both backbones' folders instead of retraining them
    assert table.main(["--data", str(csv), "--format", "csv", "--bits", "64", "--methods", "dch,csq",
                       "--backbones", "efficientnet-lite0,efficientnet-lite1", "--backbone-methods", "csq",
                       "--repeats", "1", "--epochs", "2", "--out", str(out), "--keep-runs", str(runs)]) == 0
    assert all(r.get("resumed") for r in json.loads(out.read_text())["runs"])


def test_table_refuses_an_unknown_backbone_before_training(tmp_path, capsys):
    from train import table

    assert table.main(["--backbones", "efficientnet-lite0,efficientnet-lite7", "--out", str(tmp_path / "t.json")]) == 2
    assert "backbone 'efficientnet-lite7' | unknown" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_table_note_names_the_best_backbone_of_the_best_method():
    from train import table

    runs = [{"backbone": bb, "method": m, "bits": 64, "seed": 0, "mAP@all": v, "mAP@10": v, "head_seconds": 1.0}
            for bb, m, v in (("efficientnet-lite0", "dch", 0.79), ("efficientnet-lite0", "csq", 0.81),
                             ("efficientnet-lite2", "csq", 0.83))]
    md = table.render_markdown({"rows": table.summarize(runs), "backbone": "efficientnet-lite0", "seeds": [0]})
    assert "Best at 64 bits on mean mAP@all: **csq**." in md
    assert "Backbones at 64-bit csq: efficientnet-lite0 0.8100, efficientnet-lite2 0.8300 mean mAP@all " \
           "(best: **efficientnet-lite2**)." in md
    # a table from before the column renders its rows as the table's one backbone
    old = {"rows": [{k: v for k, v in r.items() if k != "backbone"} for r in table.summarize(runs[:2])], "seeds": [0]}
    assert "| efficientnet-lite0 | dch | 64 |" in table.render_markdown(old)


def test_backbones_benchmark_writes_and_renders_a_comparison(grocery_root, tmp_path):
    """python -m benchmarks.backbones on a few images: extraction, engine timings, a trained mAP, the README text."""
    from benchmarks import backbones, report

    out = tmp_path / "backbones.json"
    assert backbones.main(["--data", str(grocery_root), "--backbones", "efficientnet-lite0", "--limit", "6",
                           "--engines", "ort", "--batches", "1,4", "--seconds", "0.2", "--seeds", "0",
                           "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "backbones" and doc["machine"]["cpus"]["logical"] >= 1
    (r,) = doc["results"]
    assert r["backbone"] == "efficientnet-lite0" and r["crop"] == 224 and r["gflops"] == 0.77
    # Grocery's train split is its database: 6 + 6 distinct images
    assert r["images"] == 12 and r["extract_s"] > 0 and r["extract_engine"] in ("openvino", "ort")
    assert r["check_min_cosine"] >= 0.9999
    assert r["ort_bs1_ms"] > 0 and r["ort_best_batch"] == 4 and [t["batch"] for t in r["latency"]["ort"]] == [1, 4]
    assert 0 <= r["mAP@all"] <= 1 and r["runs"][0]["seed"] == 0 and r["method"] == "csq" and r["bits"] == 64
    md = backbones.render_markdown(doc)
    assert "| efficientnet-lite0 | 224 | 0.77 |" in md and "first 6 images of each split" in md
    # the README block renders the same text from the file
    assert report.BLOCKS["backbones"].render({"backbones.json": doc}) == md
    readme = tmp_path / "README.md"
    begin, end = report.BLOCKS["backbones"].markers
    readme.write_text(f"{begin}\n{end}\n")
    assert backbones.main(["--from-json", "--out", str(out), "--readme", str(readme)]) == 0
    assert md in readme.read_text()

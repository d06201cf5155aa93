"""Feature extraction through the exported trunk (OpenVINO / ONNX Runtime fp32) against torch eager,
on real Grocery photos: the features match per image, the engine is in the cache key, and a trunk
that disagrees with torch sends the extraction back to torch with a warning."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from hashret.datasets import Sample, read_dataset
from hashret.errors import BadInput
from hashret.models import build_backbone
from train import fast_features as ff
from train.features import cache_key, cache_path, cached_features, extract

N = 12


@pytest.fixture(scope="module")
def samples(grocery_root) -> list[Sample]:
    s = read_dataset(grocery_root, "grocery")
    # photos of several classes and both splits (their sizes and aspect ratios differ)
    return s.database[::400][:N // 2] + s.query[::400][:N // 2]


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet-lite0", "imagenet")


@pytest.fixture(scope="module")
def torch_features(samples, lite0):
    f, kept, _ = extract(samples, lite0, progress=False)
    assert kept.tolist() == list(range(len(samples)))
    return f


@pytest.mark.parametrize("engine", ["ort", "openvino"])
def test_engine_features_match_torch_per_image(samples, lite0, torch_features, engine, tmp_path):
    info = {}
    f, kept, skipped, hit = cached_features(samples, lite0, tmp_path / "features", engine=engine, info=info,
                                            progress=False, batch_size=5)  # a ragged last batch too
    assert not hit and not skipped and kept.tolist() == list(range(len(samples)))
    assert info["engine"] == engine and info["check"]["passed"] and info["check"]["images"] == len(samples)
    c = ff.cosines(f, torch_features)
    assert c.min() >= ff.MIN_COSINE, c
    assert info["check"]["min_cosine"] >= ff.MIN_COSINE
    # the trunk went beside the feature cache, named by backbone, and is reused by the next extraction
    trunk = ff.trunk_path(lite0, tmp_path / "features")
    assert trunk.parent == tmp_path / "trunks" and trunk.is_file() and info["trunk"] == str(trunk)
    # the cache file records the engine; a second call hits it
    assert f"-{engine}-" in info["cache"]
    info2 = {}
    f2, _, _, hit2 = cached_features(samples, lite0, tmp_path / "features", engine=engine, info=info2,
                                     progress=False)
    assert hit2 and info2["engine"] == engine and np.array_equal(f, f2)


def test_cache_key_records_the_engine_and_keeps_torch_keys(samples, lite0, tmp_path):
    keys = {e: cache_key(samples, lite0, engine=e) for e in ("torch", "ort", "openvino")}
    assert len(set(keys.values())) == 3
    assert keys["torch"] == cache_key(samples, lite0)  # caches written before engines existed still hit
    assert cache_path(samples, lite0, tmp_path, engine="ort").name.startswith("efficientnet-lite0-ort-")
    assert cache_path(samples, lite0, tmp_path).name == f"efficientnet-lite0-{keys['torch']}.npz"


def test_a_trunk_that_disagrees_with_torch_falls_back_to_torch(samples, lite0, torch_features, tmp_path, caplog):
    """A wrong trunk file where the real one belongs (stale or damaged cache): the check catches it."""
    cache = tmp_path / "features"
    ff.export_trunk(build_backbone("efficientnet-lite0", "none"), ff.trunk_path(lite0, cache))
    info = {}
    with caplog.at_level(logging.WARNING):
        f, _, _, hit = cached_features(samples, lite0, cache, engine="auto", info=info, progress=False)
    assert not hit and info["engine"] == "torch"
    tried = [t["check"] for t in info["tried"]]
    assert [t["engine"] for t in tried] == ff.candidates("auto") and not any(t["passed"] for t in tried)
    assert all(t["min_cosine"] < ff.MIN_COSINE for t in tried)
    assert "not using it" in caplog.text and "extracting with torch" in caplog.text
    np.testing.assert_allclose(f, torch_features, rtol=1e-5, atol=1e-5)
    # the fallback's features are cached as torch's, which every engine choice then reuses
    assert info["cache"] == str(cache_path(samples, lite0, cache))
    info2 = {}
    _, _, _, hit2 = cached_features(samples, lite0, cache, engine="ort", info=info2, progress=False)
    assert hit2 and info2["engine"] == "torch"


def test_an_impossible_threshold_rejects_every_engine(samples, lite0, tmp_path):
    run, notes = ff.try_engines(samples[:4], lite0, ["ort"], cache_dir=tmp_path, threshold=1.0 + 1e-9,
                                progress=False)
    assert run is None and notes[0]["check"]["engine"] == "ort" and not notes[0]["check"]["passed"]


def test_unreadable_image_is_named_or_skipped(samples, lite0, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    mixed = samples[:3] + [Sample(str(bad), 0)] + samples[3:5]
    with pytest.raises(BadInput, match=r"broken\.jpg \| .*use --skip-bad"):
        cached_features(mixed, lite0, tmp_path / "a", engine="ort", progress=False)
    f, kept, skipped, _ = cached_features(mixed, lite0, tmp_path / "b", engine="ort", progress=False, skip_bad=True)
    assert kept.tolist() == [0, 1, 2, 4, 5] and len(skipped) == 1 and "broken.jpg" in skipped[0]
    assert f.shape == (5, 1280)


def test_engine_choice_is_checked():
    with pytest.raises(BadInput, match=r"--feature-engine int8 \| unknown: choose auto, torch, openvino, ort"):
        ff.candidates("int8")
    assert ff.candidates("torch") == []
    assert ff.candidates("auto") == [e for e in ff.ENGINE_ORDER if ff.engine_importable(e) is None]


def test_cosines():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    np.testing.assert_allclose(ff.cosines(a, b), [1.0, 1.0, -1.0])


def test_train_records_the_engine_and_its_check(grocery_root, tmp_path, capsys):
    from hashret.cli import main as cli
    from tests.test_train import _subset_csv

    csv = _subset_csv(grocery_root, tmp_path, per_class=2, classes=3)
    out = tmp_path / "run"
    assert cli(["train", "--data", str(csv), "--format", "csv", "--bits", "16", "--epochs", "2", "--batch-size", "4",
                "--feature-engine", "ort", "--cache-dir", str(tmp_path / "cache" / "features"), "--out", str(out),
                "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "features: ort engine" in printed and "per-image cosine with torch >=" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["features"]["engine"] == "ort" and m["features"]["check"]["min_cosine"] >= ff.MIN_COSINE
    assert m["feature_cache_hit"] is False
    assert json.loads((out / "manifest.json").read_text())["training"]["feature_engine"] == "ort"


def test_train_help_explains_the_feature_engine(capsys):
    from hashret.cli import main as cli

    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--feature-engine {auto,torch,openvino,ort}" in text
    assert "cosine >= 0.9999 each" in text and "(default: auto)" in text


def test_extract_bench_times_every_path_in_one_run_and_writes_the_bar(grocery_root, tmp_path):
    from benchmarks import extract_bench

    out = tmp_path / "extract.json"
    assert extract_bench.main(["--data", str(grocery_root), "--limit", "6", "--batch", "4", "--check-images", "3",
                               "--engines", "torch,ort", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "extract" and doc["config"]["backbone"] == "efficientnet-lite0"
    torch_row, ort_row = doc["results"]
    assert (torch_row["engine"], ort_row["engine"]) == ("torch", "ort")
    assert torch_row["images"] == ort_row["images"] == 6 and torch_row["seconds"] > 0
    assert ort_row["check_images"] == 3 and ort_row["check_passed"] and ort_row["all_min_cosine"] >= ff.MIN_COSINE
    # the engine's time covers its export, load and check too, not only the extraction
    assert ort_row["seconds"] >= ort_row["export_s"] + ort_row["check_s"] + ort_row["extract_s"] - 0.05
    assert ort_row["ratio_to_torch"] == pytest.approx(ort_row["seconds"] / torch_row["seconds"], abs=1e-3)
    (bar,) = doc["bars"]
    assert bar["met"] == (ort_row["ratio_to_torch"] <= extract_bench.RATIO_BAR) and "through ort" in bar["text"]
    assert extract_bench.default_out("efficientnet-lite0") == "benchmarks/results/extract-effnet-lite0.json"


def test_extract_bench_refuses_an_unknown_path(tmp_path, capsys):
    from benchmarks import extract_bench

    assert extract_bench.main(["--engines", "torch,int8", "--out", str(tmp_path / "x.json")]) == 2
    assert "--engines int8 | unknown" in capsys.readouterr().err

"""Fine-tuning the last block from a cache of its input, and the quality table (train/table.py)."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from torch import nn

from hashret.errors import BadInput, MissingArtifact
from hashret.images import PreprocessSpec, load_image
from hashret.manifest import load_manifest
from hashret.models import Backbone, _Pooled, build_backbone, load_encoder
from tests.test_train import _subset_csv, _train
from train import table
from train.features import cache_key, cached_features, extract


@pytest.fixture(scope="module")
def subset(grocery_root, tmp_path_factory):
    return _subset_csv(grocery_root, tmp_path_factory.mktemp("subset"), per_class=3, classes=6)


@pytest.mark.parametrize("name, weights, shape", [("efficientnet-lite0", "imagenet", (192, 7, 7)),
                                                   ("resnet50", "none", (2048, 7, 7))])
def test_stem_then_tail_is_the_backbone(name, weights, shape):
    bb = build_backbone(name, weights)
    bb.net.eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        mid = bb.stem(x)
        assert tuple(mid.shape[1:]) == shape
        assert torch.allclose(bb.tail(mid), bb.net(x), atol=1e-5)
    # the tail trains the very parameters the exported backbone holds
    held = {id(p) for p in bb.net.parameters()}
    assert {id(p) for p in bb.last_block.parameters()} <= held
    assert {id(p) for p in bb.last_block.parameters()} <= {id(p) for p in bb.tail.parameters()}


def test_block_cache_key_names_the_split_and_leaves_pooled_keys_alone(subset):
    from hashret.datasets import read_dataset

    samples = read_dataset(subset, "csv").database[:4]
    bb = build_backbone("efficientnet-lite0", "imagenet")
    pooled, block = cache_key(samples, bb), cache_key(samples, bb, "last-block")
    assert pooled == cache_key(samples, bb, "pooled") and block != pooled
    bb.split = "_blocks[-2]"
    assert cache_key(samples, bb) == pooled and cache_key(samples, bb, "last-block") != block


def test_block_inputs_are_cached_as_float16(subset, tmp_path):
    from hashret.datasets import read_dataset

    samples = read_dataset(subset, "csv").database[:3]
    bb = build_backbone("efficientnet-lite0", "imagenet")
    X, kept, _, hit = cached_features(samples, bb, tmp_path, at="last-block", progress=False)
    assert X.dtype == np.float16 and X.shape == (3, 192, 7, 7) and not hit and kept.tolist() == [0, 1, 2]
    X2, _, _, hit = cached_features(samples, bb, tmp_path, at="last-block", progress=False)
    assert hit and np.array_equal(X, X2)
    assert len(list(tmp_path.glob("efficientnet-lite0-last-block-*.npz"))) == 1
    # what the block sees equals the stem on the decoded images (float16 rounding aside)
    from hashret.models import Normalize

    imgs = torch.from_numpy(np.stack([load_image(s.path, bb.spec) for s in samples]))
    with torch.no_grad():
        ref = bb.stem(Normalize(bb.spec)(imgs)).numpy()
    assert np.allclose(X.astype(np.float32), ref, atol=2e-2, rtol=1e-2)


def test_a_backbone_without_a_split_is_refused_for_block_caching(subset):
    from hashret.datasets import read_dataset

    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    bb = Backbone("tiny", _Pooled(trunk), 4, PreprocessSpec(resize=32, crop=32), "none", trunk)
    with pytest.raises(BadInput, match=r"backbone tiny \| has no split before its last block: use --finetune none"):
        extract(read_dataset(subset, "csv").database[:1], bb, at="last-block", progress=False)


def test_finetune_trains_the_last_block_from_the_cache_and_serves_what_it_evaluated(subset, tmp_path):
    cache = tmp_path / "cache"
    assert _train(subset, tmp_path / "ft", cache, "--finetune", "last-block", "--finetune-epochs", "2",
                  "--epochs", "3", "--method", "csq") == 0
    assert len(list(cache.glob("efficientnet-lite0-last-block-*.npz"))) == 1
    m = load_manifest(tmp_path / "ft", "run")
    assert m["training"]["finetune"] == "last-block" and m["training"]["finetune_epochs"] == 2
    base = build_backbone("efficientnet-lite0", "imagenet")
    enc, _ = load_encoder(tmp_path / "ft")
    tm, bm = enc.backbone.trunk.m, base.net.trunk.m
    assert not torch.equal(tm._blocks[-1]._expand_conv.weight, bm._blocks[-1]._expand_conv.weight)
    assert not torch.equal(tm._conv_head.weight, bm._conv_head.weight)
    assert torch.equal(tm._blocks[-2]._expand_conv.weight, bm._blocks[-2]._expand_conv.weight)  # the rest did not move
    # The saved encoder on images gives the codes the run was evaluated with (those came from the cache).
    from hashret.codes import pack
    from hashret.datasets import read_dataset
    from hashret.metrics import evaluate

    s = read_dataset(subset, "csv")
    with torch.no_grad():
        Zq = enc(torch.from_numpy(np.stack([load_image(x.path, enc.spec) for x in s.query]))).numpy()
        Zd = enc(torch.from_numpy(np.stack([load_image(x.path, enc.spec) for x in s.database]))).numpy()
    served = evaluate(pack(Zq), pack(Zd), np.array([x.label for x in s.query]), np.array([x.label for x in s.database]))
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert abs(served["mAP@all"] - metrics["mAP@all"]) < 0.02
    assert metrics["timing_s"]["finetune"] > 0
    # a second run reads the block cache instead of decoding the images again
    assert _train(subset, tmp_path / "ft2", cache, "--finetune", "last-block", "--finetune-epochs", "1",
                  "--epochs", "2") == 0
    assert len(list(cache.glob("efficientnet-lite0-last-block-*.npz"))) == 1


# ----------------------------------------------------------------------------- the quality table
def _runs():
    runs = []
    for method, base in (("dch", 0.79), ("csq", 0.81)):
        for seed, d in enumerate((0.0, 0.004, -0.002)):
            runs.append({"method": method, "bits": 64, "seed": seed, "mAP@all": base + d, "mAP@10": base - 0.03 + d,
                         "mAP@all(tie-aware)": base + d - 0.001, "head_seconds": 10.0 + seed})
    return runs


def test_summarize_is_mean_and_sample_std_per_cell_and_leaves_unmeasured_columns_out():
    rows = table.summarize(_runs())
    assert [(r["method"], r["bits"], r["seeds"]) for r in rows] == [("dch", 64, [0, 1, 2]), ("csq", 64, [0, 1, 2])]
    csq = rows[1]
    values = [0.81, 0.814, 0.808]
    assert csq["mAP@all"]["mean"] == pytest.approx(statistics.fmean(values))
    assert csq["mAP@all"]["std"] == pytest.approx(statistics.stdev(values))  # ddof=1, not the population std
    assert "mAP@all(rerank)" not in csq and "mAP@10(rerank)" not in csq
    assert table.best_method(rows, 64) == "csq" and table.best_method(rows, 32) is None


def test_a_column_only_some_seeds_report_is_not_averaged():
    runs = _runs()
    runs[0]["mAP@all(rerank)"] = 0.9
    assert "mAP@all(rerank)" not in table.summarize(runs)[0]


def test_render_and_readme_update(tmp_path):
    t = {"rows": table.summarize(_runs()), "seeds": [0, 1, 2], "command": "python -m train.table",
         "created": "2026-11-30T00:00:00+00:00", "machine": {"cores": 2, "cpu": "x", "torch_threads": 2},
         "versions": {"git_commit": "abcdef1234567"}}
    md = table.render_markdown(t)
    lines = md.splitlines()
    assert lines[0].startswith("| backbone | method | bits | mAP@all | mAP@10 | tie-aware mAP@all | rerank mAP@all | "
                               "rerank mAP@10 |")
    assert lines[3].startswith("| efficientnet-lite0 | csq | 64 | 0.8107 ± 0.0031 | 0.7807 ± 0.0031 |")
    assert "| n/a | n/a |" in lines[3]
    assert "Not measured in this table: rerank mAP@all, rerank mAP@10" in md and "**csq**" in md
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.TABLE_BEGIN}\nstale\n{table.TABLE_END}\nafter\n")
    table.update_readme(readme, md)
    table.update_readme(readme, md)  # idempotent
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\nafter\n") and "stale" not in text and text.count(md) == 1
    # --from-json renders an existing table without training
    (tmp_path / "t.json").write_text(json.dumps(t))
    assert table.main(["--from-json", "--out", str(tmp_path / "t.json"), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


@pytest.mark.parametrize("content, match", [
    ("no markers here\n", r"needs exactly one <!-- train_table:begin --> followed by one <!-- train_table:end -->"),
    (f"{table.TABLE_END}\n{table.TABLE_BEGIN}\n", r"needs exactly one"),
])
def test_readme_without_markers_is_refused(tmp_path, content, match):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    with pytest.raises(BadInput, match=match):
        table.update_readme(readme, "| x |")
    assert readme.read_text() == content


def test_from_json_names_a_missing_or_bad_table(tmp_path):
    with pytest.raises(MissingArtifact, match=r"no table there: run python -m train.table first"):
        table.load_table(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"rows": [{"x": 1}]}')
    with pytest.raises(BadInput, match=r"has no rows of method/bits cells"):
        table.load_table(tmp_path / "bad.json")


def test_table_runs_train_per_seed_and_writes_its_json(subset, tmp_path, monkeypatch):
    monkeypatch.setenv("HASHRET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "table.json"
    assert table.main(["--data", str(subset), "--format", "csv", "--bits", "16", "--methods", "dch",
                       "--repeats", "2", "--epochs", "2", "--out", str(out), "--keep-runs", str(tmp_path / "runs"),
                       "--backbones", "efficientnet-lite0"]) == 0
    t = json.loads(out.read_text())
    assert t["seeds"] == [0, 1] and t["machine"]["cores"] >= 1 and t["versions"]["git_commit"]
    assert t["command"].startswith("python -m train.table --data")
    assert [(r["method"], r["bits"], r["seed"]) for r in t["runs"]] == [("dch", 16, 0), ("dch", 16, 1)]
    for r in t["runs"]:  # each run's numbers are that run folder's metrics
        m = json.loads((tmp_path / "runs" / f"dch16-s{r['seed']}" / "metrics.json").read_text())
        assert r["mAP@all"] == m["mAP@all"] and r["mAP@all(tie-aware)"] == m["mAP@all(tie-aware)"]
    row = t["rows"][0]
    assert row["mAP@10"]["mean"] == pytest.approx(statistics.fmean(r["mAP@10"] for r in t["runs"]))
    # a stopped table carries on from the runs it kept; other settings retrain
    assert table.main(["--data", str(subset), "--format", "csv", "--bits", "16", "--methods", "dch",
                       "--repeats", "2", "--epochs", "2", "--out", str(out), "--keep-runs", str(tmp_path / "runs"),
                       "--backbones", "efficientnet-lite0"]) == 0
    again = json.loads(out.read_text())
    assert all(r.get("resumed") for r in again["runs"]) and again["rows"][0]["mAP@all"] == row["mAP@all"]
    assert table.main(["--data", str(subset), "--format", "csv", "--bits", "16", "--methods", "dch",
                       "--repeats", "1", "--epochs", "3", "--out", str(out), "--keep-runs", str(tmp_path / "runs"),
                       "--backbones", "efficientnet-lite0"]) == 0
    assert not json.loads(out.read_text())["runs"][0].get("resumed")


def test_table_refuses_bad_arguments_before_training(tmp_path, capsys):
    assert table.main(["--bits", "12", "--out", str(tmp_path / "t.json")]) == 2
    assert "--bits" in capsys.readouterr().err
    assert table.main(["--repeats", "0", "--out", str(tmp_path / "t.json")]) == 2
    assert "--repeats 0 | needs at least one seed" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_readme_table_is_the_rendering_of_the_committed_json():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    t = table.load_table(root / "benchmarks" / "results" / "train_table.json")
    text = (root / "README.md").read_text()
    inside = text.split(table.TABLE_BEGIN)[1].split(table.TABLE_END)[0]
    assert inside.strip() == table.render_markdown(t).strip(), "re-run python -m train.table --from-json --readme README.md"
    assert {(r["method"], r["bits"]) for r in t["rows"]} == {(m, b) for m in ("hashnet", "dch", "csq") for b in (16, 32, 64)}
    assert all(r["seeds"] == [0, 1, 2] for r in t["rows"])

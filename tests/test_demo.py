"""`hashret demo` end to end on a small Grocery subset with the real gRPC server, its re-run
reuse, and the paths taken without data: no download allowed, the download failing, and the
archive being unpacked."""
from __future__ import annotations

import json
import time
import zipfile

import pytest

from hashret.cli import main as cli

LIMIT = 24  # images per split (spread over the classes)


def _demo(*argv) -> int:
    return cli(["demo", *map(str, argv)])


@pytest.fixture
def no_env_data(monkeypatch):
    monkeypatch.delenv("HASHRET_DATA", raising=False)
    monkeypatch.delenv("HASHRET_GROCERY_URL", raising=False)
    monkeypatch.delenv("HASHRET_NO_DOWNLOAD", raising=False)


@pytest.mark.data
@pytest.mark.slow
def test_demo_small_subset_end_to_end(grocery_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HASHRET_CACHE", str(tmp_path / "cache"))  # hermetic feature cache
    work = tmp_path / "work"
    argv = ["--data", grocery_root, "--workdir", work, "--limit", LIMIT, "--queries", LIMIT, "--epochs", 3,
            "--bits", 32, "--formats", "onnx", "--exporter", "legacy", "--parity", 0, "--sheet", 6]
    assert _demo(*argv) == 0
    out = capsys.readouterr().out
    for line in ("[1/8] data", "[8/8] report", "mAP@10", "p50", "p99", "top-1", "top-5"):
        assert line in out

    s = json.loads((work / "summary.json").read_text())
    r, shop = s["retrieval"], s["snap_to_shop"]
    assert r["queries"] == LIMIT and r["failed"] == 0
    assert 0.0 <= r["mAP@10"] <= 1.0
    # served codes are the run's codes: the served mAP@10 equals the offline one up to tie order
    assert abs(r["mAP@10"] - s["offline"]["mAP@10"]) < 0.05
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert shop["queries"] == LIMIT and shop["failed"] == 0
    assert 0.0 <= shop["top1"] <= shop["top5"] <= 1.0
    assert s["examples"] and len(s["examples"][0]["hits"]) == 5
    assert set(s["steps"]) >= {"train", "export", "index", "index-iconic", "serve+query", "snap-to-shop"}
    assert not any(v["reused"] for v in s["steps"].values())

    page = (work / "demo.html").read_text()
    assert page.count("<img ") >= 2 * 6 * 2  # 6 sheet queries + their hits, in both sections
    assert "data:image/jpeg;base64," in page
    assert len((work / "queries.jsonl").read_text().splitlines()) == LIMIT

    # a re-run reuses every finished step and only serves and queries again
    assert _demo(*argv) == 0
    s2 = json.loads((work / "summary.json").read_text())
    assert all(s2["steps"][k]["reused"] for k in ("train", "export", "index", "index-iconic"))
    assert s2["retrieval"]["mAP@10"] == r["mAP@10"] and s2["snap_to_shop"]["top5"] == shop["top5"]
    assert "train reused" in capsys.readouterr().out


def test_no_data_and_no_download_fails_fast_with_instructions(tmp_path, no_env_data, monkeypatch, capsys):
    monkeypatch.setenv("HASHRET_NO_DOWNLOAD", "1")
    empty = tmp_path / "empty"
    empty.mkdir()
    t = time.monotonic()
    assert _demo("--data", empty, "--workdir", tmp_path / "work") == 2
    assert time.monotonic() - t < 30
    err = capsys.readouterr().err
    assert "GroceryStoreDataset" in err and "git clone" in err
    assert "--data" in err and "HASHRET_DATA" in err
    assert list(empty.iterdir()) == []


def test_download_failure_is_exit_2_with_instructions(tmp_path, no_env_data, monkeypatch, capsys):
    monkeypatch.setenv("HASHRET_GROCERY_URL", "http://127.0.0.1:9/GroceryStoreDataset.zip")  # nothing listens
    empty = tmp_path / "empty"
    t = time.monotonic()
    assert _demo("--data", empty, "--workdir", tmp_path / "work", "--download-timeout", 3) == 2
    assert time.monotonic() - t < 30
    captured = capsys.readouterr()
    assert "downloading GroceryStoreDataset" in captured.out
    assert "download from" in captured.err and "git clone" in captured.err


def test_download_unpacks_the_archive(tmp_path, no_env_data, monkeypatch):
    from serve.demo import download_grocery

    archive = tmp_path / "master.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("GroceryStoreDataset-master/dataset/train.txt", "train/a.jpg, 0, 0\n")
        z.writestr("GroceryStoreDataset-master/dataset/classes.csv", "header\n")
        z.writestr("GroceryStoreDataset-master/LICENSE", "license\n")
    monkeypatch.setenv("HASHRET_GROCERY_URL", archive.as_uri())
    target = download_grocery(tmp_path / "grocery")
    assert (target / "dataset" / "train.txt").is_file() and (target / "LICENSE").is_file()
    assert sorted(p.name for p in target.iterdir()) == ["LICENSE", "dataset"]


def test_bad_options_are_exit_2(tmp_path, capsys):
    assert _demo("--workdir", tmp_path, "--limit", 0) == 2
    assert "--limit" in capsys.readouterr().err

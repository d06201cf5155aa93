"""`hashret demo` end to end on a small Grocery subset with the real gRPC server, its re-run
reuse, and the paths taken without data: no download allowed, the download failing, and the
archive being unpacked; then the demo's own parts: its flags, the reuse ledger and the scores of
served answers."""
from __future__ import annotations

import json
import time
import zipfile

import pytest

from hashret.cli import main as cli

LIMIT = 24  # images per split (spread over the classes)
HANG_S = 120  # past this a step that should fail fast is hung; its speed is never asserted


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
            "--bits", 32, "--formats", "onnx", "--exporter", "legacy", "--parity", 0, "--sheet", 6,
            "--results", tmp_path / "results.json"]
    assert _demo(*argv) == 0
    out = capsys.readouterr().out
    for line in ("[1/8] data", "[8/8] report", "mAP@10", "p50", "p99", "top-1", "top-5"):
        assert line in out

    s = json.loads((work / "summary.json").read_text())
    r, shop = s["retrieval"], s["snap_to_shop"]
    assert r["queries"] == LIMIT and r["failed"] == 0
    assert 0.0 <= r["mAP@10"] <= 1.0
    # served codes are the run's codes: served Hamming mAP@10 equals the training run's offline one
    # (torch codes; the ONNX export agrees on every bit of these queries and the ranking breaks ties
    # the same way), so any difference is a serving or export defect
    assert r["binary"]["mAP@10"] == pytest.approx(s["offline"]["mAP@10"], abs=1e-9)
    # re-ranked by default; the same queries in Hamming order too; both equal to what the gallery's
    # stored codes and activations give offline with the same engine
    same = r["offline_same_engine"]
    assert r["binary"]["queries"] == LIMIT and r["binary"]["failed"] == 0
    assert r["mAP@10"] == pytest.approx(same["mAP@10(rerank)"], abs=1e-9)
    assert r["binary"]["mAP@10"] == pytest.approx(same["mAP@10"], abs=1e-9)
    assert "mAP@10(rerank)" in s["offline"] and "re-rank    served mAP@10" in out and "equals offline" in out
    # the hits the demo shows are ordered by their cosine score, not by gallery insertion order
    lines = [ln for ln in out.splitlines() if " d=" in ln and "cos=" in ln]
    assert lines, out[-2000:]
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    # --results: the same summary with the code that made it, as benchmarks/results/ files carry it
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["summary"] == s and res["git_describe"] == s["code"]["git_describe"] and res["allow_dirty"] is False
    assert (res["diff_sha256"] is not None) == bool(res["dirty"])
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
    # a hang bound, not a speed check: refusing takes well under a second, so only a demo that
    # went on to wait for something (a download, a lock) gets near 120 s
    assert time.monotonic() - t < HANG_S
    err = capsys.readouterr().err
    assert "GroceryStoreDataset" in err and "git clone" in err
    assert "--data" in err and "HASHRET_DATA" in err
    assert list(empty.iterdir()) == []


def test_download_failure_is_exit_2_with_instructions(tmp_path, no_env_data, monkeypatch, capsys):
    monkeypatch.setenv("HASHRET_GROCERY_URL", "http://127.0.0.1:9/GroceryStoreDataset.zip")  # nothing listens
    empty = tmp_path / "empty"
    t = time.monotonic()
    assert _demo("--data", empty, "--workdir", tmp_path / "work", "--download-timeout", 3) == 2
    assert time.monotonic() - t < HANG_S  # a hang bound: a download that ignored --download-timeout
    captured = capsys.readouterr()
    assert "downloading GroceryStoreDataset" in captured.out
    assert "download from" in captured.err and "git clone" in captured.err


def test_download_unpacks_the_archive(tmp_path, no_env_data, monkeypatch):
    from demo.data import download_grocery

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


# ----------------------------------------------------------------------------- the demo's parts
DEMO_FLAGS = ["--data", "--workdir", "--fresh", "--limit", "--download-timeout", "--backbone", "--method", "--bits",
              "--epochs", "--seed", "--formats", "--exporter", "--parity", "--backend", "--queries", "--concurrency",
              "--sheet", "--examples"]


def test_help_keeps_every_flag_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        _demo("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in DEMO_FLAGS:
        assert f"  {flag}" in out, flag
    assert "--format " not in out and "--device" not in out  # the demo reads Grocery and serves on the CPU
    from hashret.cli import build_parser

    args = build_parser("demo").parse_args(["demo"])
    assert (args.backend, args.method, args.bits, args.epochs, args.formats, args.sheet, args.workdir) == (
        "ort", "csq", 64, 60, "onnx,onnx-int8", 40, "hashret-demo")
    assert args._module == "demo.cli"


def _hit(id_, label, d=0):
    from serve.client import Hit

    return Hit(id_, d, {"label": str(label)} if label is not None else {})


def test_served_scores_from_answers():
    from demo.queries import Answer, accuracy_scores, retrieval_scores

    answers = [
        Answer("q0", 1, hits=[_hit("a", 2), _hit("b", 1), _hit("c", 1)]),  # AP (1/2 + 2/3) / 2
        Answer("q1", 3, hits=[_hit("a", 3)]),  # one hit only (a gallery smaller than k): AP 1
        Answer("q2", 4, hits=[_hit("a", None), _hit("b", 5)]),  # a hit without a label is a miss
        Answer("q3", 1, error="UNAVAILABLE: down"),  # counted as failed, not in the means
    ]
    r = retrieval_scores(answers, k=3)
    assert r["queries"] == 4 and r["failed"] == 1
    assert r["mAP@3"] == pytest.approx(((0.5 + 2 / 3) / 2 + 1 + 0) / 3)
    assert r["precision@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert r["top1"] == pytest.approx(1 / 3)
    a = accuracy_scores(answers, k=2)
    assert a["top1"] == pytest.approx(1 / 3) and a["top2"] == pytest.approx(2 / 3) and a["failed"] == 1
    nothing = retrieval_scores([Answer("q", 1, error="x")], k=3)
    assert nothing["failed"] == 1 and nothing["mAP@3"] != nothing["mAP@3"]  # NaN: no answered query


def test_ledger_reuses_only_unchanged_finished_steps(tmp_path, capsys):
    from demo.ledger import Ledger

    out = tmp_path / "out"
    built = []

    def build():
        out.mkdir()
        (out / "x").write_text(str(len(built)))
        built.append(1)

    Ledger(tmp_path, 1, fresh=False).make("s", "a step", {"p": 1}, out, [out / "x"], build)
    Ledger(tmp_path, 1, fresh=False).make("s", "a step", {"p": 1}, out, [out / "x"], build)
    assert len(built) == 1 and "s reused" in capsys.readouterr().out
    Ledger(tmp_path, 1, fresh=False).make("s", "a step", {"p": 2}, out, [out / "x"], build)  # options changed
    Ledger(tmp_path, 1, fresh=True).make("s", "a step", {"p": 2}, out, [out / "x"], build)  # --fresh
    assert len(built) == 3 and (out / "x").read_text() == "2"

    def broken():  # dies after writing the output file: a half-made folder that looks finished
        out.mkdir()
        (out / "x").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        Ledger(tmp_path, 1, fresh=False).make("s", "a step", {"p": 3}, out, [out / "x"], broken)
    # the interrupted step is forgotten, so going back to the old options rebuilds rather than
    # taking the half-made folder for the old finished one
    assert "s" not in json.loads((tmp_path / "steps.json").read_text())
    Ledger(tmp_path, 1, fresh=False).make("s", "a step", {"p": 2}, out, [out / "x"], build)
    assert len(built) == 4 and (out / "x").read_text() == "3"

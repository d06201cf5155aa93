"""Which code produced a result (hashret.provenance), and the refusal to write committed results
from a checkout with uncommitted edits: `hashret bench`, `python -m benchmarks.X`,
`python -m train.table` and `hashret demo --results`.

The checkouts are real git repositories made in a temp folder; hashret.provenance.RESULTS_DIR is
pointed at one so the refusal can be seen whether or not this checkout is clean.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from hashret import provenance
from hashret.errors import BadInput

SEARCH = ["search", "--sizes", "300", "--queries", "5", "--k", "5", "--kinds", "numpy", "--warmup", "0",
          "--batch-repeats", "1"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """A git checkout with one commit: code.py and benchmarks/results/old.json."""
    r = tmp_path / "repo"
    (r / "benchmarks" / "results").mkdir(parents=True)
    git(r, "init", "-q")
    git(r, "config", "user.email", "t@example.com")
    git(r, "config", "user.name", "t")
    (r / "code.py").write_text("x = 1\n")
    (r / "benchmarks" / "results" / "old.json").write_text("{}\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "one")
    return r


@pytest.fixture
def dirty_results(repo, monkeypatch) -> Path:
    """RESULTS_DIR of a checkout whose tracked code.py has an uncommitted edit."""
    (repo / "code.py").write_text("x = 2\n")
    monkeypatch.setattr(provenance, "RESULTS_DIR", repo / "benchmarks" / "results")
    return repo / "benchmarks" / "results"


def test_clean_checkout(repo):
    p = provenance.git_provenance(repo)
    head = git(repo, "rev-parse", "HEAD").strip()
    assert p == {"git_commit": head, "git_describe": head[:12], "dirty": False, "diff_sha256": None, "dirty_files": []}
    (repo / "scratch.txt").write_text("untracked files are not the code that ran\n")
    assert provenance.git_provenance(repo)["dirty"] is False


def test_dirty_checkout_records_the_diff_hash(repo):
    (repo / "code.py").write_text("x = 2\n")
    p = provenance.git_provenance(repo)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=repo, check=True, capture_output=True).stdout
    assert p["dirty"] is True and p["git_describe"].endswith("-dirty") and p["dirty_files"] == ["code.py"]
    assert p["diff_sha256"] == hashlib.sha256(diff).hexdigest()
    (repo / "code.py").write_text("x = 3\n")  # other uncommitted code, another hash
    assert provenance.git_provenance(repo)["diff_sha256"] not in (None, p["diff_sha256"])
    git(repo, "add", "code.py")  # staged edits are still not the commit
    assert provenance.git_provenance(repo)["dirty"] is True


def test_outside_a_checkout_everything_is_unknown(tmp_path):
    p = provenance.git_provenance(tmp_path)
    assert p == {"git_commit": None, "git_describe": None, "dirty": None, "diff_sha256": None, "dirty_files": []}


def test_dirty_write_into_results_is_refused_unless_allowed(dirty_results, tmp_path):
    with pytest.raises(BadInput, match=r"uncommitted changes to 1 tracked file\(s\) \(code\.py\).*--allow-dirty"):
        provenance.check_results_write(dirty_results / "new.json")
    provenance.check_results_write(dirty_results / "new.json", allow_dirty=True)
    provenance.check_results_write(tmp_path / "elsewhere.json")  # a scratch file: anything goes
    provenance.check_results_write(None)


def test_clean_write_into_results_goes_ahead(repo, monkeypatch):
    monkeypatch.setattr(provenance, "RESULTS_DIR", repo / "benchmarks" / "results")
    provenance.check_results_write(repo / "benchmarks" / "results" / "new.json")


def test_hashret_bench_refuses_before_running_and_allow_dirty_is_recorded(dirty_results, capsys):
    from hashret.cli import main

    out = dirty_results / "search.json"
    assert main(["bench", *SEARCH, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "uncommitted changes to 1 tracked file(s)" in err and "--allow-dirty" in err, err
    assert not out.exists()

    assert main(["bench", *SEARCH, "--out", str(out), "--allow-dirty"]) == 0
    doc = json.loads(out.read_text())
    # what is recorded is this checkout's own state (the code that ran), with the allowance
    here = provenance.git_provenance()
    assert doc["allow_dirty"] is True
    assert (doc["git_commit"], doc["git_describe"], doc["dirty"]) == (here["git_commit"], here["git_describe"],
                                                                      here["dirty"])
    assert (doc["diff_sha256"] is None) == (not doc["dirty"])


def test_standalone_benchmark_refuses_too(dirty_results, capsys):
    from benchmarks import cli

    assert cli.main([*SEARCH, "--out", str(dirty_results / "s.json")]) == 2
    assert "--allow-dirty" in capsys.readouterr().err


def test_every_result_writing_benchmark_has_the_flag():
    import argparse

    from benchmarks import cli

    p = argparse.ArgumentParser()
    cli.add_args(p)
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    writers = {name for name, sp in sub.choices.items() if any(a.dest == "out" for a in sp._actions)}
    flagged = {name for name, sp in sub.choices.items() if any(a.dest == "allow_dirty" for a in sp._actions)}
    assert writers - {"report"} <= flagged and "search" in flagged and "snapshot" in flagged
    from benchmarks import soak

    assert any(a.dest == "allow_dirty" for a in soak.build_parser()._actions)


def test_write_result_fills_in_provenance(tmp_path):
    from benchmarks import machine

    path = machine.write_result({"benchmark": "x"}, tmp_path / "x.json")
    doc = json.loads(path.read_text())
    assert set(machine.PROVENANCE_KEYS) <= set(doc) and doc["allow_dirty"] is False


def test_train_table_refuses_before_training(dirty_results, capsys):
    from train.table import main

    assert main(["--out", str(dirty_results / "train_table.json"), "--bits", "16", "--repeats", "1"]) == 2
    assert "--allow-dirty" in capsys.readouterr().err


def test_demo_results_file_refused_before_anything_runs(dirty_results, tmp_path, capsys):
    from hashret.cli import main

    assert main(["demo", "--data", str(tmp_path / "nothing"), "--workdir", str(tmp_path / "w"),
                 "--results", str(dirty_results / "demo.json")]) == 2
    assert "--allow-dirty" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()

"""README.md's generated blocks and benchmarks/RESULTS.md match the results JSONs they come from.

Every figure between `<!-- gen:NAME begin -->` and its end marker (and the quality table between
train.table's markers) is rendered by benchmarks/report.py from benchmarks/results/*.json; a
number edited by hand, or a JSON re-run without `hashret bench report`, fails here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    """README, results folder and RESULTS.md copied into tmp_path, laid out as in the repo."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copytree(RESULTS, tmp_path / "benchmarks" / "results")
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", tmp_path / "benchmarks" / "RESULTS.md")
    return tmp_path / "README.md", tmp_path / "benchmarks" / "results", tmp_path / "benchmarks" / "RESULTS.md"


def _body(readme: Path, name: str) -> str:
    text = readme.read_text()
    begin, end = report.BLOCKS[name].markers
    return text[text.index(begin):text.index(end)]


def test_generated_blocks_and_results_page_match_their_json():
    problems = report.check(ROOT / "README.md", RESULTS, ROOT / "benchmarks" / "RESULTS.md")
    assert problems == [], "\n\n".join(problems) + "\n\nregenerate with `hashret bench report`"


def test_every_block_is_in_the_readme_and_names_existing_renderers():
    text = (ROOT / "README.md").read_text()
    assert {"train_table", "train_reading", "demo", "export_parity", "headline"} <= set(report.BLOCKS)
    for block in report.BLOCKS.values():
        begin, end = block.markers
        assert text.count(begin) == 1 and text.count(end) == 1, block.name


def _cell(d):  # one quality-table cell as train.table renders it
    c = d["rows"][8]["mAP@all"]
    return f"{c['mean']:.4f} ± {c['std']:.4f}"


# (file, edit, block, the text before, the text after): both texts are read from the committed JSON,
# so the test keeps working when the results are re-run
@pytest.mark.parametrize("file, edit, block, old, new", [
    # the FAISS flat bar in the headline table
    ("search-flat-1m.json", lambda d: d["bars"][0].update(measured_p50_ms=9.5123), "headline",
     lambda d: f"{d['bars'][0]['measured_p50_ms']:.2f} ms p50", lambda d: "9.51 ms p50"),
    # one cell of the quality table (train.table's own renderer and markers)
    ("train_table.json", lambda d: d["rows"][8]["mAP@all"].update(mean=0.9001), "train_table", _cell, _cell),
    # the demo paragraph
    ("demo-csq64-summary.json", lambda d: d["summary"]["snap_to_shop"].update(top1=0.0123), "demo",
     lambda d: f"top-1 {d['summary']['snap_to_shop']['top1']:.2f}", lambda d: "top-1 0.01"),
])
def test_a_changed_json_number_fails_the_check_until_regenerated(tmp_path, file, edit, block, old, new):
    readme, results, results_md = _copy(tmp_path)
    assert report.check(readme, results, results_md) == []
    doc = json.loads((results / file).read_text())
    old = old(doc)
    edit(doc)
    new = new(doc)
    assert new != old
    (results / file).write_text(json.dumps(doc))

    problems = report.check(readme, results, results_md)
    assert any(f"block {block} |" in p for p in problems), problems
    assert any(p.startswith(f"{results_md} | differs") for p in problems), problems
    assert old in _body(readme, block) and new not in _body(readme, block)

    report.write_readme(readme, results)
    report.generate(results, results_md, plots=False)
    assert report.check(readme, results, results_md) == []
    assert new in _body(readme, block) and old not in _body(readme, block)


def test_a_hand_edit_inside_a_block_fails_and_the_cli_exits_1(tmp_path, capsys):
    readme, results, results_md = _copy(tmp_path)
    text = readme.read_text()
    begin, end = report.BLOCKS["headline"].markers
    body = text[text.index(begin):text.index(end)]
    readme.write_text(text.replace(body, body.replace("search.json", "search-by-hand.json", 1)))
    args = ["--results", str(results), "--readme", str(readme), "--out", str(results_md), "--check"]
    assert report.main(args) == 1
    assert "block headline | differs" in capsys.readouterr().err


def test_a_missing_block_or_broken_markers_are_reported(tmp_path):
    from hashret.errors import BadInput

    readme, results, _ = _copy(tmp_path)
    text = readme.read_text()
    begin, end = report.BLOCKS["demo"].markers
    readme.write_text(text.replace(begin, "").replace(end, ""))
    assert any("block demo | markers" in p for p in report.check(readme, results, None))
    readme.write_text(text.replace(end, ""))
    with pytest.raises(BadInput, match="needs exactly one <!-- gen:demo begin -->"):
        report.check(readme, results, None)


def test_a_missing_results_file_renders_the_command_that_writes_it(tmp_path):
    _, results, _ = _copy(tmp_path)
    (results / "demo-csq64-summary.json").unlink()
    text = report.render_block(report.BLOCKS["demo"], results)
    assert text.startswith("_Not measured yet:") and "demo-csq64-summary.json" in text


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def history():
    try:
        last = _git("log", "-1", "--format=%H", "--", "benchmarks/search.py")
        before = _git("rev-parse", f"{last}~1")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git history of this checkout")
    if not last:
        pytest.skip("benchmarks/search.py has no commit in this checkout")
    return last, before, _git("rev-parse", "HEAD")


def test_freshness_flags_results_older_than_their_benchmark_code(history):
    _, before, head = history
    doc = {"benchmark": "search", "versions": {"git_commit": before}}
    f = report.freshness(Path("search.json"), doc)
    assert f["stale"] is True and "benchmarks/search.py changed in" in f["why"]
    assert report.freshness(Path("s.json"), {"benchmark": "search", "versions": {"git_commit": head}})["stale"] is False
    unknown = report.freshness(Path("s.json"), {"benchmark": "search", "versions": {"git_commit": "0" * 40}})
    assert unknown["stale"] is True and "unknown to git" in unknown["why"]
    assert report.freshness(Path("s.json"), {"benchmark": "search"})["why"] == "records no commit"


def test_commit_label_prefers_describe_and_shows_dirty():
    doc = {"git_commit": "a" * 40, "git_describe": "v0.1-3-gaaaaaaa", "dirty": True}
    assert report.commit_label(doc) == "v0.1-3-gaaaaaaa plus uncommitted changes"
    assert report.commit_label({"versions": {"git_commit": "b" * 40}}) == "b" * 10
    assert report.commit_label({"git_describe": "e9138dc067d8-dirty", "dirty": True}) == \
        "e9138dc067d8 plus uncommitted changes"

"""An export format added from outside the export stage is one build function plus its row.

The format below lives only in this file: model.tagged.onnx, a copy of model.onnx carrying the
run's bits, the source model's sha256 and a note from its own flag as ONNX metadata. Registered
for the length of a test, it must show up in `hashret export --help` (the --formats list, the
formats table and its flag), be built by the real `hashret export` path, land in EXP with its
sha256 in the manifest, and pass `hashret check`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import formats as F
from hashret.cli import main
from hashret.errors import BadInput
from hashret.fsutil import atomic_write, sha256_file
from tests.test_export import make_run, small_csv

NAME, FILE = "test-tagged", "model.tagged.onnx"


def add_tag_args(p) -> None:
    g = F.arg_group(p, "tagged ONNX (test plug-in)")
    g.add_argument("--tag-note", default="plug-in", metavar="TEXT",
                   help="note stored in model.tagged.onnx's metadata (default: plug-in)")


def check_tag_args(args) -> None:
    if not args.tag_note.strip():
        raise BadInput("--tag-note | is empty: pass a short note, or leave the flag out")


def build_tagged(job, out: Path) -> dict:
    import onnx

    src = job.path("model.onnx")
    model = onnx.load(str(src))
    tags = {"hashret.bits": str(job.bits), "hashret.source_sha256": sha256_file(src),
            "hashret.note": job.args.tag_note}
    for key, value in tags.items():
        model.metadata_props.add(key=key, value=value)
    data = model.SerializeToString()
    atomic_write(out, lambda f: f.write(data))
    return {"tags": tags}


ROW = F.Format(NAME, FILE, False, "fp32", "model.onnx tagged with its bits and source sha256 (test plug-in)",
               ("ort",), ("onnx",), ("onnx",), pip="onnx", step="tagging model.onnx", build=build_tagged,
               add_args=add_tag_args, check_args=check_tag_args)


@pytest.fixture()
def plugin_format():
    F.register_format(ROW)
    try:
        yield ROW
    finally:
        F.FORMATS.unregister(NAME)
    assert NAME not in F.FORMATS


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("plugin-format")
    return make_run(base / "run", small_csv(base / "data"))


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_the_plugin_only_while_registered(plugin_format, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens too, which would split the name
    text = _help(capsys)
    assert f"comma-separated formats among onnx, onnx-int8, onnx-fp16, tensorrt, triton, {NAME}," in text
    assert f"{NAME} {FILE} fp32 model.onnx tagged with its bits and source sha256 (test plug-in)" in text
    assert "--tag-note TEXT note stored in model.tagged.onnx's metadata (default: plug-in)" in text
    F.FORMATS.unregister(NAME)
    try:
        text = _help(capsys)
        assert NAME not in text and FILE not in text and "--tag-note" not in text
    finally:
        F.register_format(ROW)


def test_register_refuses_a_row_built_from_an_unknown_format():
    with pytest.raises(ValueError, match="built from"):
        F.register_format(F.Format("orphan", "x.bin", False, "fp32", "", (), after=("coreml",), build=build_tagged))
    assert "orphan" not in F.FORMATS


def test_export_builds_the_plugin_through_the_cli(plugin_format, small_run, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main(["export", str(small_run), "--formats", f"onnx,{NAME}", "--out", str(exp), "--golden", "8",
                 "--no-parity", "--tag-note", "from the test"]) == 0
    out = capsys.readouterr().out
    assert f"[2/4] {NAME}: tagging model.onnx" in out
    m = json.loads((exp / "manifest.json").read_text())
    assert m["export"]["files"][FILE] == {"sha256": sha256_file(exp / FILE), "size": (exp / FILE).stat().st_size}
    assert list(m["export"]["formats"]) == ["onnx", NAME]
    tags = m["export"]["formats"][NAME]["tags"]
    assert tags == {"hashret.bits": "32", "hashret.source_sha256": sha256_file(exp / "model.onnx"),
                    "hashret.note": "from the test"}

    import onnx

    model = onnx.load(str(exp / FILE))
    assert {p.key: p.value for p in model.metadata_props} == tags
    assert main(["check", str(exp)]) == 0  # re-hashes every listed file, the plug-in's included
    assert f"{len(m['export']['files'])} files match the manifest" in capsys.readouterr().out


def test_plugin_check_args_refuse_before_any_work(plugin_format, small_run, tmp_path, capsys):
    exp = tmp_path / "exp"
    assert main(["export", str(small_run), "--formats", NAME, "--out", str(exp), "--tag-note", " "]) == 2
    assert "--tag-note | is empty" in capsys.readouterr().err
    assert not exp.exists()


def test_unknown_format_lists_the_plugin(plugin_format, small_run, tmp_path, capsys):
    assert main(["export", str(small_run), "--formats", "onnx,coreml", "--out", str(tmp_path / "e")]) == 2
    assert f"choose from onnx, onnx-int8, onnx-fp16, tensorrt, triton, {NAME}" in capsys.readouterr().err

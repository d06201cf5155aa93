"""A backend registered from this file alone reaches every command that takes one.

`ort-one-by-one` is a throw-away runner defined here: it runs the export's model.onnx through
onnxruntime one image per call, and names its thread knob `lanes` (no built-in runner uses that
word). A fixture registers it with `register_backend` and removes it afterwards; no other file
knows it. The real CLI paths then have to offer it, run it and hand it the generic thread count
under its own option name: `hashret check`, `hashret bench engine` and `hashret serve`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from hashret.cli import build_parser, main
from hashret.engines import ENGINES, BackendSpec, Engine, register_backend
from tests.test_export import BITS, exp_folder

NAME = "ort-one-by-one"


class OneByOneEngine(Engine):
    """model.onnx through onnxruntime, one image per session call; threads via the `lanes` option."""

    name = NAME

    def _load(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.options.get("lanes") is not None:
            so.intra_op_num_threads = int(self.options["lanes"])
        self.session = ort.InferenceSession(self.model_path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _encode(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.session.run(None, {self.input_name: img[None]})[0] for img in images])

    def describe(self) -> dict:
        # read back from the session, so a test sees what the library was actually given
        return {**super().describe(), "session_threads": self.session.get_session_options().intra_op_num_threads}


@pytest.fixture(scope="session")
def exp(tmp_path_factory):
    return exp_folder(tmp_path_factory)[1]


@pytest.fixture()
def plugin():
    spec = register_backend(BackendSpec(NAME, "model.onnx", __name__, "OneByOneEngine", "onnxruntime",
                                        "onnxruntime", threads_option="lanes"))
    try:
        yield spec
    finally:
        ENGINES.unregister(NAME)


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [("serve",), ("check",), ("bench", "engine")])
def test_every_command_offers_it_and_forgets_it(plugin, capsys, argv):
    assert NAME in help_text(capsys, *argv)
    ENGINES.unregister(NAME)
    try:
        assert NAME not in help_text(capsys, *argv)
    finally:
        register_backend(plugin)  # the fixture removes it again


def test_a_registered_name_cannot_be_taken_twice(plugin):
    with pytest.raises(ValueError, match="already registered"):
        register_backend(plugin)


def test_check_runs_it_against_the_golden_set(plugin, exp, capsys):
    assert main(["check", str(exp), "--backend", NAME, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] and r["backend"] == NAME
    assert r["row"]["engine"]["engine"] == NAME
    assert r["bit_flip"] <= 0.001  # fp32 ORT one image at a time: the torch reference's codes


def test_bench_engine_hands_it_threads_under_its_own_name(plugin, exp, tmp_path):
    from benchmarks.engine import all_backends

    assert all_backends()[-1] == NAME  # the default list: registration order, no edit needed
    out = tmp_path / "engine.json"
    assert main(["bench", "engine", str(exp), "--backends", f"{NAME},ort", "--batches", "1,3", "--iters", "2",
                 "--warmup", "1", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {(r["backend"], r["batch"]): r for r in doc["results"]}
    assert set(rows) == {(NAME, 1), (NAME, 3), ("ort", 1), ("ort", 3)}
    assert rows[(NAME, 3)]["options"] == {"lanes": 1}
    assert rows[(NAME, 3)]["engine"]["session_threads"] == 1
    assert rows[("ort", 3)]["options"] == {"intra_op_threads": 1}
    assert not doc["skipped"]


def test_bench_engine_refuses_an_unregistered_name(exp, tmp_path, capsys):
    assert main(["bench", "engine", str(exp), "--backends", NAME, "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert f"--backends {NAME} | unknown backend" in err and "ort" in err


def test_serve_runs_it_with_engine_threads(plugin, exp, tmp_path):
    """`hashret serve --backend ort-one-by-one --engine-threads 1`, parsed by the real CLI, serves."""
    from benchmarks.soak import synthetic_images
    from serve.cli import config_from_args
    from serve.client import RetrievalClient
    from serve.server import BackgroundServer
    from tests.test_fuzz import build_gallery

    gal = build_gallery(exp, tmp_path / "gal", n=4)
    args = build_parser("serve").parse_args(["serve", "--model", str(exp), "--gallery", str(gal), "--backend", NAME,
                                             "--engine-threads", "1", "--port", "0", "--grace-s", "0.5"])
    with BackgroundServer(config_from_args(args)) as srv:
        engine = srv.server.service.engine
        assert isinstance(engine, OneByOneEngine) and engine.options == {"lanes": 1}
        assert engine.describe()["session_threads"] == 1
        with RetrievalClient(srv.address, timeout=60) as c:
            assert c.info().backend == f"{NAME} (cpu)"
            code, bits = c.encode(synthetic_images(1, (160, 120), seed=3)[0])
            hits = c.search(synthetic_images(1, (160, 120), seed=3)[0], k=2)
    assert bits == BITS and len(code) == BITS // 8 and len(hits) == 2

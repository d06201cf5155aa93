"""hashret.engines: real ONNX Runtime / OpenVINO / torch sessions on a real exported model.

The export (ImageNet efficientnet-lite0 + a trained 32-bit CSQ head, 40 Grocery photos) is built once
per session by tests/test_export.py's `exp_folder`; golden.npz provides real preprocessed images
and the torch reference activations.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from hashret.engines import ENGINES, available_backends, backend_spec, model_id, open_engine, unavailable_reason
from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact, Unavailable
from hashret.fsutil import sha256_file
from tests.test_export import BITS, exp_folder


@pytest.fixture(scope="session")
def exp(tmp_path_factory):
    return exp_folder(tmp_path_factory)[1]


@pytest.fixture(scope="session")
def golden(exp):
    from export.golden import load_golden

    return load_golden(exp / "golden.npz")


@pytest.fixture()
def exp_copy(exp, tmp_path):
    dst = tmp_path / "exp"
    shutil.copytree(exp, dst, copy_function=os.link)
    return dst


def agreement(a, b) -> float:
    return float(((a >= 0) == (b >= 0)).mean())


# ---------------------------------------------------------------- real sessions
@pytest.mark.parametrize("backend, options, min_agree", [
    ("torch", {}, 1.0),
    ("ort", {"intra_op_threads": 1}, 0.9999),
    ("ort-fp16", {}, 0.99),
    ("openvino", {}, 0.9999),  # f32 by default
    # reduced precision on the trained head: 0.996-0.998 of the bits agree when this was written; a
    # broken export (wrong scales, a quantized hash layer, lost normalisation) falls far below 0.99
    ("openvino", {"precision": "bf16"}, 0.99),
    ("ort-int8", {}, 0.99),
    ("openvino-int8", {}, 0.99),
])
def test_backend_matches_torch_reference(exp, golden, backend, options, min_agree):
    with open_engine(exp, backend, **options) as eng:
        assert eng.loaded and eng.size == 224 and eng.bits == BITS and eng.name == backend
        out = eng.encode(golden["images"])
        one = eng.encode(golden["images"][0])  # a single [H, W, 3] image is a batch of 1
    assert out.shape == (len(golden["images"]), BITS) and out.dtype == np.float32
    assert one.shape == (1, BITS)
    assert agreement(out, golden["activations"]) >= min_agree
    if min_agree >= 0.9999:
        assert np.abs(out - golden["activations"]).max() < 1e-3


def test_openvino_reports_precision_in_force(exp):
    with open_engine(exp, "openvino") as eng:
        d = eng.describe()
    assert d["engine"] == "openvino" and "f32" in d["inference_precision"]


def test_ort_describe_names_providers(exp):
    with open_engine(exp, "ort") as eng:
        assert eng.describe()["providers"] == ["CPUExecutionProvider"]


# ---------------------------------------------------------------- input validation
@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 224, 224, 3), np.float32), "dtype float32, expected uint8"),
    (np.zeros((2, 100, 100, 3), np.uint8), r"shape \(2, 100, 100, 3\), expected \[N, 224, 224, 3\]"),
    (np.zeros((2, 3, 224, 224), np.uint8), "shape"),
    (np.zeros((0, 224, 224, 3), np.uint8), "shape"),
    (np.zeros((224, 224), np.uint8), "shape"),
])
def test_bad_input_is_refused(exp, images, match):
    with open_engine(exp, "ort") as eng:
        with pytest.raises(BadInput, match=match):
            eng.encode(images)


@pytest.mark.parametrize("backend, options, match", [
    ("ort", {"intra_op_threads": -1}, "intra_op_threads"),
    ("openvino", {"precision": "int4"}, "precision"),
    ("torch", {"precision": "fp16"}, "needs --device cuda"),
])
def test_bad_options_are_refused(exp, backend, options, match):
    with pytest.raises(BadInput, match=match):
        open_engine(exp, backend, **options)


def test_unknown_backend_and_device(exp):
    with pytest.raises(BadInput, match="unknown: choose one of"):
        open_engine(exp, "coreml")
    with pytest.raises(BadInput, match="device"):
        open_engine(exp, "ort", device="tpu")


def test_cuda_without_cuda_is_unavailable(exp):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(Unavailable, match="pip install onnxruntime-gpu"):
        open_engine(exp, "ort", device="cuda")


# ---------------------------------------------------------------- artifacts and ids
def test_sha_mismatch_is_refused_naming_the_file(exp_copy):
    path = exp_copy / "model.int8.onnx"
    data = path.read_bytes()
    path.unlink()  # hard link: replace, never write through
    path.write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(ArtifactMismatch, match=r"model\.int8\.onnx.*re-export"):
        open_engine(exp_copy, "ort-int8")
    with open_engine(exp_copy, "ort") as eng:  # other backends are unaffected
        assert eng.bits == BITS


def test_backend_file_not_in_export(exp_copy):
    m = json.loads((exp_copy / "manifest.json").read_text())
    del m["export"]["files"]["model.fp16.onnx"]
    (exp_copy / "manifest.json").unlink()
    (exp_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MissingArtifact, match="no model.fp16.onnx for backend 'ort-fp16'"):
        open_engine(exp_copy, "ort-fp16")
    assert "ort-fp16" not in available_backends(exp_copy)


def test_run_folder_is_not_an_export(tmp_path_factory):
    run = exp_folder(tmp_path_factory)[0]
    with pytest.raises(ArtifactMismatch, match="kind is 'run', expected export"):
        open_engine(run, "ort")


def test_model_id_is_the_onnx_sha_for_every_backend(exp):
    m = json.loads((exp / "manifest.json").read_text())
    assert model_id(m) == sha256_file(exp / "model.onnx")
    with pytest.raises(ArtifactMismatch, match="re-export"):
        model_id({"export": {"files": {}}})


def test_registry_and_availability(exp):
    names = ENGINES.names()
    assert {"torch", "ort", "ort-int8", "ort-fp16", "openvino", "openvino-int8", "tensorrt"} <= set(names)
    assert backend_spec("ort-int8").file == "model.int8.onnx" and backend_spec("tensorrt").file == "model.plan"
    here = available_backends()
    assert {"torch", "ort", "openvino"} <= set(here)
    assert set(available_backends(exp)) >= {"torch", "ort", "ort-int8", "ort-fp16", "openvino", "openvino-int8"}
    if unavailable_reason("tensorrt"):
        assert "tensorrt" not in here


@pytest.mark.parametrize("backend, option", [
    ("torch", "threads"), ("ort", "intra_op_threads"), ("ort-fp16", "intra_op_threads"),
    ("ort-int8", "intra_op_threads"), ("openvino", "threads"), ("openvino-int8", "threads"), ("tensorrt", None),
])
def test_thread_option_names_live_in_the_registry(backend, option):
    spec = backend_spec(backend)
    assert spec.threads_option == option
    assert spec.thread_options(None) == {}
    assert spec.thread_options(2) == ({option: 2} if option else {})


def test_ort_gets_its_threads_through_the_generic_count(exp):
    opts = backend_spec("ort").thread_options(1)
    with open_engine(exp, "ort", **opts) as eng:
        assert eng.session.get_session_options().intra_op_num_threads == 1


def test_torch_reports_the_threads_in_force(exp):
    import torch

    before = torch.get_num_threads()
    try:
        with open_engine(exp, "torch", **backend_spec("torch").thread_options(1)) as eng:
            d = eng.describe()
        assert d["threads"] == 1 and d["torch_num_threads"] == 1 and d["torch_interop_threads"] >= 1
    finally:
        torch.set_num_threads(before)  # torch's pool is process-wide


def test_commands_offer_exactly_the_registered_backends():
    from hashret.cli import build_parser

    for argv in (["serve"], ["check"]):
        parser = build_parser(argv[0])
        sub = next(a for a in parser._actions if a.dest == "command").choices[argv[0]]
        action = next(a for a in sub._actions if a.dest == "backend")
        assert sorted(action.choices) == ENGINES.names() and action.default == "ort"


# ---------------------------------------------------------------- TensorRT
def test_tensorrt_refuses_engine_from_other_version_or_gpu(tmp_path):
    """The compatibility check runs before deserializing, so it is testable without TensorRT."""
    from hashret.engines.tensorrt_engine import check_engine_info

    plan = tmp_path / "model.plan"
    facts = {"gpu": "NVIDIA H100", "compute_capability": "9.0"}
    ok = {"tensorrt_version": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"}
    check_engine_info(ok, "10.13.0", facts, plan)
    with pytest.raises(ArtifactMismatch, match=r"TensorRT 10\.13\.0.*TensorRT 11\.0\.0.*--formats tensorrt"):
        check_engine_info(ok, "11.0.0", facts, plan)
    with pytest.raises(ArtifactMismatch, match=r"compute capability 9\.0.*8\.9.*rebuild with hashret export"):
        check_engine_info(ok, "10.13.0", {"gpu": "NVIDIA L4", "compute_capability": "8.9"}, plan)


def test_tensorrt_backend_without_tensorrt(exp_copy):
    reason = unavailable_reason("tensorrt")
    if reason is None:
        pytest.skip("tensorrt and a GPU are available here")
    from hashret.manifest import file_entry, write_manifest

    (exp_copy / "model.plan").write_bytes(b"not an engine")
    m = json.loads((exp_copy / "manifest.json").read_text())
    m["export"]["files"]["model.plan"] = file_entry(exp_copy / "model.plan")
    (exp_copy / "manifest.json").unlink()
    write_manifest(exp_copy, m)
    with pytest.raises(Unavailable, match="backend tensorrt"):
        open_engine(exp_copy, "tensorrt", device="cuda")


def test_tensorrt_engine_runs(tmp_path_factory, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except Exception as e:
        pytest.skip(f"tensorrt not installed: {type(e).__name__}: {e}")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("tensorrt installed but no CUDA GPU visible")
    from hashret.cli import main

    run = exp_folder(tmp_path_factory)[0]
    out = tmp_path / "trt"
    assert main(["export", str(run), "--out", str(out), "--formats", "tensorrt", "--golden", "8",
                 "--max-batch", "8", "--no-parity"]) == 0
    from export.golden import load_golden

    g = load_golden(out / "golden.npz")
    with open_engine(out, "tensorrt", device="cuda") as eng:
        acts = eng.encode(g["images"])
    assert agreement(acts, g["activations"]) >= 0.98


def test_torch_cuda_graphs(exp, golden):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible: torch CUDA graphs cannot run here")
    with open_engine(exp, "torch", device="cuda", graph_batches=(1, 4)) as eng:
        out = eng.encode(golden["images"][:6])  # 4 + a padded 2 -> 4
    assert agreement(out, golden["activations"][:6]) >= 0.98


def test_the_cli_reports_out_of_memory_in_one_line(monkeypatch, capsys):
    """A command that runs out of (GPU) memory ends with one line naming the command, the
    library's own words and the way out, exit code 2; any other crash keeps its traceback."""
    import torch

    import export.check
    from hashret.cli import main

    def short_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail")

    monkeypatch.setattr(export.check, "run", short_of_memory)
    assert main(["check", "EXP", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: check | out of memory (CUDA out of memory. Tried to allocate 20.00 GiB): run it "
                           "with a smaller batch (--batch, --max-batch) or on a device with more free memory")

    def bug(args):
        raise RuntimeError("an index out of range")

    monkeypatch.setattr(export.check, "run", bug)
    with pytest.raises(RuntimeError, match="index out of range"):
        main(["check", "EXP", "--backend", "torch"])


def test_a_cuda_graph_that_does_not_fit_is_dropped_for_good(exp, golden, caplog):
    """The torch engine's graph plan when capturing a batch size runs out of device memory:
    that size and the larger ones are dropped, the batch runs as smaller graphs, and no later
    batch pays for the failed capture again. CUDA graphs need a GPU, so the captures here are
    stand-ins that replay the real CPU forward pass; the plan around them is the engine's own."""
    import torch

    images = golden["images"][:6]
    with open_engine(exp, "torch", device="cpu") as eng:
        want = eng.encode(images)
        eng.graph_batches, captured, tried = (1, 4, 8, 32), {}, []

        class Replay:
            def __init__(self, b):
                self.static_in = torch.zeros((b, eng.size, eng.size, 3), dtype=torch.uint8)
                self.static_out = torch.zeros((b, eng.bits))

            def replay(self):
                self.static_out.copy_(eng._forward(self.static_in))

        def graph_for(b):
            tried.append(b)
            if b >= fits_up_to:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")
            g = captured.setdefault(b, Replay(b))
            return g, g.static_in, g.static_out

        eng._graph_for, fits_up_to = graph_for, 8
        with caplog.at_level("WARNING", logger="hashret.engines.torch"):
            got = eng._encode_with_graphs(torch.from_numpy(images))  # 6 images: 8 fails, then 4 + a padded 2
        assert np.allclose(got, want, atol=1e-5)
        assert tried == [8, 4, 4] and eng.graph_batches == (1, 4)
        assert "capturing the CUDA graph for batch 8" in caplog.text and "from now on: 1, 4" in caplog.text
        tried.clear()
        assert np.allclose(eng._encode_with_graphs(torch.from_numpy(images)), want, atol=1e-5)
        assert tried == [4, 4]  # the dropped size is not tried again
        fits_up_to = 1  # the device fills up: not even one image fits, and that is the caller's error
        eng._graphs.clear()
        captured.clear()
        with pytest.raises(torch.OutOfMemoryError):
            eng._encode_with_graphs(torch.from_numpy(images))
        assert eng.graph_batches == (1,)

"""Stage 2 (export): ONNX / INT8 / FP16 / Triton artifacts, the manifest, parity and `hashret check`.

One small export is built per session (real ImageNet efficientnet-lite0 + a 32-bit CSQ head trained
by `hashret train` on 40 real Grocery images) and shared with tests/test_engines.py through
`exp_folder`. The head is trained, not left at its random init, because an untrained head's
activations sit near zero where any rounding flips bits: parity thresholds on it would have to be
loose enough to pass a broken INT8 export too.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hashret.cli import main
from hashret.datasets import default_data_root, read_dataset
from hashret.errors import BadInput
from hashret.fsutil import sha256_file

BITS = 32
N_CLASSES, N_DB, N_Q = 8, 3, 2  # 8 classes x (3 database + 2 query) = 40 images


# ---------------------------------------------------------------- shared fixtures (also used by test_engines)
def grocery_root() -> str:
    root = default_data_root()
    if not root or not Path(root).exists():
        pytest.skip("Grocery dataset not found (../shared/datasets/grocery beside the checkout): set HASHRET_DATA")
    return root


def small_csv(folder: Path) -> Path:
    """A 40-image CSV dataset (path,label,split) drawn from the real Grocery photos."""
    splits = read_dataset(grocery_root(), "grocery")
    rows = []
    for label in sorted({s.label for s in splits.query})[:N_CLASSES]:
        rows += [(s.path, label, "database") for s in [s for s in splits.database if s.label == label][:N_DB]]
        rows += [(s.path, label, "query") for s in [s for s in splits.query if s.label == label][:N_Q]]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "small.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return path


def make_run(folder: Path, data_csv: Path, backbone: str = "efficientnet-lite0", weights: str = "imagenet",
             bits: int = BITS, seed: int = 0) -> Path:
    """A RUN folder written by train.run_folder.write_run around an untrained seeded head."""
    import torch

    from hashret.models import HashEncoder, HashHead, build_backbone
    from train.run_folder import run_manifest, write_run

    torch.manual_seed(seed)
    bb = build_backbone(backbone, weights)
    enc = HashEncoder(bb, HashHead(bb.dim, bits, hidden=256, dropout=0.0)).eval()
    sp = read_dataset(data_csv, "csv")
    m = run_manifest(bb, bits, {"hidden": 256, "dropout": 0.0}, {"name": "dch", "gamma": 20.0}, {"epochs": 0},
                     {"format": "csv", "root": str(data_csv), "fingerprint": sp.fingerprint(), "sizes": sp.sizes()})
    return write_run(folder, enc, m)


def train_run(folder: Path, data_csv: Path, bits: int = BITS) -> Path:
    """A RUN folder from `hashret train` (CSQ, 60 epochs, seed 0) on `data_csv`, with its own feature cache.

    CSQ drives activations toward +-1 within these epochs (DCH leaves more near zero), so the
    bits have the margin a trained production head has and INT8/bf16 agree on >= 99% of them.
    """
    rc = main(["train", "--data", str(data_csv), "--format", "csv", "--backbone", "efficientnet-lite0",
               "--weights", "imagenet", "--method", "csq", "--bits", str(bits), "--hidden", "256", "--dropout", "0",
               "--epochs", "60", "--batch-size", "16", "--seed", "0", "--out", str(folder),
               "--cache-dir", str(folder.parent / "features"), "--no-progress"])
    assert rc == 0
    return folder


def exp_folder(tmp_path_factory) -> tuple[Path, Path]:
    """(RUN, EXP) built once per session and cached under pytest's base temp folder."""
    base = tmp_path_factory.getbasetemp() / "hashret-export-fixture"
    run, exp, done = base / "run", base / "exp", base / "DONE"
    if not done.exists():
        shutil.rmtree(base, ignore_errors=True)
        data = small_csv(base / "data")
        train_run(run, data)
        rc = main(["export", str(run), "--out", str(exp), "--formats", "onnx,onnx-int8,onnx-fp16,triton",
                   "--calib", "8", "--golden", "24", "--parity-queries", "0", "--latency-runs", "2"])
        assert rc == 0
        done.write_text("ok")
    return run, exp


@pytest.fixture(scope="session")
def run_exp(tmp_path_factory):
    return exp_folder(tmp_path_factory)


@pytest.fixture(scope="session")
def exp(run_exp) -> Path:
    return run_exp[1]


@pytest.fixture()
def exp_copy(exp, tmp_path) -> Path:
    """A hard-linked copy of EXP; tests replace (never edit in place) the files they break."""
    dst = tmp_path / "exp"
    shutil.copytree(exp, dst, copy_function=os.link)
    return dst


def manifest(exp: Path) -> dict:
    return json.loads((exp / "manifest.json").read_text())


def ort_run(path, images):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"images": images})[0]


# ---------------------------------------------------------------- ONNX
def _io(model):
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    i, o = model.graph.input[0], model.graph.output[0]
    return (i.name, i.type.tensor_type.elem_type, dims(i)), (o.name, o.type.tensor_type.elem_type, dims(o))


def test_onnx_structure_and_dynamic_batch(exp):
    import onnx

    model = onnx.load(str(exp / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    (iname, itype, idims), (oname, otype, odims) = _io(model)
    assert (iname, itype, idims[1:]) == ("images", onnx.TensorProto.UINT8, [224, 224, 3])
    assert (oname, otype, odims[1]) == ("codes", onnx.TensorProto.FLOAT, BITS)
    assert isinstance(idims[0], str) and isinstance(odims[0], str)  # dynamic batch
    assert "Sign" not in {n.op_type for n in model.graph.node} and "Tanh" in {n.op_type for n in model.graph.node}
    assert not list(exp.glob("*.onnx.data"))  # self-contained
    rng = np.random.default_rng(0)
    for n in (1, 3):
        out = ort_run(exp / "model.onnx", rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8))
        assert out.shape == (n, BITS) and out.dtype == np.float32 and np.abs(out).max() <= 1.0



@pytest.mark.parametrize("name", ["model.onnx", "model.fp16.onnx", "model.int8.onnx"])
def test_uint8_input_is_cast_before_anything_else(exp, name):
    """TensorRT takes a uint8 tensor only into a Cast: a Transpose on the raw input fails its build."""
    import onnx

    model = onnx.load(str(exp / name))
    users = [n for n in model.graph.node if "images" in n.input]
    assert users and {n.op_type for n in users} == {"Cast"}, [(n.op_type, n.name) for n in users]
    assert all(onnx.helper.get_attribute_value(a) != onnx.TensorProto.UINT8
               for n in users for a in n.attribute if a.name == "to")

def test_ort_matches_torch_on_real_images(exp):
    from export.golden import load_golden

    g = load_golden(exp / "golden.npz")
    out = ort_run(exp / "model.onnx", g["images"])
    assert ((out >= 0) == (g["activations"] >= 0)).mean() >= 0.9999
    assert np.abs(out - g["activations"]).max() < 1e-3


def test_resnet50_exports_with_dynamic_batch(tmp_path):
    """resnet50 (random weights: structure only) through the same exporter."""
    import onnx
    import torch

    from export.onnx_format import onnx_from_run
    from hashret.models import HashEncoder, HashHead, build_backbone

    torch.manual_seed(0)
    bb = build_backbone("resnet50", "none")
    enc = HashEncoder(bb, HashHead(bb.dim, 16, hidden=0)).eval()
    info = onnx_from_run(None, tmp_path / "r50.onnx", encoder=enc, slim=False)
    assert info["check_bit_agreement"] >= 0.99
    model = onnx.load(str(tmp_path / "r50.onnx"))
    onnx.checker.check_model(model)
    x = np.random.default_rng(1).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = enc(torch.from_numpy(x)).numpy()
    for n in (1, 3):
        out = ort_run(tmp_path / "r50.onnx", x[:n])
        assert out.shape == (n, 16)
        np.testing.assert_allclose(out, ref[:n], atol=1e-4)


# ---------------------------------------------------------------- INT8 / FP16 / Triton
def test_int8_is_quantized_keeps_head_float_and_runs(exp):
    import onnx

    model = onnx.load(str(exp / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    info = manifest(exp)["export"]["formats"]["onnx-int8"]
    assert info["exclude"] == "hash-layer" and info["excluded_nodes"] and info["calibration_images"] == 8
    by_out = {o: n for n in model.graph.node for o in n.output}
    tanh = next(n for n in model.graph.node if n.op_type == "Tanh")
    assert by_out[tanh.input[0]].op_type != "DequantizeLinear"  # the hash layer feeds tanh in float
    from export.golden import load_golden

    from export.golden import split_maps

    g = load_golden(exp / "golden.npz")
    out = ort_run(exp / "model.int8.onnx", g["images"])
    assert out.shape == (len(g["images"]), BITS) and np.isfinite(out).all()
    # what the INT8 file is for: the same retrieval quality as fp32 on the golden set (6 queries
    # against 18 database images of the trained fixture; identical there when this was written)
    maps = split_maps(out, g["labels"], g["is_query"])
    assert float(g["map_all"]) > 0.5, "the fixture's fp32 mAP is too low for the comparison to mean anything"
    assert maps["mAP@all"] >= float(g["map_all"]) - 0.01, (maps, float(g["map_all"]))
    assert maps["mAP@10"] >= float(g["map_10"]) - 0.01, (maps, float(g["map_10"]))


def test_fp16_model_keeps_uint8_in_float32_out_and_runs(exp):
    import onnx

    model = onnx.load(str(exp / "model.fp16.onnx"))
    (_, itype, _), (_, otype, _) = _io(model)
    assert itype == onnx.TensorProto.UINT8 and otype == onnx.TensorProto.FLOAT
    big = [t for t in model.graph.initializer if np.prod(t.dims) > 1000]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    from export.golden import load_golden

    g = load_golden(exp / "golden.npz")
    out = ort_run(exp / "model.fp16.onnx", g["images"])
    assert out.dtype == np.float32
    assert ((out >= 0) == (g["activations"] >= 0)).mean() >= 0.99


def test_triton_repository(exp):
    cfg = (exp / "triton" / "hashret" / "config.pbtxt").read_text()
    for needle in ('name: "hashret"', 'platform: "onnxruntime_onnx"', "max_batch_size: 64", 'name: "images"',
                   "TYPE_UINT8", "dims: [ 224, 224, 3 ]", 'name: "codes"', "TYPE_FP32", f"dims: [ {BITS} ]",
                   "dynamic_batching", "preferred_batch_size: [ 8, 64 ]", "max_queue_delay_microseconds",
                   "instance_group", "KIND_GPU"):
        assert needle in cfg, needle
    assert sha256_file(exp / "triton" / "hashret" / "1" / "model.onnx") == sha256_file(exp / "model.onnx")
    assert not (exp / "triton" / "hashret_trt").exists()  # no plan built here


# ---------------------------------------------------------------- manifest, golden, parity
def test_manifest_export_section(run_exp):
    run, exp = run_exp
    m = manifest(exp)
    assert m["kind"] == "export" and m["schema_version"] == 1 and m["bits"] == BITS
    assert m["backbone"]["name"] == "efficientnet-lite0" and m["preprocessing"]["crop"] == 224
    e = m["export"]
    for name in ("model.onnx", "model.int8.onnx", "model.fp16.onnx", "model.pt", "golden.npz",
                 "triton/hashret/config.pbtxt", "triton/hashret/1/model.onnx"):
        assert e["files"][name] == {"sha256": sha256_file(exp / name), "size": (exp / name).stat().st_size}, name
    assert e["inputs"] == [{"name": "images", "dtype": "uint8", "shape": ["N", 224, 224, 3]}]
    assert e["outputs"] == [{"name": "codes", "dtype": "float32", "shape": ["N", BITS]}]
    assert e["opset"] == 18 and e["formats"]["onnx"]["exporter"] in ("dynamo", "legacy")
    assert e["tools"]["onnx"] and e["tools"]["onnxruntime"] and "tensorrt" in e["tools"]
    assert Path(e["source_run"]) == run.resolve()
    assert sha256_file(exp / "model.pt") == sha256_file(run / "model.pt")
    from hashret.engines import model_id

    assert model_id(m) == sha256_file(exp / "model.onnx")


def test_golden_set(exp):
    from export.golden import load_golden
    from hashret.codes import pack

    g = load_golden(exp / "golden.npz")
    assert g["images"].shape == (24, 224, 224, 3) and g["images"].dtype == np.uint8
    assert g["is_query"].sum() == 6 and len(set(g["paths"].tolist())) == 24
    assert (g["codes"] == pack(g["activations"])).all() and int(g["bits"]) == BITS
    assert 0.0 <= float(g["map_all"]) <= 1.0 and 0.0 <= float(g["map_10"]) <= 1.0


def test_parity_json(exp):
    p = json.loads((exp / "parity.json").read_text())
    rows = {r["backend"]: r for r in p["golden"]["rows"]}
    assert {"torch", "ort", "ort-int8", "ort-fp16", "openvino", "openvino-int8"} <= set(rows)
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["torch"]["bit_agreement"] == 1.0 and rows["ort"]["bit_agreement"] >= 0.9999
    assert rows["openvino"]["bit_agreement"] >= 0.9999  # f32 by default
    for col in ("file_mb", "max_abs_diff", "at_risk", "mAP@all", "mAP@10", "mAP_delta", "top10_overlap",
                "latency_ms_bs1"):
        assert isinstance(rows["ort"][col], float), col
    assert "dataset" not in p  # --parity-queries 0


def test_parity_rows_report_skips_and_errors(exp):
    from export.golden import load_golden
    from export.parity import format_table, parity_rows

    g = load_golden(exp / "golden.npz")
    rows = parity_rows(exp, ["ort", "tensorrt"], g["images"][:8], g["labels"][:8], g["is_query"][:8],
                       reference=g["activations"][:8], latency_runs=1)
    status = {r["backend"]: r["status"] for r in rows}
    assert status["ort"] == "ok"
    assert status["tensorrt"].startswith(("skipped:", "error:"))  # no model.plan in this export
    assert "tensorrt" in format_table(rows)


# ---------------------------------------------------------------- hashret check
def test_check_passes_on_fresh_export(exp, capsys):
    assert main(["check", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "files match the manifest" in out
    assert main(["check", str(exp), "--backend", "openvino", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["passed"] and r["bit_flip"] <= 0.001 and r["verdict"].startswith("PASS")


def test_check_fails_with_exit_1_when_head_weights_change(exp_copy, capsys):
    """Perturb the hash layer inside model.onnx (re-hashed in the manifest, golden kept)."""
    import onnx
    from onnx import numpy_helper

    from hashret.manifest import file_entry, write_manifest

    path = exp_copy / "model.onnx"
    model = onnx.load(str(path))
    gemm = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]
    inits = {t.name: t for t in model.graph.initializer}
    w = inits[gemm.input[1]]
    arr = numpy_helper.to_array(w)
    w.CopyFrom(numpy_helper.from_array(arr + np.random.default_rng(0).normal(0, arr.std() * 2, arr.shape)
                                       .astype(arr.dtype), w.name))
    path.unlink()  # a hard link: replace, never write through it
    onnx.save(model, str(path))
    m = manifest(exp_copy)
    m["export"]["files"]["model.onnx"] = file_entry(path)
    write_manifest(exp_copy, m)
    assert main(["check", str(exp_copy), "--backend", "ort"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_exit_2_on_truncated_file(exp_copy, capsys):
    path = exp_copy / "model.onnx"
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])
    assert main(["check", str(exp_copy)]) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "re-export" in err


def test_check_exit_2_on_swapped_file(exp_copy, capsys):
    os.replace(exp_copy / "model.fp16.onnx", exp_copy / "model.onnx")
    assert main(["check", str(exp_copy)]) == 2
    assert "model.onnx" in capsys.readouterr().err


def test_check_exit_2_on_missing_golden(exp_copy, capsys):
    (exp_copy / "golden.npz").unlink()
    assert main(["check", str(exp_copy)]) == 2
    assert "golden.npz" in capsys.readouterr().err


# ---------------------------------------------------------------- CLI and the format table
def test_formats_table_drives_parsing_and_help(capsys):
    from export import formats as F

    assert [f.name for f in F.parse_formats("triton")] == ["onnx", "triton"]
    assert [f.name for f in F.parse_formats("onnx-int8,onnx")] == ["onnx", "onnx-int8"]
    with pytest.raises(BadInput, match="unknown format"):
        F.parse_formats("onnx,coreml")
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    for f in F.rows():
        assert f.name in out and f.file in out
    assert "(default: 256)" in out


def test_tensorrt_without_tensorrt_is_a_plain_error(run_exp, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here: the refusal path cannot be exercised")
    except ImportError:
        pass
    run, _ = run_exp
    assert main(["export", str(run), "--formats", "tensorrt", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "pip install tensorrt" in err and "Traceback" not in err
    assert not (tmp_path / "e" / "model.onnx").exists()  # refused before doing any work


@pytest.mark.parametrize("argv, match", [
    (["--opt-batch", "128"], "--max-batch"),
    (["--formats", "onnx,bogus"], "unknown format"),
    (["--golden", "-1"], "--golden"),
])
def test_export_rejects_bad_arguments(run_exp, tmp_path, capsys, argv, match):
    run, _ = run_exp
    assert main(["export", str(run), "--out", str(tmp_path / "e"), *argv]) == 2
    assert match in capsys.readouterr().err


def test_export_refuses_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_defaulted_formats_skip_int8_without_a_dataset(run_exp, tmp_path, monkeypatch, capsys):
    """No images reachable: a defaulted INT8 is skipped with the reason, the rest is built."""
    from hashret.manifest import write_manifest

    run, _ = run_exp
    moved = tmp_path / "run"
    shutil.copytree(run, moved, copy_function=os.link)
    m = manifest(moved)
    m["dataset"]["root"] = str(tmp_path / "gone.csv")
    (moved / "manifest.json").unlink()  # a hard link: replace, never write through it
    write_manifest(moved, m)
    monkeypatch.setenv("HASHRET_DATA", str(tmp_path / "nowhere"))
    out = tmp_path / "e"
    assert main(["export", str(moved), "--out", str(out), "--golden", "0", "--no-parity"]) == 0
    printed = capsys.readouterr().out
    e = manifest(out)["export"]
    assert e["skipped"]["onnx-int8"] == "no dataset reachable for calibration (pass --data DIR --format FMT)"
    assert "skipped onnx-int8: no dataset reachable" in printed
    assert "onnx-int8" not in e["formats"] and not (out / "model.int8.onnx").exists()
    assert {"onnx", "onnx-fp16", "triton"} <= set(e["formats"]) and "model.fp16.onnx" in e["files"]
    assert e["golden"] is None and "golden.npz" not in e["files"]


# ---------------------------------------------------------------- TensorRT (GPU hosts only)
def _tensorrt_or_skip():
    try:
        import tensorrt as trt
    except Exception as e:
        pytest.skip(f"tensorrt not installed: {type(e).__name__}: {e}")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("tensorrt installed but no CUDA GPU visible")
    return trt


def test_tensorrt_engine_build_and_check(run_exp, tmp_path):
    _tensorrt_or_skip()
    run, _ = run_exp
    out = tmp_path / "trt"
    assert main(["export", str(run), "--out", str(out), "--formats", "tensorrt,triton", "--golden", "16",
                 "--max-batch", "16", "--parity-queries", "0", "--latency-runs", "2"]) == 0
    info = json.loads((out / "engine.json").read_text())
    assert info["precision"] == "fp16" and info["profile"]["max"][0] == 16
    assert (out / "triton" / "hashret_trt" / "1" / "model.plan").is_file()
    assert main(["check", str(out), "--backend", "tensorrt", "--device", "cuda",
                 "--max-bit-flip", "0.02", "--max-map-drop", "0.02"]) == 0


class _FakeTRT:
    """Just enough of the TensorRT Python API to drive export.tensorrt without a GPU.

    The enums follow the real bindings (NVIDIA's Python API pages for 10.x and 11.0, and NvInfer.h):
    10.x has BuilderFlag.FP16/INT8 (weak typing) and NetworkDefinitionCreationFlag EXPLICIT_BATCH = 0
    (deprecated, ignored) and STRONGLY_TYPED = 1; 11.x has neither builder flag nor EXPLICIT_BATCH,
    and STRONGLY_TYPED = 0 (deprecated: strongly typed is always on). Touching a member the real
    module lacks raises AttributeError here as it would there."""

    def __init__(self, major: int, parse_ok: bool = True):
        from types import SimpleNamespace as NS

        self.__version__ = f"{major}.3.0"
        self.calls: list = []
        self.BuilderFlag = NS(FP16="FP16", INT8="INT8") if major < 11 else NS()
        self.NetworkDefinitionCreationFlag = (NS(EXPLICIT_BATCH=0, STRONGLY_TYPED=1) if major < 11
                                              else NS(STRONGLY_TYPED=0))
        self.MemoryPoolType = NS(WORKSPACE="WORKSPACE")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        fake = self

        class Tensor:
            name, shape = "images", (-1, 224, 224, 3)

        class Network:
            def get_input(self, i):
                return Tensor()

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, p):
                fake.calls.append(("profile", p.shapes))

            def create_timing_cache(self, blob):
                fake.calls.append(("timing_cache_in", blob))
                return NS(serialize=lambda: b"cache")

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return NS(serialize=lambda: b"cache-updated")

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                self.shapes = (name, lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN"

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", Path(path).name))
                return parse_ok

            def get_error(self, i):
                return "Unsupported operator Foo"

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.mark.parametrize("major, source, flags, fp16_flag", [
    (10, "model.onnx", 0, True),  # weak typing: FP16 builder flag on the fp32 ONNX, no creation flag
    (11, "model.fp16.onnx", 0, False),  # strongly typed (implied there): precision from the fp16 ONNX
])
def test_tensorrt_builder_code_paths_without_a_gpu(tmp_path, monkeypatch, major, source, flags, fp16_flag):
    import export.tensorrt as T

    trt = _FakeTRT(major)
    monkeypatch.setattr(T, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(T, "cuda_device_facts", lambda: {"gpu": "Fake GPU", "compute_capability": "9.0"})
    for f in ("model.onnx", "model.fp16.onnx"):
        (tmp_path / f).write_bytes(b"onnx")
    src, strongly = T.source_onnx_for("fp16", tmp_path, trt)
    assert src.name == source
    cache = tmp_path / "timing.cache"
    info = T.engine_from_onnx(src, tmp_path / "model.plan", precision="fp16", strongly_typed=strongly,
                              min_batch=1, opt_batch=4, max_batch=16, workspace_gb=1, timing_cache=cache)
    assert (tmp_path / "model.plan").read_bytes() == b"PLAN" and cache.read_bytes() == b"cache-updated"
    assert ("network_flags", flags) in trt.calls and ("parse", source) in trt.calls
    assert (("flag", "FP16") in trt.calls) == fp16_flag
    assert ("workspace", 1 << 30) in trt.calls
    assert ("profile", ("images", (1, 224, 224, 3), (4, 224, 224, 3), (16, 224, 224, 3))) in trt.calls
    saved = json.loads((tmp_path / "engine.json").read_text())
    assert saved == info and info["tensorrt_version"] == f"{major}.3.0" and info["compute_capability"] == "9.0"
    assert info["source_onnx_sha256"] == sha256_file(src) and info["profile"]["opt"][0] == 4


def test_tensorrt_11_step_builds_the_fp16_model_it_reads(exp, tmp_path, monkeypatch):
    """TensorRT 11 parses model.fp16.onnx: the tensorrt row builds it first when onnx-fp16 was not
    chosen, the job records it like a chosen format, and the Triton row then serves the plan."""
    import export.tensorrt as T
    from export import formats as F
    from export.job import ExportJob
    from hashret.cli import build_parser
    from hashret.images import PreprocessSpec

    trt = _FakeTRT(11)
    monkeypatch.setattr(T, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(T, "cuda_device_facts", lambda: {"gpu": "Fake GPU", "compute_capability": "9.0"})
    out = tmp_path / "exp"
    out.mkdir()
    shutil.copyfile(exp / "model.onnx", out / "model.onnx")
    args = build_parser("export").parse_args(["export", "RUN", "--formats", "tensorrt,triton", "--max-batch", "16"])
    m = manifest(exp)
    job = ExportJob(args=args, run_dir=exp, exp=out, run_manifest=m, encoder=None,
                    spec=PreprocessSpec.from_dict(m["preprocessing"]), bits=BITS,
                    chosen=F.parse_formats(args.formats), built={"onnx": {"opset": 18}}, files=["model.onnx"])
    info = job.build(F.get("tensorrt"))
    assert list(job.built) == ["onnx", "onnx-fp16", "tensorrt"] and job.built["tensorrt"] is info
    assert ("parse", "model.fp16.onnx") in trt.calls and info["source_onnx"] == "model.fp16.onnx"
    assert info["profile"]["max"][0] == 16 and (out / "model.fp16.onnx").is_file()
    job.build(F.get("triton"))
    assert job.files == ["model.onnx", "model.fp16.onnx", "engine.json", "model.plan",
                         "triton/hashret/config.pbtxt", "triton/hashret/1/model.onnx",
                         "triton/hashret_trt/config.pbtxt", "triton/hashret_trt/1/model.plan"]
    assert 'platform: "tensorrt_plan"' in (out / "triton" / "hashret_trt" / "config.pbtxt").read_text()


def test_tensorrt_parser_errors_are_reported(tmp_path, monkeypatch):
    import export.tensorrt as T
    from hashret.errors import CheckFailed

    monkeypatch.setattr(T, "import_tensorrt", lambda: _FakeTRT(10, parse_ok=False))
    monkeypatch.setattr(T, "cuda_device_facts", lambda: {"gpu": "Fake GPU", "compute_capability": "9.0"})
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(CheckFailed, match="ONNX parser failed: Unsupported operator Foo"):
        T.engine_from_onnx(tmp_path / "model.onnx", tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()


@pytest.mark.parametrize("major, strongly_typed, flags, fp16_flag", [
    (10, None, 0, True),  # default on 10: weak typing
    (10, True, 1 << 1, False),  # opt-in on 10: STRONGLY_TYPED is bit 1 there
    (11, None, 0, False),  # default on 11: strongly typed, flag deprecated and not set
    (11, True, 0, False),
])
def test_tensorrt_strongly_typed_default_follows_the_major_version(tmp_path, monkeypatch, major, strongly_typed,
                                                                   flags, fp16_flag):
    import export.tensorrt as T

    trt = _FakeTRT(major)
    monkeypatch.setattr(T, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(T, "cuda_device_facts", lambda: {"gpu": "Fake GPU", "compute_capability": "9.0"})
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    info = T.engine_from_onnx(tmp_path / "model.onnx", tmp_path / "model.plan", precision="fp16",
                              strongly_typed=strongly_typed)
    assert ("network_flags", flags) in trt.calls
    assert (("flag", "FP16") in trt.calls) == fp16_flag
    assert info["strongly_typed"] == (not fp16_flag)


def test_tensorrt_11_refuses_weak_typing_before_touching_builder_flags(tmp_path, monkeypatch):
    import export.tensorrt as T

    trt = _FakeTRT(11)
    monkeypatch.setattr(T, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(T, "cuda_device_facts", lambda: {"gpu": "Fake GPU", "compute_capability": "9.0"})
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(BadInput, match=r"tensorrt 11\.3\.0 \| builds strongly typed networks only.*strongly_typed=True"):
        T.engine_from_onnx(tmp_path / "model.onnx", tmp_path / "model.plan", precision="fp16", strongly_typed=False)
    assert trt.calls == [] and not (tmp_path / "model.plan").exists()


def test_fake_tensorrt_enums_match_the_real_bindings():
    """Guards the fake itself: the values the real 10.x and 11.x modules expose."""
    t10, t11 = _FakeTRT(10), _FakeTRT(11)
    assert (t10.NetworkDefinitionCreationFlag.EXPLICIT_BATCH, t10.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == (0, 1)
    assert t11.NetworkDefinitionCreationFlag.STRONGLY_TYPED == 0
    assert not hasattr(t11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert hasattr(t10.BuilderFlag, "FP16") and not hasattr(t11.BuilderFlag, "FP16")
    assert not hasattr(t11.BuilderFlag, "INT8")

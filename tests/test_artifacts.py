"""Artifact checks at server start: a wrong file is refused before serving, naming the file and the fix.

Through the `hashret serve` CLI function (exit code 2 + the message on stderr) and the server
builder (the exception): a model file (model.onnx, model.int8.onnx) or TensorRT plan whose
sha256 differs from the export manifest, a gallery snapshot file whose sha256 differs from the
gallery manifest, a gallery of another code length or model, and manifests from a newer
schema_version. A TensorRT plan built by another TensorRT version is refused by
`check_engine_info`, tested directly (it needs no TensorRT).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hashret.errors import ArtifactMismatch, MissingArtifact
from tests.test_fuzz import build_gallery, model_id_of, shared_exp

REEXPORT = "re-export it"
REBUILD = "rebuild with `hashret index build`"


@pytest.fixture(scope="module")
def exp_all(tmp_path_factory) -> Path:
    """The tiny export plus model.int8.onnx and a TensorRT model.plan + engine.json, all in the manifest."""
    from hashret.manifest import file_entry

    exp = tmp_path_factory.mktemp("artifacts") / "exp"
    shutil.copytree(shared_exp(tmp_path_factory), exp)
    shutil.copy(exp / "model.onnx", exp / "model.int8.onnx")  # any valid ONNX of the same interface
    (exp / "model.plan").write_bytes(b"not really a TensorRT engine, but sha256-listed " * 20)
    (exp / "engine.json").write_text(json.dumps({"tensorrt_version": "8.6.1", "compute_capability": "8.0",
                                                 "gpu": "NVIDIA A100"}))
    m = json.loads((exp / "manifest.json").read_text())
    for name in ("model.int8.onnx", "model.plan"):
        m["export"]["files"][name] = file_entry(exp / name)
    (exp / "manifest.json").write_text(json.dumps(m, indent=2))
    return exp


@pytest.fixture(scope="module")
def gallery(exp_all, tmp_path_factory) -> Path:
    return build_gallery(exp_all, tmp_path_factory.mktemp("artifacts-gal") / "gal", n=12)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def serve_cli(exp: Path, gal: Path, capsys, *extra: str) -> tuple[int, str]:
    """`hashret serve` in-process; returns (exit code, stderr). Only for starts expected to fail."""
    from hashret.cli import main

    capsys.readouterr()
    code = main(["serve", "--model", str(exp), "--gallery", str(gal), "--port", "0", "--log-format", "text", *extra])
    return code, capsys.readouterr().err


def starts(exp: Path, gal: Path, **kw) -> bool:
    """Positive control: the untampered artifacts do start (and stop)."""
    from serve.server import BackgroundServer, ServeConfig

    cfg = ServeConfig(model=exp, gallery=gal, port=0, metrics_port=None, grace_s=0.5, decode_threads=1, **kw)
    with BackgroundServer(cfg) as srv:
        return srv.port > 0


def _tamper(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("backend,name", [("ort", "model.onnx"), ("ort-int8", "model.int8.onnx"),
                                          ("tensorrt", "model.plan")])
def test_model_file_differing_from_manifest_is_refused(exp_all, gallery, tmp_path, capsys, backend, name):
    exp = _copy(exp_all, tmp_path / "exp")
    gal = _copy(gallery, tmp_path / "gal")
    if backend.startswith("ort"):
        assert starts(exp, gal, backend=backend)
    _tamper(exp / name)
    code, err = serve_cli(exp, gal, capsys, "--backend", backend)
    assert code == 2, err
    assert f"{exp / name} | sha256" in err and "differs from the manifest" in err and REEXPORT in err, err
    # the same refusal from the server builder
    from serve.server import HashretServer, ServeConfig

    with pytest.raises(ArtifactMismatch, match=rf"{name} \| sha256 .* {REEXPORT}"):
        HashretServer(ServeConfig(model=exp, gallery=gal, port=0, backend=backend))


def test_truncated_model_file_is_refused(exp_all, gallery, tmp_path, capsys):
    exp = _copy(exp_all, tmp_path / "exp")
    p = exp / "model.onnx"
    p.write_bytes(p.read_bytes()[:100])
    code, err = serve_cli(exp, _copy(gallery, tmp_path / "gal"), capsys)
    assert code == 2 and str(p) in err and REEXPORT in err, err


def test_missing_model_file_is_refused(exp_all, gallery, tmp_path, capsys):
    exp = _copy(exp_all, tmp_path / "exp")
    (exp / "model.int8.onnx").unlink()
    code, err = serve_cli(exp, _copy(gallery, tmp_path / "gal"), capsys, "--backend", "ort-int8")
    assert code == 2 and str(exp / "model.int8.onnx") in err and "missing" in err and "re-run" in err, err


def test_tensorrt_plan_is_checked_before_tensorrt_is_needed(exp_all, gallery, tmp_path, capsys):
    """An intact plan passes the sha256 check; then the runtime decides (absent here, or another version)."""
    exp = _copy(exp_all, tmp_path / "exp")
    code, err = serve_cli(exp, _copy(gallery, tmp_path / "gal"), capsys, "--backend", "tensorrt", "--device", "cuda")
    assert code == 2 and "sha256" not in err, err
    assert ("tensorrt not installed" in err or "no CUDA GPU" in err or "built with TensorRT 8.6.1" in err), err


def test_gallery_file_differing_from_manifest_is_refused(exp_all, gallery, tmp_path, capsys):
    gal = _copy(gallery, tmp_path / "gal")
    (snap,) = gal.glob("snapshot-*.codes.npy")
    _tamper(snap)
    code, err = serve_cli(exp_all, gal, capsys)
    assert code == 2, err
    assert f"{snap} | sha256" in err and "does not match the manifest" in err and f"restore it or {REBUILD}" in err, err


@pytest.mark.parametrize("bits", [32, 128])
def test_gallery_of_another_code_length_is_refused(exp_all, tmp_path, capsys, bits):
    from serve.gallery import create_gallery

    gal = tmp_path / "gal"
    create_gallery(gal, "faiss-flat", bits, model_id_of(exp_all)).close()
    code, err = serve_cli(exp_all, gal, capsys)
    assert code == 2 and str(gal) in err and f"({bits} bits)" in err and "(64 bits)" in err and REBUILD in err, err


def test_gallery_of_another_model_is_refused(exp_all, tmp_path, capsys):
    from serve.gallery import create_gallery

    gal = tmp_path / "gal"
    create_gallery(gal, "faiss-flat", 64, "c0ffee00" * 8).close()
    code, err = serve_cli(exp_all, gal, capsys)
    assert code == 2 and str(gal) in err and "c0ffee00" in err and model_id_of(exp_all)[:8] in err and REBUILD in err


def test_newer_export_manifest_is_refused(exp_all, gallery, tmp_path, capsys):
    from hashret.manifest import SCHEMA_VERSION

    exp = _copy(exp_all, tmp_path / "exp")
    m = json.loads((exp / "manifest.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (exp / "manifest.json").write_text(json.dumps(m))
    code, err = serve_cli(exp, _copy(gallery, tmp_path / "gal"), capsys)
    assert code == 2 and str(exp / "manifest.json") in err, err
    assert f"schema_version {SCHEMA_VERSION + 1} is newer" in err and "upgrade hashret" in err, err


def test_newer_gallery_manifest_is_refused(exp_all, gallery, tmp_path, capsys):
    from serve.gallery import SCHEMA_VERSION

    gal = _copy(gallery, tmp_path / "gal")
    m = json.loads((gal / "manifest.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (gal / "manifest.json").write_text(json.dumps(m))
    code, err = serve_cli(exp_all, gal, capsys)
    assert code == 2 and str(gal / "manifest.json") in err, err
    assert f"schema_version {SCHEMA_VERSION + 1}" in err and "upgrade hashret" in err and REBUILD in err, err


def test_export_manifest_of_wrong_kind_is_refused(exp_all, gallery, tmp_path, capsys):
    """Passing a gallery (or RUN) folder as --model: refused naming the manifest and what to check."""
    code, err = serve_cli(gallery, _copy(gallery, tmp_path / "gal"), capsys)
    assert code == 2 and str(gallery / "manifest.json") in err and "expected export" in err, err


# ---- TensorRT: the build facts in engine.json against this runtime --------------------------
def test_tensorrt_plan_from_another_version_or_gpu_is_refused(tmp_path):
    from hashret.engines.tensorrt_engine import check_engine_info, read_engine_info

    plan = tmp_path / "exp" / "model.plan"
    info = {"tensorrt_version": "10.3.0", "compute_capability": "8.9", "gpu": "NVIDIA L4"}
    here = {"gpu": "NVIDIA L4", "compute_capability": "8.9"}
    check_engine_info(info, "10.3.0", here, plan)  # the same build: accepted
    with pytest.raises(ArtifactMismatch, match=r"model\.plan \| built with TensorRT 10\.3\.0, this runtime is "
                                               r"TensorRT 10\.7\.0: rebuild with hashret export .*--formats tensorrt"):
        check_engine_info(info, "10.7.0", here, plan)
    with pytest.raises(ArtifactMismatch, match=r"model\.plan \| built for compute capability 8\.9 .*this GPU is 9\.0"):
        check_engine_info(info, "10.3.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"}, plan)
    plan.parent.mkdir()
    with pytest.raises(MissingArtifact, match=r"engine\.json \| missing beside model\.plan"):
        read_engine_info(plan)
    (plan.parent / "engine.json").write_text("{torn")
    with pytest.raises(ArtifactMismatch, match=r"engine\.json \| not valid JSON"):
        read_engine_info(plan)


def test_manifest_bits_disagreeing_with_the_model_is_refused_at_start(exp_all, tmp_path, capsys):
    """A hand-edited `bits` passes every file hash; the warm-up inference at start catches it."""
    from serve.gallery import create_gallery

    exp = _copy(exp_all, tmp_path / "exp")
    m = json.loads((exp / "manifest.json").read_text())
    m["bits"] = 32  # the model really outputs 64
    (exp / "manifest.json").write_text(json.dumps(m))
    gal = tmp_path / "gal"
    create_gallery(gal, "faiss-flat", 32, model_id_of(exp)).close()
    code, err = serve_cli(exp, gal, capsys)
    assert code == 2 and "does not produce what its manifest says (32 bits)" in err and "re-export" in err, err


# ---- start-up: one manifest read, galleries of the previous release ---------------------------
def test_start_reads_the_export_manifest_once(exp_all, gallery, tmp_path, monkeypatch):
    """The EXP manifest is read once at start: the gallery check and the engine share it."""
    import hashret.manifest as hm

    reads: list[Path] = []
    real = hm.read_json
    monkeypatch.setattr(hm, "read_json", lambda path, what="file": reads.append(Path(path)) or real(path, what))
    gal = _copy(gallery, tmp_path / "gal")
    assert starts(exp_all, gal)
    assert reads.count(exp_all / "manifest.json") == 1, reads
    assert reads.count(gal / "manifest.json") >= 1, reads


def test_gallery_of_the_previous_release_is_served(tmp_path):
    """tests/data/gallery-v1-faiss-flat (written by hashret 0.1.0) serves searches and takes writes."""
    from benchmarks.soak import synthetic_images
    from serve.client import Item, RetrievalClient
    from serve.server import BackgroundServer, ServeConfig
    from benchmarks.tiny_exp import build_tiny_exp

    exp = build_tiny_exp(tmp_path / "exp16", bits=16)
    gal = shutil.copytree(Path(__file__).parent / "data" / "gallery-v1-faiss-flat", tmp_path / "gal")
    m = json.loads((gal / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["model"]["bits"] == 16
    m["model"]["sha256"] = model_id_of(exp)  # bind it to this export (the v1 checksum seals only the file list)
    (gal / "manifest.json").write_text(json.dumps(m))
    image = next(iter(synthetic_images(1, (160, 120), seed=5)))
    cfg = ServeConfig(model=exp, gallery=gal, port=0, metrics_port=None, grace_s=0.5, decode_threads=1,
                      token="v1-token")
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address, token="v1-token") as c:
        assert c.info().gallery.size == 4
        assert {h.id for h in c.search(image, k=10)} == {"a.jpg", "b.jpg", "c/ü.jpg", "e.jpg"}
        code, _ = c.encode(image)
        assert c.upsert([Item("new.jpg", code=code, metadata={"label": "9"})]) == 1
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address) as c:
        top = c.search(image, k=1)[0]
        assert (top.id, top.distance, top.metadata) == ("new.jpg", 0, {"label": "9"})
        assert c.info().gallery.size == 5

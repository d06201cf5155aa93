"""The benchmark suite runs end to end on tiny sizes and writes the JSON/markdown it promises.

Only shapes, keys and exact-vs-exact agreement are checked here: a timing is never asserted.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import machine, report, search
from hashret.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]


def bench_parser() -> argparse.ArgumentParser:
    from benchmarks import cli

    p = argparse.ArgumentParser(prog="hashret bench")
    cli.add_args(p)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    args = bench_parser().parse_args(argv)
    args._argv = ["hashret", "bench", *argv]
    return args


# --------------------------------------------------------------------------- machine


def test_run_meta_records_command_machine_and_versions():
    meta = machine.run_meta("x", threads={"faiss": 1}, argv=["/usr/bin/hashret", "bench", "search", "--sizes", "10"])
    assert meta["command"] == "hashret bench search --sizes 10"
    assert meta["argv"][-1] == "10"
    m = meta["machine"]
    assert m["cpu_model"] and m["cpus"]["logical"] >= 1
    assert m["threads_used"] == {"faiss": 1}
    assert isinstance(m["gpus"], list)
    assert meta["versions"]["numpy"] == np.__version__
    assert "T" in meta["date"]


def test_int_list_and_percentiles():
    assert machine.int_list("1,8, 32") == [1, 8, 32]
    assert machine.int_list("1e6,1_000") == [1_000_000, 1000]
    with pytest.raises(argparse.ArgumentTypeError):
        machine.int_list("a")
    p = machine.percentiles([1.0, 2.0, 3.0, 4.0])
    assert p["n"] == 4 and p["p50_ms"] == pytest.approx(2.5) and p["min_ms"] == 1.0


def test_help_shows_defaults():
    p = bench_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"engine", "serve", "search", "parity", "report"}
    for name, sp in sub.choices.items():
        text = sp.format_help()
        assert "(default:" in text, name


# --------------------------------------------------------------------------- search


def test_make_codes_real_has_class_structure():
    db, q = search.make_codes(500, 64, "real", n_classes=5, noise=0.05, seed=1, n_queries=10)
    assert db.shape == (500, 8) and q.shape == (10, 8) and db.dtype == np.uint8
    d = search.exact_distances(q, db, 1)
    assert d.max() <= 16  # a query lies near its class prototype, so near some gallery code
    r_db, r_q = search.make_codes(500, 64, "random", seed=1, n_queries=10)
    assert search.exact_distances(r_q, r_db, 1).mean() > d.mean()
    again, _ = search.make_codes(500, 64, "real", n_classes=5, noise=0.05, seed=1, n_queries=10)
    assert np.array_equal(db, again)


def test_make_codes_draws_with_metrics_synthetic_codes():
    from hashret.metrics import synthetic_codes

    db, q = search.make_codes(300, 32, "real", n_classes=7, noise=0.1, seed=5, n_queries=20, chunk=64)
    codes, _ = synthetic_codes(320, 32, 7, 0.1, seed=5, chunk=64)
    assert np.array_equal(q, codes[:20]) and np.array_equal(db, codes[20:])
    # the queries do not depend on the gallery size, and a smaller gallery is a prefix of a larger
    # one, chunk boundaries or not (300 + 20 and 1001 + 20 are no multiples of 64 or 50)
    for chunk in (64, 50):
        db, q = search.make_codes(300, 32, "real", n_classes=7, noise=0.1, seed=5, n_queries=20, chunk=chunk)
        db_big, q_big = search.make_codes(1001, 32, "real", n_classes=7, noise=0.1, seed=5, n_queries=20, chunk=chunk)
        assert np.array_equal(q, q_big) and np.array_equal(db, db_big[:300])
    with pytest.raises(BadInput, match="--bits"):
        search.make_codes(10, 12)


def test_chunked_synthetic_codes_keep_the_model():
    """chunk= only changes how the draw is made: same prototypes, same flip rate, same label law."""
    from hashret.metrics import synthetic_codes

    B, L = synthetic_codes(4000, 64, 4, 0.1, seed=2)
    Bc, Lc = synthetic_codes(4000, 64, 4, 0.1, seed=2, chunk=1000)
    assert Bc.shape == B.shape and Bc.dtype == np.uint8 and Lc.dtype == np.int64
    assert np.array_equal(synthetic_codes(4000, 64, 4, 0.1, seed=2, chunk=1000)[0], Bc)  # seeded
    bits, bits_c = np.unpackbits(B, axis=1), np.unpackbits(Bc, axis=1)
    for c in range(4):  # the per-class majority code is the prototype, the same in both draws
        proto, proto_c = bits[L == c].mean(0) > 0.5, bits_c[Lc == c].mean(0) > 0.5
        assert np.array_equal(proto, proto_c)
        assert abs((bits_c[Lc == c] != proto_c).mean() - 0.1) < 0.01  # the flip rate
    assert np.bincount(Lc, minlength=4).min() > 900
    with pytest.raises(BadInput, match="chunk"):
        synthetic_codes(10, 16, 2, 0.1, chunk=0)


def test_recall_is_tie_aware():
    db = np.array([[0], [0], [1], [3]], np.uint8)  # distances to query 0: 0, 0, 1, 2
    q = np.zeros((1, 1), np.uint8)
    exact = search.exact_distances(q, db, 2)
    assert exact.tolist() == [[0, 0]]
    assert search.recall_at_k(q, db, np.array([[1, 0]]), exact) == 1.0
    assert search.recall_at_k(q, db, np.array([[0, 2]]), exact) == 0.5
    exact3 = search.exact_distances(q, db, 3)
    assert search.recall_at_k(q, db, np.array([[0, 1, 2]]), exact3) == 1.0
    assert search.recall_at_k(q, db, np.array([[0, 1, -1]]), exact3) == pytest.approx(2 / 3)


def test_search_bench_end_to_end(tmp_path):
    out = tmp_path / "search.json"
    args = parse(["search", "--sizes", "2000", "--queries", "20", "--k", "10,50",
                  "--kinds", "numpy,faiss-flat,faiss-hnsw", "--hnsw-ef-search", "8,64", "--warmup", "1",
                  "--batch-repeats", "1", "--out", str(out)])
    assert search.run(args) == 0
    doc = json.loads(out.read_text())
    for key in ("benchmark", "command", "argv", "date", "machine", "versions", "config", "results",
                "skipped", "notes"):
        assert key in doc, key
    assert doc["benchmark"] == "search"
    assert doc["command"].startswith("hashret bench search --sizes 2000")
    assert doc["machine"]["threads_used"]["faiss_search"] == 1
    rows = doc["results"]
    assert {r["kind"] for r in rows} == {"numpy", "faiss-flat", "faiss-hnsw"}
    assert len([r for r in rows if r["kind"] == "faiss-hnsw"]) == 4  # 2 efSearch x 2 k
    for r in rows:
        for key in ("p50_ms", "p90_ms", "p99_ms", "qps"):
            assert r["per_query"][key] >= 0
        assert r["batch"]["per_query_ms"] >= 0
        assert r["build_s"] >= 0
        assert r["memory"]["index_bytes"] > 0
        assert 0.0 <= r["recall"] <= 1.0
        if r["kind"] in ("numpy", "faiss-flat"):
            assert r["recall"] == 1.0 and r["recall_batch"] == 1.0


def test_flat_matches_numpy_exactly():
    db, q = search.make_codes(3000, 32, "real", n_classes=20, noise=0.1, seed=3, n_queries=15)
    a, b = search.NumpySearcher(32), search.FaissFlatSearcher(32)
    a.build(db)
    b.build(db)
    ia, ib = a.search(q, 25), b.search(q, 25)
    da = search._popcount_rows(q[:, None, :], db[ia])
    db_ = search._popcount_rows(q[:, None, :], db[ib])
    assert np.array_equal(da, db_)
    assert np.array_equal(da, search.exact_distances(q, db, 25))


def test_search_kinds_come_from_the_index_registry(tmp_path):
    """A kind registered in serve.gallery.INDEX_KINDS is offered and timed, through its gallery."""
    from serve.gallery import INDEX_KINDS
    from serve.gallery.faiss_index import FaissFlatGallery

    class ProbeFlat(FaissFlatGallery):
        kind = "bench-probe-flat"

    assert search.all_kinds()[0] == "numpy" and set(search.all_kinds()[1:]) == set(INDEX_KINDS.names())
    out = tmp_path / "s.json"
    with INDEX_KINDS.registered(ProbeFlat.kind, ProbeFlat):
        assert ProbeFlat.kind in search.all_kinds()
        sub = next(a for a in bench_parser()._actions if isinstance(a, argparse._SubParsersAction))
        assert ProbeFlat.kind in sub.choices["search"].format_help()
        args = parse(["search", "--sizes", "500", "--queries", "8", "--k", "5", "--kinds", f"numpy,{ProbeFlat.kind}",
                      "--warmup", "0", "--batch-repeats", "1", "--out", str(out)])
        assert search.run(args) == 0
    assert ProbeFlat.kind not in search.all_kinds()
    doc = json.loads(out.read_text())
    rows = {r["kind"]: r for r in doc["results"]}
    assert set(rows) == {"numpy", ProbeFlat.kind}
    probe = rows[ProbeFlat.kind]
    assert probe["recall"] == 1.0 and probe["recall_batch"] == 1.0  # an exact index, ids mapped back to rows
    assert probe["memory"]["disk_bytes"] > 0
    assert any(ProbeFlat.kind in n and "through its gallery" in n for n in doc["notes"])
    with pytest.raises(BadInput, match="unknown: choose from numpy, faiss-flat"):
        search.run(parse(["search", "--kinds", ProbeFlat.kind, "--out", str(out)]))


def test_hnsw_defaults_are_the_gallery_options():
    from serve.gallery.faiss_index import FaissHNSWGallery

    args = parse(["search"])
    assert args.hnsw_m == FaissHNSWGallery.OPTIONS["M"][0]
    assert args.hnsw_ef_construction == FaissHNSWGallery.OPTIONS["ef_construction"][0]


def test_search_caps_milvus_and_reports_skip(tmp_path):
    out = tmp_path / "s.json"
    args = parse(["search", "--sizes", "300", "--queries", "5", "--k", "5", "--kinds", "numpy,milvus",
                  "--milvus-max", "100", "--warmup", "0", "--batch-repeats", "1", "--out", str(out)])
    assert search.run(args) == 0
    doc = json.loads(out.read_text())
    assert [s["kind"] for s in doc["skipped"]] == ["milvus"]
    assert any("Milvus Lite is capped" in n for n in doc["notes"])


@pytest.mark.slow
def test_search_milvus_lite_small(tmp_path):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    out = tmp_path / "m.json"
    args = parse(["search", "--sizes", "1000", "--queries", "5", "--k", "10", "--kinds", "faiss-flat,milvus",
                  "--warmup", "0", "--batch-repeats", "1", "--out", str(out)])
    assert search.run(args) == 0
    rows = json.loads(out.read_text())["results"]
    milvus = [r for r in rows if r["kind"] == "milvus"]
    assert milvus and milvus[0]["recall"] == 1.0


# --------------------------------------------------------------------------- engine


class FakeEngine:
    """Stands in for a hashret Engine: encode(uint8 [N,H,W,3]) -> float32 [N, bits]."""

    def __init__(self, bits=16):
        self.bits = bits
        self.closed = False

    def encode(self, x):
        assert x.dtype == np.uint8 and x.ndim == 4
        return np.zeros((x.shape[0], self.bits), np.float32)

    def describe(self):
        return {"engine": "fake", "intra_op_threads": 1}

    def close(self):
        self.closed = True


def test_engine_bench_with_fake_engines():
    from benchmarks import engine
    from hashret.errors import Unavailable

    def opener(exp, backend, device, **opts):
        if backend == "missing":
            raise Unavailable("backend missing | not installed here")
        if backend == "broken":
            raise RuntimeError("boom")
        return FakeEngine()

    out = engine.run_engine_bench("EXP", ["fake", "missing", "broken"], batches=[1, 4], iters=3, warmup=1,
                                  threads=2, opener=opener, size=8, progress=lambda *_: None)
    assert [(r["backend"], r["batch"]) for r in out["results"]] == [("fake", 1), ("fake", 4)]
    for r in out["results"]:
        assert r["iters"] == 3 and r["img_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] >= 0
        assert r["threads"] == {"intra_op_threads": 1}
    reasons = {s["backend"]: s["reason"] for s in out["skipped"]}
    assert "not installed" in reasons["missing"] and "boom" in reasons["broken"]


def test_engine_bench_thread_option_comes_from_the_registry():
    from benchmarks import engine
    from hashret.engines import ENGINES

    assert engine.all_backends() == [name for name, _ in ENGINES.items()] and engine.all_backends()[0] == "torch"
    assert engine.thread_options("ort-int8", 2) == {"intra_op_threads": 2}
    assert engine.thread_options("openvino", 2) == {"threads": 2}
    assert engine.thread_options("tensorrt", 2) == {}  # no CPU thread knob
    assert engine.thread_options("ort", 0) == {} and engine.thread_options("not-registered", 2) == {}
    seen = {}

    def opener(exp, backend, device, **opts):
        seen[backend] = opts
        return FakeEngine()

    engine.run_engine_bench("EXP", ["ort", "torch"], batches=[1], iters=1, warmup=0, threads=3,
                            options={"threads": 1}, opener=opener, size=8, progress=lambda *_: None)
    # an explicit --option wins over the mapped --threads
    assert seen == {"ort": {"intra_op_threads": 3, "threads": 1}, "torch": {"threads": 1}}


def test_standalone_mains_share_error_handling(tmp_path, capsys):
    """`python -m benchmarks.X` turns a HashretError into `error: ...` and its exit code, like `hashret`."""
    from benchmarks import cli, gpu_search

    assert gpu_search.main(["--bits", "12", "--sizes", "10", "--device", "cpu", "--methods", "torch-lut",
                            "--out", str(tmp_path / "g.json")]) == 2
    assert "error: --bits" in capsys.readouterr().err
    assert cli.main(["search", "--kinds", "nope", "--out", str(tmp_path / "s.json")]) == 2
    assert "error: --kinds nope | unknown: choose from numpy" in capsys.readouterr().err
    assert report.main(["--results", str(tmp_path / "missing"), "--out", str(tmp_path / "r.md")]) == 2
    assert "error: results folder" in capsys.readouterr().err


def test_engine_option_parsing():
    from benchmarks.engine import parse_option

    assert parse_option("precision=fp32") == ("precision", "fp32")
    assert parse_option("graph_batches=1,8") == ("graph_batches", (1, 8))
    assert parse_option("graph_batches=") == ("graph_batches", ())
    assert parse_option("threads=2") == ("threads", 2)


# --------------------------------------------------------------------------- serve


@pytest.fixture()
def fake_server():
    """A tiny Retrieval server on 127.0.0.1: Search answers one hit; an image b'bad' is refused."""
    from concurrent import futures

    import grpc

    from serve._proto import retrieval_pb2 as pb
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.RetrievalServicer):
        def Search(self, request, context):
            if request.image == b"bad":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad image")
            return pb.SearchResponse(hits=[pb.Hit(id="a", distance=1)], model_id="m")

        def Info(self, request, context):
            return pb.InfoResponse(model_id="m", backend="fake")

    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_RetrievalServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_serve_load_counts_requests_and_errors(fake_server):
    from benchmarks import serve_load

    rows = serve_load.run_load(fake_server, [b"ok", b"ok", b"bad", b"ok"], concurrency=[1, 4],
                               max_requests=40, seconds=20, warmup=2, channels=2, progress=lambda *_: None)
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["sent"] == 40 and r["stopped_by"] == "requests"
        assert r["errors"] == {"INVALID_ARGUMENT": 10}
        assert r["ok"] == 30 and r["requests_per_s"] > 0
        assert r["p99_ms"] >= r["p50_ms"] > 0
    assert serve_load.server_info(fake_server)["backend"] == "fake"


def test_serve_bench_cli_against_addr(fake_server, tmp_path):
    from benchmarks import serve_load

    out = tmp_path / "serve.json"
    args = parse(["serve", "--addr", fake_server, "--concurrency", "2", "--requests", "10", "--warmup", "0",
                  "--out", str(out)])
    assert serve_load.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "serve" and doc["results"][0]["ok"] == 10
    assert doc["config"]["images"].startswith("8 synthetic")


# --------------------------------------------------------------------------- report


def test_report_regenerates_markdown(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    doc = {**machine.run_meta("search", argv=["hashret", "bench", "search", "--sizes", "2000"]),
           "config": {"bits": 64}, "skipped": [{"kind": "milvus", "size": 2000, "reason": "capped"}],
           "notes": ["a note"], "bars": [],
           "results": [{"kind": "faiss-flat", "label": "faiss-flat", "size": 2000, "bits": 64, "data": "real",
                        "k": 10, "threads": 1, "build_threads": 1, "params": {}, "build_s": 0.01,
                        "memory": {"index_bytes": 16000, "rss_delta_bytes": 0},
                        "per_query": {"p50_ms": 0.01, "p90_ms": 0.02, "p99_ms": 0.03, "qps": 1000.0},
                        "batch": {"per_query_ms": 0.005}, "recall": 1.0, "recall_batch": 1.0}]}
    (results / "search.json").write_text(json.dumps(doc))
    serve_doc = {**machine.run_meta("serve", argv=["hashret", "bench", "serve", "--addr", "x:1"]),
                 "results": [{"concurrency": 1, "channels": 1, "rpc": "Search", "ok": 5, "sent": 5,
                              "requests_per_s": 50.0, "images_per_s": 50.0, "p50_ms": 2.0, "p90_ms": 3.0,
                              "p99_ms": 4.0, "errors": {}}]}
    (results / "serve.json").write_text(json.dumps(serve_doc))
    (results / "junk.json").write_text("{not json")
    md = tmp_path / "RESULTS.md"
    assert report.main(["--results", str(results), "--out", str(md)]) == 0
    text = md.read_text()
    assert "`hashret bench search --sizes 2000`" in text
    assert "`hashret bench serve --addr x:1`" in text
    assert "| faiss-flat | 2,000 | 64 | 10 |" in text
    assert "Skipped milvus at 2,000: capped" in text
    assert "junk.json" in text  # listed as not included
    assert machine.cpu_model() in text
    if report.pyplot() is not None:
        assert (results / "plots" / "search.png").is_file()
        assert "plots/search.png" in text


# --------------------------------------------------------------------------- parity


def _parity_doc() -> dict:
    rows = [{"backend": "torch", "status": "ok", "bit_agreement": 1.0, "mAP@all": 0.5, "mAP_delta": 0.0,
             "mAP@10": 0.6, "top10_overlap": 1.0, "at_risk": 0.01, "max_abs_diff": 0.0, "latency_ms_bs1": 9.0},
            {"backend": "ort-int8", "status": "ok", "bit_agreement": 0.98, "mAP@all": 0.49, "mAP_delta": -0.01,
             "mAP@10": 0.58, "top10_overlap": 0.9, "at_risk": 0.01, "max_abs_diff": 0.2, "latency_ms_bs1": 4.0},
            {"backend": "tensorrt", "status": "skipped: no GPU"}]
    return {**machine.run_meta("parity", argv=["hashret", "bench", "parity", "--bits", "16,32"]),
            "results": [{"bits": 16, "rows": rows}, {"bits": 32, "rows": rows}]}


def test_parity_table_and_plot(tmp_path):
    from benchmarks import parity_bench

    head, rows = parity_bench.report_table(_parity_doc())
    assert len(rows) == 6 and rows[2][1] == "tensorrt" and rows[2][3] == "-"
    assert rows[1][:3] == [16, "ort-int8", "ok"]
    if report.pyplot() is not None:
        assert parity_bench.plot(_parity_doc(), tmp_path / "p.png") and (tmp_path / "p.png").is_file()


def test_parity_needs_exactly_one_source():
    from benchmarks import parity_bench
    from hashret.errors import BadInput

    with pytest.raises(BadInput):
        parity_bench.run(parse(["parity"]))
    with pytest.raises(BadInput):
        parity_bench.run(parse(["parity", "--bits", "16", "--exps", "x"]))


@pytest.fixture(scope="module")
def tiny_exp(tmp_path_factory):
    """An EXP with model.pt, model.onnx and a 12-image golden set (random-init backbone, 16 bits)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from export.golden import split_maps
    from export.onnx_format import onnx_from_run
    from hashret.codes import pack
    from hashret.manifest import SCHEMA_VERSION, file_entry, now_iso, versions, write_manifest
    from hashret.models import HashEncoder, HashHead, build_backbone

    exp = tmp_path_factory.mktemp("tiny-exp")
    torch.manual_seed(0)
    bb = build_backbone("efficientnet-lite0", "none")
    enc = HashEncoder(bb, HashHead(bb.dim, 16, 64, 0.0)).eval()
    torch.save(enc.state_dict(), exp / "model.pt")
    onnx_from_run(None, exp / "model.onnx", exporter="legacy", slim=False, encoder=enc)
    crop = int(bb.spec.crop)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, crop, crop, 3), dtype=np.uint8)
    with torch.inference_mode():
        acts = enc(torch.from_numpy(images)).numpy()
    labels = np.arange(12) % 3
    is_query = np.arange(12) < 3
    maps = split_maps(acts, labels, is_query)
    np.savez(exp / "golden.npz", images=images, labels=labels, is_query=is_query,
             paths=np.array([f"img{i}.jpg" for i in range(12)]), activations=acts.astype(np.float32),
             codes=pack(acts), bits=np.int64(16), map_all=np.float64(maps["mAP@all"]),
             map_10=np.float64(maps["mAP@10"]))
    write_manifest(exp, {
        "schema_version": SCHEMA_VERSION, "kind": "export", "created": now_iso(), "bits": 16,
        "preprocessing": bb.spec.to_dict(),
        "backbone": {"name": bb.name, "weights": "none", "feature_dim": bb.dim},
        "head": {"hidden": 64, "dropout": 0.0}, "method": {"name": "dch"},
        "export": {"files": {f: file_entry(exp / f) for f in ("model.onnx", "model.pt", "golden.npz")}},
        "versions": versions(),
    })
    return exp


@pytest.mark.slow
def test_parity_bench_on_an_export(tiny_exp, tmp_path):
    from benchmarks import parity_bench

    out = tmp_path / "parity.json"
    args = parse(["parity", "--exps", str(tiny_exp), "--backends", "ort,ort-int8", "--latency-runs", "1",
                  "--out", str(out)])
    assert parity_bench.run(args) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "parity" and doc["command"].startswith("hashret bench parity --exps")
    model = doc["results"][0]
    assert model["bits"] == 16 and model["golden"]["n"] == 12
    rows = {r["backend"]: r for r in model["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["bit_agreement"] == 1.0
    assert rows["ort"]["status"] == "ok" and rows["ort"]["bit_agreement"] > 0.9
    assert rows["ort-int8"]["status"] != "ok"  # this export has no INT8 file: listed, not fatal


@pytest.mark.slow
def test_engine_bench_on_an_export(tiny_exp, tmp_path):
    from benchmarks import engine

    out = tmp_path / "engine.json"
    args = parse(["engine", str(tiny_exp), "--backends", "ort,tensorrt", "--batches", "1,2", "--iters", "2",
                  "--warmup", "1", "--threads", "1", "--out", str(out)])
    assert engine.run(args) == 0
    doc = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in doc["results"]] == [("ort", 1), ("ort", 2)]
    assert doc["results"][0]["threads"].get("intra_op_threads") == 1
    assert [s["backend"] for s in doc["skipped"]] == ["tensorrt"]
    assert doc["config"]["exp"]["bits"] == 16


def test_serve_load_refuses_remote_targets():
    from benchmarks import serve_load
    from hashret.errors import BadInput

    assert serve_load.is_loopback("127.0.0.1:50051") and serve_load.is_loopback("[::1]:1")
    assert not serve_load.is_loopback("10.0.0.1:50051")
    with pytest.raises(BadInput, match="loopback"):
        serve_load.run(parse(["serve", "--addr", "10.0.0.1:50051"]))


def test_gpu_search_measures_the_served_index_kind(tmp_path):
    """`benchmarks.gpu_search --methods torch-flat` times the torch-flat index as a server
    searches it (on the CPU here): exact answers, and the row names how distances were counted."""
    from benchmarks import gpu_search

    out = tmp_path / "g.json"
    assert gpu_search.main(["--sizes", "3000", "--queries", "6", "--k", "1,10", "--device", "cpu", "--warmup", "1",
                            "--check-queries", "6", "--methods", "torch-flat,torch-swar", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    flat = [r for r in doc["results"] if r["method"] == "torch-flat"]
    assert [r["k"] for r in flat] == [1, 10] and all(r["recall"] == 1.0 for r in flat)
    assert all(r["scan"] == "torch-swar" and r["device_bytes"] == 3000 * 8 for r in flat)  # no CuPy on a CPU
    assert "scan" not in next(r for r in doc["results"] if r["method"] == "torch-swar")

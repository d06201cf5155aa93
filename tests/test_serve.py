"""The gRPC retrieval service end to end: a real server on 127.0.0.1, real Grocery images,
a real ONNX Runtime engine (efficientnet-lite0 + a seeded 64-bit head), real galleries.
"""
from __future__ import annotations

import asyncio

import importlib.util
import io
import json
import shutil
import struct
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from hashret import codes as hcodes
from hashret.errors import ArtifactMismatch
from hashret.images import PreprocessSpec, load_image
from serve.client import Item, ItemError, RetrievalClient
from serve.server import BackgroundServer, ServeConfig
from serve.service import Limits
from tests.pki import make_pki

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
N_GALLERY, N_QUERY = 60, 10
MAX_IMAGE_BYTES = 2 * 1024 * 1024
MAX_MESSAGE_BYTES = 3 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_K = 100
SC = grpc.StatusCode


# ---- fixtures: model, data, galleries, servers -------------------------------------------
@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory) -> Path:
    """An EXP folder: ImageNet efficientnet-lite0 + a seeded 64-bit head, exported to ONNX."""
    import torch

    from export.onnx_format import onnx_from_run
    from hashret.manifest import SCHEMA_VERSION, file_entry, now_iso, versions, write_manifest
    from hashret.models import HashEncoder, HashHead, build_backbone

    exp = tmp_path_factory.mktemp("exp")
    torch.manual_seed(0)
    bb = build_backbone("efficientnet-lite0", "imagenet")
    enc = HashEncoder(bb, HashHead(bb.dim, 64)).eval()
    onnx_from_run(None, exp / "model.onnx", exporter="legacy", slim=False, encoder=enc)
    write_manifest(exp, {
        "schema_version": SCHEMA_VERSION, "kind": "export", "created": now_iso(), "bits": 64,
        "preprocessing": bb.spec.to_dict(),
        "backbone": {"name": bb.name, "weights": bb.weights, "feature_dim": bb.dim},
        "method": {"name": "hashnet"}, "dataset": {"format": "grocery"},
        "export": {"files": {"model.onnx": file_entry(exp / "model.onnx")}},
        "versions": versions(),
    })
    return exp


@pytest.fixture(scope="module")
def spec(exp_dir) -> PreprocessSpec:
    return PreprocessSpec.from_dict(json.loads((exp_dir / "manifest.json").read_text())["preprocessing"])


@pytest.fixture(scope="module")
def engine(exp_dir):
    from hashret.engines import open_engine

    eng = open_engine(exp_dir, "ort")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def data(grocery_root):
    """60 gallery images spread over the classes, 10 query photos (test split)."""
    from hashret.datasets import read_dataset

    splits = read_dataset(grocery_root, "grocery")
    db = splits.database[:: len(splits.database) // N_GALLERY][:N_GALLERY]
    queries = [s.path for s in splits.query[:: len(splits.query) // N_QUERY][:N_QUERY]]
    return splits, db, queries


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory, exp_dir, engine, data) -> Path:
    """A faiss-flat gallery built by `index_cli.build` (never opened by a server: copy it first)."""
    from serve.index_cli import build

    splits, db, _ = data
    root = Path(splits.root)
    paths = [s.path for s in db]
    ids = [str(Path(p).relative_to(root).as_posix()) for p in paths]
    metas = [{"path": i, "label": str(s.label), "class": splits.class_names.get(s.label, "")} for i, s in zip(ids, db)]
    out = tmp_path_factory.mktemp("gal") / "grocery"
    summary = build(exp_dir, out, paths, ids, metas, engine=engine, progress=False)
    assert summary["size"] == N_GALLERY
    return out


def copy_gallery(src: Path, tmp_path_factory, name: str = "copy") -> Path:
    dst = tmp_path_factory.mktemp(name) / "gal"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def config(exp_dir, gal, **kw) -> ServeConfig:
    base = dict(
        model=exp_dir, gallery=gal, host="127.0.0.1", port=0, token=TOKEN, metrics_port=0, grace_s=2.0,
        limits=Limits(max_k=MAX_K, max_image_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_PIXELS),
        max_message_bytes=MAX_MESSAGE_BYTES, decode_threads=2,
    )
    base.update(kw)
    return ServeConfig(**base)


@pytest.fixture(scope="module")
def server(exp_dir, gallery_dir, tmp_path_factory):
    with BackgroundServer(config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "served"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server.address, timeout=30) as c:
        yield c


def offline_search(engine, spec, gallery_dir, images, k, rerank_factor=10):
    """What the server should answer: the same engine (bs=1), packed, searched in the same gallery,
    re-ranked by the activations as the server does by default (--rerank-factor 10)."""
    from serve.gallery import open_gallery

    g = open_gallery(gallery_dir)
    try:
        out = []
        for img in images:
            z = engine.encode(load_image(img, spec)[None])
            out.append([(h.id, h.distance) for h in g.search(hcodes.pack(z), k, None, z, rerank_factor)[0]])
        return out
    finally:
        g.close()


def as_pairs(hits):
    return [(h.id, h.distance) for h in hits]


class SlowEngine:
    """A real engine that takes at least `delay` seconds per batch: makes queues fill up."""

    def __init__(self, engine, delay: float):
        self.inner, self.delay = engine, delay
        self.bits, self.name, self.calls = engine.bits, "ort-slow", 0

    def encode(self, images):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.encode(images)

    def close(self):
        pass


def wait_for(cond, timeout: float = 10.0) -> None:
    """Poll `cond()` until true: timing-independent on a loaded machine."""
    until = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.01)


def health_code(addr) -> str:
    with RetrievalClient(addr, timeout=5) as c:
        return c.health()


# ---- image corpus ------------------------------------------------------------------------
def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A ~70-byte PNG claiming width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo(data) -> Image.Image:
    return Image.open(data[2][0]).convert("RGB")


@pytest.fixture(scope="module")
def odd_images(photo) -> dict[str, bytes]:
    """Valid but unusual encodings: each must be served like training decodes it."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    sixteen = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    return {
        "exif-rotated": _jpeg(photo.transpose(Image.Transpose.ROTATE_90), exif=exif),
        "cmyk": _jpeg(photo.convert("CMYK")),
        "16-bit": _png(sixteen),
        "palette": _png(photo.convert("P", palette=Image.Palette.ADAPTIVE)),
        "alpha": _png(rgba),
        "grayscale": _jpeg(photo.convert("L")),
    }


# ---- tests -------------------------------------------------------------------------------
def test_stubs_are_fresh():
    spec_ = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    gen = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(gen)
    assert gen.stale_files() == [], "serve/_proto is stale: run python protos/generate.py"


def test_search_equals_offline(client, engine, spec, gallery_dir, data):
    queries = data[2]
    expected = offline_search(engine, spec, gallery_dir, queries, 10)
    for q, exp in zip(queries, expected):
        hits = client.search(q, k=10)
        assert as_pairs(hits) == exp
        assert hits[0].metadata["path"] == hits[0].id and "label" in hits[0].metadata
    # max_distance trims, Encode gives the same code, SearchBatch the same lists
    near = client.search(queries[0], k=10, max_distance=expected[0][2][1])
    assert as_pairs(near) == [p for p in expected[0] if p[1] <= expected[0][2][1]]
    code, bits = client.encode(queries[0])
    assert bits == 64 and code == hcodes.pack(engine.encode(load_image(queries[0], spec)[None]))[0].tobytes()
    batch = client.search_batch(queries[:4], k=10)
    assert [as_pairs(r) for r in batch] == expected[:4]


def test_gallery_image_is_found_at_distance_zero(client, data):
    splits, db, _ = data
    hits = client.search(db[7].path, k=1)
    assert hits[0].id == Path(db[7].path).relative_to(splits.root).as_posix() and hits[0].distance == 0


def test_server_threads_carry_os_names(client, data):
    """The batcher, decode, snapshot and engine threads have OS names (serve.threadnames), which
    is how `hashret bench serve` splits the server's CPU time by thread."""
    import os

    _, _, queries = data
    client.search(Path(queries[0]).read_bytes(), k=3)  # the decode pool starts its threads lazily
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            names.add(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            pass
    assert {"hashret-batcher", "hashret-decode_", "hashret-snapsho"} <= names, names
    if (os.cpu_count() or 1) > 1:  # ONNX Runtime starts intra-op threads only with more than one core
        assert "hashret-engine" in names, names


def test_64_concurrent_clients_match_sequential(server, client, data):
    queries = data[2]
    sequential = [as_pairs(client.search(q, k=5)) for q in queries]
    payloads = [Path(q).read_bytes() for q in queries]
    start = threading.Barrier(64)

    def one(i):
        with RetrievalClient(server.address, timeout=60) as c:
            c.health()  # connect before the barrier so the calls really overlap
            start.wait()
            return i % len(queries), as_pairs(c.search(payloads[i % len(queries)], k=5))

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for qi, pairs in results:
        assert pairs == sequential[qi]
    stats = server.server.service.batcher.stats
    assert stats.batches < stats.items  # some requests shared a batch


BAD = {
    "undecodable": (lambda p: b"this is not an image at all", SC.INVALID_ARGUMENT, "not a decodable image"),
    "truncated-jpeg": (lambda p: _jpeg(p)[: len(_jpeg(p)) // 2], SC.INVALID_ARGUMENT, "truncated"),
    "zero-bytes": (lambda p: b"", SC.INVALID_ARGUMENT, "empty"),
    "too-many-bytes": (lambda p: _jpeg(p) + b"\0" * MAX_IMAGE_BYTES, SC.INVALID_ARGUMENT, "exceeds the limit"),
    "over-message-limit": (lambda p: b"\xff" * (MAX_MESSAGE_BYTES + 1024), SC.RESOURCE_EXHAUSTED, ""),
    "decompression-bomb": (lambda p: bomb_png(), SC.INVALID_ARGUMENT, "pixel"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_images_get_invalid_argument_and_server_stays_healthy(server, client, photo, case):
    make, code, words = BAD[case]
    with pytest.raises(grpc.RpcError) as ei:
        client.search(make(photo), k=3)
    assert ei.value.code() == code, ei.value.details()
    assert words in (ei.value.details() or "")
    assert health_code(server.address) == "SERVING"


@pytest.mark.parametrize("case", ["exif-rotated", "cmyk", "16-bit", "palette", "alpha", "grayscale"])
def test_unusual_images_are_served_like_training(server, client, engine, spec, gallery_dir, odd_images, case):
    data_ = odd_images[case]
    expected = offline_search(engine, spec, gallery_dir, [data_], 5)[0]
    assert as_pairs(client.search(data_, k=5)) == expected
    assert health_code(server.address) == "SERVING"


def test_bad_requests_get_the_right_codes(server, client, data):
    q = data[2][0]
    cases = [
        (lambda: client.search(q, k=0), SC.INVALID_ARGUMENT, "k 0"),
        (lambda: client.search(q, k=MAX_K + 1), SC.INVALID_ARGUMENT, f"1..{MAX_K}"),
        (lambda: client.search(q, k=3, max_distance=65), SC.INVALID_ARGUMENT, "max_distance 65"),
        (lambda: client.delete(["no/such/id.jpg"]), SC.UNAUTHENTICATED, "authorization"),
    ]
    with RetrievalClient(server.address, token=TOKEN) as writer:
        cases += [
            (lambda: writer.delete(["no/such/id.jpg"]), SC.NOT_FOUND, "no/such/id.jpg"),
            (lambda: writer.delete([]), SC.INVALID_ARGUMENT, "no ids"),
            (lambda: writer.upsert([Item("", code=b"\0" * 8)]), SC.INVALID_ARGUMENT, "non-empty"),
            (lambda: writer.upsert([Item("x", code=b"\0" * 3)]), SC.INVALID_ARGUMENT, "8 (64 bits"),
            (lambda: writer.upsert([Item("x", image=b"junk")]), SC.INVALID_ARGUMENT, "upsert item #0"),
            (lambda: writer.upsert([Item("a" * 600, code=b"\0" * 8)]), SC.INVALID_ARGUMENT, "longer than"),
            (lambda: writer.upsert([Item("x", code=b"\0" * 8), Item("x", code=b"\0" * 8)]),
             SC.INVALID_ARGUMENT, "duplicate"),
        ]
        for call, code, words in cases:
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == code and words in ei.value.details(), (code, ei.value.details())
    assert client.info().gallery.size == N_GALLERY  # nothing was written
    assert health_code(server.address) == "SERVING"


def test_search_batch_reports_per_item_errors(client, data):
    q = data[2][:2]
    out = client.search_batch([q[0], b"junk", q[1], b""], k=3)
    assert isinstance(out[0], list) and isinstance(out[2], list) and len(out[0]) == 3
    assert isinstance(out[1], ItemError) and out[1].status == "INVALID_ARGUMENT" and out[1].code == 3
    assert "item 1" in out[1].message
    assert isinstance(out[3], ItemError) and "empty" in out[3].message


def test_writes_need_the_token_and_change_nothing_without_it(server, client, data):
    q = data[2][0]
    before = as_pairs(client.search(q, k=3))
    for token in (None, "wrong-token"):
        with RetrievalClient(server.address, token=token) as c:
            for call in (lambda: c.upsert([Item("new", image=q)]), lambda: c.delete([before[0][0]])):
                with pytest.raises(grpc.RpcError) as ei:
                    call()
                assert ei.value.code() == SC.UNAUTHENTICATED
    assert client.info().gallery.size == N_GALLERY
    assert as_pairs(client.search(q, k=3)) == before


def test_info(client, exp_dir):
    from hashret.engines import model_id

    info = client.info()
    assert info.model_id == model_id(json.loads((exp_dir / "manifest.json").read_text()))
    assert info.model.backbone == "efficientnet-lite0" and info.model.bits == 64 and info.model.method == "hashnet"
    assert info.model.preprocessing.crop == 224 and len(info.model.preprocessing.mean) == 3
    assert info.gallery.kind == "faiss-flat" and info.gallery.size == N_GALLERY
    assert info.gallery.model_id == info.model_id and info.backend.startswith("ort")
    assert info.limits.max_k == MAX_K and info.limits.max_batch == 32
    assert info.versions["grpcio"] == grpc.__version__ and "hashret" in info.versions


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert health_code(server.address) == "SERVING"
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="hashret.v1.Retrieval")])
        responses = list(stub.ServerReflectionInfo(req, timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"hashret.v1.Retrieval", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert responses[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe it


def test_metrics_endpoint(server, client, data):
    client.search(data[2][0], k=2)
    with pytest.raises(grpc.RpcError):
        client.search(data[2][0], k=0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for needle in ('hashret_rpc_latency_seconds_bucket{le="0.005",method="Search"}',
                   'hashret_rpc_errors_total{code="INVALID_ARGUMENT",method="Search"}',
                   "hashret_batch_size_bucket", "hashret_queue_depth", f"hashret_gallery_size {N_GALLERY}.0",
                   "hashret_inference_seconds_count"):
        assert needle in text, needle


def test_out_of_memory_in_a_batch_is_retried_in_halves(server, data):
    """A batch that runs out of (GPU) memory is encoded again in halves: every request gets the
    answer it gets alone, and /metrics counts the event. Device OOM cannot happen on this CPU host,
    so the real engine is wrapped to raise torch's own OOM type for any batch above one image; the
    first batch is held until the other requests are queued, so a large batch follows."""
    import torch

    queries = [Path(p).read_bytes() for p in data[2][:8]]
    with RetrievalClient(server.address, timeout=60) as c:
        alone = [as_pairs(c.search(q, k=3)) for q in queries]
    batcher = server.server.pairs.live.batcher
    real, gate, calls = batcher._encode, threading.Event(), []

    def tight(images):
        calls.append(len(images))
        if len(calls) == 1:
            gate.wait(60)
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (injected)")
        return real(images)

    def one(q):
        with RetrievalClient(server.address, timeout=60) as c:
            return as_pairs(c.search(q, k=3))

    batcher._encode = tight
    try:
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(one, q) for q in queries]
            deadline = time.monotonic() + 60
            while (not calls or batcher.depth < 8 - calls[0]) and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            got = [f.result(60) for f in futs]
    finally:
        batcher._encode = real
    assert got == alone
    assert max(calls) >= 4 and calls.count(1) == 8  # every image was finally encoded alone
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    # halving a batch of n down to single images meets n - 1 failures: 6 for two batches of 8 in all
    assert "hashret_inference_out_of_memory_total 6.0" in text


def test_query_cli(server, data, capsys):
    from hashret.cli import main

    assert main(["query", data[2][0], data[2][1], "--addr", server.address, "-k", "3", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [len(x["hits"]) for x in lines] == [3, 3] and lines[0]["image"] == data[2][0]
    assert main(["query", data[2][0], "--addr", server.address, "-k", "0"]) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_upsert_delete_and_restart_keep_items(exp_dir, gallery_dir, tmp_path_factory, photo, data):
    gal = copy_gallery(gallery_dir, tmp_path_factory, "restart")
    q = data[2][3]
    cfg = config(exp_dir, gal, metrics_port=None)
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address, token=TOKEN) as c:
        code, _ = c.encode(_jpeg(photo))
        n = c.upsert([Item("sku/photo", image=q, metadata={"title": "a photo"}),
                      Item("sku/code", code=code, metadata={"title": "by code"})])
        assert n == 2 and c.info().gallery.size == N_GALLERY + 2
        assert c.delete([Path(data[1][0].path).relative_to(data[0].root).as_posix()]) == 1
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address) as c:
        assert c.info().gallery.size == N_GALLERY + 1
        top = c.search(q, k=1)[0]
        assert (top.id, top.distance, top.metadata) == ("sku/photo", 0, {"title": "a photo"})
        assert as_pairs(c.search(_jpeg(photo), k=1)) == [("sku/code", 0)]


def test_refuses_gallery_of_another_model(exp_dir, tmp_path_factory):
    from hashret.engines import model_id
    from serve.gallery import create_gallery

    mid = model_id(json.loads((exp_dir / "manifest.json").read_text()))
    other = "deadbeef" * 8
    gal = tmp_path_factory.mktemp("other") / "gal"
    create_gallery(gal, "faiss-flat", 64, other).close()
    with pytest.raises(ArtifactMismatch) as ei:
        BackgroundServer(config(exp_dir, gal)).start()
    assert other[:8] in str(ei.value) and mid[:8] in str(ei.value)
    gal32 = tmp_path_factory.mktemp("bits") / "gal"
    create_gallery(gal32, "faiss-flat", 32, mid).close()
    with pytest.raises(ArtifactMismatch, match="32 bits"):
        BackgroundServer(config(exp_dir, gal32)).start()


def test_full_queue_deadlines_and_graceful_shutdown(exp_dir, gallery_dir, engine, tmp_path_factory, data):
    slow = SlowEngine(engine, 0.4)
    cfg = config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "slow"), max_batch=1, queue_size=2,
                 metrics_port=None, grace_s=5.0)
    q = Path(data[2][0]).read_bytes()
    srv = BackgroundServer(cfg, engine=slow).start()
    try:
        with RetrievalClient(srv.address, timeout=30) as c:
            # a burst beyond the queue: the excess is refused at once, the rest served
            with ThreadPoolExecutor(8) as pool:
                futs = [pool.submit(c.search, q, 3) for _ in range(8)]
                codes = []
                for f in futs:
                    try:
                        f.result()
                        codes.append(SC.OK)
                    except grpc.RpcError as e:
                        codes.append(e.code())
                        if e.code() == SC.RESOURCE_EXHAUSTED:
                            assert "queue is full" in e.details()
            assert SC.RESOURCE_EXHAUSTED in codes and SC.OK in codes and set(codes) <= {SC.OK, SC.RESOURCE_EXHAUSTED}
            assert c.health() == "SERVING"

            # a request whose deadline passes while queued is dropped before inference
            stats = srv.server.service.batcher.stats
            dropped, calls = stats.dropped, slow.calls
            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(c.search, q, 3)
                time.sleep(0.1)
                with pytest.raises(grpc.RpcError) as ei:
                    c.search(q, 3, timeout=0.15)
                assert ei.value.code() == SC.DEADLINE_EXCEEDED
                first.result()
            wait_for(lambda: stats.dropped == dropped + 1)
            assert slow.calls == calls + 1
            assert c.health() == "SERVING"

            # graceful stop: NOT_SERVING and new calls refused while an in-flight call completes
            inflight = ThreadPoolExecutor(1).submit(c.search, q, 3)
            wait_for(lambda: srv.server.servicer.in_flight == 1)
            stopping = srv.stop_async()
            wait_for(lambda: srv.server.gate.draining)
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as ei:
                c.search(q, 3)
            assert ei.value.code() == SC.UNAVAILABLE
            assert len(inflight.result(timeout=10)) == 3
            stopping.result(timeout=10)
    finally:
        srv.stop()


def test_cancelled_requests_give_their_queue_slots_back(exp_dir, gallery_dir, engine, tmp_path_factory, data):
    """Callers that go away while decoding, queued or in inference leave no slot reserved."""
    slow = SlowEngine(engine, 0.3)
    cfg = config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "cancel"), max_batch=1, queue_size=6,
                 decode_threads=1, metrics_port=None)
    q = Path(data[2][0]).read_bytes()
    srv = BackgroundServer(cfg, engine=slow).start()
    try:
        svc = srv.server.service

        async def burst(n: int, cancel_after: float):
            tasks = [asyncio.ensure_future(svc.search(q, 3)) for _ in range(n)]
            await asyncio.sleep(cancel_after)
            for t in tasks[1:]:
                t.cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

        for cancel_after in (0.0, 0.05, 0.4):  # still in the decode pool / decoding or queued / later
            res = srv.call(burst(6, cancel_after), timeout=30)
            assert len(res[0]) == 3
            assert all(isinstance(r, (asyncio.CancelledError, list)) for r in res[1:])
            wait_for(lambda: svc.batcher.depth == 0)

        async def full():  # every slot is usable again
            return await asyncio.gather(*(svc.search(q, 3) for _ in range(6)))

        assert all(len(r) == 3 for r in srv.call(full(), timeout=60))
        assert svc.batcher.depth == 0
    finally:
        srv.stop()


def test_mutual_tls_and_token_for_reads(exp_dir, gallery_dir, tmp_path_factory, data):
    pem = make_pki(tmp_path_factory.mktemp("tls"))
    cfg = config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "tls"), metrics_port=None,
                 tls_cert=str(pem["srv"]), tls_key=str(pem["srv_key"]), tls_client_ca=str(pem["ca"]),
                 require_token_for_reads=True)
    q = data[2][0]
    mtls = {"ca": pem["ca"], "cert": pem["cli"], "key": pem["cli_key"]}
    with BackgroundServer(cfg) as srv:
        with RetrievalClient(srv.address, tls=mtls, token=TOKEN) as c:
            assert len(c.search(q, k=3)) == 3
        with RetrievalClient(srv.address, tls=mtls) as c:
            assert c.health() == "SERVING"  # probes never need the token
            with pytest.raises(grpc.RpcError) as ei:
                c.search(q, k=3)
            assert ei.value.code() == SC.UNAUTHENTICATED
        for kw in ({"tls": {"ca": pem["ca"]}}, {"tls": False}):  # no client cert; plaintext
            with RetrievalClient(srv.address, timeout=5, **kw) as c:
                with pytest.raises(grpc.RpcError) as ei:
                    c.search(q, k=3)
                assert ei.value.code() == SC.UNAVAILABLE


def test_milvus_gallery_serves_the_same_hits(exp_dir, gallery_dir, tmp_path_factory, client, data):
    pytest.importorskip("milvus_lite")
    from serve.gallery import create_gallery, open_gallery

    src = open_gallery(gallery_dir)
    try:
        ids = src.ids()
        rows = [src.get(i) for i in ids]
        acts = src.stored_activations()  # both servers re-rank by them
    finally:
        src.close()
    gal = tmp_path_factory.mktemp("milvus") / "gal"
    g = create_gallery(gal, "milvus", 64, src.model_sha256)
    try:
        g.upsert(ids, np.stack([r[0] for r in rows]), [r[1] for r in rows], acts)
    finally:
        g.close()
    queries = data[2][:3]
    with BackgroundServer(config(exp_dir, gal, metrics_port=None)) as srv, RetrievalClient(srv.address) as c:
        assert c.info().gallery.kind == "milvus"
        for q in queries:
            assert as_pairs(c.search(q, k=5)) == as_pairs(client.search(q, k=5))


def test_cli_index_iconic_and_serve_refusal(exp_dir, grocery_root, tmp_path, capsys):
    from hashret.cli import main
    from serve.gallery import create_gallery, open_gallery

    gal = tmp_path / "catalogue"
    assert main(["index", "build", str(exp_dir), "--data", str(grocery_root), "--iconic", "--out", str(gal),
                 "--no-progress"]) == 0
    g = open_gallery(gal)
    try:
        assert g.size == 81
        code, meta = g.get(g.ids()[0])
        assert meta["class"] == "Golden-Delicious" and meta["path"] == g.ids()[0] and meta["label"] == "0"
    finally:
        g.close()
    assert main(["index", "build", str(exp_dir), "--data", str(grocery_root), "--iconic", "--out", str(gal)]) == 2
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "other"
    create_gallery(other, "faiss-flat", 64, "cafebabe" * 8).close()
    argv = ["serve", "--model", str(exp_dir), "--gallery", str(other), "--port", "0", "--log-format", "text"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cafebabe" in err and "built for model" in err

"""Crash safety of `hashret serve` on a FAISS gallery, with the server as a real subprocess.

* SIGKILL mid-stream: writers stream Upserts, each acknowledged item is recorded; the server is
  killed with SIGKILL while they write, restarted on the same gallery, and every acknowledged
  item is there (Info size, Search of the image items at distance 0, and the stored code and
  metadata of every item read back from the gallery), the index loads, nothing unacknowledged
  beyond the calls in flight appears;
* a torn last WAL line (a crash mid-append, never acknowledged) is dropped and the rest served;
* a torn or modified snapshot, a missing snapshot file, a corrupt WAL line followed by others,
  or an unreadable manifest is detected (sha256 / CRC / JSON) and the server refuses to start:
  exit code 2 and a message naming the file and the fix, instead of serving.
"""
from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.soak import ServerProcess, synthetic_images
from tests.test_fuzz import build_gallery, shared_exp

TOKEN = "crash-token-42"
N_BASE = 24
SERVER_ARGS = ["--log-format", "text", "--engine-threads", "1", "--decode-threads", "2"]


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return shared_exp(tmp_path_factory)


@pytest.fixture(scope="module")
def base_gallery(exp, tmp_path_factory) -> Path:
    return build_gallery(exp, tmp_path_factory.mktemp("crash") / "gal", n=N_BASE)


def copy_gallery(src: Path, dst_parent: Path) -> Path:
    dst = dst_parent / "gal"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _stub(addr):
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(addr)
    return ch, pb_grpc.RetrievalStub(ch)


def test_sigkill_mid_upsert_stream_loses_no_acknowledged_item(exp, base_gallery, tmp_path):
    from serve._proto import retrieval_pb2 as pb
    from serve.gallery import open_gallery

    gal = copy_gallery(base_gallery, tmp_path)
    srv = ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN).start()
    images = synthetic_images(40, (96, 72), seed=11)
    acked: dict[str, tuple[str, bytes, dict]] = {}  # id -> ("code"|"image", payload, metadata)
    attempted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    auth = (("authorization", f"Bearer {TOKEN}"),)

    def writer(w: int):
        rng = random.Random(w)
        ch, stub = _stub(srv.addr)
        n = 0
        try:
            while not stop.is_set():
                per_call = (1, 3, 1)[w]
                batch = []
                for _ in range(per_call):
                    n += 1
                    item_id = f"w{w}/{n:05d}"
                    md = {"writer": str(w), "n": str(n)}
                    if w == 2:
                        payload = images[n % len(images)] if n <= len(images) else None
                        if payload is None:  # each image once: its search must find this id
                            return
                        batch.append(("image", item_id, payload, md))
                    else:
                        batch.append(("code", item_id, bytes(rng.getrandbits(8) for _ in range(8)), md))
                msgs = [pb.UpsertItem(id=i, metadata=md, **{kind: p}) for kind, i, p, md in batch]
                with lock:
                    attempted.update(i for _, i, _, _ in batch)
                try:
                    stub.Upsert(iter(msgs), timeout=10, metadata=auth)
                except grpc.RpcError:
                    return  # the server is gone
                with lock:  # acknowledged: durable from here on
                    for kind, i, p, md in batch:
                        acked[i] = (kind, p, md)
        finally:
            ch.close()

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(3)]
    try:
        for t in threads:
            t.start()
        until = time.monotonic() + 60
        while time.monotonic() < until:
            with lock:
                n_acked = len(acked)
            if n_acked >= 60:
                break
            time.sleep(0.01)
        srv.kill()  # SIGKILL while the writers are streaming
        killed_with = len(acked)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        srv.cleanup()
    assert killed_with >= 20, f"only {killed_with} upserts acknowledged before the kill"
    in_flight = attempted - set(acked)

    srv2 = ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN).start()
    try:
        ch, stub = _stub(srv2.addr)
        with ch:
            size = stub.Info(pb.InfoRequest(), timeout=30).gallery.size
            assert N_BASE + len(acked) <= size <= N_BASE + len(acked) + len(in_flight), (size, len(acked))
            for i, (kind, payload, _) in acked.items():
                if kind == "image":
                    # the same bytes encode to the same code (distance 0; <= 2 allows a batch-size rounding flip)
                    hits = stub.Search(pb.SearchRequest(image=payload, k=200, max_distance=2), timeout=30).hits
                    assert i in [h.id for h in hits], f"acknowledged image item {i} not found after the crash"
    finally:
        assert srv2.stop() == 0, srv2.log_text()[-3000:]
        srv2.cleanup()

    g = open_gallery(gal)  # the index loads offline too, and holds exactly what was acknowledged
    try:
        ids = set(g.ids())
        missing = [i for i in acked if i not in ids]
        assert not missing, f"{len(missing)} acknowledged items lost: {missing[:5]}"
        assert ids - set(acked) - in_flight == {f"item/{n:03d}" for n in range(N_BASE)}
        for i, (kind, payload, md) in acked.items():
            code, meta = g.get(i)
            assert meta == md
            if kind == "code":
                assert code.tobytes() == payload
        print(f"\ncrash: {len(acked)} acknowledged upserts before SIGKILL, {len(in_flight)} in flight; "
              f"all {len(acked)} present after restart (gallery size {g.size})")
    finally:
        g.close()


def _gallery_with_wal(exp, base_gallery, tmp_path, n: int = 3) -> Path:
    """A gallery copy whose WAL holds n upsert records (as a crashed server leaves it)."""
    from serve.gallery import open_gallery

    gal = copy_gallery(base_gallery, tmp_path)
    g = open_gallery(gal)
    try:
        for k in range(n):
            g.upsert([f"wal/{k}"], np.full((1, 8), k, np.uint8), [{"k": str(k)}])
    finally:
        g.close()
    assert len((gal / "wal.jsonl").read_bytes().splitlines()) == n
    return gal


def test_torn_last_wal_line_is_dropped_and_the_rest_served(exp, base_gallery, tmp_path):
    from serve._proto import retrieval_pb2 as pb

    gal = _gallery_with_wal(exp, base_gallery, tmp_path)
    wal = gal / "wal.jsonl"
    whole = wal.read_bytes()
    wal.write_bytes(whole + whole.splitlines(keepends=True)[0][:37])  # a crash mid-append
    with ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN) as srv:
        ch, stub = _stub(srv.addr)
        with ch:
            assert stub.Info(pb.InfoRequest(), timeout=30).gallery.size == N_BASE + 3
            # the log was repaired, so the next write lands on a clean line and survives a restart
            stub.Upsert(iter([pb.UpsertItem(id="after", code=b"\1" * 8)]), timeout=30,
                        metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert "torn last line" in srv.log_text()
    srv.cleanup()
    with ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN) as srv:
        ch, stub = _stub(srv.addr)
        with ch:
            assert stub.Info(pb.InfoRequest(), timeout=30).gallery.size == N_BASE + 4
    srv.cleanup()


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x20
    p.write_bytes(bytes(b))


def _snapshot(gal: Path, suffix: str) -> Path:
    (p,) = gal.glob(f"snapshot-*{suffix}")
    return p


DAMAGE = {
    # case: (how to damage GAL, which file the refusal must name, words of the fix)
    "truncated codes snapshot": (lambda g: _truncate(_snapshot(g, ".codes.npy")), ".codes.npy", "restore it or rebuild"),
    "modified items snapshot": (lambda g: _flip(_snapshot(g, ".items.jsonl")), ".items.jsonl", "restore it or rebuild"),
    "missing codes snapshot": (lambda g: _snapshot(g, ".codes.npy").unlink(), ".codes.npy", "restore it or rebuild"),
    "corrupt WAL line before others": (lambda g: _flip_first_wal_line(g), "wal.jsonl", "restore it or rebuild"),
    "torn manifest": (lambda g: _truncate(g / "manifest.json"), "manifest.json", "restore or regenerate"),
}


def _flip_first_wal_line(gal: Path) -> None:
    wal = gal / "wal.jsonl"
    lines = wal.read_bytes().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"k":"0"', b'"k":"X"')  # the CRC no longer matches
    wal.write_bytes(b"".join(lines))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_gallery_refuses_to_start(exp, base_gallery, tmp_path, case):
    damage, names, fix = DAMAGE[case]
    gal = _gallery_with_wal(exp, base_gallery, tmp_path)
    damage(gal)
    srv = ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN).spawn()
    try:
        code = srv.wait_exit(120)
        log = srv.log_text()
    finally:
        srv.cleanup()
    assert code == 2, f"exit code {code}:\n{log[-3000:]}"
    err = [line for line in log.splitlines() if line.startswith("error:")]
    assert err and names in err[-1] and str(gal) in err[-1] and fix in err[-1], log[-3000:]
    assert "hashret.serve: serving" not in log, "it served a damaged gallery"


def test_damaged_hnsw_graph_refuses_to_start(exp, tmp_path):
    gal = build_gallery(exp, tmp_path / "hnsw", n=12, kind="faiss-hnsw")
    index = _snapshot(gal, ".index.faiss")
    _truncate(index)
    srv = ServerProcess(exp, gal, SERVER_ARGS).spawn()
    try:
        code = srv.wait_exit(120)
        log = srv.log_text()
    finally:
        srv.cleanup()
    assert code == 2 and index.name in log and "sha256" in log and "truncated or modified" in log, log[-3000:]


def test_manifest_checksum_guards_the_file_list(exp, base_gallery, tmp_path):
    """Editing the manifest's file list (to paper over a bad snapshot) is caught by its checksum."""
    gal = copy_gallery(base_gallery, tmp_path)
    m = json.loads((gal / "manifest.json").read_text())
    name = next(n for n in m["snapshot"]["files"] if n.endswith(".codes.npy"))
    m["snapshot"]["files"][name] = "0" * 64
    (gal / "manifest.json").write_text(json.dumps(m))
    srv = ServerProcess(exp, gal, SERVER_ARGS).spawn()
    try:
        code = srv.wait_exit(120)
        log = srv.log_text()
    finally:
        srv.cleanup()
    assert code == 2 and "manifest.json" in log and "checksum does not match" in log, log[-3000:]

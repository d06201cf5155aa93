"""Crash safety of `hashret serve` on a FAISS gallery, with the server as a real subprocess.

* SIGKILL mid-stream: writers stream Upserts, each acknowledged item is recorded; the server is
  killed with SIGKILL while they write, restarted on the same gallery, and every acknowledged
  item is there (Info size, Search of the image items at distance 0, and the stored code and
  metadata of every item read back from the gallery), the index loads, nothing unacknowledged
  beyond the calls in flight appears;
* a torn last WAL line (no newline: a crash mid-append, never acknowledged) is moved aside to
  wal.torn-1, byte for byte, and every whole record is served;
* a torn or modified snapshot, a missing snapshot file or WAL, a corrupt WAL line (the last one
  too: a line that ends in its newline was written and fsynced whole, so it may have been
  acknowledged), or an unreadable or edited manifest is detected (sha256 / CRC / JSON / the
  manifest checksum / the WAL's sequence numbers) and the server refuses to start: exit code 2
  and a message naming the file and the fix, with not one byte of the gallery removed;
* the two reproductions of issue 15: 1,000 items in one acknowledged Upsert then one bit flipped
  in the WAL's last line, and `"wal_seq": 1` edited to 9 in manifest.json (and sealed again).
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
from hashret.errors import ArtifactMismatch
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


def test_torn_last_wal_line_is_moved_aside_and_the_rest_served(exp, base_gallery, tmp_path):
    from serve._proto import retrieval_pb2 as pb

    gal = _gallery_with_wal(exp, base_gallery, tmp_path)
    wal = gal / "wal.jsonl"
    whole = wal.read_bytes()
    torn = whole.splitlines(keepends=True)[0][:37]
    wal.write_bytes(whole + torn)  # a crash mid-append: no newline, so never acknowledged
    with ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN) as srv:
        ch, stub = _stub(srv.addr)
        with ch:
            assert stub.Info(pb.InfoRequest(), timeout=30).gallery.size == N_BASE + 3
            assert wal.read_bytes() == whole  # every whole record as it was, the torn bytes cut...
            assert (gal / "wal.torn-1").read_bytes() == torn  # ...after being kept aside, not erased
            # so the next write lands on a clean line and survives a restart
            stub.Upsert(iter([pb.UpsertItem(id="after", code=b"\1" * 8)]), timeout=30,
                        metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert "torn last line" in srv.log_text() and "wal.torn-1" in srv.log_text()
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
    "corrupt WAL line before others": (lambda g: _flip_first_wal_line(g), "wal.jsonl", "from a backup or rebuild"),
    "corrupt last WAL line": (lambda g: _flip_last_wal_line(g), "wal.jsonl", "from a backup or rebuild"),
    "missing WAL": (lambda g: (g / "wal.jsonl").unlink(), "wal.jsonl", "restore it from a backup"),
    "torn manifest": (lambda g: _truncate(g / "manifest.json"), "manifest.json", "restore or regenerate"),
}


def _flip_last_wal_line(gal: Path) -> None:
    wal = gal / "wal.jsonl"
    lines = wal.read_bytes().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b'"k":"2"', b'"k":"X"')  # its newline intact: a whole, damaged record
    wal.write_bytes(b"".join(lines))


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
    before = _files(gal)
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
    assert _files(gal) == before, "a refused start changed the gallery"


def _files(gal: Path) -> dict[str, bytes]:
    """The gallery's bytes, but for the lock file a start creates."""
    return {p.name: p.read_bytes() for p in gal.iterdir() if p.is_file() and p.name != ".lock"}


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


def _refused_start(exp, gal: Path) -> tuple[int, str]:
    srv = ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN).spawn()
    try:
        return srv.wait_exit(120), srv.log_text()
    finally:
        srv.cleanup()


def test_issue15_bit_flip_in_the_last_whole_wal_line_refuses_and_keeps_every_byte(exp, base_gallery, tmp_path):
    """1,000 items in one acknowledged Upsert, the server stopped, one bit flipped inside the WAL's
    last line (its newline intact): that line was written and fsynced whole, so it is no torn
    write. The server used to log "torn last line", truncate it and serve 1,000 items fewer."""
    from serve._proto import retrieval_pb2 as pb

    gal = copy_gallery(base_gallery, tmp_path)
    rng = random.Random(15)
    items = [pb.UpsertItem(id=f"bulk/{i:04d}", code=bytes(rng.getrandbits(8) for _ in range(8)),
                           metadata={"i": str(i)}) for i in range(1000)]
    srv = ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN).start()
    try:
        ch, stub = _stub(srv.addr)
        with ch:
            r = stub.Upsert(iter(items), timeout=60, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert r.count == 1000  # acknowledged
        srv.kill()  # stopped with no shutdown snapshot, so the 1,000 items live only in the WAL
    finally:
        srv.cleanup()
    wal = gal / "wal.jsonl"
    lines = wal.read_bytes().splitlines(keepends=True)
    last = lines[-1]
    assert last.endswith(b"\n") and b"bulk/0999" in last
    damaged = bytearray(b"".join(lines))
    at = len(damaged) - len(last) + len(last) // 2
    damaged[at] ^= 0x01
    wal.write_bytes(bytes(damaged))
    code, log = _refused_start(exp, gal)
    err = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2 and err, f"exit code {code}:\n{log[-3000:]}"
    assert f"{wal} | line {len(lines)} is corrupt" in err[-1] and "from a backup or rebuild" in err[-1], err[-1]
    assert "serving" not in log and "torn" not in log, log[-3000:]
    assert wal.read_bytes() == bytes(damaged), "bytes were removed from wal.jsonl"
    assert not list(gal.glob("wal.torn-*"))


def test_issue15_edited_wal_seq_refuses_to_start(exp, base_gallery, tmp_path):
    """`"wal_seq": 1` edited to 9 used to start with 80 acknowledged items missing (records 2-9
    skipped as if in the snapshot). The manifest checksum covers wal_seq now; and with the checksum
    sealed again, the skipped records' writes are found missing from the snapshot."""
    from hashret.manifest import gallery_checksum
    from serve.gallery import open_gallery

    gal = copy_gallery(base_gallery, tmp_path)
    mpath = gal / "manifest.json"
    assert json.loads(mpath.read_text())["snapshot"]["wal_seq"] == 1
    with open_gallery(gal) as g:  # records 2..11, ten items each, each acknowledged on return
        for r in range(10):
            g.upsert([f"r{r}/{i}" for i in range(10)], np.full((10, 8), r, np.uint8), [{"r": str(r)}] * 10)
    text = mpath.read_text()
    assert text.count('"wal_seq": 1,') == 1
    mpath.write_text(text.replace('"wal_seq": 1,', '"wal_seq": 9,'))
    before = _files(gal)
    code, log = _refused_start(exp, gal)
    err = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2 and err and f"{mpath} | checksum does not match" in err[-1], f"exit {code}:\n{log[-3000:]}"
    assert _files(gal) == before

    m = json.loads(text)
    m["snapshot"]["wal_seq"] = 9
    m["checksum"] = gallery_checksum(m)  # as someone who knows the checksum would
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match=r"wal\.jsonl \| line 1's write to id 'r0/0' has seq <= the "
                                                r"manifest's wal_seq 9, so snapshot generation \d+ should hold it"):
        open_gallery(gal)
    m["snapshot"]["wal_seq"] = 12  # past the log's end
    m["checksum"] = gallery_checksum(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match=r"ends at seq 11, but the snapshot .* holds up to wal_seq 12"):
        open_gallery(gal)
    m["snapshot"]["wal_seq"] = 0  # lowered: the log no longer continues the snapshot
    m["checksum"] = gallery_checksum(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(ArtifactMismatch, match=r"starts at seq 2, but the snapshot .* ends at wal_seq 0: "
                                                r"record 1 is missing"):
        open_gallery(gal)
    assert _files(gal) == {**before, "manifest.json": mpath.read_bytes()}

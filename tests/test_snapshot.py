"""Snapshots keep a FAISS gallery's write-ahead log bounded, and are crash-safe at every step.

* in-process: a snapshot taken while writes go on keeps every write (the WAL is rewritten to the
  records after the copy, not emptied); a failed snapshot leaves the old generation live; files
  of an unfinished generation are removed at open; the Snapshotter's bound and write stall;
  `hashret index compact`; Milvus keeps no log of ours;
* the real server as a subprocess, killed (SIGKILL, via HASHRET_SNAPSHOT_CRASH_AT) at each step
  of its shutdown snapshot and of a background snapshot while writers stream: it reopens to
  exactly the acknowledged ids, codes and metadata, from the old or the new generation, never a
  mix, and leftover files are gone;
* the scaled-down bar: 2,000 single-item Upserts through the server with
  --snapshot-every-records 200 keep wal.jsonl under its bound, and a restart has every item;
* Info and the Prometheus metrics report WAL records, bytes and the last snapshot's time.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from benchmarks.soak import ServerProcess
from serve.gallery import create_gallery, open_gallery
from serve.gallery import faiss_index
from serve.gallery.faiss_index import CRASH_ENV, CRASH_STEPS
from serve.snapshots import HARD_FACTOR, SnapshotPolicy, Snapshotter, compact, compact_summary
from tests.test_fuzz import build_gallery, shared_exp

TOKEN = "snapshot-token-7"
N_BASE = 12
SERVER_ARGS = ["--log-format", "text", "--engine-threads", "1", "--decode-threads", "1"]
SHA = "ab" * 32


def _codes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 8), dtype=np.uint8)


def _state(g) -> list[tuple[str, bytes, dict]]:
    return [(i, g.get(i)[0].tobytes(), g.get(i)[1]) for i in g.ids()]


def _wal_seqs(gal: Path) -> list[int]:
    wal = gal / "wal.jsonl"
    return [json.loads(line)["rec"]["seq"] for line in wal.read_bytes().splitlines()] if wal.exists() else []


def _live_files(gal: Path) -> set[str]:
    m = json.loads((gal / "manifest.json").read_text())
    return set(m["snapshot"]["files"]) | {"manifest.json", "wal.jsonl", ".lock"}


# ============================================================================ in-process
@pytest.mark.parametrize("kind", ["faiss-flat", "faiss-hnsw"])
def test_snapshot_during_writes_keeps_every_write(tmp_path, kind):
    rng = np.random.default_rng(0)
    g = create_gallery(tmp_path / "g", kind, 64, SHA)
    g.upsert([f"a{i}" for i in range(300)], _codes(rng, 300), [{"i": str(i)} for i in range(300)])
    stop, errors, written = threading.Event(), [], []

    def writer():
        wrng = np.random.default_rng(1)
        n = 0
        try:
            while not stop.is_set():
                g.upsert([f"w{n}"], _codes(wrng, 1), [{"n": str(n)}])
                if n % 7 == 3:
                    g.upsert([f"a{n % 300}"], _codes(wrng, 1), [{"replaced": str(n)}])  # in place
                if n % 11 == 5:
                    g.delete([f"w{n - 1}"])
                written.append(n)
                n += 1
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        while len(written) < 50:
            time.sleep(0.005)
        result = g.snapshot()
        n_during = len(written)
        while len(written) < n_during + 30:  # and writes after it
            time.sleep(0.005)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert g.search(_codes(rng, 1), 5)  # searches answered after it too
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    s = m["snapshot"]["wal_seq"]
    assert result["wal_seq"] == s and m["snapshot"]["generation"] == result["generation"] == 1
    seqs = _wal_seqs(tmp_path / "g")
    # the WAL was rewritten to exactly the records after the snapshot, not emptied
    assert seqs and seqs[0] == s + 1 and seqs == list(range(s + 1, s + 1 + len(seqs)))
    assert g.wal_stats()["records"] == len(seqs)
    expected = _state(g)
    g.close()
    g = open_gallery(tmp_path / "g")
    try:
        assert _state(g) == expected
    finally:
        g.close()


def test_failed_snapshot_leaves_the_old_generation_live(tmp_path, monkeypatch):
    """A snapshot that cannot write (a full disk, simulated at the items file) changes nothing."""
    rng = np.random.default_rng(2)
    gal = tmp_path / "g"
    g = create_gallery(gal, "faiss-flat", 64, SHA)
    g.upsert(["x", "y"], _codes(rng, 2), [{"k": "x"}, {"k": "y"}])
    before = (gal / "manifest.json").read_bytes()
    wal_before = (gal / "wal.jsonl").read_bytes()
    real = faiss_index.atomic_write

    def disk_full(path, write, mode="wb"):
        if str(path).endswith(".items.jsonl"):
            raise OSError(28, "No space left on device")
        return real(path, write, mode)

    monkeypatch.setattr(faiss_index, "atomic_write", disk_full)
    with pytest.raises(Exception, match=r"snapshot generation 1 could not be written \(No space left on device\): "
                                        r"free disk space .* still hold every write"):
        g.snapshot()
    assert (gal / "manifest.json").read_bytes() == before
    assert (gal / "wal.jsonl").read_bytes() == wal_before
    assert sorted(p.name for p in gal.iterdir()) == sorted(_live_files(gal))  # no new-generation file left
    snap = Snapshotter(g, SnapshotPolicy(every_records=1))
    assert snap.take("test") is None and snap.failures == 1 and "No space left" in snap.last_error
    g.upsert(["z"], _codes(rng, 1))  # writes go on
    monkeypatch.setattr(faiss_index, "atomic_write", real)
    assert g.snapshot()["generation"] == 1
    expected = _state(g)
    g.close()
    with open_gallery(gal) as g:
        assert _state(g) == expected and g.ids() == ["x", "y", "z"]


def test_leftovers_of_an_unfinished_snapshot_are_removed_at_open(tmp_path, caplog):
    rng = np.random.default_rng(3)
    gal = tmp_path / "g"
    with create_gallery(gal, "faiss-flat", 64, SHA) as g:
        g.upsert(["a", "b"], _codes(rng, 2))
        g.snapshot()
        expected = _state(g)
    junk = ["snapshot-000002.codes.npy", "snapshot-000000.items.jsonl", ".snapshot-000002.items.jsonl.x1.tmp",
            ".wal.jsonl.q2.tmp", ".manifest.json.z3.tmp"]
    for name in junk:
        (gal / name).write_bytes(b"partial")
    (gal / "notes.txt").write_text("not ours to remove")
    with caplog.at_level(logging.WARNING, logger="hashret.gallery"):
        with open_gallery(gal) as g:
            assert _state(g) == expected
    assert sorted(p.name for p in gal.iterdir()) == sorted(_live_files(gal) | {"notes.txt"})
    msg = [r.getMessage() for r in caplog.records if "unfinished" in r.getMessage()]
    assert msg and "removed 5 file(s)" in msg[0] and "generation 1 is live" in msg[0]
    assert all(name in msg[0] for name in junk)


def test_snapshotter_bound_and_write_stall(tmp_path):
    """The thread snapshots past the bound; at HARD_FACTOR x the bound writes wait for it."""
    import asyncio

    rng = np.random.default_rng(4)
    g = create_gallery(tmp_path / "g", "faiss-flat", 64, SHA)
    snaps = []
    s = Snapshotter(g, SnapshotPolicy(every_records=5), on_snapshot=snaps.append).start()
    try:
        for i in range(4):
            g.upsert([f"a{i}"], _codes(rng, 1))
            s.written()
        time.sleep(0.2)
        assert not snaps and g.wal_stats()["records"] == 4  # under the bound: no snapshot
        g.upsert(["a4"], _codes(rng, 1))
        s.written()
        until = time.monotonic() + 30
        while not snaps and time.monotonic() < until:
            time.sleep(0.01)
        assert snaps and snaps[0]["why"] == "bound" and snaps[0]["wal_before"]["records"] == 5
        assert g.wal_stats()["records"] == 0

        # A long snapshot: the thread waits on the snapshot lock while writes reach 2x the bound.
        g._snap_lock.acquire()
        released = threading.Timer(0.5, g._snap_lock.release)
        for i in range(HARD_FACTOR * 5):
            g.upsert([f"b{i}"], _codes(rng, 1))
            s.written()
        assert g.wal_stats()["records"] == HARD_FACTOR * 5
        released.start()
        waited = asyncio.run(s.room())  # the next write waits until the snapshot cut the WAL back
        assert waited >= 0.2 and g.wal_stats()["records"] < HARD_FACTOR * 5 and s.stalled_s == waited
        assert asyncio.run(s.room()) == 0.0
    finally:
        s.close()
        g.close()
    assert len(snaps) == 2 and s.snapshots == 2  # nothing left for a shutdown snapshot
    with open_gallery(tmp_path / "g") as g:
        assert g.size == 15


def test_compact_cli_prints_before_and_after(tmp_path, capsys):
    from hashret.cli import main

    rng = np.random.default_rng(5)
    gal = tmp_path / "g"
    with create_gallery(gal, "faiss-hnsw", 64, SHA) as g:
        for i in range(40):
            g.upsert([f"i{i}"], _codes(rng, 1), [{"i": str(i)}])
        g.delete(["i3"])
        expected = _state(g)
        wal_bytes = (gal / "wal.jsonl").stat().st_size
    assert main(["index", "compact", str(gal)]) == 0
    out = capsys.readouterr().out
    assert f"WAL 41 records, {wal_bytes} bytes before -> 0 records, 0 bytes after" in out, out
    assert (gal / "wal.jsonl").stat().st_size == 0
    with open_gallery(gal) as g:
        assert _state(g) == expected
        assert g.wal_stats()["records"] == 0 and g.wal_stats()["generation"] == 1
    assert main(["index", "compact", str(gal)]) == 0
    assert "WAL already empty, nothing to compact" in capsys.readouterr().out
    with open_gallery(gal):  # one process per folder: compacting a gallery a server holds is refused
        assert main(["index", "compact", str(gal)]) == 2
    assert "already open" in capsys.readouterr().err


def test_milvus_keeps_no_log_of_ours(tmp_path):
    pytest.importorskip("milvus_lite")
    rng = np.random.default_rng(6)
    gal = tmp_path / "m"
    g = create_gallery(gal, "milvus", 64, SHA)
    try:
        manifest = (gal / "manifest.json").read_bytes()
        names = sorted(p.name for p in gal.iterdir())
        for r in range(20):
            g.upsert([f"m{i}" for i in range(50)], _codes(rng, 50))
        g.delete(["m1"])
        assert g.wal_stats() is None and g.snapshot() is None
        assert not Snapshotter(g).start().enabled
        # nothing of ours grew beside Milvus: same files, manifest untouched by writes
        assert sorted(p.name for p in gal.iterdir()) == names and (gal / "manifest.json").read_bytes() == manifest
    finally:
        g.close()
    r = compact(gal)
    assert r["before"] is None and r["snapshot"] is None and r["size"] == 49
    assert "no WAL of ours" in compact_summary(r) and "Milvus keeps its own log" in compact_summary(r)


def test_info_fields_are_unset_without_a_wal():
    from serve.servicer import _gallery_info

    info = _gallery_info({"id": "m", "kind": "milvus", "model_id": SHA, "wal": None}, 3)
    assert info.wal_records == 0 and info.wal_bytes == 0 and not info.HasField("last_snapshot")
    info = _gallery_info({"id": "g", "kind": "faiss-flat", "model_id": SHA,
                          "wal": {"records": 4, "bytes": 440, "last_snapshot_unix": 1700000000.5}}, 3)
    assert (info.wal_records, info.wal_bytes) == (4, 440)
    assert info.last_snapshot.ToNanoseconds() == 1_700_000_000_500_000_000


def test_policy_refuses_bad_bounds():
    from hashret.errors import BadInput

    with pytest.raises(BadInput, match=r"--snapshot-every-records 0 \| must be a positive integer"):
        SnapshotPolicy(every_records=0)
    with pytest.raises(BadInput, match=r"--snapshot-every-mb -1 \| must be a positive number"):
        SnapshotPolicy(every_mb=-1)


# ============================================================================ the real server
@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return shared_exp(tmp_path_factory)


@pytest.fixture(scope="module")
def galleries(exp, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("snapshot-base")
    return {kind: build_gallery(exp, root / kind, n=N_BASE, kind=kind) for kind in ("faiss-flat", "faiss-hnsw")}


def copy_gallery(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


class Model:
    """What the acknowledged writes make of a gallery: ids in insertion order -> (code, metadata)."""

    def __init__(self, gal: Path):
        with open_gallery(gal) as g:
            self.items = {i: (code, meta) for i, code, meta in _state(g)}

    def upsert(self, client, items: list[tuple[str, bytes, dict]]) -> None:
        from serve.client import Item

        client.upsert([Item(id=i, code=c, metadata=m) for i, c, m in items])
        for i, c, m in items:  # acknowledged: a replace keeps its place, a new id goes last
            self.items[i] = (c, m)

    def delete(self, client, ids: list[str]) -> None:
        client.delete(ids)
        for i in ids:
            del self.items[i]

    def check(self, gal: Path) -> None:
        with open_gallery(gal) as g:
            got = _state(g)
        assert [i for i, _, _ in got] == list(self.items), "ids or their order differ"
        for i, code, meta in got:
            assert (code, meta) == self.items[i], f"{i}: stored {code.hex()} {meta}, acknowledged {self.items[i]}"


def _acknowledged_history(client, model: Model, rng: np.random.Generator) -> None:
    """New ids, replacements, deletes and a re-add: a mix would show in codes, metadata or order."""
    for n in range(6):
        model.upsert(client, [(f"new/{n}", rng.bytes(8), {"n": str(n)})])
    model.upsert(client, [("item/003", rng.bytes(8), {"v": "2"}), ("new/6", rng.bytes(8), {})])
    model.delete(client, ["item/005", "new/2"])
    model.upsert(client, [("item/005", rng.bytes(8), {"v": "back"})])
    model.upsert(client, [("new/0", rng.bytes(8), {"v": "2"})])


def _old_or_new(step: str) -> str:
    return "new" if CRASH_STEPS.index(step) >= CRASH_STEPS.index("after-manifest") else "old"


CASES = [("faiss-hnsw", s) for s in CRASH_STEPS] + [
    ("faiss-flat", s) for s in ("writing-codes", "after-items", "after-manifest", "writing-wal", "after-wal")
]


@pytest.mark.parametrize("kind,step", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_kill_at_each_step_of_the_shutdown_snapshot(exp, galleries, tmp_path, kind, step):
    """SIGTERM -> the shutdown snapshot -> SIGKILL at `step` -> reopen: exactly the acknowledged state."""
    from serve.client import RetrievalClient

    gal = copy_gallery(galleries[kind], tmp_path / "gal")
    model = Model(gal)
    gen_before = json.loads((gal / "manifest.json").read_text())["snapshot"]["generation"]
    srv = ServerProcess(exp, gal, [*SERVER_ARGS, "--snapshot-every-records", "1000000"], token=TOKEN,
                        env={CRASH_ENV: step}).start()
    try:
        with RetrievalClient(srv.addr, token=TOKEN) as c:
            _acknowledged_history(c, model, np.random.default_rng(7))
            assert c.info().gallery.wal_records == 10  # 10 acknowledged calls, no snapshot yet
        code = srv.stop(60)
        log = srv.log_text()
    finally:
        srv.cleanup()
    assert code == -9, f"exit {code}, expected death by SIGKILL at {step}:\n{log[-3000:]}"
    assert f"killing this process at step {step}" in log

    m = json.loads((gal / "manifest.json").read_text())
    want_gen = gen_before + (1 if _old_or_new(step) == "new" else 0)
    assert m["snapshot"]["generation"] == want_gen, f"{step}: generation {m['snapshot']['generation']}"
    left = {p.name for p in gal.iterdir()} - _live_files(gal)
    assert bool(left) == (step not in ("before-start", "after-cleanup")), f"{step}: leftovers {left}"
    if step in ("after-manifest", "writing-wal"):
        assert len(_wal_seqs(gal)) == 10  # committed, WAL not yet cut: records <= wal_seq are skipped
    model.check(gal)  # exactly the acknowledged ids, codes, metadata and order
    assert {p.name for p in gal.iterdir()} == _live_files(gal), "leftovers not removed at open"

    # and it serves and snapshots normally afterwards
    with ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN) as srv2:
        with RetrievalClient(srv2.addr, token=TOKEN) as c:
            assert c.info().gallery.size == len(model.items)
            model.upsert(c, [("after", b"\x01" * 8, {"after": step})])
    assert "removed" not in srv2.log_text()
    srv2.cleanup()
    assert _wal_seqs(gal) == []  # the shutdown snapshot ran this time
    model.check(gal)


@pytest.mark.parametrize("step", ["after-codes", "after-manifest", "writing-wal", "after-wal"])
def test_kill_during_a_background_snapshot_while_writers_stream(exp, galleries, tmp_path, step):
    """Writers keep streaming through a background snapshot; SIGKILL at `step`; every ack survives."""
    import grpc

    from serve.client import Item, RetrievalClient

    gal = copy_gallery(galleries["faiss-flat"], tmp_path / "gal")
    base = Model(gal).items
    srv = ServerProcess(exp, gal, [*SERVER_ARGS, "--snapshot-every-records", "25"], token=TOKEN,
                        env={CRASH_ENV: step}).start()
    acked: dict[str, tuple[bytes, dict]] = {}
    attempted: set[str] = set()
    lock = threading.Lock()

    def writer(w: int):
        rng = np.random.default_rng(w)
        with RetrievalClient(srv.addr, token=TOKEN, timeout=10) as c:
            for n in range(2000):
                i, code, md = f"w{w}/{n:04d}", rng.bytes(8), {"w": str(w)}
                with lock:
                    attempted.add(i)
                try:
                    c.upsert([Item(id=i, code=code, metadata=md)])
                except grpc.RpcError:
                    return  # the server died
                with lock:
                    acked[i] = (code, md)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        code = srv.proc.wait(30)
        log = srv.log_text()
    finally:
        srv.cleanup()
    assert code == -9 and f"killing this process at step {step}" in log, log[-3000:]
    assert len(acked) >= 25
    in_flight = attempted - set(acked)
    with open_gallery(gal) as g:
        got = {i: (code, meta) for i, code, meta in _state(g)}
    for i, (code, meta) in {**base, **acked}.items():
        assert got.get(i) == (code, meta), f"acknowledged {i} lost or changed"
    assert set(got) - set(base) - set(acked) <= in_flight


def test_2000_upserts_keep_the_wal_bounded_and_a_restart_has_every_item(exp, galleries, tmp_path):
    """The scaled-down bar (the 200,000-upsert run is benchmarks/snapshot_bench.py)."""
    from serve.client import Item, RetrievalClient

    every = 200
    gal = copy_gallery(galleries["faiss-flat"], tmp_path / "gal")
    srv = ServerProcess(exp, gal, [*SERVER_ARGS, "--snapshot-every-records", str(every)], token=TOKEN).start()
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    done = threading.Event()
    peak = [0]

    def watch():  # the WAL's length, as often as we can read it
        while not done.is_set():
            try:
                peak[0] = max(peak[0], (gal / "wal.jsonl").read_bytes().count(b"\n"))
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    def writer(w: int):
        rng = np.random.default_rng(10 + w)
        with RetrievalClient(srv.addr, token=TOKEN) as c:
            for n in range(1000):
                i, code = f"w{w}/{n:04d}", rng.bytes(8)
                c.upsert([Item(id=i, code=code, metadata={"n": str(n)})])
                with lock:
                    acked[i] = code

    watcher = threading.Thread(target=watch, daemon=True)
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    try:
        watcher.start()
        for t in writers:
            t.start()
        for t in writers:
            t.join(300)
        with RetrievalClient(srv.addr) as c:
            info = c.info().gallery
        done.set()
        watcher.join()
        srv.kill()  # no shutdown snapshot: the restart replays what the WAL holds
    finally:
        done.set()
        srv.cleanup()
    assert len(acked) == 2000
    assert peak[0] <= HARD_FACTOR * every + 2, f"wal.jsonl reached {peak[0]} records, bound {every}"
    assert info.wal_records <= HARD_FACTOR * every + 2 and info.last_snapshot.seconds > 0
    m = json.loads((gal / "manifest.json").read_text())
    assert m["snapshot"]["generation"] >= 2000 // (HARD_FACTOR * every)
    with ServerProcess(exp, gal, SERVER_ARGS, token=TOKEN) as srv2:
        with RetrievalClient(srv2.addr) as c:
            assert c.info().gallery.size == N_BASE + 2000
    srv2.cleanup()
    with open_gallery(gal) as g:
        assert g.size == N_BASE + 2000
        for i, code in acked.items():
            assert g.get(i)[0].tobytes() == code
    print(f"\n2000 upserts, --snapshot-every-records {every}: wal.jsonl peaked at {peak[0]} records, "
          f"{m['snapshot']['generation']} snapshot generations")


def test_info_and_metrics_report_the_wal(exp, galleries, tmp_path):
    from serve.client import Item, RetrievalClient
    from serve.server import BackgroundServer, ServeConfig

    gal = copy_gallery(galleries["faiss-flat"], tmp_path / "gal")
    cfg = ServeConfig(model=exp, gallery=gal, port=0, token=TOKEN, metrics_port=0, grace_s=2.0,
                      engine_threads=1, decode_threads=1, snapshots=SnapshotPolicy(every_records=10))
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address, token=TOKEN) as c:
        g0 = c.info().gallery
        assert (g0.wal_records, g0.wal_bytes) == (0, 0) and g0.last_snapshot.seconds > 0
        for n in range(4):
            c.upsert([Item(id=f"x{n}", code=bytes([n]) * 8)])
        g1 = c.info().gallery
        assert g1.wal_records == 4 and g1.wal_bytes == (gal / "wal.jsonl").stat().st_size > 0

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
            return {k: float(v) for k, v in re.findall(r"^(hashret_gallery_\w+) (\S+)$", text, re.M)}

        m = scrape()
        assert m["hashret_gallery_wal_records"] == 4 and m["hashret_gallery_wal_bytes"] == g1.wal_bytes
        assert m["hashret_gallery_snapshots_total"] == 0
        for n in range(4, 12):
            c.upsert([Item(id=f"x{n}", code=bytes([n]) * 8)])
        # wait for the snapshot to finish, not only for its manifest: the WAL count drops at the
        # manifest write, the snapshot's time and counter are set after the WAL rewrite
        until = time.monotonic() + 30
        while (c.info().gallery.wal_records >= 10 or scrape().get("hashret_gallery_snapshots_total", 0) < 1) \
                and time.monotonic() < until:
            time.sleep(0.02)
        g2 = c.info().gallery
        assert g2.wal_records < 10 and g2.last_snapshot.ToNanoseconds() > g0.last_snapshot.ToNanoseconds()
        m = scrape()
        assert m["hashret_gallery_snapshots_total"] == 1 and m["hashret_gallery_snapshot_failures_total"] == 0
        assert abs(m["hashret_gallery_last_snapshot_timestamp_seconds"] - g2.last_snapshot.ToNanoseconds() / 1e9) < 1e-3
        assert 0 <= m["hashret_gallery_last_snapshot_copy_seconds"] < m["hashret_gallery_last_snapshot_duration_seconds"]
    # graceful stop: one more snapshot, the WAL is empty on disk
    assert (gal / "wal.jsonl").stat().st_size == 0
    with open_gallery(gal) as g:
        assert g.size == N_BASE + 12 and g.wal_stats()["records"] == 0


def test_snapshot_bench_parts_end_to_end(exp, tmp_path):
    """The benchmark runs (tiny sizes) and its JSON renders in `hashret bench report`."""
    from benchmarks import snapshot_bench

    docs = {}
    for part, extra in {
        "replay": ["--replay-records", "300", "--replay-items", "2000", "--load-sizes", "2000", "--repeats", "1"],
        "write-wait": ["--size", "3000", "--hnsw-size", "0", "--snapshots", "1", "--gap-s", "0.2"],
        "upserts": ["--model", str(exp), "--upserts", "300", "--writers", "2", "--every-records", "40",
                    "--restarts", "1"],
    }.items():
        out = tmp_path / f"{part}.json"
        assert snapshot_bench.main(["--part", part, *extra, "--out", str(out), "--work", str(tmp_path / part)]) == 0
        docs[part] = json.loads(out.read_text())
        assert docs[part]["benchmark"] == f"snapshot-{part}" and "--part" in docs[part]["command"]
        head, rows = snapshot_bench.report_table(docs[part])
        assert rows and all(len(r) == len(head) for r in rows)
    single = docs["replay"]["results"][0]
    assert single["records"] == 300 and single["items"] == 300 and single["records_per_s"] > 0
    (flat,) = docs["write-wait"]["results"]
    assert flat["items"] == 3000 and flat["snapshots"][0]["items"] >= 3000 and flat["lock_held_ms_max"] > 0
    bar = docs["upserts"]["bars"][0]
    assert bar["acknowledged"] == bar["gallery_size"] == 300 and bar["every_item_present"]
    assert bar["wal_peak_records"] <= bar["wal_bound_records"] + 2 and bar["wal_under_bound"]
    assert docs["upserts"]["results"]["snapshots"] >= 300 // (2 * 40)

"""`hashret serve --workers N`: several real server processes on one port (SO_REUSEPORT), the
gallery opened read-only by all of them, the supervisor's restarts and shutdown; and the
read-only gallery mode underneath (shared lock, writes refused, nothing on disk touched)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from hashret.errors import BadInput, ReadOnly, Unavailable
from serve.client import Item, RetrievalClient
from serve.gallery import create_gallery, open_gallery, shared_mode
from serve.server import ServeConfig
from serve.workers import hold_port, worker_configs
from tests.test_serve import TOKEN, as_pairs, copy_gallery, data, engine, exp_dir, gallery_dir, offline_search, spec  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def folder_digest(path: Path) -> dict[str, str]:
    """sha256 of each file but the empty lock file, which a reader creates when it is missing."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def small_gallery(tmp_path) -> Path:
    g = create_gallery(tmp_path / "g", "faiss-flat", 64, "ab" * 32)
    rng = np.random.default_rng(0)
    g.upsert([f"i{k}" for k in range(20)], rng.integers(0, 256, (20, 8), dtype=np.uint8),
             [{"n": str(k)} for k in range(20)])
    g.close()
    return tmp_path / "g"


# ---- the read-only gallery ------------------------------------------------------------------
def test_read_only_openers_share_the_folder_and_exclude_a_writer(small_gallery):
    before = folder_digest(small_gallery)
    a, b = open_gallery(small_gallery, read_only=True), open_gallery(small_gallery, read_only=True)
    try:
        assert a.read_only and b.read_only and a.size == b.size == 20
        q = np.zeros((1, 8), np.uint8)
        assert [h.id for h in a.search(q, 5)[0]] == [h.id for h in b.search(q, 5)[0]]
        with pytest.raises(Unavailable, match=r"already open .*read-only openers"):
            open_gallery(small_gallery)
        assert a.wal_stats() is None  # no log of its own to bound: the Snapshotter stays off
        for op, call in (("upsert", lambda: a.upsert(["new"], np.zeros((1, 8), np.uint8))),
                         ("delete", lambda: a.delete(["i1"])), ("save", a.save), ("snapshot", a.snapshot)):
            with pytest.raises(ReadOnly, match=rf"({op}|snapshot) refused: it is open read-only") as e:
                call()
            assert e.value.grpc_code == "FAILED_PRECONDITION"
        assert a.size == 20 and a.get("i1")[1] == {"n": "1"}
    finally:
        a.close()
        b.close()
    assert folder_digest(small_gallery) == before
    w = open_gallery(small_gallery)  # every reader gone: a writer may open it again
    try:
        with pytest.raises(Unavailable, match=r"already open \(a writer\)"):
            open_gallery(small_gallery, read_only=True)
    finally:
        w.close()


def test_read_only_open_leaves_a_torn_wal_tail_for_the_writer(small_gallery):
    wal = next(p for p in small_gallery.iterdir() if p.name.startswith("wal"))
    with open(wal, "ab") as f:
        f.write(b'{"op":"upsert","half a rec')  # a write that crashed before its newline
    before = folder_digest(small_gallery)
    with open_gallery(small_gallery, read_only=True) as g:
        assert g.size == 20
    assert folder_digest(small_gallery) == before  # a reader cuts nothing
    with open_gallery(small_gallery) as g:  # the writer does
        assert g.size == 20
    assert not wal.read_bytes().endswith(b"half a rec")


def test_shared_mode_per_kind(small_gallery):
    from serve.gallery.milvus_index import MilvusGallery

    assert shared_mode(small_gallery) == "read-only"
    assert MilvusGallery.shared_mode(Path("g"), {"index": {"uri": "http://milvus:19530"}}) == "read-write"
    with pytest.raises(BadInput, match=r"Milvus Lite file \(milvus.db\) can be opened by one process only"):
        MilvusGallery.shared_mode(Path("g"), {"index": {"uri": "milvus.db"}})


# ---- planning the workers ---------------------------------------------------------------------
def test_worker_configs_split_threads_and_refuse_what_cannot_be_shared(small_gallery):
    cfg = ServeConfig(model="m", gallery=small_gallery, port=0, metrics_port=9400)
    cfgs = worker_configs(cfg, 2)
    cpus = os.cpu_count() or 1
    assert [c.metrics_port for c in cfgs] == [9400, 9401]
    assert all(c.reuse_port and c.read_only_gallery for c in cfgs)
    assert cfgs[0].engine_threads == max(1, cpus // 2) and cfgs[0].decode_threads == max(1, min(4, cpus // 2))
    assert worker_configs(ServeConfig(model="m", gallery=small_gallery, engine_threads=3), 2)[1].engine_threads == 3
    assert worker_configs(ServeConfig(model="m", gallery=small_gallery, metrics_port=0), 3)[2].metrics_port == 0
    with pytest.raises(BadInput, match=r"--admin-token-file \| the Admin service \(rollover\) drives one process"):
        worker_configs(ServeConfig(model="m", gallery=small_gallery, admin_token="t"), 2)
    with pytest.raises(BadInput, match=r"--shadow-fraction"):
        worker_configs(ServeConfig(model="m", gallery=small_gallery, shadow_fraction=0.5), 2)
    with pytest.raises(BadInput, match=r"--workers 0 \| must be an integer >= 1"):
        worker_configs(cfg, 0)


def test_hold_port_keeps_the_port_for_the_workers_and_refuses_a_used_one():
    held = hold_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    try:
        worker = socket.socket()  # a worker binds with SO_REUSEPORT, as gRPC does with reuse_port
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", port))
        worker.listen()
        stranger = socket.socket()  # anything else cannot take it
        with pytest.raises(OSError):
            stranger.bind(("127.0.0.1", port))
        stranger.close()
        with pytest.raises(Unavailable, match=rf"--port {port} \| cannot listen on 127.0.0.1:{port}"):
            hold_port("127.0.0.1", port)  # a second set of workers on a port in use
        worker.close()
    finally:
        held.close()


# ---- N real server processes -----------------------------------------------------------------
class Workers:
    """`python -m hashret serve --workers N` on a free port; stderr's JSON lines collected."""

    def __init__(self, exp: Path, gal: Path, n: int, tmp: Path, *extra: str, host: str = "127.0.0.1"):
        tok = tmp / "token"
        tok.write_text(TOKEN)
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        probe.bind((host, 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.addr = f"127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "hashret", "serve", "--model", str(exp), "--gallery", str(gal),
                    "--host", host, "--port", str(self.port), "--workers", str(n), "--metrics-port", "0",
                    "--token-file", str(tok), "--grace-s", "2", *extra]
        self.lines: list[dict] = []
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"msg": raw.decode(errors="replace").rstrip()})

    def wait_for(self, pred, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if pred(line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"not seen within {timeout} s; rc={self.proc.poll()}; log tail: {self.lines[-15:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def supervisor_serving(line: dict) -> bool:
    return line.get("logger") == "hashret.serve.workers" and line.get("msg") == "serving"


def search_count(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith('hashret_rpc_latency_seconds_count{method="Search"}'):
            return float(line.split()[-1])
    return 0.0


def test_two_workers_share_the_port_answer_alike_refuse_writes_and_restart(
        exp_dir, engine, spec, gallery_dir, data, tmp_path_factory, tmp_path):  # noqa: F811
    gal = copy_gallery(gallery_dir, tmp_path_factory, "workers")
    before = folder_digest(gal)
    _, _, queries = data
    images = [Path(q).read_bytes() for q in queries]
    expected = offline_search(engine, spec, gallery_dir, queries, 5)  # [(id, distance)] per query
    w = Workers(exp_dir, gal, 2, tmp_path)
    try:
        up = w.wait_for(supervisor_serving)
        assert up["workers"] == 2 and up["gallery_read_only"] is True and len(set(up["pids"])) == 2
        ports = up["metrics_ports"]
        assert len(set(ports)) == 2 and all(ports)
        # each new client is a new TCP connection; the kernel spreads connections over the workers
        for i in range(30):
            with RetrievalClient(w.addr, timeout=30) as c:
                assert as_pairs(c.search(images[i % len(images)], k=5)) == expected[i % len(images)]
        counts = [search_count(p) for p in ports]
        assert sum(counts) == 30 and min(counts) > 0, counts
        # bench serve sums the workers' stage histograms
        from serve.stages import scrape_stages

        each = [scrape_stages(f"127.0.0.1:{p}") for p in ports]
        both = scrape_stages(",".join(f"127.0.0.1:{p}" for p in ports))
        assert both["decode"]["count"] == sum(e["decode"]["count"] for e in each) == 30
        assert both["decode"]["buckets"][-1][1] == 30
        with RetrievalClient(w.addr, token=TOKEN, timeout=30) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.upsert([Item(id="new", image=images[0])])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "open read-only" in e.value.details() and "--workers" in e.value.details()
        # a worker that dies is replaced; the other keeps the port open meanwhile
        victim = up["pids"][0]
        os.kill(victim, signal.SIGKILL)
        again = w.wait_for(lambda ln: "serving again" in str(ln.get("msg")))
        assert str(victim) not in again["msg"]
        for i in range(10):
            with RetrievalClient(w.addr, timeout=30) as c:
                assert as_pairs(c.search(images[i], k=5)) == expected[i]
    finally:
        rc = w.stop()
    assert rc == 0
    w.wait_for(lambda ln: ln.get("msg") == "stopped", timeout=5)
    assert sum(1 for ln in w.lines if ln.get("msg") == "stopped") >= 2  # each worker drained and closed
    assert not any(Path(f"/proc/{pid}").exists() for pid in up["pids"][1:])
    assert folder_digest(gal) == before  # read-only: not a byte changed


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_hold_port_on_the_ipv6_wildcard_is_dual_stack_and_sees_ipv4_users():
    held = hold_port("::", 0)
    try:  # as gRPC binds [::]: IPv4 too, whatever the machine's bindv6only default
        assert held.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        held.close()
    with socket.socket() as v4:  # a server on IPv4 only still owns the port for a set of workers on ::
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        port = v4.getsockname()[1]
        with pytest.raises(Unavailable, match=rf"--port {port} \| cannot listen on :::{port}"):
            hold_port("::", port)


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_workers_on_the_dual_stack_wildcard_answer_ipv4_and_ipv6_clients(
        exp_dir, engine, spec, gallery_dir, data, tmp_path_factory, tmp_path):  # noqa: F811
    # --host ::: the port holder and every worker bind the IPv6 wildcard, which also takes IPv4
    gal = copy_gallery(gallery_dir, tmp_path_factory, "dual-stack")
    _, _, queries = data
    images = [Path(q).read_bytes() for q in queries[:4]]
    expected = offline_search(engine, spec, gallery_dir, queries[:4], 5)
    w = Workers(exp_dir, gal, 2, tmp_path, host="::")
    try:
        up = w.wait_for(supervisor_serving)
        for addr in (f"127.0.0.1:{w.port}", f"[::1]:{w.port}"):
            for i in range(12):  # a connection each: the kernel spreads them over both workers
                with RetrievalClient(addr, timeout=30) as c:
                    assert as_pairs(c.search(images[i % 4], k=5)) == expected[i % 4], addr
        counts = [search_count(p) for p in up["metrics_ports"]]
        assert sum(counts) == 24 and min(counts) > 0, counts
    finally:
        assert w.stop() == 0


def test_a_worker_that_cannot_start_stops_the_set_with_its_error(exp_dir, tmp_path):  # noqa: F811
    gal = create_gallery(tmp_path / "other", "faiss-flat", 32, "cd" * 32)  # another model's gallery
    gal.close()
    w = Workers(exp_dir, tmp_path / "other", 2, tmp_path)
    rc = w.proc.wait(120)
    assert rc == 2, w.lines[-10:]
    assert any("built for model" in str(ln.get("msg")) for ln in w.lines), w.lines[-10:]
    assert any("exited with 2 before serving" in str(ln.get("msg")) for ln in w.lines)


def test_cli_refuses_workers_with_the_admin_service(exp_dir, gallery_dir, tmp_path, tmp_path_factory, capsys):  # noqa: F811
    from hashret.cli import main

    tok = tmp_path / "admin"
    tok.write_text("admin-secret")
    gal = copy_gallery(gallery_dir, tmp_path_factory, "refused")
    code = main(["serve", "--model", str(exp_dir), "--gallery", str(gal), "--port", "0", "--workers", "2",
                 "--admin-token-file", str(tok), "--log-format", "text"])
    assert code == 2
    assert "the Admin service (rollover) drives one process" in capsys.readouterr().err

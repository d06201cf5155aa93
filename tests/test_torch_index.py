"""torch-flat: exact device search with faiss-flat's results and faiss-flat's durability.

Runs on the CPU here (gallery option device=cpu, or --search-device cpu): the scan, the tie order,
the chunk merge, the WAL/snapshot machinery and the refusal of a CUDA device this host lacks. The
CUDA-only checks skip with their reason on a host without a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hashret.errors import ArtifactMismatch, BadInput, Unavailable
from serve.gallery import create_gallery, open_gallery
from serve.gallery.faiss_index import CRASH_ENV
from serve.gallery import torch_index
from serve.gallery.torch_index import TorchFlatGallery, TorchFlatIndex, popcount64, smallest_keys, torch_distances

ROOT = Path(__file__).resolve().parents[1]
SHA = "5a" * 32

try:
    import torch

    CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a core dependency
    CUDA = False
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")


def codes(n: int, bits: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, bits // 8), dtype=np.uint8)


def hits(results) -> list[list[tuple]]:
    nan = "nan"  # an item stored without activations scores NaN, which equals nothing
    return [[(h.id, h.distance, h.metadata, nan if h.score is not None and h.score != h.score else h.score)
             for h in r] for r in results]


def history(g, bits: int, n: int = 1500) -> None:
    """Inserts, in-place replaces, deletes and re-adds: ties must follow insertion order through all."""
    ids = [f"i{i}" for i in range(n)]
    rng = np.random.default_rng(bits)
    z = rng.standard_normal((n, bits)).astype(np.float32)
    g.upsert(ids, codes(n, bits, 1), [{"n": str(i)} for i in range(n)], np.tanh(z))
    g.upsert(ids[10:40], codes(30, bits, 2), [{"v": "2"}] * 30)  # by code: no activations
    g.delete(ids[100:160:3])
    g.upsert(["i101", "new"], codes(2, bits, 3))


@pytest.mark.parametrize("bits", [16, 24, 64, 128])
def test_results_equal_faiss_flat_with_ties(tmp_path, bits):
    """Ids, distances, metadata and re-rank scores identical to faiss-flat (16-bit codes tie a lot)."""
    flat = create_gallery(tmp_path / "f", "faiss-flat", bits, SHA)
    torch_g = create_gallery(tmp_path / "t", "torch-flat", bits, SHA, device="cpu")
    try:
        for g in (flat, torch_g):
            history(g, bits)
        q = codes(12, bits, 4)
        zq = np.tanh(np.random.default_rng(5).standard_normal((12, bits))).astype(np.float32)
        for k in (1, 7, 300, 5000):  # 5000: more than the gallery holds
            assert hits(torch_g.search(q, k)) == hits(flat.search(q, k)), k
        assert hits(torch_g.search(q, 20, max_distance=bits // 3)) == hits(flat.search(q, 20, max_distance=bits // 3))
        assert hits(torch_g.search(q, 10, activations=zq, rerank_factor=5)) == hits(
            flat.search(q, 10, activations=zq, rerank_factor=5))
        if bits == 16:  # the case has ties at the cut: the order among them is what is checked
            d = [h.distance for h in flat.search(q[:1], 300)[0]]
            assert len(set(d)) < len(d)
    finally:
        flat.close()
        torch_g.close()


def test_chunked_scan_merges_to_the_same_answer():
    """Codes scanned a few at a time (the bound on device memory) give the one-pass answer."""
    db, q = codes(5000, 32, 1), codes(9, 32, 2)
    one = TorchFlatIndex(32, torch.device("cpu"))
    one.add(db)
    pair = one._pair_bytes()  # scan temporaries per (query, code)
    small = TorchFlatIndex(32, torch.device("cpu"), chunk_bytes=9 * pair * 100)  # 100 codes per chunk
    small.add(db[:1234])
    small.add(db[1234:])  # growth past the first capacity
    for k in (1, 10, 250):
        d1, r1 = one.search(q, k)
        d2, r2 = small.search(q, k)
        assert np.array_equal(d1, d2) and np.array_equal(r1, r2)
        ref = np.unpackbits(q[:, None, :] ^ db[None], axis=2).sum(2)
        order = np.lexsort((np.broadcast_to(np.arange(5000), ref.shape), ref), axis=1)[:, :k]
        assert np.array_equal(r1, order) and np.array_equal(d1, np.take_along_axis(ref, order, 1))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int64])
def test_smallest_keys_is_exact_and_takes_the_lower_rows_at_a_tie(dtype):
    """The selection by a histogram of distances and a running count of ties equals sorting
    every (distance, row) pair, on distances that tie nearly everywhere."""
    rng = np.random.default_rng(3)
    for n_q, n, hi in ((5, 1000, 4), (3, 64, 2), (1, 7, 1), (4, 300, 65)):
        d = rng.integers(0, hi, (n_q, n))
        want = np.sort((d << 40) + np.arange(n) + 1000, axis=1)
        for k in sorted({1, 2, 17, n - 1, n} - {0}):
            if k > n:
                continue
            got = smallest_keys(torch.from_numpy(d).to(dtype), k, 1000, hi - 1).numpy()
            assert np.array_equal(got, want[:, :k]), (n_q, n, hi, k)


def test_the_fused_kernel_is_checked_before_use(monkeypatch, caplog):
    """Where CuPy runs (a CUDA device), distances come from one fused kernel; it is tried on the
    first scan and kept only if it builds and agrees with torch's count, so a broken CuPy costs
    speed, never answers. Shown here with stand-in kernels on an index told to try one."""
    db, q = codes(3000, 64, 1), codes(4, 64, 2)
    ref = TorchFlatIndex(64, torch.device("cpu"))
    ref.add(db)
    want = ref.search(q, 10)
    assert ref.scan_method == "torch-swar"  # on the CPU no kernel is tried
    calls = []

    class Agrees:
        def __init__(self, device):
            pass

        def __call__(self, qq, rows):
            calls.append(len(rows))
            return torch_distances(qq, rows)

    class Disagrees(Agrees):
        def __call__(self, qq, rows):
            return torch_distances(qq, rows) + 1

    class Missing:
        def __init__(self, device):
            raise ModuleNotFoundError("No module named 'cupy'")

    for kernel, method, warning in ((Missing, "torch-swar", "CuPy distance kernel is unavailable .*No module named"),
                                    (Disagrees, "torch-swar", "disagrees with torch's count"),
                                    (Agrees, "cupy-popc", None)):
        monkeypatch.setattr(torch_index, "FusedHamming", kernel)
        idx = TorchFlatIndex(64, torch.device("cpu"))
        idx._fused = None  # as on a CUDA device: try the kernel on the first scan
        idx.add(db)
        caplog.clear()
        calls.clear()
        with caplog.at_level("INFO", logger="hashret.gallery"):
            got = idx.search(q, 10)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert idx.scan_method == method
        if warning:
            assert any(r.levelname == "WARNING" and re.search(warning, r.getMessage())
                       for r in caplog.records), warning
        else:
            assert calls[0] == 3000 and sum(calls[1:]) == 3000  # the probe, then the whole scan by the kernel


def test_popcount64_counts_every_bit_pattern():
    rng = np.random.default_rng(0)
    words = np.concatenate([rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2000, dtype=np.int64),
                            np.array([0, -1, 1, np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64)])
    want = np.unpackbits(words.view(np.uint8)).reshape(-1, 64).sum(1)
    assert np.array_equal(popcount64(torch.from_numpy(words)).numpy(), want)


def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch, caplog):
    """A device that cannot hold the scan's temporaries: smaller chunks, same answer (CUDA OOM
    cannot be produced on this CPU host, so the scan raises torch's own OOM type above a size)."""
    idx = TorchFlatIndex(64, torch.device("cpu"))
    db, q = codes(4000, 64, 1), codes(3, 64, 2)
    idx.add(db)
    want = idx.search(q, 10)
    real, seen = TorchFlatIndex._scan, []

    def scan(self, qq, k, rows):
        seen.append(rows)
        if rows > 500:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, qq, k, rows)

    monkeypatch.setattr(TorchFlatIndex, "_scan", scan)
    got = idx.search(q, 10)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert seen[-1] <= 500 < seen[0] and all(a > b for a, b in zip(seen, seen[1:]))
    monkeypatch.setattr(TorchFlatIndex, "_scan", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(Unavailable, match="out of device memory scanning 3 queries .* send fewer queries"):
        idx.search(q, 10)


def test_device_option_and_override(tmp_path):
    """Built for cuda on a CPU host: created fine, opening refused with the fix, --search-device cpu
    serves it, and the override never reaches the manifest (a snapshot keeps cuda)."""
    with create_gallery(tmp_path / "g", "torch-flat", 64, SHA) as g:  # default device: cuda
        g.upsert(["a", "b"], codes(2, 64, 1))
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["index"] == {"kind": "torch-flat", "activations": True, "device": "cuda"}
    if not CUDA:
        with pytest.raises(Unavailable, match=r"index device cuda \| torch sees no CUDA GPU .* --search-device cpu"):
            open_gallery(tmp_path / "g")
    with open_gallery(tmp_path / "g", search_device="cpu") as g:
        assert g.search_device == "cpu" and [h.id for h in g.search(codes(1, 64, 1), 1)[0]] == ["a"]
        g.upsert(["c"], codes(1, 64, 2))
        g.snapshot()
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["index"]["device"] == "cuda" and m["size"] == 3
    with pytest.raises(BadInput, match=r"--search-device 'gpu0' \| must be cpu, cuda or cuda:N"):
        open_gallery(tmp_path / "g", search_device="gpu0")
    with pytest.raises(BadInput, match=r"index option device 'tpu' \| must be cpu, cuda or cuda:N"):
        create_gallery(tmp_path / "h", "torch-flat", 64, SHA, device="tpu")
    with pytest.raises(BadInput, match="unknown option"):
        create_gallery(tmp_path / "h2", "torch-flat", 64, SHA, device="cpu", M=8)
    create_gallery(tmp_path / "f", "faiss-flat", 64, SHA).close()
    with pytest.raises(BadInput, match=r"--search-device cpu \| gallery .* is a faiss-flat gallery"):
        open_gallery(tmp_path / "f", search_device="cpu")


def test_index_build_flag_is_the_kind_option():
    import argparse

    from serve.index_cli import add_kind_args, kind_options

    p = argparse.ArgumentParser()
    add_kind_args(p)
    assert kind_options(p.parse_args(["--kind", "torch-flat", "--search-device", "cuda:1"])) == {"device": "cuda:1"}
    assert kind_options(p.parse_args(["--kind", "torch-flat"])) == {}
    with pytest.raises(BadInput, match="--search-device | only applies to --kind torch-flat"):
        kind_options(p.parse_args(["--kind", "faiss-flat", "--search-device", "cpu"]))


# ---- durability: FaissGallery's WAL and snapshots, through the new kind ------------------------
def test_reopen_replays_the_wal_and_snapshots(tmp_path):
    g = create_gallery(tmp_path / "g", "torch-flat", 64, SHA, device="cpu")
    g.upsert(["a", "b", "c"], codes(3, 64, 1), [{"x": "1"}, {}, {}])
    g.save()
    g.upsert(["d"], codes(1, 64, 9))
    g.upsert(["a"], codes(1, 64, 8), [{"x": "2"}])
    g.delete(["b"])
    q = codes(4, 64, 5)
    before = hits(g.search(q, 3))
    g.close()  # no save: the WAL holds the last three writes
    with open_gallery(tmp_path / "g", 64, SHA) as g2:
        assert g2.ids() == ["a", "c", "d"] and g2.get("a")[1] == {"x": "2"}
        assert hits(g2.search(q, 3)) == before


def test_torn_wal_line_and_damaged_snapshot(tmp_path, caplog):
    g = create_gallery(tmp_path / "g", "torch-flat", 64, SHA, device="cpu")
    g.upsert([str(i) for i in range(50)], codes(50, 64, 1))
    g.save()
    g.upsert(["x"], codes(1, 64, 2))
    g.close()
    with open(tmp_path / "g" / "wal.jsonl", "ab") as f:
        f.write(b'{"crc":"1234abcd","rec":{"seq":3,"op":"ups')  # a crash mid-append
    with open_gallery(tmp_path / "g") as g2:
        assert g2.size == 51 and g2.ids()[-1] == "x"
    assert "torn last line" in caplog.text
    snap = tmp_path / "g" / "snapshot-000001.codes.npy"
    snap.write_bytes(snap.read_bytes()[:-7])
    with pytest.raises(ArtifactMismatch, match=r"snapshot-000001\.codes\.npy \| sha256 .* restore it or rebuild"):
        open_gallery(tmp_path / "g")


_KILLED_SNAPSHOT = """
import sys, numpy as np
from serve.gallery import open_gallery
g = open_gallery(sys.argv[1])
rng = np.random.default_rng(3)
g.upsert([f"w{i}" for i in range(20)], rng.integers(0, 256, (20, 8), dtype=np.uint8), [{"w": "1"}] * 20)
g.upsert(["item0"], rng.integers(0, 256, (1, 8), dtype=np.uint8), [{"replaced": "1"}])
g.delete(["item3", "w5"])
print("acknowledged", flush=True)
g.snapshot()
"""


@pytest.mark.parametrize("step", ["writing-codes", "after-items", "after-manifest", "writing-wal", "after-wal"])
def test_kill_during_a_snapshot_keeps_every_acknowledged_write(tmp_path, step):
    """SIGKILL at a step of a snapshot (the hook tests/test_snapshot.py uses) -> reopen: exactly the
    acknowledged state, old or new generation, never a mix; it searches like faiss-flat afterwards."""
    gal = tmp_path / "g"
    with create_gallery(gal, "torch-flat", 64, SHA, device="cpu") as g:
        g.upsert([f"item{i}" for i in range(30)], codes(30, 64, 1))
    env = {**os.environ, CRASH_ENV: step, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SNAPSHOT, str(gal)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "acknowledged" in proc.stdout, proc.stderr[-2000:]
    rng = np.random.default_rng(3)
    w, r = rng.integers(0, 256, (20, 8), dtype=np.uint8), rng.integers(0, 256, (1, 8), dtype=np.uint8)
    want = {f"item{i}": (c.tobytes(), {}) for i, c in enumerate(codes(30, 64, 1))}
    want.update({f"w{i}": (c.tobytes(), {"w": "1"}) for i, c in enumerate(w)})
    want["item0"] = (r[0].tobytes(), {"replaced": "1"})
    del want["item3"], want["w5"]
    with open_gallery(gal, search_device="cpu") as g:
        assert g.ids() == list(want)
        assert {i: (g.get(i)[0].tobytes(), g.get(i)[1]) for i in g.ids()} == want
        stored = np.stack([np.frombuffer(want[i][0], np.uint8) for i in want])
        flat = create_gallery(tmp_path / "f", "faiss-flat", 64, SHA)
        flat.upsert(list(want), stored, [want[i][1] for i in want])
        q = codes(5, 64, 7)
        assert hits(g.search(q, 8)) == hits(flat.search(q, 8))
        flat.close()


# ---- the server -------------------------------------------------------------------------------
def test_served_search_on_a_torch_flat_gallery(tmp_path_factory):
    """`hashret serve --search-device cpu` on a gallery built for cuda: answers as faiss-flat does."""
    from benchmarks.soak import ServerProcess
    from serve.client import RetrievalClient
    from tests.test_fuzz import build_gallery, shared_exp, synthetic_images

    exp = shared_exp(tmp_path_factory)
    root = tmp_path_factory.mktemp("torch-serve")
    gals = {kind: build_gallery(exp, root / kind, n=16, kind=kind) for kind in ("faiss-flat", "torch-flat")}
    photo = next(iter(synthetic_images(1, (160, 120), seed=1)))  # the gallery's first image
    got = {}
    for kind, gal in gals.items():
        args = ["--log-format", "text", "--engine-threads", "1", "--decode-threads", "1", "--rerank-factor", "0"]
        if kind == "torch-flat":
            args += ["--search-device", "cpu"]
        with ServerProcess(exp, gal, args) as srv, RetrievalClient(srv.addr) as c:
            got[kind] = [(h.id, h.distance) for h in c.search(photo, k=8)]
        srv.cleanup()
    assert got["torch-flat"] == got["faiss-flat"] and got["torch-flat"][0] == ("item/000", 0)


# ---- CUDA only --------------------------------------------------------------------------------
@needs_cuda
def test_cuda_search_equals_cpu_search_and_frees_memory(tmp_path):
    import torch

    db, q = codes(1_000_000, 64, 1), codes(64, 64, 2)
    cpu, gpu = TorchFlatIndex(64, torch.device("cpu")), TorchFlatIndex(64, torch.device("cuda"))
    for idx in (cpu, gpu):
        idx.add(db)
    base = torch.cuda.memory_allocated()
    for k in (1, 10, 100):
        a, b = cpu.search(q, k), gpu.search(q, k)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    if importlib.util.find_spec("cupy") is not None:
        assert gpu.scan_method == "cupy-popc"  # the fused kernel built and agreed with torch's count
    assert torch.cuda.memory_allocated() == base  # scan temporaries all freed
    gpu.release()
    with create_gallery(tmp_path / "g", "torch-flat", 64, SHA) as g:
        g.upsert([str(i) for i in range(1000)], db[:1000])
    with open_gallery(tmp_path / "g") as g:
        assert isinstance(g, TorchFlatGallery) and g.search_device == "cuda"
        assert [h.distance for h in g.search(db[:1], 1)[0]] == [0]

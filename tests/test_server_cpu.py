"""Server CPU per request (`hashret bench serve`): /proc accounting, the engine/decode/rest split,
the bare gRPC echo floor, and the cuts on the request path (loop wake-ups, re-ranked search)."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from benchmarks import serve_load
from hashret.codes import pack
from hashret.errors import BadInput, Unavailable


# ---- reading CPU time from /proc ----------------------------------------------------------
def test_cpu_of_a_busy_child_process_and_its_children():
    # a process that burns CPU in a child of its own: both must be counted
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time\\nt = time.process_time()\\n"
            "while time.process_time() - t < 0.4: pass\\ntime.sleep(30)'])\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.4: pass\n"
            "print('busy', flush=True)\n"
            "time.sleep(30)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "busy"
        deadline = 0
        cpu = serve_load.process_cpu_seconds(p.pid)
        while cpu < 0.75 and deadline < 50:  # the child may still be finishing its 0.4 s
            threading.Event().wait(0.1)
            deadline += 1
            cpu = serve_load.process_cpu_seconds(p.pid)
        assert cpu >= 0.75, cpu  # 0.4 s of its own + 0.4 s of its child's, at 10 ms resolution
        assert cpu < 30
    finally:
        for c in serve_load.machine.child_pids(p.pid):
            subprocess.run(["kill", str(c)], check=False)
        p.kill()
        p.wait()


def test_cpu_of_a_missing_process_is_refused():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    with pytest.raises(Unavailable, match=rf"server pid {p.pid} \| /proc/{p.pid}/stat cannot be read"):
        serve_load.process_cpu_seconds(p.pid)


# ---- the split -------------------------------------------------------------------------------
BASELINE = {"results": [{"batch": 1, "cpu_ms_per_batch": 4.0}, {"batch": 8, "cpu_ms_per_batch": 18.0},
                        {"batch": 16, "cpu_ms_per_batch": 34.0}],
            "decode": {"cpu_ms_per_image": 1.5}}


def level(total_ms=8.0, items=800, batches=100, per_request=1):
    return {"requests_per_s": 300.0, "images_per_request": per_request,
            "server_cpu": {"ms_per_request": total_ms},
            "stages": {"inference_item": {"count": items}, "inference_batch": {"count": batches}}}


def test_split_adds_up_and_interpolates_the_engine_at_the_mean_batch():
    sp = serve_load.cpu_split(level(), BASELINE, cores=2)
    assert sp["mean_batch"] == 8.0
    assert sp["engine_ms"] == pytest.approx(18.0 / 8)
    assert sp["decode_ms"] == 1.5
    assert sp["engine_ms"] + sp["decode_ms"] + sp["rest_ms"] == pytest.approx(sp["total_ms"], abs=1e-3)
    assert sp["ceiling_requests_per_s"] == pytest.approx(2 * 1000 / (18.0 / 8 + 1.5), abs=0.1)
    # between timed batch sizes: CPU per batch on the line from 8 to 16
    sp = serve_load.cpu_split(level(items=1200), BASELINE, cores=2)
    assert sp["mean_batch"] == 12.0 and sp["engine_ms"] == pytest.approx(26.0 / 12, abs=1e-4)
    # beyond the largest: the last segment's slope continues
    sp = serve_load.cpu_split(level(items=2400), BASELINE, cores=2)
    assert sp["engine_ms"] == pytest.approx(50.0 / 24, abs=1e-4)
    # a SearchBatch request of 4 images costs 4 images' engine and decode
    sp = serve_load.cpu_split(level(per_request=4), BASELINE, cores=2)
    assert sp["decode_ms"] == 6.0 and sp["engine_ms"] == pytest.approx(9.0)


@pytest.mark.parametrize("row, baseline", [
    ({"server_cpu": {"ms_per_request": 5.0}}, BASELINE),  # no stage metrics: no batch size
    (level(), None),  # no baseline
    (level(), {"results": [], "decode": {"cpu_ms_per_image": 1.0}}),
    (level(), {"results": BASELINE["results"], "decode": {}}),
])
def test_split_needs_every_part(row, baseline):
    assert serve_load.cpu_split(row, baseline, cores=2) is None


def test_rest_bar_at_the_bar_concurrency():
    rows = [{"concurrency": 16, "rpc": "Search", "images_per_s": 100.0, "requests_per_s": 100.0,
             "cpu_split": serve_load.cpu_split(level(total_ms=4.5), BASELINE, cores=2)}]
    base = {"results": [{**r, "p50_ms": 1.0, "img_per_s": 200.0, "device": "cpu"} for r in BASELINE["results"]],
            "decode": {"ms_per_image": 1.5, "cpu_ms_per_image": 1.5}}
    bar = [b for b in serve_load.overhead_bars(rows, base) if "outside engine and decode" in b["name"]]
    assert len(bar) == 1 and bar[0]["measured"] == pytest.approx(0.75) and bar[0]["met"] is False


def test_rest_bar_is_met_only_when_the_services_own_threads_agree():
    base = {"results": [{**r, "p50_ms": 1.0, "img_per_s": 200.0, "device": "cpu"} for r in BASELINE["results"]],
            "decode": {"ms_per_image": 1.5, "cpu_ms_per_image": 1.5}}

    def bar(loop_ms):
        rows = [{"concurrency": 16, "rpc": "Search", "images_per_s": 100.0, "requests_per_s": 100.0,
                 "cpu_split": serve_load.cpu_split(level(total_ms=4.25), BASELINE, cores=2),
                 "server_cpu": {"ms_per_request": 4.25, "by_thread": {"engine_ms": 2.5, "decode_ms": 1.0,
                                                                      "loop_ms": loop_ms, "other_ms": 0.1}}}]
        return next(b for b in serve_load.overhead_bars(rows, base) if "outside engine and decode" in b["name"])

    # rest 0.5 by subtraction; the loop and other threads say 0.6: met
    assert bar(0.5)["measured"] == pytest.approx(0.5) and bar(0.5)["met"] is True
    # the same rest, but the threads themselves spent 0.75 (the decode baseline ran slow): not met
    b = bar(0.65)
    assert b["met"] is False and "the event loop and the other threads alone spent 0.75 ms" in b["text"]


# ---- the load, with CPU read ----------------------------------------------------------------
def test_echo_floor_is_loaded_and_its_cpu_read():
    images = serve_load.synthetic_images(3)
    with serve_load.EchoChild(reply_bytes=500) as echo:
        rows = serve_load.run_load(echo.addr, images, concurrency=[1, 4], max_requests=300, seconds=60, rpc="Echo",
                                   warmup=2, channels=2, server_pid=echo.proc.pid, progress=lambda *_: None)
    assert echo.proc.poll() is not None  # stopped on exit
    for r in rows:
        assert r["ok"] == r["sent"] == 300 and r["error_count"] == 0
        cpu = r["server_cpu"]
        assert cpu["pid"] == echo.proc.pid and cpu["requests"] == 300
        assert cpu["cpu_s"] >= 0 and cpu["ms_per_request"] == pytest.approx(cpu["cpu_s"] * 1e3 / 300, abs=1e-3)
        assert len(r["load_avg_1m"]) == 2
        assert "cpu_split" not in r  # an echo server has no engine


def test_a_level_is_shared_by_several_client_processes():
    assert serve_load.split_evenly(7, 3) == [3, 2, 2] and serve_load.split_evenly(2, 2) == [1, 1]
    images = serve_load.synthetic_images(3)
    with serve_load.EchoChild(reply_bytes=300) as echo:
        rows = serve_load.run_load(echo.addr, images, concurrency=[1, 3], max_requests=200, seconds=60, rpc="Echo",
                                   warmup=2, channels=2, server_pid=echo.proc.pid, clients=2,
                                   progress=lambda *_: None)
        with pytest.raises(BadInput, match="clients 0"):
            serve_load.run_load(echo.addr, images, concurrency=[1], clients=0)
    one, two = rows
    assert one["clients"] == 1 and one["client_cpu"]["processes"] == 1  # one request in flight: one process
    assert two["clients"] == 2 and two["client_cpu"]["processes"] == 2 and two["channels"] == 2
    for r in rows:
        # every request sent by some process was answered and counted once, server side too
        assert r["ok"] == r["sent"] == 200 and r["error_count"] == 0 and r["server_cpu"]["requests"] == 200
        c = r["client_cpu"]
        assert c["cpu_s"] > 0 and c["ms_per_request"] == pytest.approx(c["cpu_s"] * 1e3 / 200, abs=0.006)  # cpu_s to 1 ms
        assert 0 < c["busiest_core_share"] <= 2  # a share of one core (gRPC's own threads may add to it)
        assert r["duration_s"] > 0 and r["requests_per_s"] == pytest.approx(200 / r["duration_s"], rel=0.01)


def test_a_client_process_that_fails_ends_the_level_with_its_reason():
    # no images: each client's first call fails in its own process; the parent says why, at once
    began = []
    kwargs = {"addr": "127.0.0.1:1", "images": [], "concurrency": 2, "max_requests": 10, "seconds": 5,
              "k": 10, "rpc": "Echo", "batch_items": 1, "channels": 2, "timeout": 5, "token": None, "warmup": 1}
    with serve_load.EchoChild(reply_bytes=10) as echo, \
            pytest.raises(Unavailable, match="a client process failed: ZeroDivisionError"):
        serve_load._drive_processes(2, {**kwargs, "addr": echo.addr}, lambda: began.append(1))
    assert began == []  # never timed


def test_the_client_line_says_when_the_load_generator_may_be_the_limit():
    row = {"client_cpu": {"processes": 2, "ms_per_request": 0.25, "busiest_core_share": 0.95}}
    assert serve_load.format_client(row) == ("load generator: 0.250 ms CPU per request over 2 processes, the busiest "
                                             "at 95% of a core (it may be the limit here: more --clients)")
    row["client_cpu"]["busiest_core_share"] = 0.5
    assert "limit" not in serve_load.format_client(row)


def test_bench_cli_reads_a_server_pid_and_refuses_a_bad_one(tmp_path):
    from tests.test_benchmarks import parse

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(Unavailable, match="cannot be read"):
        serve_load.run(parse(["serve", "--addr", "127.0.0.1:1", "--server-pid", str(dead.pid)]))
    with pytest.raises(BadInput, match=re.escape("--server-pid | only with --addr")):
        serve_load.run(parse(["serve", "--model", "m", "--gallery", "g", "--server-pid", "1"]))
    with pytest.raises(BadInput, match="--clients | must be positive"):
        serve_load.run(parse(["serve", "--addr", "127.0.0.1:1", "--clients", "0"]))


# ---- the cuts ----------------------------------------------------------------------------------
def test_loop_waker_runs_a_burst_in_order_with_one_wake_up():
    from serve.service import _LoopWaker

    async def main():
        loop = asyncio.get_running_loop()
        waker = _LoopWaker(loop)
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), real(*a))[1]
        got, where = [], set()
        done = asyncio.Event()

        def note(i):
            got.append(i)
            where.add(threading.get_ident())
            if i == 9:
                done.set()

        t = threading.Thread(target=lambda: [waker.post(note, i) for i in range(10)])
        t.start()
        t.join()  # the loop is not running callbacks meanwhile: the whole burst is pending
        await asyncio.wait_for(done.wait(), 10)
        assert got == list(range(10)) and where == {threading.get_ident()}
        assert len(wakeups) == 1
        waker.post(note, 10)  # after a drain, the next post wakes the loop again
        await asyncio.sleep(0.05)
        assert got[-1] == 10 and len(wakeups) == 2

    asyncio.run(main())


def test_waker_of_a_closed_loop_drops_quietly():
    from serve.service import _LoopWaker

    loop = asyncio.new_event_loop()
    waker = _LoopWaker(loop)
    loop.close()
    waker.post(print, "never")  # no exception: nobody waits on a closed loop
    waker.post(print, "never")


def test_reranked_search_on_arrays_equals_the_hit_path(tmp_path):
    from serve.gallery import create_gallery
    from serve.gallery.base import Gallery

    rng = np.random.default_rng(4)
    Z = np.tanh(rng.normal(size=(300, 16)) * 2).astype(np.float32)
    Q = np.tanh(rng.normal(size=(20, 16)) * 2).astype(np.float32)
    ids = [f"i{j}" for j in range(len(Z))]
    with create_gallery(tmp_path / "g", "faiss-flat", 16, "m" * 64) as g:
        g.upsert(ids, pack(Z), [{"n": str(j)} for j in range(len(Z))], Z)
        g.upsert([f"code{j}" for j in range(5)], pack(Q[:5]))  # no activations: NaN rows
        g.delete(ids[10:20])  # positions shift
        cls = type(g)
        for k, factor, md in ((5, 10, None), (10, 3, 6), (1, 1, None), (40, 10, 2)):
            fast = g.search(pack(Q), k, md, Q, factor)
            own = cls._search_reranked
            cls._search_reranked = Gallery._search_reranked  # the fallback: Hits from _search, re-ranked
            try:
                slow = g.search(pack(Q), k, md, Q, factor)
            finally:
                cls._search_reranked = own
            assert [[(h.id, h.distance, h.metadata) for h in hs] for hs in fast] == \
                   [[(h.id, h.distance, h.metadata) for h in hs] for hs in slow]
            np.testing.assert_array_equal([h.score for hs in fast for h in hs], [h.score for hs in slow for h in hs])
        assert any(h.id.startswith("code") for hs in g.search(pack(Q[:5]), 5, None, Q[:5], 10) for h in hs)


def test_searches_of_one_loop_turn_share_one_gallery_call(tmp_path_factory, monkeypatch):
    """Requests that resume in the same turn of the event loop (a batch's answers) are searched with
    one gallery call per (k, max_distance, factor); each gets what a search of its own would give;
    a caller that stopped waiting is left out; a gallery too big for the loop is searched in the
    pool the same way; a failing call fails each of its searches."""
    from hashret.engines import open_engine
    from hashret.images import PreprocessSpec
    from hashret.manifest import load_manifest
    from serve.batcher import Batcher
    from serve.gallery import open_gallery
    from serve.service import RetrievalService
    from tests.test_fuzz import build_gallery, model_id_of, shared_exp

    exp = shared_exp(tmp_path_factory)
    gal_dir = build_gallery(exp, tmp_path_factory.mktemp("turn") / "gal", n=24)
    engine = open_engine(exp, "ort", "cpu")
    gal = open_gallery(gal_dir)
    spec = PreprocessSpec.from_dict(load_manifest(exp, kind="export")["preprocessing"])
    svc = RetrievalService(engine, gal, model_id=model_id_of(exp), spec=spec,
                           batcher=Batcher(engine.encode, max_batch=8))
    calls = []
    nowait = gal.search_nowait

    def counted(q, *a):
        calls.append(len(q))
        return nowait(q, *a)

    monkeypatch.setattr(gal, "search_nowait", counted)
    rng = np.random.default_rng(5)
    Z = np.tanh(rng.normal(size=(9, engine.bits)) * 2).astype(np.float32)
    codes = [pack(z[None]) for z in Z]
    asks = [(5, None, 10)] * 5 + [(3, None, 0)] * 3 + [(4, 20, 10)]

    async def turn(cancel_one=False):
        tasks = [asyncio.ensure_future(svc._search_code(codes[i], k, md, Z[i][None], f))
                 for i, (k, md, f) in enumerate(asks)]
        await asyncio.sleep(0)  # every task has asked for its search: one flush is due
        if cancel_one:
            tasks[1].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        got = asyncio.run(turn())
        assert sorted(calls) == [1, 3, 5]  # three kinds of search, one call each
        for i, (k, md, f) in enumerate(asks):
            alone = gal.search(codes[i], k, md, Z[i][None], f)[0]
            assert [(h.id, h.distance, h.score) for h in got[i]] == [(h.id, h.distance, h.score) for h in alone]
        calls.clear()
        got2 = asyncio.run(turn(cancel_one=True))
        assert isinstance(got2[1], asyncio.CancelledError) and sorted(calls) == [1, 3, 4]
        assert [h.id for h in got2[0]] == [h.id for h in got[0]]
        # too big to search on the loop: the same single call, made in the gallery pool
        calls.clear()
        monkeypatch.setattr(type(gal), "CHEAP_SCAN_BYTES", 0)
        searched = []
        search = gal.search
        monkeypatch.setattr(gal, "search", lambda q, *a: (searched.append(len(q)), search(q, *a))[1])
        got3 = asyncio.run(turn())
        assert sorted(searched) == [1, 3, 5] and sorted(calls) == [1, 3, 5]
        assert [[h.id for h in r] for r in got3] == [[h.id for h in r] for r in got]
        monkeypatch.setattr(gal, "search", lambda *a: (_ for _ in ()).throw(RuntimeError("gallery gone")))
        failed = asyncio.run(turn())
        assert all(isinstance(r, RuntimeError) and "gallery gone" in str(r) for r in failed)
    finally:
        svc.close()


# ---- CPU by thread ---------------------------------------------------------------------------
def test_threads_are_grouped_by_their_os_names_and_add_up_to_the_total():
    pid = 100
    before = {100: ("hashret", 10), 101: ("hashret-batcher", 5), 102: ("hashret-engine", 0),
              103: ("hashret-decode_", 7), 104: ("event_engine", 1)}
    after = {100: ("hashret", 30), 101: ("hashret-batcher", 45), 102: ("hashret-engine", 20),
             103: ("hashret-decode_", 37), 104: ("event_engine", 6), 105: ("hashret-decode_", 3)}  # 105: new
    tick_ms = 1e3 / serve_load.CLK_TCK
    total_s = 140 * tick_ms / 1e3  # 5 ticks more than the live threads show: a thread that ended
    g = serve_load.thread_groups(pid, before, after, total_s, requests=10)
    assert g["engine_ms"] == pytest.approx(60 * tick_ms / 10)
    assert g["decode_ms"] == pytest.approx(33 * tick_ms / 10)
    assert g["loop_ms"] == pytest.approx(20 * tick_ms / 10)
    assert g["other_ms"] == pytest.approx(27 * tick_ms / 10)  # event_engine's 5 + the 22 no live thread shows
    assert sum(g[k] for k in ("engine_ms", "decode_ms", "loop_ms", "other_ms")) == pytest.approx(total_s * 1e3 / 10)
    assert list(g["threads"]) == ["main (asyncio loop)", "event_engine"]
    assert serve_load.thread_groups(pid, before, after, total_s, requests=0) is None


def test_cpu_of_named_threads_is_read_from_proc():
    import os
    import time

    from serve import threadnames

    stop = threading.Event()

    def burn():
        threadnames.set_name("hashret-decode_9")
        while not stop.is_set():
            sum(range(1000))

    before = serve_load.thread_cpu_ticks(os.getpid())
    t = threading.Thread(target=burn)
    t.start()
    try:
        time.sleep(0.5)
        after = serve_load.thread_cpu_ticks(os.getpid())
    finally:
        stop.set()
        t.join()
    assert after[t.native_id][0] == "hashret-decode_"  # the kernel keeps 15 bytes
    g = serve_load.thread_groups(os.getpid(), before, after, 10.0, requests=1)
    assert g["decode_ms"] > 0


def test_threads_of_child_processes_count_and_their_main_threads_are_loops():
    # `hashret serve --workers N`: the supervisor waits, its worker processes do the work
    import os

    code = ("import time\nprint('up', flush=True)\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\ntime.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        before = serve_load.thread_cpu_ticks(os.getpid())
        assert child.stdout.readline().strip() == "done"
        after = serve_load.thread_cpu_ticks(os.getpid())
        loops = serve_load.loop_threads(os.getpid())
        assert child.pid in after and child.pid in loops and os.getpid() not in loops
        g = serve_load.thread_groups(os.getpid(), before, after, 10.0, requests=1, loops=loops)
        assert g["loop_ms"] >= 200  # its 0.3 s busy loop, at 10 ms resolution
    finally:
        child.kill()
        child.wait()
    assert serve_load.loop_threads(child.pid) == {child.pid}  # no children: the process's own main thread


def test_workers_among_server_args():
    assert serve_load._workers(["--backend", "ort"]) == 1
    assert serve_load._workers(["--workers", "4", "--backend", "ort"]) == 4
    assert serve_load._workers(["--workers=2", "--workers", "3"]) == 3  # argparse keeps the last
    assert serve_load._workers(["--workers", "x"]) == 1


def test_echo_answers_in_groups_at_its_rhythm():
    # 6 requests at once, answered 2 every 150 ms: the last two leave two ticks after the first two
    # (ticks run from the server's start, so the first one comes 0-150 ms after the requests). A
    # lower bound, which no slow machine can break; and they are never answered all at once
    images = serve_load.synthetic_images(2)
    with serve_load.EchoChild(reply_bytes=100, every_ms=150, group=2) as echo:
        rows = serve_load.run_load(echo.addr, images, concurrency=[6], max_requests=6, seconds=60, rpc="Echo",
                                   warmup=0, channels=1, server_pid=echo.proc.pid, progress=lambda *_: None)
    r = rows[0]
    assert r["ok"] == 6 and r["max_ms"] >= 2 * 150 * 0.95
    assert r["min_ms"] < r["max_ms"] - 150


def test_echo_takes_the_rhythm_of_the_server_level():
    row = {"requests_per_s": 200.0, "images_per_request": 1,
           "stages": {"inference_item": {"count": 760}, "inference_batch": {"count": 100}}}
    every_ms, group = serve_load.answer_pattern(row)
    assert group == 8 and every_ms == pytest.approx(40.0)  # 8 answers every 40 ms = 200 per second
    assert serve_load.answer_pattern({**row, "stages": {}}) is None
    assert serve_load.answer_pattern({**row, "images_per_request": 8}) is None



def test_cached_hit_protos_follow_changed_metadata_and_scores():
    from serve._proto import retrieval_pb2 as pb
    from serve.gallery import Hit
    from serve.servicer import _HitProtos

    cache = _HitProtos()

    def answer(hits):
        resp = pb.SearchResponse()
        cache.fill(resp.hits, hits)
        return [(h.id, h.distance, dict(h.metadata), h.score if h.HasField("score") else None) for h in resp.hits]

    first = answer([Hit("a", 3, {"label": "1"}, 0.5), Hit("b", 4, {}, float("nan")), Hit("c", 5, {"x": "y"})])
    assert first == [("a", 3, {"label": "1"}, 0.5), ("b", 4, {}, None), ("c", 5, {"x": "y"}, None)]
    # the same item again, at another distance and with its metadata changed by an upsert
    assert answer([Hit("a", 7, {"label": "2"}, 0.25)]) == [("a", 7, {"label": "2"}, 0.25)]
    assert answer([Hit("a", 1, {"label": "1"})]) == [("a", 1, {"label": "1"}, None)]
    cache.MAX_ITEMS = 2  # full: emptied, and still right
    assert answer([Hit(f"i{n}", n, {"n": str(n)}) for n in range(5)]) == [
        (f"i{n}", n, {"n": str(n)}, None) for n in range(5)]
    assert len(cache._by_item) <= 2

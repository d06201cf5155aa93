"""Snapshots of FAISS galleries: WAL replay speed, how long writes wait, and the 200,000-Upsert bar.

    python -m benchmarks.snapshot_bench --part replay        # -> benchmarks/results/snapshot-replay.json
    python -m benchmarks.snapshot_bench --part write-wait    # -> snapshot-write-wait.json (1M items)
    python -m benchmarks.snapshot_bench --part upserts       # -> snapshot-upserts.json (the bar, minutes)

replay: how fast `open_gallery` replays WAL records: single-item upserts (what a catalogue
that changes item by item writes) and batched ones, on an empty snapshot, next to how long
loading a snapshot of the same items takes. These rates pick serve's --snapshot-every-records
/ --snapshot-every-mb defaults (serve/snapshots.py): the restart cost the bound allows.

write-wait: a 1M-item gallery (real-looking ids and metadata); one thread upserts single items
back to back (fsync each, as served), one searches; snapshots are taken meanwhile. Reported:
how long each snapshot held the lock (the copy, all writes and searches wait for), write and
search latency inside and outside the snapshot windows, and the snapshot's phases.

upserts: `hashret serve` as a subprocess with the given bound; --writers threads send
--upserts single-item Upserts (codes, so the engine is not the bottleneck) while wal.jsonl is
sampled. Then SIGKILL (no shutdown snapshot), and restarts are timed (spawn to SERVING, median
of --restarts) of that gallery against the same gallery freshly compacted (a snapshot and an
empty WAL, as `hashret index build` leaves it). Bar: the WAL stays under its bound
(HARD_FACTOR x the trigger), the restart takes at most 2x the fresh one, every acknowledged
item is present with its code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine

PARTS = ("replay", "write-wait", "upserts")
NOTES = {
    "replay": "The WALs are filled with fsync off (only while filling); the opens are timed as they are.",
    "write-wait": "'during' = writes and searches that started while snapshot() ran; 'lock held' = its copy "
                  "plus its WAL rewrite.",
    "upserts": "Restarts are spawn-to-SERVING of `hashret serve` on a copy of each gallery, alternated, median "
               "kept; the copies are not timed.",
}
SHA = "ab" * 32
BITS = 64


def _ids(start: int, n: int) -> list[str]:
    # shaped like the Grocery ids (relative image paths), so JSON sizes are realistic
    return [f"train/Packages/Yoghurt/Arla-Natural-Yoghurt/Arla-Natural-Yoghurt_{i:07d}.jpg"
            for i in range(start, start + n)]


def _meta(ids: list[str]) -> list[dict[str, str]]:
    return [{"path": i, "label": str(k % 81), "class": "Arla-Natural-Yoghurt"} for k, i in enumerate(ids)]


class _NoFsync:
    """Builds WALs fast: fsync off while filling (never while measuring)."""

    def __enter__(self):
        self._fsync = os.fsync
        os.fsync = lambda fd: None

    def __exit__(self, *exc):
        os.fsync = self._fsync


def _timed_open(path: Path, repeats: int) -> tuple[float, int]:
    from serve.gallery import open_gallery

    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        g = open_gallery(path)
        times.append(time.perf_counter() - t)
        n = g.size
        g.close()
    return statistics.median(times), n


# --------------------------------------------------------------------------- replay
def part_replay(args, work: Path) -> dict[str, Any]:
    from serve.gallery import create_gallery
    from serve.snapshots import compact

    rng = np.random.default_rng(0)
    rows = []
    cases = [("single-item upserts", args.replay_records, 1), ("batched upserts", args.replay_items // 1000, 1000)]
    for name, records, per in cases:
        path = work / f"replay-{per}"
        g = create_gallery(path, "faiss-flat", BITS, SHA)
        with _NoFsync():
            for r in range(records):
                ids = _ids(r * per, per)
                g.upsert(ids, rng.integers(0, 256, (per, BITS // 8), dtype=np.uint8), _meta(ids))
        g.close()
        wal = (path / "wal.jsonl").stat().st_size
        replay_s, n = _timed_open(path, args.repeats)
        compact(path)
        load_s, _ = _timed_open(path, args.repeats)
        rows.append({
            "case": name, "records": records, "items": n, "wal_bytes": wal,
            "bytes_per_record": round(wal / records, 1), "replay_s": round(replay_s, 4),
            "records_per_s": round(records / replay_s), "items_per_s": round(n / replay_s),
            "mb_per_s": round(wal / replay_s / (1 << 20), 2), "snapshot_load_s": round(load_s, 4),
        })
        print(f"{name}: {records:,} records ({n:,} items, {wal / (1 << 20):.1f} MiB) replay {replay_s:.2f} s = "
              f"{records / replay_s:,.0f} records/s, {wal / replay_s / (1 << 20):.1f} MiB/s; "
              f"the same items from a snapshot {load_s:.2f} s")
        shutil.rmtree(path, ignore_errors=True)
    loads = []
    for size in args.load_sizes:
        path = work / f"load-{size}"
        g = create_gallery(path, "faiss-flat", BITS, SHA)
        for s in range(0, size, 100_000):
            ids = _ids(s, min(100_000, size - s))
            g.upsert(ids, rng.integers(0, 256, (len(ids), BITS // 8), dtype=np.uint8), _meta(ids))
        g.snapshot()
        g.close()
        load_s, _ = _timed_open(path, args.repeats)
        loads.append({"items": size, "snapshot_load_s": round(load_s, 4)})
        print(f"snapshot of {size:,} items loads in {load_s:.2f} s")
        shutil.rmtree(path, ignore_errors=True)
    from serve.snapshots import DEFAULT_EVERY_MB, DEFAULT_EVERY_RECORDS

    single, batched = rows
    bound = {
        "every_records": DEFAULT_EVERY_RECORDS, "every_mb": DEFAULT_EVERY_MB,
        "replay_s_at_records_bound": round(DEFAULT_EVERY_RECORDS / single["records_per_s"], 2),
        "replay_s_at_mb_bound_single": round(DEFAULT_EVERY_MB / single["mb_per_s"], 2),
        "replay_s_at_mb_bound_batched": round(DEFAULT_EVERY_MB / batched["mb_per_s"], 2),
    }
    print(f"defaults {DEFAULT_EVERY_RECORDS:,} records / {DEFAULT_EVERY_MB:g} MiB -> at most "
          f"{max(bound['replay_s_at_records_bound'], bound['replay_s_at_mb_bound_batched']):.2f} s of replay "
          "per restart (twice that while writes outpace a snapshot)")
    return {"results": rows, "snapshot_loads": loads, "default_bound": bound}


# --------------------------------------------------------------------------- write wait
def _window_stats(events: list[tuple[float, float]], windows: list[tuple[float, float]]) -> dict[str, Any]:
    inside = [ms for t, ms in events if any(a <= t <= b for a, b in windows)]
    outside = [ms for t, ms in events if not any(a <= t <= b for a, b in windows)]
    return {"during_snapshots": machine.percentiles(inside), "otherwise": machine.percentiles(outside)}


def part_write_wait(args, work: Path) -> dict[str, Any]:
    from serve.gallery import create_gallery

    out = []
    for kind, size in (("faiss-flat", args.size), ("faiss-hnsw", args.hnsw_size)):
        if not size:
            continue
        rng = np.random.default_rng(1)
        path = work / f"wait-{kind}"
        g = create_gallery(path, kind, BITS, SHA)
        t = time.perf_counter()
        for s in range(0, size, 100_000):
            ids = _ids(s, min(100_000, size - s))
            g.upsert(ids, rng.integers(0, 256, (len(ids), BITS // 8), dtype=np.uint8), _meta(ids))
        g.snapshot()
        print(f"{kind}: {size:,} items built in {time.perf_counter() - t:.0f} s")
        g.search(rng.integers(0, 256, (1, BITS // 8), dtype=np.uint8), 10)  # the index exists before timing
        writes: list[tuple[float, float]] = []
        searches: list[tuple[float, float]] = []
        stop = threading.Event()

        def writer():
            wrng = np.random.default_rng(2)
            n = size
            while not stop.is_set():
                ids = _ids(n, 1)
                t0 = time.perf_counter()
                g.upsert(ids, wrng.integers(0, 256, (1, BITS // 8), dtype=np.uint8), _meta(ids))
                writes.append((t0, (time.perf_counter() - t0) * 1e3))
                n += 1

        def searcher():
            import faiss

            faiss.omp_set_num_threads(1)  # as the server's search threads
            srng = np.random.default_rng(3)
            while not stop.is_set():
                q = srng.integers(0, 256, (1, BITS // 8), dtype=np.uint8)
                t0 = time.perf_counter()
                g.search(q, 10)
                searches.append((t0, (time.perf_counter() - t0) * 1e3))
                time.sleep(0.002)  # a steady query stream, not a saturating one

        threads = [threading.Thread(target=writer), threading.Thread(target=searcher)]
        for th in threads:
            th.start()
        windows, snaps = [], []
        try:
            time.sleep(args.gap_s)
            for _ in range(args.snapshots):
                t0 = time.perf_counter()
                r = g.snapshot()
                windows.append((t0, time.perf_counter()))
                snaps.append({k: r[k] for k in ("items", "bytes", "copy_ms", "serialize_s", "write_s",
                                                "wal_rewrite_ms", "total_s")})
                print(f"  snapshot: {r['items']:,} items, lock held {r['copy_ms']:.1f} ms (copy) + "
                      f"{r['wal_rewrite_ms']:.1f} ms (WAL rewrite), serialize {r['serialize_s']:.2f} s, "
                      f"write {r['write_s']:.2f} s, total {r['total_s']:.2f} s")
                time.sleep(args.gap_s)
        finally:
            stop.set()
            for th in threads:
                th.join()
            g.close()
            shutil.rmtree(path, ignore_errors=True)
        w, s = _window_stats(writes, windows), _window_stats(searches, windows)
        print(f"  writes  p50/p99/max during snapshots {w['during_snapshots'].get('p50_ms')}/"
              f"{w['during_snapshots'].get('p99_ms')}/{w['during_snapshots'].get('max_ms')} ms, otherwise "
              f"{w['otherwise'].get('p50_ms')}/{w['otherwise'].get('p99_ms')}/{w['otherwise'].get('max_ms')} ms")
        print(f"  searches p50/p99/max during snapshots {s['during_snapshots'].get('p50_ms')}/"
              f"{s['during_snapshots'].get('p99_ms')}/{s['during_snapshots'].get('max_ms')} ms, otherwise "
              f"{s['otherwise'].get('p50_ms')}/{s['otherwise'].get('p99_ms')}/{s['otherwise'].get('max_ms')} ms")
        out.append({"kind": kind, "items": size, "snapshots": snaps,
                    "lock_held_ms_max": max(x["copy_ms"] + x["wal_rewrite_ms"] for x in snaps),
                    "write_latency": w, "search_latency": s})
    return {"results": out}


# --------------------------------------------------------------------------- the bar
def _restart_s(exp: Path, src: Path, scratch: Path, extra: list[str]) -> float:
    """Spawn-to-SERVING seconds of `hashret serve` on a fresh copy of `src` (the copy is not timed)."""
    from benchmarks.soak import ServerProcess

    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(src, scratch, ignore=shutil.ignore_patterns(".lock"))
    srv = ServerProcess(exp, scratch, extra)
    try:
        t = time.perf_counter()
        srv.start(600)
        return time.perf_counter() - t
    finally:
        srv.cleanup()  # SIGKILL: the shutdown snapshot would only cost time here


def _tiny_exp(work: Path) -> Path:
    from benchmarks.tiny_exp import build_tiny_exp  # the test suite's tiny real export

    return build_tiny_exp(work / "tiny-exp")


def part_upserts(args, work: Path) -> dict[str, Any]:
    import grpc

    from benchmarks.soak import ServerProcess
    from serve.client import Item, RetrievalClient
    from serve.gallery import create_gallery, open_gallery
    from serve.snapshots import HARD_FACTOR, SnapshotPolicy, compact

    exp = Path(args.model) if args.model else _tiny_exp(work)
    from hashret.engines import model_id
    from hashret.manifest import load_manifest

    manifest = load_manifest(exp, kind="export")
    gal = work / "gal"
    with create_gallery(gal, "faiss-flat", int(manifest["bits"]), model_id(manifest)):
        pass
    nbytes = int(manifest["bits"]) // 8
    policy = SnapshotPolicy(every_records=args.every_records, every_mb=args.every_mb)
    server_args = ["--log-format", "text", "--engine-threads", "1", "--decode-threads", "1"]
    bound_args = ["--snapshot-every-records", str(policy.every_records), "--snapshot-every-mb", str(policy.every_mb)]
    token = "bench-" + os.urandom(8).hex()
    srv = ServerProcess(exp, gal, [*server_args, *bound_args], token=token).start()
    acked: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    done = threading.Event()
    peak = {"bytes": 0, "records": 0, "samples": 0}
    failures: list[str] = []

    def watch():
        wal = gal / "wal.jsonl"
        last_count = 0.0
        while not done.is_set():
            try:
                peak["bytes"] = max(peak["bytes"], wal.stat().st_size)
                if time.monotonic() - last_count > 0.2:  # counting lines reads the file: 5 times a second
                    peak["records"] = max(peak["records"], wal.read_bytes().count(b"\n"))
                    last_count = time.monotonic()
                peak["samples"] += 1
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    per_writer = args.upserts // args.writers

    def writer(w: int):
        rng = np.random.default_rng(100 + w)
        mine = []
        try:
            with RetrievalClient(srv.addr, token=token, timeout=60) as c:
                for n in range(per_writer):
                    i = _ids(w * per_writer + n, 1)[0]
                    code = rng.bytes(nbytes)
                    c.upsert([Item(id=i, code=code, metadata={"n": str(n)})])
                    mine.append((i, code))
        except grpc.RpcError as e:
            failures.append(f"writer {w}: {e.code().name} {e.details()}")
        with lock:
            acked.extend(mine)

    watcher = threading.Thread(target=watch, daemon=True)
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(args.writers)]
    t0 = time.perf_counter()
    try:
        watcher.start()
        for t in writers:
            t.start()
        while any(t.is_alive() for t in writers):
            time.sleep(5)
            with RetrievalClient(srv.addr, timeout=30) as c:
                gi = c.info().gallery
            print(f"  {time.perf_counter() - t0:6.0f} s: gallery {gi.size:,} items, WAL {gi.wal_records:,} records "
                  f"{gi.wal_bytes / (1 << 20):.1f} MiB (peak {peak['records']:,} records, "
                  f"{peak['bytes'] / (1 << 20):.1f} MiB)", flush=True)
        for t in writers:
            t.join()
        elapsed = time.perf_counter() - t0
        with RetrievalClient(srv.addr, timeout=30) as c:
            final = c.info().gallery
        done.set()
        watcher.join()
        srv.kill()  # a crash: the restart replays whatever the WAL holds
        log = srv.log_text()
    finally:
        done.set()
        srv.cleanup()
    snapshots = log.count("| snapshot generation")
    crashed = work / "crashed"
    shutil.copytree(gal, crashed, ignore=shutil.ignore_patterns(".lock"))
    fresh = work / "fresh"
    shutil.copytree(gal, fresh, ignore=shutil.ignore_patterns(".lock"))
    compact(fresh)
    after_s, fresh_s = [], []
    for _ in range(args.restarts):  # alternated, so drift in machine load hits both alike
        after_s.append(_restart_s(exp, crashed, work / "scratch", server_args))
        fresh_s.append(_restart_s(exp, fresh, work / "scratch", server_args))
    open_after, _ = _timed_open(crashed, 3)
    open_fresh, _ = _timed_open(fresh, 3)
    with open_gallery(crashed) as g:
        size = g.size
        lost = [i for i, code in acked if g.get(i)[0].tobytes() != code]
        wal_left = g.wal_stats()
    ratio = statistics.median(after_s) / statistics.median(fresh_s)
    bar = {
        "wal_bound_records": HARD_FACTOR * policy.every_records, "wal_bound_bytes": HARD_FACTOR * policy.every_bytes,
        "wal_peak_records": peak["records"], "wal_peak_bytes": peak["bytes"],
        "wal_under_bound": peak["records"] <= HARD_FACTOR * policy.every_records + args.writers
        and peak["bytes"] <= HARD_FACTOR * policy.every_bytes + (1 << 20),
        "restart_s_median": round(statistics.median(after_s), 3), "fresh_restart_s_median": round(statistics.median(fresh_s), 3),
        "restart_ratio": round(ratio, 3), "restart_within_2x": ratio <= 2.0,
        "acknowledged": len(acked), "gallery_size": size, "lost_or_changed": len(lost),
        "every_item_present": not lost and size == len(acked),
    }
    bar["met"] = bar["wal_under_bound"] and bar["restart_within_2x"] and bar["every_item_present"]
    bar["text"] = (
        f"{args.upserts:,} single-item Upserts: wal.jsonl peaked at {peak['records']:,} records (bound "
        f"{bar['wal_bound_records']:,}), restart after SIGKILL {bar['restart_s_median']:.2f} s vs "
        f"{bar['fresh_restart_s_median']:.2f} s freshly compacted ({ratio:.2f}x, bar 2x), "
        f"{len(acked) - len(lost):,}/{len(acked):,} acknowledged items present"
    )
    print(f"{len(acked):,} acknowledged upserts in {elapsed:.0f} s ({len(acked) / elapsed:,.0f}/s), {snapshots} "
          f"snapshots; wal.jsonl peaked at {peak['records']:,} records / {peak['bytes'] / (1 << 20):.1f} MiB "
          f"(bound {bar['wal_bound_records']:,} / {bar['wal_bound_bytes'] / (1 << 20):.0f} MiB)")
    print(f"restart after SIGKILL {bar['restart_s_median']:.2f} s (WAL {wal_left['records']:,} records) vs freshly "
          f"compacted {bar['fresh_restart_s_median']:.2f} s: {ratio:.2f}x; open_gallery alone {open_after:.2f} vs "
          f"{open_fresh:.2f} s; {len(lost)} acknowledged items lost or changed")
    return {
        "config": {"upserts": args.upserts, "writers": args.writers, "every_records": policy.every_records,
                   "every_mb": policy.every_mb, "hard_factor": HARD_FACTOR, "restarts": args.restarts,
                   "model": str(exp) if args.model else "tiny test export (benchmarks/tiny_exp.build_tiny_exp)"},
        "results": {
            "elapsed_s": round(elapsed, 1), "upserts_per_s": round(len(acked) / elapsed, 1), "snapshots": snapshots,
            "final_info": {"size": final.size, "wal_records": final.wal_records, "wal_bytes": final.wal_bytes},
            "wal_at_kill": wal_left, "restart_s": [round(x, 3) for x in after_s],
            "fresh_restart_s": [round(x, 3) for x in fresh_s], "open_gallery_s": round(open_after, 4),
            "fresh_open_gallery_s": round(open_fresh, 4), "writer_failures": failures,
        },
        "bars": [bar],
    }


# --------------------------------------------------------------------------- report
def report_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The table `hashret bench report` shows for each part's JSON."""
    part = doc.get("config", {}).get("part")
    if part == "replay":
        head = ["case", "records", "items", "MiB", "replay s", "records/s", "MiB/s", "snapshot load s"]
        rows = [[r["case"], r["records"], r["items"], round(r["wal_bytes"] / (1 << 20), 1), r["replay_s"],
                 r["records_per_s"], r["mb_per_s"], r["snapshot_load_s"]] for r in doc["results"]]
        rows += [[f"snapshot of {x['items']:,} items", "", x["items"], "", "", "", "", x["snapshot_load_s"]]
                 for x in doc.get("snapshot_loads", [])]
        return head, rows
    if part == "write-wait":
        head = ["kind", "items", "lock held ms (max)", "snapshot s", "write p50/p99/max ms during",
                "write p50/p99/max ms otherwise", "search p50/p99/max ms during", "search p50/p99/max ms otherwise"]

        def trio(p):
            return f"{p.get('p50_ms')}/{p.get('p99_ms')}/{p.get('max_ms')}"

        return head, [[r["kind"], r["items"], r["lock_held_ms_max"],
                       "/".join(f"{x['total_s']:.1f}" for x in r["snapshots"]),
                       trio(r["write_latency"]["during_snapshots"]), trio(r["write_latency"]["otherwise"]),
                       trio(r["search_latency"]["during_snapshots"]), trio(r["search_latency"]["otherwise"])]
                      for r in doc["results"]]
    b, r = doc["bars"][0], doc["results"]
    head = ["upserts/s", "snapshots", "WAL peak records", "bound", "restart s", "fresh restart s", "ratio",
            "items present"]
    return head, [[r["upserts_per_s"], r["snapshots"], b["wal_peak_records"], b["wal_bound_records"],
                   b["restart_s_median"], b["fresh_restart_s_median"], b["restart_ratio"],
                   f"{b['acknowledged'] - b['lost_or_changed']}/{b['acknowledged']}"]]


# --------------------------------------------------------------------------- CLI
def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=PARTS, required=True, help="which measurement (required)")
    p.add_argument("--repeats", type=int, default=3, help="replay: opens timed per case, median kept (default: 3)")
    p.add_argument("--replay-records", type=int, default=50_000,
                   help="replay: single-item records in the WAL (default: 50000)")
    p.add_argument("--replay-items", type=int, default=200_000,
                   help="replay: items written as 1000-item records (default: 200000)")
    p.add_argument("--load-sizes", type=machine.int_list, default=[200_000, 1_000_000], metavar="N,N",
                   help="replay: snapshot sizes whose load time is measured too (default: 200000,1000000)")
    p.add_argument("--size", type=int, default=1_000_000, help="write-wait: faiss-flat gallery size (default: 1000000)")
    p.add_argument("--hnsw-size", type=int, default=100_000,
                   help="write-wait: faiss-hnsw gallery size, 0 to skip (default: 100000)")
    p.add_argument("--snapshots", type=int, default=3, help="write-wait: snapshots taken (default: 3)")
    p.add_argument("--gap-s", type=float, default=2.0, help="write-wait: seconds between snapshots (default: 2)")
    p.add_argument("--model", default=None, metavar="EXP",
                   help="upserts: export to serve (default: the test suite's tiny export, built in a temp folder)")
    p.add_argument("--upserts", type=int, default=200_000, help="upserts: single-item Upsert calls (default: 200000)")
    p.add_argument("--writers", type=int, default=4, help="upserts: concurrent writer threads (default: 4)")
    from serve.snapshots import DEFAULT_EVERY_MB, DEFAULT_EVERY_RECORDS

    p.add_argument("--every-records", type=int, default=DEFAULT_EVERY_RECORDS,
                   help=f"upserts: the server's --snapshot-every-records (default: {DEFAULT_EVERY_RECORDS})")
    p.add_argument("--every-mb", type=float, default=DEFAULT_EVERY_MB,
                   help=f"upserts: the server's --snapshot-every-mb (default: {DEFAULT_EVERY_MB:g})")
    p.add_argument("--restarts", type=int, default=3, help="upserts: timed restarts of each gallery (default: 3)")
    p.add_argument("--work", default=None, metavar="DIR", help="scratch folder (default: a new temp folder, removed)")
    machine.add_out_arg(p, "snapshot-PART")


def run(args) -> int:
    if args.out == str(machine.default_out("snapshot-PART")):
        args.out = str(machine.default_out(f"snapshot-{args.part}"))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hashret-snapshot-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        part = {"replay": part_replay, "write-wait": part_write_wait, "upserts": part_upserts}[args.part]
        out = part(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    meta = machine.run_meta(f"snapshot-{args.part}", threads={"faiss_search": 1}, argv=getattr(args, "_argv", None))
    doc = {**meta, "config": {"part": args.part, **out.pop("config", {})}, **out, "notes": [NOTES[args.part]]}
    path = machine.write_result(doc, args.out)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.cli import run_main, standalone_parser

    def command(args) -> int:
        if argv is not None:  # called with arguments (tests): record those, not the caller's own
            args._argv = [__file__, *argv]
        return run(args)

    return run_main(standalone_parser("python -m benchmarks.snapshot_bench", __doc__, add_args), command, argv)


if __name__ == "__main__":
    raise SystemExit(main())

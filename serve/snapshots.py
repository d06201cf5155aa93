"""Keeping a FAISS gallery's write-ahead log bounded: snapshots by the running server, and offline.

Every acknowledged Upsert or Delete is one WAL record (serve.gallery.faiss_index), replayed at
start. Left alone the log grows with every write ever made, and so do disk use and start-up
time. The server therefore snapshots in the background when the WAL passes
`--snapshot-every-records` or `--snapshot-every-mb`, and once at graceful shutdown; `hashret
index compact GAL` does the same offline. A snapshot only holds the gallery lock while it copies
the in-memory state, so searches and writes go on while it serializes and writes.

The defaults come from measured replay speed (benchmarks/snapshot_bench.py, README "Snapshots
and compaction"): on a busy 2-core host single-item records (about 300 bytes) replay at 13,400/s
and 1,000-item records at 19 MiB/s, so 20,000 records or 8 MiB add at most about 1.5 s of replay
to a restart, next to the 2.6 s / 13.6 s it takes to load a snapshot of 200k / 1M items. A
smaller bound re-serializes a large gallery more often (about 4 s of one core at 1M items).

If writes outpace snapshots (more than a whole bound written while one snapshot runs), writes
wait before being logged once the WAL reaches twice either bound, until the running snapshot
cuts it back: so the WAL never exceeds twice the bound plus the writes already in progress.
A snapshot that fails (disk full) is logged and counted; nothing is lost, since the WAL still
holds every write, and it is retried after RETRY_S; writes never wait on a failing snapshot.

Milvus galleries keep no WAL of ours: Milvus logs every write itself (its message stream, or
Milvus Lite's local database), seals segments and compacts them (merging small segments and
purging deleted rows) on its own schedule. Our Milvus gallery writes its manifest only at create
and `save()`, nothing per write, so nothing of ours grows beside it; snapshots are a no-op there.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from hashret.errors import BadInput, HashretError
from serve import threadnames

log = logging.getLogger("hashret.snapshots")

DEFAULT_EVERY_RECORDS = 20_000
DEFAULT_EVERY_MB = 8.0
HARD_FACTOR = 2  # writes wait for a running snapshot once the WAL holds this many bounds
RETRY_S = 30.0  # after a failed snapshot, before the next try


@dataclass(frozen=True)
class SnapshotPolicy:
    """When the server snapshots a FAISS gallery: see the module docstring for the defaults."""

    every_records: int = DEFAULT_EVERY_RECORDS
    every_mb: float = DEFAULT_EVERY_MB
    at_shutdown: bool = True

    def __post_init__(self):
        r = self.every_records
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise BadInput(f"--snapshot-every-records {r!r} | must be a positive integer")
        m = self.every_mb
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0:
            raise BadInput(f"--snapshot-every-mb {m!r} | must be a positive number of MiB")

    @property
    def every_bytes(self) -> int:
        return max(1, int(self.every_mb * (1 << 20)))

    def due(self, wal: dict[str, Any]) -> bool:
        return wal["records"] >= self.every_records or wal["bytes"] >= self.every_bytes

    def over_cap(self, wal: dict[str, Any]) -> bool:
        return (wal["records"] >= HARD_FACTOR * self.every_records
                or wal["bytes"] >= HARD_FACTOR * self.every_bytes)


class Snapshotter:
    """Runs a gallery's snapshots on a thread of its own, when its WAL passes the policy's bound.

    The service calls `room()` before each write and `written()` after it; `close()` stops the
    thread and takes the shutdown snapshot. For galleries without a WAL of ours (Milvus) every
    method is a no-op.
    """

    def __init__(self, gallery, policy: SnapshotPolicy = SnapshotPolicy(),
                 on_snapshot: Callable[[dict], None] | None = None):
        self.gallery = gallery
        self.policy = policy
        self.enabled = gallery.wal_stats() is not None
        self._on_snapshot = on_snapshot
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._failed_at: float | None = None
        self.snapshots = 0
        self.failures = 0
        self.stalled_s = 0.0
        self.last: dict[str, Any] | None = None
        self.last_error: str | None = None

    def start(self) -> "Snapshotter":
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hashret-snapshot", daemon=True)
            self._thread.start()
            self._wake.set()  # a WAL already past its bound (say, after a crash) is cut back at once
        return self

    def stats(self) -> dict[str, Any] | None:
        return self.gallery.wal_stats() if self.enabled else None

    # ---- called by the service around every write ----------------------------------------
    def written(self) -> None:
        """After an acknowledged write: wake the snapshot thread when the WAL passed its bound."""
        if self.enabled and not self._stopping and self.policy.due(self.gallery.wal_stats()):
            self._wake.set()

    async def room(self) -> float:
        """Before a write: wait, on the event loop, while the WAL is at HARD_FACTOR times its bound
        and a snapshot is coming to cut it back. Returns the seconds waited (usually 0)."""
        if not self.enabled:
            return 0.0
        t0 = None
        while self._can_help() and self.policy.over_cap(self.gallery.wal_stats()):
            if t0 is None:
                t0 = time.monotonic()
                log.warning("writes wait: the WAL reached %dx its snapshot bound while a snapshot runs",
                            HARD_FACTOR)
            self._wake.set()
            await asyncio.sleep(0.005)
        if t0 is None:
            return 0.0
        waited = time.monotonic() - t0
        self.stalled_s += waited
        return waited

    def _can_help(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping
                and self._retry_in() is None)

    # ---- the thread -----------------------------------------------------------------------
    def _retry_in(self) -> float | None:
        """Seconds until a failed snapshot may be retried (0: now); None when none failed."""
        if self._failed_at is None:
            return None
        return max(0.0, self._failed_at + RETRY_S - time.monotonic())

    def _run(self) -> None:
        threadnames.name_current()
        while True:
            self._wake.wait(self._retry_in())
            self._wake.clear()
            if self._stopping:
                return
            if self._retry_in():
                continue  # still backing off after a failure
            if self.policy.due(self.gallery.wal_stats()):
                self.take("bound")
            else:
                self._failed_at = None  # someone else (compact, save) cut it back

    def take(self, why: str) -> dict[str, Any] | None:
        """One snapshot now; failures are logged and counted, not raised (the WAL keeps everything)."""
        try:
            result = self.gallery.snapshot()
        except Exception as e:  # noqa: BLE001 - a background thread: report, keep serving
            self.failures += 1
            self._failed_at = time.monotonic()
            self.last_error = str(e)
            log.error("snapshot (%s) of gallery %s failed: %s; every write is still in the WAL, next try "
                      "in %.0f s", why, self.gallery.path, e, RETRY_S, exc_info=not isinstance(e, HashretError))
            return None
        self._failed_at = None
        self.snapshots += 1
        self.last = {**result, "why": why}
        if self._on_snapshot is not None:
            self._on_snapshot(self.last)
        return result

    def close(self) -> None:
        """Stop the thread (a running snapshot finishes), then the shutdown snapshot when the WAL holds anything."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join()
        if self.enabled and self.policy.at_shutdown:
            wal = self.gallery.wal_stats()
            if wal["records"] or wal["bytes"]:
                self.take("shutdown")


class SnapshotCollector:
    """Prometheus view of a Snapshotter, read at scrape time (nothing for galleries without a WAL)."""

    def __init__(self, snapshotter: Snapshotter):
        self.s = snapshotter

    def describe(self):
        return []  # no fixed set: Milvus galleries report none of these

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        wal = self.s.stats()
        if wal is None:
            return
        yield GaugeMetricFamily("hashret_gallery_wal_records", "WAL records since the last snapshot",
                                value=wal["records"])
        yield GaugeMetricFamily("hashret_gallery_wal_bytes", "bytes of wal.jsonl (the records since the last snapshot)",
                                value=wal["bytes"])
        if wal.get("last_snapshot_unix") is not None:
            yield GaugeMetricFamily("hashret_gallery_last_snapshot_timestamp_seconds",
                                    "Unix time of the last snapshot", value=wal["last_snapshot_unix"])
        last = self.s.last or {}
        if last:
            yield GaugeMetricFamily("hashret_gallery_last_snapshot_duration_seconds",
                                    "wall time of the last snapshot by this server", value=last["total_s"])
            yield GaugeMetricFamily("hashret_gallery_last_snapshot_copy_seconds",
                                    "how long the last snapshot held the gallery lock (writes waited)",
                                    value=last["copy_ms"] / 1e3)
        yield CounterMetricFamily("hashret_gallery_snapshots", "snapshots taken by this server",
                                  value=self.s.snapshots)
        yield CounterMetricFamily("hashret_gallery_snapshot_failures", "snapshots that failed (retried later)",
                                  value=self.s.failures)
        yield CounterMetricFamily("hashret_gallery_write_stall_seconds",
                                  f"time writes waited for a snapshot with the WAL at {HARD_FACTOR}x its bound",
                                  value=self.s.stalled_s)


def compact(path) -> dict[str, Any]:
    """`hashret index compact`: snapshot a gallery offline; {kind, before, after, snapshot}."""
    from serve.gallery import open_gallery

    g = open_gallery(path)
    try:
        before = g.wal_stats()
        result = g.snapshot() if before is not None and (before["records"] or before["bytes"]) else None
        return {"gallery": str(path), "kind": g.kind, "size": g.size, "before": before,
                "after": g.wal_stats(), "snapshot": result}
    finally:
        g.close()


def add_compact_parser(sub) -> None:
    """`hashret index compact GAL` under `hashret index`'s subcommands."""
    import argparse

    c = sub.add_parser(
        "compact",
        help="snapshot a gallery offline so its write-ahead log is empty",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write a new snapshot of a FAISS gallery and cut its write-ahead log (wal.jsonl) back to\n"
            "nothing, so the next start replays nothing. A running `hashret serve` does this by itself\n"
            "(--snapshot-every-records, --snapshot-every-mb, and at shutdown); this is for a gallery\n"
            "no server has open (one that has is refused: the folder is locked).\n\n"
            "example:\n"
            "  hashret index compact galleries/grocery\n\n"
            "Milvus galleries keep no log of ours (Milvus compacts its own): nothing to do there."
        ),
    )
    c.add_argument("gallery", metavar="GAL", help="gallery folder from `hashret index build`")


def run_compact(args) -> int:
    print(compact_summary(compact(args.gallery)))
    return 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n} bytes"


def compact_summary(r: dict[str, Any]) -> str:
    if r["before"] is None:
        return (f"gallery {r['gallery']} ({r['kind']}): no WAL of ours to compact; Milvus keeps its own log "
                "and seals and compacts segments itself")
    b, a, s = r["before"], r["after"], r["snapshot"]
    if s is None:
        return f"gallery {r['gallery']} ({r['kind']}, {r['size']} items): WAL already empty, nothing to compact"
    return (f"gallery {r['gallery']} ({r['kind']}, {r['size']} items): WAL {b['records']} records, "
            f"{_mib(b['bytes'])} before -> {a['records']} records, {_mib(a['bytes'])} after "
            f"(snapshot generation {s['generation']}, {s['total_s']:.2f} s)")

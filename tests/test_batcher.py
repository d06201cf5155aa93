"""The dynamic batcher: batching under load, no waiting when alone, one encode at a time."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hashret.errors import Overloaded
from serve.batcher import Batcher, Expired


class Recorder:
    """An encode function that records who called it, with what batch, and overlapping calls."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[tuple[str, int]] = []
        self.active = 0
        self.overlaps = 0
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            self.active += 1
            self.overlaps += self.active > 1
        try:
            time.sleep(self.delay)
            self.calls.append((threading.current_thread().name, len(images)))
            return images.reshape(len(images), -1)[:, :4].astype(np.float32)  # row i depends on image i
        finally:
            with self._lock:
                self.active -= 1


def image(v: int) -> np.ndarray:
    return np.full((2, 2, 3), v, np.uint8)


def test_a_lone_request_is_encoded_at_once():
    rec = Recorder()
    # a batch window of 10 minutes that a lone request must not wait out: nobody else is coming.
    # The 60 s result timeout is a hang bound, not a speed check: a worker that waited for the
    # batch to fill would take the whole 600 s. Latency itself is benchmark output (`hashret bench
    # serve` at concurrency 1).
    with Batcher(rec, max_delay_us=600_000_000, name="worker") as b:
        out = b.submit(image(7)).result(60)
    assert out.tolist() == [7, 7, 7, 7]
    assert rec.calls == [("worker", 1)]
    assert b.stats.items == 1 and b.stats.batches == 1


def test_requests_that_arrive_together_are_batched_by_the_worker():
    rec = Recorder()
    with Batcher(rec, max_batch=8, max_delay_us=200_000, name="worker") as b:
        tickets = [b.reserve() for _ in range(5)]  # five requests still decoding
        futs = [t.submit(image(i)) for i, t in enumerate(tickets)]
        outs = [f.result(5) for f in futs]
    assert [o[0] for o in outs] == [0, 1, 2, 3, 4]  # each caller gets its own row
    assert sum(n for _, n in rec.calls) == 5 and len(rec.calls) < 5
    assert all(who == "worker" for who, _ in rec.calls)


def test_the_engine_never_runs_twice_at_once_and_every_caller_gets_its_row():
    rec = Recorder(delay=0.002)
    with Batcher(rec, max_batch=4, max_delay_us=500, queue_size=64) as b:
        def one(i: int) -> float:
            time.sleep((i % 7) * 0.001)
            return float(b.submit(image(i % 250)).result(10)[0])

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(200)))
    assert got == [float(i % 250) for i in range(200)]
    assert rec.overlaps == 0
    assert b.stats.items == 200 and b.depth == 0
    assert b.stats.batches < 200  # concurrent callers shared batches


def test_full_queue_is_refused_and_expired_items_are_dropped():
    gate = threading.Event()
    rec = Recorder()

    def slow(images):
        gate.wait(10)
        return rec(images)

    with Batcher(slow, max_batch=1, queue_size=2) as b:
        first = b.reserve()
        second = b.reserve()
        with pytest.raises(Overloaded, match="queue is full"):
            b.reserve()
        f1 = first.submit(image(1))
        f2 = second.submit(image(2), deadline=time.monotonic() - 1)
        gate.set()
        with pytest.raises(Expired, match="deadline passed"):
            f2.result(5)
        assert f1.result(5)[0] == 1
        assert b.stats.dropped == 1

"""The dynamic batcher: batching under load, no waiting when alone, one encode at a time."""
from __future__ import annotations

import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pytest

from hashret.engines import out_of_memory
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


class Blob:
    """Stands for the device memory a failed attempt allocated (its tensors)."""


class ShortOfMemory:
    """An encode that runs out of memory above `fits` images, or whenever `never` is in the batch.

    Each attempt allocates a Blob and keeps only a weak reference to it, so the next attempt can
    tell whether the failed one's memory was freed before it ran (a traceback held while retrying
    would keep it alive).
    """

    def __init__(self, error: Callable[[], BaseException], fits: int = 2, never: int | None = None):
        self.error, self.fits, self.never = error, fits, never
        self.sizes: list[int] = []
        self.held_while_retrying = 0
        self._last: weakref.ref | None = None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self._last is not None and self._last() is not None:
            self.held_while_retrying += 1
        blob = Blob()
        self._last = weakref.ref(blob)
        self.sizes.append(len(images))
        if len(images) > self.fits or (self.never is not None and (images[:, 0, 0, 0] == self.never).any()):
            raise self.error()
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)


def _batch_of(b: Batcher, values: list[int]) -> list:
    tickets = [b.reserve() for _ in values]  # all reserved first: they form one batch
    return [t.submit(image(v)) for t, v in zip(tickets, values)]


def test_out_of_memory_splits_the_batch_and_every_request_is_answered():
    import torch

    enc = ShortOfMemory(lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), fits=2)
    with Batcher(enc, max_batch=8, max_delay_us=5_000_000, split_when=out_of_memory) as b:
        futs = _batch_of(b, list(range(8)))
        outs = [f.result(10) for f in futs]
    assert [o[0] for o in outs] == list(range(8))
    assert enc.sizes == [8, 4, 2, 2, 4, 2, 2]  # halved depth first until each part fits
    assert b.stats.splits == 3 and b.stats.batches == 4 and b.stats.items == 8
    assert enc.held_while_retrying == 0  # the failed attempt's memory was freed before each retry


def test_an_image_that_does_not_fit_alone_fails_alone():
    enc = ShortOfMemory(lambda: RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate "
                                             "memory for requested buffer of size 1073741824"), fits=8, never=3)
    with Batcher(enc, max_batch=4, max_delay_us=5_000_000, split_when=out_of_memory) as b:
        futs = _batch_of(b, [1, 2, 3, 4])
        with pytest.raises(Overloaded, match="out of memory encoding a single image .*Failed to allocate memory"):
            futs[2].result(10)
        assert [futs[i].result(10)[0] for i in (0, 1, 3)] == [1, 2, 4]
    assert b.stats.items == 3


def test_a_deadline_that_passes_during_the_failed_attempt_is_honoured():
    sizes = []

    def slow_and_short(images):
        sizes.append(len(images))
        if len(images) > 2:
            time.sleep(1.5)  # the failed attempt takes longer than the first request may wait
            raise MemoryError()
        return images.reshape(len(images), -1)[:, :4].astype(np.float32)

    with Batcher(slow_and_short, max_batch=4, max_delay_us=5_000_000, split_when=out_of_memory) as b:
        tickets = [b.reserve() for _ in range(4)]
        now = time.monotonic()
        futs = [t.submit(image(v), deadline=now + (1.0 if v == 0 else 60)) for v, t in enumerate(tickets)]
        with pytest.raises(Expired, match="deadline passed"):
            futs[0].result(10)
        assert [f.result(10)[0] for f in futs[1:]] == [1, 2, 3]
    assert sizes == [4, 1, 2] and b.stats.dropped == 1  # the expired image was not encoded again


def test_other_errors_fail_the_whole_batch_without_a_retry():
    enc = ShortOfMemory(lambda: RuntimeError("shape mismatch in node Conv_3"), fits=0)
    with Batcher(enc, max_batch=4, max_delay_us=5_000_000, split_when=out_of_memory) as b:
        futs = _batch_of(b, [1, 2, 3, 4])
        for f in futs:
            with pytest.raises(RuntimeError, match="shape mismatch"):
                f.result(10)
    assert enc.sizes == [4] and b.stats.splits == 0


def test_without_split_when_out_of_memory_fails_the_batch():
    enc = ShortOfMemory(MemoryError, fits=1)
    with Batcher(enc, max_batch=4, max_delay_us=5_000_000) as b:
        futs = _batch_of(b, [1, 2])
        for f in futs:
            with pytest.raises(MemoryError):
                f.result(10)
    assert enc.sizes == [2]


def test_what_counts_as_out_of_memory():
    import torch

    from hashret.errors import BadInput

    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert out_of_memory(MemoryError())
    assert out_of_memory(RuntimeError("CUDA failure 2: out of memory ; GPU=0"))  # ONNX Runtime's CUDA provider
    assert out_of_memory(RuntimeError("std::bad_alloc"))
    assert out_of_memory(RuntimeError("cudaErrorMemoryAllocation"))
    assert not out_of_memory(RuntimeError("shape mismatch"))
    assert not out_of_memory(ValueError(""))
    # our own errors are never retried, whatever they say
    assert not out_of_memory(BadInput("image | 1e9 pixels would run the server out of memory"))

"""Dynamic batching in front of one inference engine (Triton's dynamic batcher, in-process).

Why: a CNN encodes 16 images in far less than 16 times the time of one, and ONNX Runtime /
OpenVINO sessions are best driven from one thread with all cores. So concurrent requests hand
their preprocessed images to ONE worker thread that stacks whatever is waiting (up to
`max_batch`) and calls `encode` once.

Waiting policy: Triton waits up to `max_queue_delay` for a batch to fill. Waiting when nothing
else is on its way only adds latency, so here the worker waits (at most `max_delay_us` after the
oldest item arrived) only while other requests hold a reserved slot, i.e. are still being
decoded and will arrive shortly. A lone request is encoded at once; under load the batch fills
from the queue that builds up while the previous batch runs.

Admission: callers `reserve()` a slot *before* decoding. When queued + reserved items reach
`queue_size` the caller gets `Overloaded` (gRPC RESOURCE_EXHAUSTED) without spending CPU on
decoding, which is what a client should see under overload: back off and retry.

Deadlines: an item whose deadline passed, or whose future was cancelled (client gone), is
dropped before inference instead of wasting a batch slot.

Out of memory: when `split_when(error)` says a failed batch ran out of memory (a GPU under a
large --max-batch, or one shared with other processes), the batch is encoded again in halves,
down to single images, so the requests get slower instead of failing; only an image that does
not fit alone fails (RESOURCE_EXHAUSTED). Any other error fails the whole batch, as before.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hashret.errors import BadInput, HashretError, Overloaded, first_line
from serve import threadnames

log = logging.getLogger("hashret.serve.batcher")


class Expired(HashretError):
    """The request's deadline passed before its image reached the model."""

    exit_code = 2
    grpc_code = "DEADLINE_EXCEEDED"


@dataclass
class _Item:
    image: np.ndarray
    deadline: float | None  # time.monotonic() seconds
    future: Future
    enqueued: float


@dataclass
class BatchStats:
    """Counters since start (for tests and /metrics)."""

    batches: int = 0
    items: int = 0
    dropped: int = 0
    rejected: int = 0
    splits: int = 0  # batches encoded again in halves after running out of memory


@dataclass(frozen=True)
class BatchTiming:
    """When an inference batch ran (time.monotonic() seconds) and how many images it held.

    Each answered future carries `future.timing = (enqueued, BatchTiming)`, so a waiter can
    split its latency into queue wait and inference (serve.stages) without another callback.
    """

    started: float
    ended: float
    size: int


class Ticket:
    """A reserved queue slot: the holder is preparing an image and will `submit` it or `cancel`.

    Use as a context manager so a failed decode releases the slot.
    """

    __slots__ = ("_batcher", "_open")

    def __init__(self, batcher: "Batcher"):
        self._batcher = batcher
        self._open = True

    def submit(self, image: np.ndarray, deadline: float | None = None) -> Future:
        """Queue `image` (uint8 [H, W, 3]); the future resolves to its float32 row of the output."""
        if not self._open:
            raise RuntimeError("ticket already used")
        self._open = False
        return self._batcher._enqueue(image, deadline)

    def cancel(self) -> None:
        if self._open:
            self._open = False
            self._batcher._release()

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()


class Batcher:
    """Groups images from many threads/coroutines into batches for one `encode` worker thread.

    `encode(uint8 [N, H, W, 3]) -> [N, ...]` is called only from the worker thread.
    `on_batch(size, seconds)` is called after each inference (metrics).
    `split_when(error) -> bool`: errors after which the batch is retried in halves (out of memory).
    """

    def __init__(
        self,
        encode: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 32,
        max_delay_us: int = 2000,
        queue_size: int = 256,
        on_batch: Callable[[int, float], None] | None = None,
        split_when: Callable[[BaseException], bool] | None = None,
        name: str = "hashret-batcher",
    ):
        for what, v, lo in (("max_batch", max_batch, 1), ("max_delay_us", max_delay_us, 0), ("queue_size", queue_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise BadInput(f"batcher {what} {v!r} | must be an integer >= {lo}")
        self._encode = encode
        self.max_batch = max_batch
        self.max_delay_s = max_delay_us / 1e6
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._split_when = split_when
        self._queue: collections.deque[_Item] = collections.deque()
        self._reserved = 0
        self._cond = threading.Condition()
        self._closing = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- producer side -----------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items waiting for inference plus slots reserved by requests still decoding."""
        with self._cond:
            return len(self._queue) + self._reserved

    def reserve(self) -> Ticket:
        """A slot for one image, or Overloaded when the queue is full (or the batcher is closing)."""
        with self._cond:
            if self._closing:
                raise Overloaded("server | shutting down: retry on another replica")
            if len(self._queue) + self._reserved >= self.queue_size:
                self.stats.rejected += 1
                raise Overloaded(
                    f"server | inference queue is full ({self.queue_size} requests waiting): back off and retry"
                )
            self._reserved += 1
        return Ticket(self)

    def submit(self, image: np.ndarray, deadline: float | None = None) -> Future:
        """reserve() + submit() for callers that already hold a decoded image."""
        return self.reserve().submit(image, deadline)

    def _release(self) -> None:
        with self._cond:
            self._reserved -= 1
            self._cond.notify_all()  # a waiting worker may stop waiting for this item

    def _enqueue(self, image: np.ndarray, deadline: float | None) -> Future:
        fut: Future = Future()
        item = _Item(image, deadline, fut, time.monotonic())
        with self._cond:
            self._reserved -= 1
            self._queue.append(item)
            self._cond.notify_all()
        return fut

    # ---- worker side -------------------------------------------------------------------
    def _collect(self) -> list[_Item] | None:
        """Block for the next batch; None when closing and drained."""
        with self._cond:
            while not self._queue:
                if self._closing and self._reserved == 0:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            until = batch[0].enqueued + self.max_delay_s
            while len(batch) < self.max_batch:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = until - time.monotonic()
                if self._reserved == 0 or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _run(self) -> None:
        threadnames.set_name(self._thread.name)  # so per-thread CPU reads show the engine's share
        while True:
            batch = self._collect()
            if batch is None:
                return
            running = []
            for it in batch:
                if it.future.set_running_or_notify_cancel():
                    running.append(it)
                else:
                    self.stats.dropped += 1  # cancelled: the client is gone
            live = self._unexpired(running)
            if live:
                self._infer(live)

    def _unexpired(self, items: list[_Item]) -> list[_Item]:
        """`items` whose deadline has not passed; the others are answered with Expired."""
        now = time.monotonic()
        live = []
        for it in items:
            if it.deadline is not None and now >= it.deadline:
                self.stats.dropped += 1
                waited = (now - it.enqueued) * 1e3
                it.future.set_exception(Expired(f"request | deadline passed after {waited:.1f} ms in the queue"))
            else:
                live.append(it)
        return live

    def _infer(self, live: list[_Item]) -> None:
        """Encode `live` and answer each future; in halves after an out-of-memory error."""
        t0 = time.perf_counter()
        started = time.monotonic()
        short_of_memory = None
        try:
            out = self._encode(np.stack([it.image for it in live]))
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about it
            if self._split_when is None or not isinstance(e, Exception) or not self._split_when(e):
                if not isinstance(e, HashretError):
                    log.exception("inference failed on a batch of %d", len(live))
                for it in live:
                    it.future.set_exception(e)
                return
            short_of_memory = first_line(e)
        if short_of_memory is not None:
            # Out of the except block first: the error's traceback holds the failed attempt's
            # tensors, which must be freed before the halves run.
            if len(live) == 1:
                live[0].future.set_exception(Overloaded(
                    f"server | out of memory encoding a single image ({short_of_memory}): retry later or on "
                    f"another replica"))
                return
            self.stats.splits += 1
            log.warning("out of memory encoding a batch of %d: encoding it in halves (%s)", len(live), short_of_memory)
            half = len(live) // 2
            for part in (live[:half], live[half:]):
                part = self._unexpired(part)  # the failed attempt took time: deadlines may have passed
                if part:
                    self._infer(part)
            return
        seconds = time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.items += len(live)
        timing = BatchTiming(started, time.monotonic(), len(live))
        for i, it in enumerate(live):
            # read by the waiter for its per-stage timings (serve.stages), before it wakes
            it.future.timing = (it.enqueued, timing)
            it.future.set_result(out[i])
        if self._on_batch is not None:
            try:
                self._on_batch(len(live), seconds)
            except Exception:  # noqa: BLE001 - metrics must never stop inference
                log.exception("on_batch callback failed")

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop admitting, let queued and reserved items finish, join the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

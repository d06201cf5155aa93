"""Shadow comparison: re-run a sample of live searches on the candidate model, after answering.

Why: codes of two models are not comparable, so "is the new model better?" offline does not say
how much the answers users get would *change*. Re-running real traffic on the candidate and
comparing its top-k with the answer the client got shows that before Promote.

Off the hot path: the live answer is sent first; a sampled query goes into a bounded queue
that one task drains through the candidate's own batcher. When the queue is full the sample
is dropped (counted), never waited for, so a slow candidate cannot slow live traffic.

Two numbers per compared query, both exported as Prometheus histograms labelled with the
candidate's model id (short), and as running means in the Admin Status reply:
- top-k overlap = |A ∩ B| / max(|A|, |B|)  (= |A ∩ B| / k when both lists are full; 1.0 when
  both are empty), A and B the live and candidate id lists;
- Spearman's rho over the union A ∪ B: an item's rank is its position in a list, and items
  missing from a list share (average) the ranks after its end, the usual tie correction.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

log = logging.getLogger("hashret.serve.shadow")

OVERLAP_BUCKETS = tuple(round(x * 0.1, 1) for x in range(11))
RHO_BUCKETS = tuple(round(-1 + x * 0.2, 1) for x in range(11))


def topk_overlap(a: Sequence[str], b: Sequence[str]) -> float:
    """|A ∩ B| / max(|A|, |B|); 1.0 for two empty lists."""
    n = max(len(a), len(b))
    return 1.0 if n == 0 else len(set(a) & set(b)) / n


def _ranks(lst: Sequence[str], union: list[str]) -> np.ndarray:
    pos = {x: i + 1 for i, x in enumerate(lst)}
    missing = [x for x in union if x not in pos]
    tied = len(lst) + (len(missing) + 1) / 2  # average of ranks len+1 .. len+m
    return np.array([pos.get(x, tied) for x in union], dtype=np.float64)


def rank_correlation(a: Sequence[str], b: Sequence[str]) -> float:
    """Spearman's rho of the two rankings over A ∪ B (missing items tied after the end)."""
    union = list(dict.fromkeys([*a, *b]))
    if len(union) < 2:
        return 1.0 if list(a) == list(b) else 0.0
    ra, rb = _ranks(a, union), _ranks(b, union)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    if den == 0.0:  # one list ranks every item alike (e.g. it is empty)
        return 1.0 if list(a) == list(b) else 0.0
    return float((ra * rb).sum() / den)


@dataclass
class ShadowStats:
    """Running totals for one candidate (reset when another is loaded)."""

    model_id: str = ""
    compared: int = 0
    dropped: int = 0
    failed: int = 0
    overlap_sum: float = 0.0
    rho_sum: float = 0.0

    @property
    def mean_overlap(self) -> float:
        return self.overlap_sum / self.compared if self.compared else 0.0

    @property
    def mean_rank_correlation(self) -> float:
        return self.rho_sum / self.compared if self.compared else 0.0


class Shadow:
    """Samples live searches (probability `fraction`) and compares them on a candidate service.

    `offer()` is called on the server's event loop after a Search answered; `run_one` does the
    comparison (a coroutine on the same loop). The candidate is taken from `get_candidate()`
    when the sample is run, and skipped if it changed since the sample was taken.
    """

    def __init__(self, fraction: float, registry=None, queue_size: int = 64, seed: int | None = None):
        if not 0.0 <= float(fraction) <= 1.0:
            from hashret.errors import BadInput

            raise BadInput(f"--shadow-fraction {fraction!r} | must be between 0 and 1")
        self.fraction = float(fraction)
        self._rng = random.Random(seed)
        self._queue: asyncio.Queue | None = None
        self._queue_size = int(queue_size)
        self._task: asyncio.Task | None = None
        self.stats = ShadowStats()
        self._metrics = None
        if registry is not None:
            from prometheus_client import Counter, Histogram

            self._metrics = {
                "overlap": Histogram("hashret_shadow_topk_overlap", "top-k overlap |A∩B|/k of live and candidate "
                                     "answers to the same sampled search", ["candidate"], buckets=OVERLAP_BUCKETS,
                                     registry=registry),
                "rho": Histogram("hashret_shadow_rank_correlation", "Spearman rank correlation over the union of "
                                 "live and candidate top-k", ["candidate"], buckets=RHO_BUCKETS, registry=registry),
                "compared": Counter("hashret_shadow_compared_total", "sampled searches re-run on the candidate",
                                    ["candidate"], registry=registry),
                "dropped": Counter("hashret_shadow_dropped_total", "sampled searches dropped: shadow queue full",
                                   ["candidate"], registry=registry),
                "failed": Counter("hashret_shadow_failed_total", "sampled searches the candidate failed",
                                  ["candidate"], registry=registry),
            }

    def reset(self, model_id: str) -> None:
        """Start counting for a new candidate; queued samples of the old one are dropped when run."""
        self.stats = ShadowStats(model_id=model_id)

    def offer(self, pairs, image: bytes, k: int, max_distance, live_ids: list[str], rerank_factor=None) -> bool:
        """Maybe queue one answered search for comparison (same k, max_distance and re-ranking
        request as the live one); True when queued."""
        cand = pairs.candidate
        if cand is None or self.fraction <= 0.0 or self._rng.random() >= self.fraction:
            return False
        if self._queue is None:
            self._queue = asyncio.Queue(self._queue_size)
            self._task = asyncio.ensure_future(self._drain(pairs))
        try:
            self._queue.put_nowait((cand.model_id, image, k, max_distance, live_ids, rerank_factor))
        except asyncio.QueueFull:
            self._count("dropped", cand.model_id)
            self.stats.dropped += 1
            return False
        return True

    def _count(self, what: str, model_id: str) -> None:
        if self._metrics is not None:
            self._metrics[what].labels(model_id[:12]).inc()

    async def _drain(self, pairs) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self.run_one(pairs, *item)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a shadow failure must never reach live traffic
                log.exception("shadow comparison failed")
            finally:
                self._queue.task_done()

    async def run_one(self, pairs, model_id: str, image: bytes, k: int, max_distance, live_ids: list[str],
                      rerank_factor=None) -> None:
        from hashret.errors import HashretError
        from serve.stages import untimed

        with pairs.admit_candidate() as cand:
            if cand is None or cand.model_id != model_id or self.stats.model_id != model_id:
                return  # promoted, replaced or unloaded since it was sampled
            try:
                with untimed():  # not client latency: kept out of hashret_stage_seconds (serve.stages)
                    hits = await cand.search(image, k, max_distance, rerank_factor=rerank_factor)
            except HashretError:
                self.stats.failed += 1
                self._count("failed", model_id)
                return
        ids = [h.id for h in hits]
        ov, rho = topk_overlap(live_ids, ids), rank_correlation(live_ids, ids)
        s = self.stats
        s.compared += 1
        s.overlap_sum += ov
        s.rho_sum += rho
        if self._metrics is not None:
            label = model_id[:12]
            self._metrics["overlap"].labels(label).observe(ov)
            self._metrics["rho"].labels(label).observe(rho)
            self._metrics["compared"].labels(label).inc()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (up to timeout) until every queued sample was compared: for tests and reports."""
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout)
            except asyncio.TimeoutError:
                pass  # report what was compared so far

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

"""The retrieval service's logic, free of gRPC: decode -> batcher -> pack -> gallery search.

`RetrievalService` is what the gRPC servicer (serve.servicer) calls; tests and other
front-ends can call it directly. Its methods are coroutines because the server runs on
grpc.aio: every blocking step runs off the event loop — image decoding in a thread pool
(PIL releases the GIL), inference on the batcher's one worker thread, gallery calls in a
small pool of their own (except in-memory searches cheap enough to answer on the loop) — so
the loop only routes bytes and a slow decode never holds up inference of other requests.

All request validation lives here (k range, max_distance range, ids, metadata, sizes), each
failure a HashretError whose grpc_code the servicer turns into a status.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, AsyncIterable, Sequence

import numpy as np

from hashret import codes as hcodes
from hashret.errors import BadInput, HashretError
from hashret.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, PreprocessSpec, load_image
from hashret.metrics import RERANK_FACTOR
from serve import threadnames
from serve.batcher import Batcher, Expired
from serve.stages import NULL_STAGES, Stages

if TYPE_CHECKING:  # serve.gallery imports faiss and pymilvus: only when a gallery is opened
    from serve.gallery import Gallery, Hit
    from serve.snapshots import Snapshotter

log = logging.getLogger("hashret.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; Info reports them so clients can adapt."""

    max_k: int = 1000
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_items: int = 64  # images per SearchBatch call
    max_id_length: int = 512
    max_metadata_bytes: int = 16384  # keys + values of one item
    max_write_items: int = 100_000  # items per Upsert stream / Delete call

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise BadInput(f"{flag} {value!r} | must be a positive integer")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UpsertEntry:
    """One item of an Upsert stream: exactly one of `image` (encoded file) or `code` (packed)."""

    id: str
    image: bytes | None = None
    code: bytes | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _gallery_thread() -> None:
    """Initializer of the gallery pool's threads: one OpenMP thread, and an OS thread name."""
    _single_omp_thread()
    threadnames.name_current()


def _single_omp_thread() -> None:
    """One OpenMP thread for FAISS searches made from this thread.

    A search here is one query (or a few): microseconds of work. Letting FAISS fan it out to an
    OpenMP team on cores the engine's threads are busy on made each search wait for descheduled
    team members (measured: 0.03 ms alone, 25-45 ms next to inference on 2 cores). Throughput
    comes from concurrent requests instead. The setting is per calling thread (OpenMP ICV).
    """
    import sys

    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(1)


def _as_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise BadInput(f"{what} {v!r} | must be an integer")
    return int(v)


class _LoopWaker:
    """Runs callbacks posted from other threads on one event loop, waking it once per burst.

    `loop.call_soon_threadsafe` writes to the loop's self-pipe on every call, and every write
    is one more wake-up of the loop thread. The batcher answers a whole batch at once, so the
    answers posted while a wake-up is already pending ride along with it.
    """

    __slots__ = ("_lock", "_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list | None = None  # None: no wake-up scheduled

    def post(self, fn, *args) -> None:
        with self._lock:
            if self._pending is not None:
                self._pending.append((fn, args))
                return
            self._pending = [(fn, args)]
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # loop closed: nobody is waiting any more
            with self._lock:
                self._pending = None

    def _run(self) -> None:  # in the loop
        with self._lock:
            batch, self._pending = self._pending, None
        for fn, args in batch or ():
            fn(*args)


class _Job:
    """One image on its way through decode and the batcher, and the future its caller awaits."""

    __slots__ = ("decode_end", "decode_start", "done", "gone", "inner", "waker")

    def __init__(self, done: asyncio.Future, waker: _LoopWaker):
        self.done = done
        self.waker = waker
        self.gone = False  # set by the caller when it stops waiting: don't queue the image
        self.inner: Future | None = None  # the batcher's future; its `timing` splits wait and inference
        self.decode_start: float | None = None
        self.decode_end: float | None = None

    def answered(self, f: Future) -> None:  # in the batcher's thread (or wherever `f` was cancelled)
        if f.cancelled():
            self.waker.post(self.resolve, None, None)
        else:
            e = f.exception()
            self.waker.post(self.resolve, None if e is not None else f.result(), e)

    def resolve(self, row, error: BaseException | None) -> None:  # in the loop
        if self.done.done():
            return
        if error is not None:
            self.done.set_exception(error)
        elif row is None:
            self.done.cancel()
        else:
            self.done.set_result(row)


class _SearchTurn:
    """The searches asked for in one turn of an event loop, made as one gallery call per kind of
    search (k, max_distance, re-ranking factor).

    The batcher answers a whole batch at once, so its requests resume in the same turn of the
    loop and each asks for a search. One call for all of them pays the per-call costs (argument
    checks, the gallery lock, the index call itself, the thread hop of a large gallery) once, and
    an index that scans for all its queries in one pass (a GPU scan, a Milvus request) does so.
    Every index kind answers each query of a call as it would alone (tests/test_gallery.py).
    """

    __slots__ = ("_loop", "_pending", "_service")

    def __init__(self, service: "RetrievalService", loop: asyncio.AbstractEventLoop):
        self._service = service
        self._loop = loop
        self._pending: list[tuple] = []

    def search(self, code: np.ndarray, k: int, max_distance: int | None, z: np.ndarray | None,
               factor: int) -> asyncio.Future:
        fut = self._loop.create_future()
        if not self._pending:  # runs after every callback already due in this turn
            self._loop.call_soon(self._flush)
        self._pending.append((code, z, k, max_distance, factor, fut))
        return fut

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict[tuple, list[tuple]] = {}
        for item in pending:
            if not item[5].done():  # a cancelled caller's search is not made
                groups.setdefault((item[2], item[3], item[4], item[1] is not None), []).append(item)
        for (k, max_distance, factor, with_z), items in groups.items():
            self._service._search_group(items, k, max_distance, factor, with_z)


def _answer(items: list[tuple], hits: list | None, error: BaseException | None = None) -> None:
    for n, item in enumerate(items):
        fut = item[5]
        if fut.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            fut.cancel()
        elif error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(hits[n])


class RetrievalService:
    """One model + one gallery behind a dynamic batcher.

    The caller owns `engine` and `gallery` lifetimes only until this object is built:
    `aclose()` closes the batcher, the pools, the gallery and the engine.
    """

    def __init__(
        self,
        engine,
        gallery: Gallery,
        *,
        model_id: str,
        spec: PreprocessSpec,
        batcher: Batcher,
        limits: Limits = Limits(),
        decode_threads: int = 2,
        info: dict | None = None,
        snapshots: Snapshotter | None = None,
        stages: Stages | None = None,
        rerank_factor: int = RERANK_FACTOR,
        decoder=None,
    ):
        if gallery.bits != engine.bits:
            raise BadInput(f"gallery {gallery.path} | {gallery.bits} bits, engine {engine.bits} bits")
        self.engine = engine
        self.gallery = gallery
        self.model_id = model_id
        self.spec = spec
        self.batcher = batcher
        self.limits = limits
        self.bits = int(engine.bits)
        self._decode_pool = ThreadPoolExecutor(max(1, int(decode_threads)), thread_name_prefix="hashret-decode",
                                               initializer=threadnames.name_current)
        # --decode cuda: a serve.gpu_decode.GpuDecoder that the decode threads call instead of
        # load_image (it batches them onto the GPU); None decodes on the CPU. Closed with the service.
        self._decoder = decoder
        # Gallery calls are short but may block (fsync, Milvus RPC); the gallery has its own lock.
        self._gallery_pool = ThreadPoolExecutor(2, thread_name_prefix="hashret-gallery", initializer=_gallery_thread)
        self._info = info or {}
        # Background snapshots keep a FAISS gallery's WAL bounded (serve.snapshots); off when None.
        self.snapshots = snapshots
        self._inline_threads: set[int] = set()
        self._wakers: dict[asyncio.AbstractEventLoop, _LoopWaker] = {}  # one per loop that awaits images
        self._turns: dict[asyncio.AbstractEventLoop, _SearchTurn] = {}  # one per loop that searches
        # per-stage latency histograms and spans (serve.stages); the server passes its own
        self.stages = stages or NULL_STAGES
        self._closed = False
        # Searches re-rank the Hamming top-(k * factor) by cosine (serve.gallery.base.Gallery.search)
        # unless the request sets its own factor; 0 = off. A gallery without activations never does.
        self.rerank_factor = self.check_rerank_factor(rerank_factor, "--rerank-factor")
        if self.rerank_factor and not gallery.has_activations:
            log.info("gallery %s | stores no activations: searches are not re-ranked (--rerank-factor %d has "
                     "no effect); rebuild it with hashret index build to re-rank", gallery.path, self.rerank_factor)

    @property
    def decoder(self):
        """The serve.gpu_decode.GpuDecoder of --decode cuda, or None (CPU decoding)."""
        return self._decoder

    # ---- validation --------------------------------------------------------------------
    def check_k(self, k) -> int:
        k = _as_int(k, "k")
        if not 1 <= k <= self.limits.max_k:
            raise BadInput(f"k {k} | out of range: ask for 1..{self.limits.max_k} results")
        return k

    @staticmethod
    def check_rerank_factor(f, what: str = "rerank_factor") -> int:
        f = _as_int(f, what)
        if not 0 <= f <= 1000:
            raise BadInput(f"{what} {f} | must be in [0, 1000]: 0 turns re-ranking off, default {RERANK_FACTOR}")
        return f

    def check_max_distance(self, d) -> int | None:
        if d is None:
            return None
        d = _as_int(d, "max_distance")
        if not 0 <= d <= self.bits:
            raise BadInput(f"max_distance {d} | out of range: use 0..{self.bits} (codes have {self.bits} bits) or leave it unset")
        return d

    def check_id(self, i, what: str = "id") -> str:
        if not isinstance(i, str) or not i:
            raise BadInput(f"{what} {i!r} | must be a non-empty string")
        if len(i.encode()) > self.limits.max_id_length:
            raise BadInput(f"{what} {i[:40]!r}… | longer than {self.limits.max_id_length} bytes: use a shorter id")
        return i

    def check_ids(self, ids: Sequence[str], op: str) -> list[str]:
        ids = list(ids)
        if not ids:
            raise BadInput(f"{op} | no ids given: pass at least one")
        if len(ids) > self.limits.max_write_items:
            raise BadInput(f"{op} | {len(ids)} ids exceeds {self.limits.max_write_items} per call: split the call")
        seen: set[str] = set()
        for n, i in enumerate(ids):
            self.check_id(i, f"{op} id #{n}")
            if i in seen:
                raise BadInput(f"{op} id #{n} {i!r} | duplicate in one call: pass each id once")
            seen.add(i)
        return ids

    def check_metadata(self, md, what: str) -> dict[str, str]:
        md = dict(md or {})
        size = 0
        for key, value in md.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise BadInput(f"{what} metadata | keys and values must be strings, keys non-empty")
            size += len(key.encode()) + len(value.encode())
        if size > self.limits.max_metadata_bytes:
            raise BadInput(f"{what} metadata | {size} bytes exceeds {self.limits.max_metadata_bytes}: store less per item")
        return md

    def check_image(self, image, what: str = "image") -> bytes:
        if not isinstance(image, (bytes, bytearray, memoryview)):
            raise BadInput(f"{what} | expected encoded image bytes, got {type(image).__name__}")
        if len(image) == 0:
            raise BadInput(f"{what} | empty (0 bytes): send the image file's bytes")
        if len(image) > self.limits.max_image_bytes:
            raise BadInput(f"{what} | {len(image)} bytes exceeds the limit of {self.limits.max_image_bytes} bytes: downscale it")
        return bytes(image)

    # ---- the pipeline ------------------------------------------------------------------
    def _preprocess(self, image: bytes, name: str) -> np.ndarray:
        if self._decoder is not None:
            return self._decoder(image, name)
        return load_image(
            image, self.spec, max_bytes=self.limits.max_image_bytes, max_pixels=self.limits.max_pixels, name=name
        )

    async def embed(self, image: bytes, deadline: float | None = None, name: str = "image") -> np.ndarray:
        """float32 [bits] model output for one encoded image (decode in the pool, encode batched).

        The decode thread hands the image straight to the batcher, and the batcher's answer
        comes back through the loop's `_LoopWaker`, which wakes the loop once for all the images
        of a batch instead of once per image: on a 2-core host each wake-up of a thread costs
        0.1-0.4 ms next to a busy engine, more than a search.
        """
        image = self.check_image(image, name)
        if deadline is not None and time.monotonic() >= deadline:
            raise Expired(f"{name} | deadline passed before decoding")
        loop = asyncio.get_running_loop()
        waker = self._wakers.get(loop)
        if waker is None:
            waker = self._wakers[loop] = _LoopWaker(loop)
        job = _Job(loop.create_future(), waker)
        ticket = self.batcher.reserve()  # Overloaded before spending CPU on decoding

        def decode_and_submit() -> None:  # in a decode thread
            with ticket:
                if job.gone:  # the caller stopped waiting while this waited for a thread
                    return
                try:
                    job.decode_start = time.monotonic()
                    arr = self._preprocess(image, name)
                    job.decode_end = time.monotonic()
                except BaseException as e:  # noqa: BLE001 - the waiter hears about every failure
                    waker.post(job.resolve, None, e)
                    return
                if job.gone:
                    return
                job.inner = inner = ticket.submit(arr, deadline)
            inner.add_done_callback(job.answered)

        def never_ran(f: Future) -> None:  # the pool dropped the job (shutdown) or the caller did
            if f.cancelled():
                ticket.cancel()
                waker.post(job.resolve, None, None)

        try:
            outer = self._decode_pool.submit(decode_and_submit)
        except BaseException:
            ticket.cancel()
            raise
        outer.add_done_callback(never_ran)
        try:
            row = await job.done
        except asyncio.CancelledError:
            job.gone = True
            inner = job.inner
            if not outer.cancel() and inner is not None:
                inner.cancel()  # decoded and still queued: the batcher drops it
            raise
        self._record_stages(job)
        return row

    def _record_stages(self, job: _Job) -> None:
        """Decode and queue-wait observations of one answered image, and its inference span
        (the batch's histograms are observed once per batch, by the server's on_batch)."""
        if job.decode_end is not None:
            self.stages.span("decode", job.decode_start, job.decode_end)
        timing = getattr(job.inner, "timing", None)
        if timing is not None:
            enqueued, batch = timing
            self.stages.span("queue_wait", enqueued, batch.started)
            self.stages.span("inference_batch", batch.started, batch.ended, observe=False, batch_size=batch.size)

    async def encode(self, image: bytes, deadline: float | None = None) -> bytes:
        """The packed code (bits/8 bytes) of one image."""
        with self.stages.request("Encode"):
            row = await self.embed(image, deadline)
            return hcodes.pack(row[None])[0].tobytes()

    async def _search_code(self, code: np.ndarray, k: int, max_distance: int | None,
                           z: np.ndarray | None = None, factor: int = 0) -> list[Hit]:
        """The hits of one packed code [1, bits/8], searched together with the others of this
        turn of the loop (_SearchTurn)."""
        loop = asyncio.get_running_loop()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = _SearchTurn(self, loop)
        return await turn.search(code, k, max_distance, z, factor)

    def _search_group(self, items: list[tuple], k: int, max_distance: int | None, factor: int,
                      with_z: bool) -> None:
        """One gallery call for `items` (code, z, ..., future) that share k, max_distance and factor."""
        # A small in-memory search (tens of microseconds) is answered here: handing it to a
        # thread and back costs more. Large, busy or remote galleries go to the pool.
        if threading.get_ident() not in self._inline_threads:
            _single_omp_thread()  # FAISS in the loop thread: no OpenMP team either
            self._inline_threads.add(threading.get_ident())
        codes = items[0][0] if len(items) == 1 else np.concatenate([it[0] for it in items])
        zs = None
        if with_z:
            zs = items[0][1] if len(items) == 1 else np.concatenate([it[1] for it in items])
        try:
            hits = self.gallery.search_nowait(codes, k, max_distance, zs, factor)
        except Exception as e:  # noqa: BLE001 - each waiter hears about it
            _answer(items, None, e)
            return
        if hits is not None:
            _answer(items, hits)
            return

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                _answer(items, None, asyncio.CancelledError())
            elif f.exception() is not None:
                _answer(items, None, f.exception())
            else:
                _answer(items, f.result())

        try:
            job = self._gallery_pool.submit(self.gallery.search, codes, k, max_distance, zs, factor)
        except RuntimeError as e:  # the pool is shut down: the service is closing
            _answer(items, None, e)
            return
        asyncio.wrap_future(job).add_done_callback(done)

    async def search(self, image: bytes, k, max_distance=None, deadline: float | None = None, name: str = "image",
                     rerank_factor=None) -> list[Hit]:
        """The k nearest gallery items to one image, at most max_distance bits away.

        The Hamming top-(k * rerank_factor) is re-ranked by cosine of the activations when the
        gallery keeps them; rerank_factor None means the server's --rerank-factor, 0 off.
        """
        k = self.check_k(k)
        max_distance = self.check_max_distance(max_distance)
        factor = self.rerank_factor if rerank_factor is None else self.check_rerank_factor(rerank_factor)
        with self.stages.request("Search", k=k):
            row = await self.embed(image, deadline, name)
            t0 = time.monotonic()  # not stages.time(): a generator context manager per request costs more
            try:
                return await self._search_code(hcodes.pack(row[None]), k, max_distance, row[None], factor)
            finally:
                self.stages.span("search", t0, time.monotonic())

    async def search_batch(self, items: Sequence[tuple], deadline: float | None = None) -> list[list[Hit] | HashretError]:
        """(image, k, max_distance[, rerank_factor]) items searched concurrently; a bad item yields its error."""
        if len(items) > self.limits.max_batch_items:
            raise BadInput(
                f"batch | {len(items)} items exceeds {self.limits.max_batch_items} per call: split it or use Search"
            )

        async def one(n: int, item: tuple):
            try:
                image, k, max_distance, *factor = item
                return await self.search(image, k, max_distance, deadline, name=f"item {n}",
                                         rerank_factor=factor[0] if factor else None)
            except HashretError as e:
                return e

        return list(await asyncio.gather(*(one(n, it) for n, it in enumerate(items))))

    async def upsert(self, entries: AsyncIterable[UpsertEntry], deadline: float | None = None) -> tuple[int, int]:
        """Validate and encode every item, then write them all at once (all-or-nothing).

        Images are encoded as they stream in (at most `max_batch` in flight, so one big
        upload cannot starve searches of queue slots); the codes are kept, and the activations
        of items sent as images (an item sent as a code has none: a search ranks it after the
        items with activations at the same distance, see serve.gallery.base.Gallery).
        Returns (items written, gallery size).
        """
        nbytes = self.bits // 8
        ids: list[str] = []
        metas: list[dict] = []
        slots: list[np.ndarray | asyncio.Task | None] = []
        seen: set[str] = set()
        sem = asyncio.Semaphore(self.batcher.max_batch)
        failed: list[asyncio.Future] = []  # finished encode tasks that raised: stop reading early

        def note(t: asyncio.Future) -> None:
            if not t.cancelled() and t.exception() is not None:
                failed.append(t)

        async def encode_one(image: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
            try:
                row = await self.embed(image, deadline, what)
                return hcodes.pack(row[None])[0], row
            finally:
                sem.release()

        try:
            n = 0
            async for e in entries:
                what = f"upsert item #{n} (id {e.id!r})"
                if n >= self.limits.max_write_items:
                    raise BadInput(f"upsert | more than {self.limits.max_write_items} items: split the stream")
                self.check_id(e.id, f"upsert item #{n} id")
                if e.id in seen:
                    raise BadInput(f"{what} | duplicate id in one call: send each id once")
                seen.add(e.id)
                md = self.check_metadata(e.metadata, what)
                if (e.image is None) == (e.code is None):
                    raise BadInput(f"{what} | give exactly one of image or code")
                if e.code is not None:
                    if len(e.code) != nbytes:
                        raise BadInput(
                            f"{what} | code has {len(e.code)} bytes, this model's codes have {nbytes} "
                            f"({self.bits} bits, numpy.packbits order)"
                        )
                    slots.append((np.frombuffer(bytes(e.code), dtype=np.uint8), None))
                else:
                    image = self.check_image(e.image, what)
                    await sem.acquire()
                    task = asyncio.ensure_future(encode_one(image, what))
                    task.add_done_callback(note)
                    slots.append(task)
                if failed:
                    await failed[0]
                ids.append(e.id)
                metas.append(md)
                n += 1
            if not ids:
                raise BadInput("upsert | the stream had no items: send at least one")
            rows = []
            for s in slots:
                rows.append(await s if isinstance(s, asyncio.Future) else s)
        finally:
            for s in slots:
                if isinstance(s, asyncio.Future) and not s.done():
                    s.cancel()
        codes = np.ascontiguousarray(np.stack([c for c, _ in rows]))
        acts = None
        if any(z is not None for _, z in rows):
            acts = np.full((len(rows), self.bits), np.nan, np.float32)
            for r, (_, z) in enumerate(rows):
                if z is not None:
                    acts[r] = z
        loop = asyncio.get_running_loop()

        def write() -> int:
            self.gallery.upsert(ids, codes, metas, acts)
            return self.gallery.size

        if self.snapshots is not None:
            await self.snapshots.room()
        size = await loop.run_in_executor(self._gallery_pool, write)
        if self.snapshots is not None:
            self.snapshots.written()
        log.info("upserted %d items", len(ids), extra={"fields": {"count": len(ids), "gallery_size": size}})
        return len(ids), size

    async def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        """Remove ids (NotFound and nothing removed when any is unknown); (removed, gallery size)."""
        ids = self.check_ids(ids, "delete")
        loop = asyncio.get_running_loop()

        def remove() -> tuple[int, int]:
            n = self.gallery.delete(ids)
            return n, self.gallery.size

        if self.snapshots is not None:
            await self.snapshots.room()
        n, size = await loop.run_in_executor(self._gallery_pool, remove)
        if self.snapshots is not None:
            self.snapshots.written()
        log.info("deleted %d items", n, extra={"fields": {"count": n, "gallery_size": size}})
        return n, size

    async def gallery_size(self) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._gallery_pool, lambda: self.gallery.size)

    def info(self) -> dict:
        """Static facts about the model, backend and limits, plus the gallery's identity."""
        g = self.gallery
        return {
            **self._info,
            "model_id": self.model_id,
            "gallery": {"id": g.path.name, "kind": g.kind, "model_id": g.model_sha256, "path": str(g.path),
                        "wal": g.wal_stats()},
            "limits": {
                **self.limits.to_dict(),
                "max_batch": self.batcher.max_batch,
                "max_delay_us": int(round(self.batcher.max_delay_s * 1e6)),
                "queue_size": self.batcher.queue_size,
            },
        }

    # ---- lifetime ----------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Finish queued inference, then release pools, gallery and engine (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.batcher.close(timeout)
        self._decode_pool.shutdown(wait=True, cancel_futures=True)
        if self._decoder is not None:
            self._decoder.close()
        self._gallery_pool.shutdown(wait=True)
        try:
            if self.snapshots is not None:
                self.snapshots.close()  # after the last write, before the gallery closes
            self.gallery.close()
        finally:
            self.engine.close()


def exp_summary(manifest: dict) -> dict:
    """The Info 'model' section from an EXP manifest (tolerant of missing optional fields)."""
    method = manifest.get("method") or {}
    dataset = manifest.get("dataset") or {}
    backbone = manifest.get("backbone") or {}
    return {
        "backbone": str(backbone.get("name", "")) if isinstance(backbone, dict) else str(backbone),
        "bits": int(manifest.get("bits", 0)),
        "preprocessing": dict(manifest.get("preprocessing") or {}),
        "method": str(method.get("name", "")) if isinstance(method, dict) else str(method),
        "dataset": str(dataset.get("format", dataset.get("name", ""))) if isinstance(dataset, dict) else str(dataset),
    }

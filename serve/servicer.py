"""The gRPC face of RetrievalService: protobuf <-> Python, HashretError -> status code. Nothing else.

Why grpc.aio rather than the thread-pool server: a search spends most of its time waiting
(for the decode pool, then for its batch). With the sync server every waiting request pins a
handler thread, so concurrency is capped by the pool size and a burst queues invisibly inside
gRPC, beyond the batcher's admission control and deadline checks. On asyncio a waiting
request is just a suspended coroutine: thousands can wait cheaply, all admission happens in
the batcher (RESOURCE_EXHAUSTED when full), and a client's cancellation or deadline cancels
the coroutine, which cancels its queued inference.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import TYPE_CHECKING, Callable, Sequence

import grpc

from hashret.errors import HashretError
from serve._proto import retrieval_pb2 as pb
from serve._proto import retrieval_pb2_grpc as pb_grpc
from serve.service import RetrievalService, UpsertEntry

if TYPE_CHECKING:
    from serve.gallery import Hit

log = logging.getLogger("hashret.serve.rpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Retrieval"].full_name  # "hashret.v1.Retrieval"


def status_code(e: HashretError) -> grpc.StatusCode:
    """HashretError.grpc_code ("INVALID_ARGUMENT", ...) as a grpc.StatusCode (INTERNAL if unknown)."""
    return getattr(grpc.StatusCode, str(getattr(e, "grpc_code", "INTERNAL")), grpc.StatusCode.INTERNAL)


def _deadline(context) -> float | None:
    """The client's deadline on our monotonic clock (None when the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class _HitProtos:
    """Answers' pb.Hit messages, each copied from a cached one that holds the item's id and metadata.

    Filling a protobuf map from a dict is most of the cost of an answer (about 4 us a hit against
    1 us for a copy), and the same items come back again and again. The key holds the metadata
    itself, so an upsert that changes it simply misses; the cache is emptied when it is full.
    Used from the event loop's thread only.
    """

    MAX_ITEMS = 20_000

    def __init__(self):
        self._by_item: dict[tuple, pb.Hit] = {}

    def fill(self, out, hits: Sequence[Hit]) -> None:
        """Append a pb.Hit for each gallery Hit to the repeated field `out`."""
        cache = self._by_item
        for h in hits:
            key = (h.id, *h.metadata.items())
            proto = cache.get(key)
            if proto is None:
                if len(cache) >= self.MAX_ITEMS:
                    cache.clear()
                proto = cache[key] = pb.Hit(id=h.id, metadata=h.metadata)
            m = out.add()
            m.CopyFrom(proto)
            m.distance = int(h.distance)
            score = getattr(h, "score", None)
            if score is not None and not math.isnan(score):  # unset: not re-ranked, or no activations (NaN)
                m.score = score


def _gallery_info(g: dict, size: int) -> pb.GalleryInfo:
    out = pb.GalleryInfo(id=g["id"], kind=g["kind"], size=size, model_id=g["model_id"])
    wal = g.get("wal")
    if wal:  # FAISS; Milvus keeps its own log and leaves these unset
        out.wal_records, out.wal_bytes = int(wal["records"]), int(wal["bytes"])
        if wal.get("last_snapshot_unix") is not None:
            out.last_snapshot.FromNanoseconds(int(wal["last_snapshot_unix"] * 1e9))
    return out


class RetrievalServicer(pb_grpc.RetrievalServicer):
    """Thin adapter; `observe(method, code_name, seconds)` receives every call's outcome (metrics, logs)."""

    def __init__(self, service: RetrievalService, observe: Callable[[str, str, float], None] | None = None,
                 pairs=None):
        self._service = service
        self._observe = observe
        self._hits = _HitProtos()
        self.in_flight = 0
        # serve.pairs.Pairs: which model answers (rollover); each request holds the pair it was admitted on
        self.pairs = pairs

    @property
    def service(self) -> RetrievalService:
        """The live pair's service (it changes on Promote/Rollback)."""
        return self.pairs.live if self.pairs is not None else self._service

    def _admit(self):
        """`with self._admit() as svc:` the pair that answers this whole request."""
        return self.pairs.admit() if self.pairs is not None else contextlib.nullcontext(self._service)

    async def _call(self, method: str, context, work):
        """Run `work()`, turning errors into statuses; report the outcome."""
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        self.in_flight += 1
        try:
            return await work()
        except HashretError as e:
            code = status_code(e)
            await context.abort(code, str(e))
        except asyncio.CancelledError:  # the client cancelled or its deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"{method} | internal error: see the server log")
        finally:
            self.in_flight -= 1
            if self._observe is not None:
                self._observe(method, code.name, time.perf_counter() - t0)

    async def Search(self, request, context):
        async def work():
            md = request.max_distance if request.HasField("max_distance") else None
            with self._admit() as svc:
                factor = request.rerank_factor if request.HasField("rerank_factor") else None
                hits = await svc.search(request.image, request.k, md, _deadline(context), rerank_factor=factor)
            if self.pairs is not None and self.pairs.shadow is not None:  # after answering, off the hot path
                self.pairs.shadow.offer(self.pairs, request.image, request.k, md, [h.id for h in hits],
                                        rerank_factor=factor)
            resp = pb.SearchResponse(model_id=svc.model_id)
            self._hits.fill(resp.hits, hits)
            return resp

        return await self._call("Search", context, work)

    async def SearchBatch(self, request, context):
        async def work():
            items = [
                (it.image, it.k, it.max_distance if it.HasField("max_distance") else None,
                 it.rerank_factor if it.HasField("rerank_factor") else None)
                for it in request.items
            ]
            out = []
            with self._admit() as svc:
                results = await svc.search_batch(items, _deadline(context))
            for r in results:
                if isinstance(r, HashretError):
                    c = status_code(r)
                    out.append(pb.SearchResult(error=pb.ItemError(code=c.value[0], status=c.name, message=str(r))))
                else:
                    res = pb.SearchResult(hits=pb.HitList())
                    self._hits.fill(res.hits.hits, r)
                    out.append(res)
            return pb.SearchBatchResponse(results=out, model_id=svc.model_id)

        return await self._call("SearchBatch", context, work)

    async def Encode(self, request, context):
        async def work():
            with self._admit() as svc:
                code = await svc.encode(request.image, _deadline(context))
            return pb.EncodeResponse(code=code, bits=svc.bits, model_id=svc.model_id)

        return await self._call("Encode", context, work)

    async def Upsert(self, request_iterator, context):
        async def entries():
            async for it in request_iterator:
                which = it.WhichOneof("content")
                yield UpsertEntry(
                    id=it.id,
                    image=it.image if which == "image" else None,
                    code=it.code if which == "code" else None,
                    metadata=dict(it.metadata),
                )

        async def work():
            writer = self.pairs if self.pairs is not None else self.service  # both pairs while two are loaded
            n, size = await writer.upsert(entries(), _deadline(context))
            return pb.UpsertResponse(count=n, gallery_size=size)

        return await self._call("Upsert", context, work)

    async def Delete(self, request, context):
        async def work():
            writer = self.pairs if self.pairs is not None else self.service
            n, size = await writer.delete(list(request.ids))
            return pb.DeleteResponse(count=n, gallery_size=size)

        return await self._call("Delete", context, work)

    async def Info(self, request, context):
        async def work():
            with self._admit() as svc:
                return await info(svc)

        async def info(svc):
            i = svc.info()
            m, g, lim = i.get("model", {}), i["gallery"], i["limits"]
            pre = m.get("preprocessing", {})
            return pb.InfoResponse(
                model_id=i["model_id"],
                model=pb.ModelSummary(
                    backbone=m.get("backbone", ""),
                    bits=int(m.get("bits", svc.bits)),
                    preprocessing=pb.Preprocessing(
                        resize=int(pre.get("resize", 0)),
                        crop=int(pre.get("crop", 0)),
                        mean=list(pre.get("mean", [])),
                        std=list(pre.get("std", [])),
                        interpolation=str(pre.get("interpolation", "")),
                    ),
                    method=m.get("method", ""),
                    dataset=m.get("dataset", ""),
                ),
                backend=i.get("backend", ""),
                gallery=_gallery_info(g, await svc.gallery_size()),
                versions={k: str(v) for k, v in (i.get("versions") or {}).items() if v is not None},
                limits=pb.Limits(**{k: int(lim[k]) for k in pb.Limits.DESCRIPTOR.fields_by_name if k in lim}),
                standby_model_id=self.pairs.status()["standby_model_id"] if self.pairs is not None else "",
                standby_role=self.pairs.status()["standby_role"] if self.pairs is not None else "",
            )

        return await self._call("Info", context, work)

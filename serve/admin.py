"""The gRPC Admin service (model rollover): protobuf <-> serve.pairs, admin-token check, nothing else.

Only registered when the server has an admin token (`--admin-token-file`). The token is checked
here rather than in the Retrieval Gate so that the write token can never drive a rollover and
the admin token never authorizes writes: two secrets, two holders.
"""
from __future__ import annotations

import hmac
import logging

import grpc

from hashret.errors import HashretError
from serve._proto import retrieval_pb2 as pb
from serve._proto import retrieval_pb2_grpc as pb_grpc
from serve.pairs import Pairs
from serve.servicer import status_code

log = logging.getLogger("hashret.serve.admin")

ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name  # "hashret.v1.Admin"


def pairs_status(pairs: Pairs) -> pb.PairsStatus:
    st = pairs.status()
    out = pb.PairsStatus(**st)
    sh = pairs.shadow
    if sh is not None:
        s = sh.stats
        out.shadow.CopyFrom(pb.ShadowReport(
            compared=s.compared, dropped=s.dropped, failed=s.failed, mean_overlap=s.mean_overlap,
            mean_rank_correlation=s.mean_rank_correlation, fraction=sh.fraction,
        ))
    return out


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, pairs: Pairs, token: str):
        if not token:
            raise ValueError("an admin token is required")
        self.pairs = pairs
        self._token = token.encode()

    async def _authorize(self, method: str, context) -> None:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        v = values[0] if values else ""
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        scheme, _, given = v.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            why = "missing 'authorization: Bearer <admin token>' metadata" if not values else "invalid admin token"
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"Admin.{method} | {why}: use the token of the server's --admin-token-file")

    async def _call(self, method: str, context, work):
        await self._authorize(method, context)
        try:
            await work()
        except HashretError as e:
            log.warning("admin %s refused: %s", method, e)
            await context.abort(status_code(e), str(e))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("admin %s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"Admin.{method} | internal error: see the server log")
        return pairs_status(self.pairs)

    async def LoadCandidate(self, request, context):
        return await self._call("LoadCandidate", context,
                                lambda: self.pairs.load_candidate(request.exp, request.gallery))

    async def Promote(self, request, context):
        return await self._call("Promote", context, self.pairs.promote)

    async def Rollback(self, request, context):
        return await self._call("Rollback", context, self.pairs.rollback)

    async def Unload(self, request, context):
        return await self._call("Unload", context, self.pairs.unload)

    async def Status(self, request, context):
        async def nothing():
            if self.pairs.shadow is not None:
                await self.pairs.shadow.drain(timeout=5.0)

        return await self._call("Status", context, nothing)

    async def ListItems(self, request, context):
        import asyncio

        await self._authorize("ListItems", context)
        with self.pairs.admit() as live:
            g = live.gallery
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(None, g.ids)

            def chunk(part: list[str]) -> list[tuple[str, dict]]:
                out = []
                for i in part:
                    try:
                        out.append((i, g.get(i)[1]))
                    except HashretError:  # deleted meanwhile
                        pass
                return out

            for start in range(0, len(ids), 1000):  # one thread hop per thousand items, not per item
                for i, md in await loop.run_in_executor(None, chunk, ids[start:start + 1000]):
                    yield pb.GalleryItem(id=i, metadata=md)

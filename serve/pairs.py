"""The live serving pair and an optional standby pair, for model rollover without downtime.

A *pair* is one RetrievalService: an engine, the gallery encoded by that engine's model, its
batcher and pools, and the model id tying them together (codes of two models are never
comparable, so a pair is the unit that is switched, never an engine or a gallery alone).

Admission: a request takes the live pair once, when it is admitted (`admit()`), and finishes on
it, so one answer never mixes two models. `promote()` / `rollback()` swap which pair is live by
one assignment on the event loop: requests admitted before the swap finish on the old pair,
later ones use the new. Each pair counts its admitted requests, and is closed only once that
count drains to zero.

Roles of the standby pair: "candidate" (loaded by LoadCandidate, shadowed, not yet live) or
"previous" (the pair that was live before Promote, kept loaded so Rollback is instant). A new
LoadCandidate replaces (closes) whichever standby is loaded; Unload closes it; so at most two
pairs are in memory at any time. Rollback makes the demoted pair the candidate again.

Writes while a standby pair is loaded (both pairs must keep holding the same items, or Promote
or Rollback would change the catalogue):
- Upsert items that carry an image are encoded by each model and written to both galleries,
  standby first: if the standby write fails nothing was written live and the call fails; if the
  live write then fails the standby holds the items already, and a retry (upserts replace)
  converges both.
- Upsert items that carry a code are refused for the whole call (FAILED_PRECONDITION): a code
  belongs to one model's code space and cannot be written to the other gallery. Send the
  image, or Unload the standby pair first.
- Delete removes the ids from the live gallery (all-or-nothing, as always), then whichever of
  them the standby gallery holds.
Items written between building the candidate gallery and LoadCandidate are not in it: the
rollover CLI builds, then loads, and reports the size difference.

Memory check before LoadCandidate opens anything: the pair needs about (size of the gallery
folder) + (largest model file of the export) x MODEL_MEMORY_FACTOR bytes (the runtime holds the
weights, an optimized copy of the graph and its arena). The check refuses when that exceeds
MemAvailable from /proc/meminfo minus MEMORY_RESERVE_BYTES kept for request buffers.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterable, Callable, Iterator, Sequence

from hashret.errors import HashretError, NotFound

if TYPE_CHECKING:
    from serve.service import RetrievalService, UpsertEntry

log = logging.getLogger("hashret.serve.pairs")

MODEL_MEMORY_FACTOR = 3.0
MEMORY_RESERVE_BYTES = 256 << 20
CANDIDATE, PREVIOUS = "candidate", "previous"


class NoCandidate(HashretError):
    """Promote/Rollback asked for a pair that is not loaded (or not in that role)."""

    exit_code = 2
    grpc_code = "FAILED_PRECONDITION"


class WrongCodeSpace(HashretError):
    """A write that only makes sense for one model arrived while two models are loaded."""

    exit_code = 2
    grpc_code = "FAILED_PRECONDITION"


class NotEnoughMemory(HashretError):
    """A candidate pair would not fit next to the live one."""

    exit_code = 2
    grpc_code = "RESOURCE_EXHAUSTED"


def mem_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (what the kernel can hand out without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def pair_memory_estimate(exp: str | os.PathLike, gallery: str | os.PathLike) -> int:
    """Bytes a pair is expected to take once loaded: gallery folder + largest model file x factor."""
    exp = Path(exp)
    models = [p.stat().st_size for p in exp.iterdir() if p.is_file() and p.suffix in (".onnx", ".plan", ".xml", ".bin", ".pt")] \
        if exp.is_dir() else []
    return int(_folder_bytes(Path(gallery)) + max(models, default=0) * MODEL_MEMORY_FACTOR)


class Pairs:
    """Which RetrievalService answers: the live one, plus at most one standby.

    `open_pair(exp, gallery)` builds and warms a RetrievalService (blocking; run in a thread)
    and raises a HashretError naming the file when the pair is damaged or inconsistent.
    All methods except close() run on the server's event loop.
    """

    def __init__(self, live: RetrievalService, open_pair: Callable[[str, str], RetrievalService] | None = None,
                 shadow=None, available: Callable[[], int] = mem_available, close_timeout_s: float = 30.0):
        self.live = live
        self.standby: RetrievalService | None = None
        self.role: str | None = None
        self._open_pair = open_pair
        self.shadow = shadow
        self._available = available
        self._close_timeout_s = close_timeout_s
        self._in_flight: dict[int, int] = {}
        self._busy = asyncio.Lock()  # one LoadCandidate / Promote / Rollback / Unload at a time
        self._closing: set[asyncio.Task] = set()

    # ---- admission ---------------------------------------------------------------------
    @property
    def candidate(self) -> RetrievalService | None:
        return self.standby if self.role == CANDIDATE else None

    @contextlib.contextmanager
    def _hold(self, svc) -> Iterator:
        if svc is None:
            yield None
            return
        key = id(svc)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield svc
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]

    def admit(self):
        """`with pairs.admit() as svc:` the live pair for one request, held until it finishes."""
        return self._hold(self.live)

    def admit_candidate(self):
        return self._hold(self.candidate)

    def in_flight(self, svc) -> int:
        return self._in_flight.get(id(svc), 0)

    # ---- rollover ----------------------------------------------------------------------
    def check_memory(self, exp: str, gallery: str) -> None:
        need = pair_memory_estimate(exp, gallery)
        have = self._available() - MEMORY_RESERVE_BYTES
        if need > have:
            raise NotEnoughMemory(
                f"candidate {exp} + {gallery} | needs about {need / 2**20:.0f} MiB (gallery folder + model file x "
                f"{MODEL_MEMORY_FACTOR:g}), only {max(have, 0) / 2**20:.0f} MiB available (MemAvailable minus "
                f"{MEMORY_RESERVE_BYTES >> 20} MiB reserve): Unload the standby pair, free memory, or use a host with more"
            )

    async def load_candidate(self, exp: str, gallery: str) -> None:
        """Open + warm EXP/GAL beside the live pair; the live pair is untouched on any failure."""
        if self._open_pair is None:
            raise NoCandidate("LoadCandidate | this server cannot open pairs: start it with --admin-token-file")
        async with self._busy:
            loop = asyncio.get_running_loop()
            old = self.standby
            # The old standby's memory is given back before the new pair is measured and opened.
            if old is not None:
                self.standby, self.role = None, None
                await self._retire(old)
            self.check_memory(exp, gallery)
            svc = await loop.run_in_executor(None, self._open_pair, exp, gallery)
            self.standby, self.role = svc, CANDIDATE
            if self.shadow is not None:
                self.shadow.reset(svc.model_id)
            log.info("candidate loaded", extra={"fields": {"model_id": svc.model_id, "gallery": str(gallery),
                                                             "live_model_id": self.live.model_id}})

    async def promote(self) -> None:
        async with self._busy:
            if self.role != CANDIDATE:
                raise NoCandidate("Promote | no candidate is loaded: call LoadCandidate first")
            self.live, self.standby, self.role = self.standby, self.live, PREVIOUS
            log.info("promoted", extra={"fields": {"model_id": self.live.model_id,
                                                   "previous_model_id": self.standby.model_id}})

    async def rollback(self) -> None:
        async with self._busy:
            if self.role != PREVIOUS:
                raise NoCandidate("Rollback | no previous pair is loaded (nothing was promoted, or it was "
                                  "unloaded or replaced): load it again with LoadCandidate and Promote")
            self.live, self.standby, self.role = self.standby, self.live, CANDIDATE
            if self.shadow is not None:
                self.shadow.reset(self.standby.model_id)
            log.info("rolled back", extra={"fields": {"model_id": self.live.model_id,
                                                      "candidate_model_id": self.standby.model_id}})

    async def unload(self) -> None:
        async with self._busy:
            old, self.standby, self.role = self.standby, None, None
            if old is not None:
                await self._retire(old)

    async def _retire(self, svc) -> None:
        """Close a pair that is no longer reachable once its admitted requests have finished."""
        until = time.monotonic() + self._close_timeout_s
        while self.in_flight(svc) and time.monotonic() < until:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, svc.close)

    def status(self) -> dict:
        s = self.standby
        return {
            "live_model_id": self.live.model_id, "live_gallery": str(self.live.gallery.path),
            "standby_model_id": s.model_id if s is not None else "",
            "standby_gallery": str(s.gallery.path) if s is not None else "",
            "standby_role": self.role or "",
        }

    # ---- writes ------------------------------------------------------------------------
    async def upsert(self, entries: AsyncIterable[UpsertEntry], deadline: float | None = None) -> tuple[int, int]:
        """Upsert on the live pair, and on the standby too while one is loaded (see the module doc)."""
        # Both pairs are taken now, before the stream is read: a Promote meanwhile must not turn
        # "live and standby" into the same pair twice.
        with self.admit() as live, self._hold(self.standby) as sb:
            if sb is None:
                return await live.upsert(entries, deadline)
            role = self.role
            items = []
            n = 0
            async for e in entries:
                if e.code is not None:
                    raise WrongCodeSpace(
                        f"upsert item #{n} (id {e.id!r}) | carries a code, but two models are loaded (live "
                        f"{live.model_id[:12]}, {role} {sb.model_id[:12]}) and a code fits only one: "
                        f"send the image so each model encodes it, or Unload the {role} pair first"
                    )
                items.append(e)
                n += 1
                if n > live.limits.max_write_items:
                    break  # the service's own check names the limit

            async def replay():
                for e in items:
                    yield e

            await sb.upsert(replay(), deadline)
            return await live.upsert(replay(), deadline)

    async def delete(self, ids: Sequence[str]) -> tuple[int, int]:
        with self.admit() as live, self._hold(self.standby) as sb:
            out = await live.delete(ids)
            if sb is not None:
                ids = list(ids)
                g = sb.gallery

                def held() -> list[str]:
                    present = []
                    for i in ids:
                        try:
                            g.get(i)
                            present.append(i)
                        except NotFound:
                            pass
                    return present

                present = await asyncio.get_running_loop().run_in_executor(None, held)
                if present:
                    await sb.delete(present)
            return out

    # ---- lifetime ----------------------------------------------------------------------
    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop shadowing (on the loop), then close every loaded pair in a thread."""
        if self.shadow is not None:
            self.shadow.close()
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Close every loaded pair (blocking; called after the server stopped taking requests)."""
        for svc in (self.standby, self.live):
            if svc is not None:
                svc.close(timeout)

"""The abstract gallery: validation, locking and the index-kind registry, shared by every kind.

Concrete kinds (FAISS, Milvus) implement only the storage primitives (`_upsert`,
`_delete`, `_search`, ...). Everything a caller can get wrong is checked here once, so
every kind refuses bad input with the same message, and one lock per gallery makes it
safe to call from the server's worker threads. The manifest (its fields, schema version,
migrations and checksum) belongs to hashret.manifest, like RUN/'s and EXP/'s.

A kind is one module `serve/gallery/<name>_index.py` whose Gallery subclass is decorated
with `@index_kind("<name>")`; serve.gallery imports every such module, so `hashret index
build --kind`, the server and `create_gallery` know the kind with no other edit.
"""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from hashret.errors import BadInput, NotFound, ReadOnly
from hashret.manifest import GALLERY, KINDS, new_manifest
from hashret.metrics import rerank_order, rerank_size
from hashret.registry import Registry

REBUILD = KINDS[GALLERY].fix

#: index kind name -> Gallery subclass (with `create` and `open` classmethods)
INDEX_KINDS: Registry[type["Gallery"]] = Registry("index kind")


def index_kind(name: str) -> Callable[[type[Gallery]], type[Gallery]]:
    """Class decorator: register a Gallery subclass as index kind `name` (and set its `kind`)."""

    def deco(cls: type[Gallery]) -> type[Gallery]:
        cls.kind = name
        return INDEX_KINDS.register(name)(cls)

    return deco


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its Hamming distance to the query, its metadata.

    `score` is the cosine between the query's and the item's activations when the search was
    re-ranked, None otherwise (and NaN for an item stored without activations).
    """

    id: str
    distance: int
    metadata: dict[str, str] = field(default_factory=dict)
    score: float | None = None


def short_sha(sha: str) -> str:
    return f"{sha[:8]}…" if len(sha) > 8 else sha


def new_gallery_manifest(bits: int, model_id: str, index: dict[str, Any]) -> dict[str, Any]:
    """An empty gallery's manifest; `index` holds the kind and its options."""
    return new_manifest(GALLERY, bits=bits, model_id=model_id, index=index, size=0, checksum=None)


class Gallery(abc.ABC):
    """Packed binary codes + string ids + string metadata, searchable by Hamming distance.

    Results are sorted by distance; ties go to the item inserted first (an upsert that
    replaces an id keeps its original place), so every kind returns the same list.

    A kind with `ACTIVATIONS = True` can also keep each item's tanh activations (float16, one
    row of `bits` values) next to its code, when the gallery was created with them (manifest
    `index.activations`, the default of `hashret index build`). A search given the query's
    activations and a re-rank factor then takes the Hamming top-R, R = max(k * factor, k), and
    orders it by cosine (hashret.metrics.rerank_order, the rule offline evaluation uses too).
    An item written without activations (an upsert by code) is ranked right after the items
    with activations at the same or a smaller distance.
    """

    kind: str = ""  # set by @index_kind
    #: one line for `hashret index build --help`
    summary: str = ""
    #: `hashret index build` flags that set this kind's options: flag -> (option, argparse kwargs).
    #: Giving one with another --kind is refused, so a flag never silently does nothing.
    CLI_OPTIONS: ClassVar[dict[str, tuple[str, dict[str, Any]]]] = {}
    #: whether this kind can store activations for re-ranking (its create takes option
    #: "activations", its _upsert keyword `activations`, and it implements _activations_of)
    ACTIVATIONS: ClassVar[bool] = False
    #: whether open(..., read_only=True) lets several processes open one folder at once (the
    #: FAISS kinds: a shared lock, nothing written); see `shared_mode`
    READ_ONLY_OPEN: ClassVar[bool] = False

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self._path = Path(path)
        self._manifest = manifest
        self._bits = int(manifest["bits"])
        self._lock = threading.RLock()
        self._closed = False
        self._read_only = False

    @classmethod
    def shared_mode(cls, path: Path, manifest: dict[str, Any]) -> str:
        """How several server processes can serve this gallery at once (`hashret serve --workers`):
        "read-only" (each opens it with read_only=True; writes are refused) or "read-write" (the
        kind's storage is a service every process talks to). A kind that can do neither raises
        BadInput saying why."""
        if cls.READ_ONLY_OPEN:
            return "read-only"
        raise BadInput(f"gallery {path} | a {cls.kind} gallery can be opened by one process at a time: "
                       f"serve it with --workers 1")

    # ---- creation / opening (per kind) -------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def create(cls, path: Path, bits: int, model_sha256: str, options: dict[str, Any]) -> "Gallery":
        """Make a new, empty gallery at `path` (the folder has no manifest yet)."""

    @classmethod
    @abc.abstractmethod
    def open(cls, path: Path, manifest: dict[str, Any]) -> "Gallery":
        """Load an existing gallery whose manifest was already validated."""

    # ---- properties ---------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    @property
    def nbytes(self) -> int:
        return self._bits // 8

    @property
    def model_sha256(self) -> str:
        """The model id the codes were made by (sha256 of the export's model.onnx)."""
        return str(self._manifest["model_id"])

    @property
    def path(self) -> Path:
        return self._path

    @property
    def has_activations(self) -> bool:
        """Whether items carry float16 activations, so searches can be re-ranked."""
        return bool(self.ACTIVATIONS and self._manifest["index"].get("activations"))

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(self._manifest)

    @property
    def read_only(self) -> bool:
        """Opened with read_only=True: searches only; writes and snapshots raise ReadOnly."""
        return self._read_only

    @property
    def size(self) -> int:
        with self._lock:
            self._check_open()
            return self._size()

    def __len__(self) -> int:
        return self.size

    def __enter__(self) -> "Gallery":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._path} {self.kind} {self._bits} bits>"

    # ---- public operations --------------------------------------------------------------
    def upsert(
        self,
        ids: Sequence[str],
        codes: np.ndarray,
        metadata: Sequence[dict] | None = None,
        activations: np.ndarray | None = None,
    ) -> None:
        """Add items, replacing any id already present; durable when this returns.

        `activations` float [N, bits]: each item's tanh outputs, kept (as float16) when the
        gallery stores them; a row of NaN marks an item that has none. Defaults to none.
        """
        ids = self._check_ids(ids, "upsert")
        codes = self._check_codes(codes, "codes")
        if len(codes) != len(ids):
            raise BadInput(f"upsert | {len(ids)} ids but {len(codes)} codes: pass one code per id")
        metadata = self._check_metadata(metadata, len(ids))
        if activations is not None:
            activations = self._check_activations(activations, len(ids), "upsert activations", allow_nan=True)
        if not ids:
            return
        with self._lock:
            self._check_writable("upsert")
            if self.has_activations:
                if activations is None:
                    activations = np.full((len(ids), self._bits), np.nan, np.float16)
                self._upsert(ids, codes, metadata, activations=activations.astype(np.float16))
            else:
                self._upsert(ids, codes, metadata)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items; all-or-nothing: an unknown id raises NotFound and nothing is deleted."""
        ids = self._check_ids(ids, "delete")
        if not ids:
            return 0
        with self._lock:
            self._check_writable("delete")
            missing = self._missing(ids)
            if missing:
                shown = ", ".join(repr(i) for i in missing[:10])
                more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
                raise NotFound(
                    f"gallery {self._path} | {len(missing)} id(s) not found: {shown}{more}; nothing was deleted"
                )
            self._delete(ids)
            return len(ids)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        max_distance: int | None = None,
        activations: np.ndarray | None = None,
        rerank_factor: int = 0,
    ) -> list[list[Hit]]:
        """The k nearest items per query row, by Hamming distance, at most `max_distance` away.

        With the queries' `activations` (float [Q, bits]) and `rerank_factor` > 0, on a gallery
        that stores activations, the Hamming top-R (R = max(k * factor, k)) within
        `max_distance` is re-ordered by cosine and cut to k; hits then carry `score`. Otherwise
        (factor 0, the default) it is the plain Hamming ranking.
        """
        queries = self._check_codes(queries, "queries")
        if isinstance(rerank_factor, bool) or not isinstance(rerank_factor, (int, np.integer)) or rerank_factor < 0:
            raise BadInput(f"rerank_factor {rerank_factor!r} | must be an integer >= 0 (0 turns re-ranking off)")
        rerank = activations is not None and rerank_factor > 0 and self.has_activations
        if rerank:
            activations = self._check_activations(activations, len(queries), "query activations", allow_nan=False)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadInput(f"k {k!r} | must be an integer >= 1")
        if max_distance is not None and (
            isinstance(max_distance, bool)
            or not isinstance(max_distance, (int, np.integer))
            or max_distance < 0
        ):
            raise BadInput(f"max_distance {max_distance!r} | must be an integer >= 0 or None")
        with self._lock:
            self._check_open()
            if len(queries) == 0 or self._size() == 0:
                return [[] for _ in range(len(queries))]
            if not rerank:
                results = self._search(queries, int(k))
            else:
                r = rerank_size(int(k), int(rerank_factor), self._size())
                fast = self._search_reranked(queries, activations, int(k), r, max_distance)
                if fast is not None:
                    return fast
                results = self._search(queries, r)
                stored = self._activations_of(results)
        if max_distance is not None:
            keep = [[h.distance <= max_distance for h in hits] for hits in results]
            results = [[h for h, m in zip(hits, ms) if m] for hits, ms in zip(results, keep)]
            if rerank:
                stored = [Z[np.asarray(ms, bool)] if len(ms) else Z for Z, ms in zip(stored, keep)]
        if not rerank:
            return results
        out = []
        for hits, qz, Z in zip(results, activations, stored):
            order, scores = rerank_order([h.distance for h in hits], qz, Z)
            out.append([replace(hits[o], score=float(sc)) for o, sc in zip(order[:k], scores[:k])])
        return out

    def _search_reranked(self, queries, activations, k: int, r: int, max_distance) -> list[list[Hit]] | None:
        """The whole re-ranked search (called under the lock) for kinds that can shortlist on
        arrays and build Hits for the k answers only, not for all r candidates; None: this
        kind cannot, and `search` re-ranks the Hits of `_search` instead (the same ranking)."""
        return None

    def search_nowait(
        self,
        queries: np.ndarray,
        k: int,
        max_distance: int | None = None,
        activations: np.ndarray | None = None,
        rerank_factor: int = 0,
    ) -> list[list[Hit]] | None:
        """`search` when it can answer right away, else None (then call `search` from a thread).

        "Right away" means no write holds the lock and the kind says the search is cheap
        (`_cheap`). An event loop uses this to skip a thread hop that costs more than a small
        in-memory search, without ever waiting behind an fsync or a Milvus round trip.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            n = len(queries) if getattr(queries, "ndim", 2) > 1 else 1
            width = int(k) * max(1, int(rerank_factor)) if activations is not None else int(k)
            if self._closed or not self._cheap(n, width):
                return None
            return self.search(queries, k, max_distance, activations, rerank_factor)
        finally:
            self._lock.release()

    def get(self, id: str) -> tuple[np.ndarray, dict[str, str]]:
        """The stored code (uint8[bits//8]) and metadata of one id; NotFound if absent."""
        with self._lock:
            self._check_open()
            found = self._get(str(id))
        if found is None:
            raise NotFound(f"gallery {self._path} | id {id!r} not found")
        return found

    def stored_activations(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """float16 [len(ids), bits] activations of `ids` (default: all, in insertion order); NaN rows
        for items stored without. BadInput on a gallery that keeps none; NotFound for an unknown id."""
        with self._lock:
            self._check_open()
            if not self.has_activations:
                raise BadInput(f"gallery {self._path} | keeps no activations: rebuild it with hashret index build")
            ids = self._ids() if ids is None else list(ids)
            missing = self._missing(ids)
            if missing:
                raise NotFound(f"gallery {self._path} | id {missing[0]!r} not found")
            return self._activations_of([[Hit(i, 0) for i in ids]])[0]

    def ids(self) -> list[str]:
        """All ids in insertion order."""
        with self._lock:
            self._check_open()
            return self._ids()

    def save(self) -> None:
        """Snapshot/flush so the gallery reopens fast; acknowledged writes are durable anyway."""
        with self._lock:
            self._check_writable("save")
            self._save()

    def snapshot(self) -> dict[str, Any] | None:
        """Bound the gallery's own write-ahead log now (FAISS; see serve.gallery.faiss_index).

        None for kinds that keep no log of ours: Milvus logs, seals and compacts its own.
        """
        return None

    def wal_stats(self) -> dict[str, Any] | None:
        """{records, bytes} of our WAL since the last snapshot and its time; None without one."""
        return None

    def close(self) -> None:
        """Release files and connections; does not snapshot (writes are already durable)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    # ---- validation ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BadInput(f"gallery {self._path} | already closed: open it again with open_gallery")

    def _check_writable(self, op: str) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnly(
                f"gallery {self._path} | {op} refused: it is open read-only (served by several processes, "
                f"hashret serve --workers); send writes to a server with --workers 1, or build a new gallery "
                f"(hashret index build) and restart the workers on it"
            )

    def _check_ids(self, ids: Sequence[str], op: str) -> list[str]:
        if isinstance(ids, (str, bytes)):
            raise BadInput(f"{op} | ids must be a list of strings, got a single {type(ids).__name__}")
        ids = list(ids)
        for i in ids:
            if not isinstance(i, str) or not i:
                raise BadInput(f"{op} | id {i!r} is invalid: ids must be non-empty strings")
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dups = sorted({i for i in ids if i in seen or seen.add(i)})
            raise BadInput(f"{op} | duplicate ids in one call: {', '.join(map(repr, dups[:10]))}")
        return ids

    def _check_codes(self, codes: Any, what: str) -> np.ndarray:
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 2:
            got = (
                f"{codes.dtype}{list(codes.shape)}" if isinstance(codes, np.ndarray) else type(codes).__name__
            )
            raise BadInput(
                f"{what} | expected packed uint8[N, {self.nbytes}] (np.packbits of {self._bits} bits), "
                f"got {got}"
            )
        if codes.shape[1] != self.nbytes:
            raise BadInput(
                f"{what} | width {codes.shape[1]} bytes ({codes.shape[1] * 8} bits), gallery holds "
                f"{self.nbytes} bytes ({self._bits} bits): encode with the gallery's model"
            )
        return np.ascontiguousarray(codes)

    def _check_activations(self, Z: Any, n: int, what: str, allow_nan: bool) -> np.ndarray:
        if not isinstance(Z, np.ndarray) or Z.ndim != 2 or not np.issubdtype(Z.dtype, np.floating):
            got = f"{Z.dtype}{list(Z.shape)}" if isinstance(Z, np.ndarray) else type(Z).__name__
            raise BadInput(f"{what} | expected float[N, {self._bits}] (the model's tanh outputs), got {got}")
        if Z.shape != (n, self._bits):
            raise BadInput(
                f"{what} | shape {list(Z.shape)}, expected [{n}, {self._bits}]: one row of {self._bits} "
                f"activations per code, from the gallery's model"
            )
        if np.isfinite(Z).all():  # the usual case, one pass (a search checks its query's row)
            return Z
        nan = np.isnan(Z)
        rows = nan.any(axis=1)
        if np.isinf(Z).any() or (~nan[rows]).any() or (rows.any() and not allow_nan):
            raise BadInput(
                f"{what} | holds inf or partly-NaN rows: pass finite model outputs"
                + (", or a whole row of NaN for an item without them" if allow_nan else "")
            )
        return Z

    @staticmethod
    def _check_metadata(metadata: Sequence[dict] | None, n: int) -> list[dict[str, str]]:
        if metadata is None:
            return [{} for _ in range(n)]
        metadata = list(metadata)
        if len(metadata) != n:
            raise BadInput(f"upsert | {n} ids but {len(metadata)} metadata entries: pass one dict per id")
        out = []
        for m in metadata:
            if m is None:
                m = {}
            if not isinstance(m, dict) or not all(
                isinstance(a, str) and isinstance(b, str) for a, b in m.items()
            ):
                raise BadInput(f"upsert | metadata {m!r} is invalid: use a dict of str -> str")
            out.append(dict(m))
        return out

    # ---- primitives each kind implements (called with the lock held) ---------------------
    def _cheap(self, n_queries: int, k: int) -> bool:
        """Whether searching now takes well under a millisecond (no I/O, no index rebuild)."""
        return False

    @abc.abstractmethod
    def _size(self) -> int: ...

    @abc.abstractmethod
    def _upsert(self, ids: list[str], codes: np.ndarray, metadata: list[dict[str, str]]) -> None: ...

    @abc.abstractmethod
    def _missing(self, ids: list[str]) -> list[str]: ...

    @abc.abstractmethod
    def _delete(self, ids: list[str]) -> None: ...

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int) -> list[list[Hit]]: ...

    def _activations_of(self, results: list[list[Hit]]) -> list[np.ndarray]:
        """Stored activations (float16 [len(hits), bits], NaN rows for none) of each hit list."""
        raise NotImplementedError(f"index kind {self.kind!r} stores no activations")

    @abc.abstractmethod
    def _get(self, id: str) -> tuple[np.ndarray, dict[str, str]] | None: ...

    @abc.abstractmethod
    def _ids(self) -> list[str]: ...

    @abc.abstractmethod
    def _save(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

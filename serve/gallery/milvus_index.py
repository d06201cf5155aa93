"""Milvus galleries (kind "milvus"): the same code for a Milvus cluster and embedded Milvus Lite.

The `uri` option picks the backend: "http://host:19530" talks to a cluster (token from the
HASHRET_MILVUS_TOKEN environment variable, never written to the manifest); a local path
ending in ".db" runs Milvus Lite in-process. The default is GAL/milvus.db; relative paths
are relative to the gallery folder, so the folder can be moved as a whole.

Collection schema: `id` VARCHAR primary key, `code` BINARY_VECTOR(dim=bits) holding the
np.packbits bytes unchanged, `meta` JSON, `seq` INT64 (first-insertion order, used to break
distance ties the same way FAISS does), and for a gallery that keeps activations `z`
FLOAT16_VECTOR(dim=bits) (a NaN vector for an item upserted by code; its FLAT/COSINE index exists
only because Milvus loads no collection with an unindexed vector field: searches never use it,
the re-ranking fetches `z` of the Hamming shortlist by id, since Milvus Lite 2.5 returns empty
FLOAT16 vectors from a search on another field). Metric HAMMING, index BIN_FLAT (exact, default) or
BIN_IVF_FLAT (options nlist, nprobe). Milvus persists writes itself (Milvus Lite too, even
without a flush), so there is no snapshot; save() flushes and records the size. The manifest's
checksum seals what it says (bits, model, uri, collection, index type); the collection's own
files are Milvus' to keep intact.

Logs and compaction belong to Milvus here: a cluster writes every insert/delete to its own log
(the message stream), seals segments and compacts them in the background (merging small ones,
purging deleted and overwritten rows); Milvus Lite stores rows in its local milvus.db and
overwrites an upserted id in place (measured: the file stayed at 123 KB over 15,000 upserts of
the same 500 ids; its Compact RPC answers UNIMPLEMENTED). Nothing of ours grows per write beside
it: no WAL, and the manifest is written only at create and save(). So `snapshot()` and
`wal_stats()` return None, the server takes no snapshots of it, and `hashret index compact`
says so.

Quirks handled here:
* Milvus returns at most 16384 hits per query (top-k in [1, 16384]); a larger k that the
  gallery could fill is refused with BadInput instead of silently truncated.
* Milvus cuts distance ties at the k-th hit arbitrarily; for BIN_FLAT the tied boundary
  distance is re-fetched with a range search (range_filter <= d < radius) and ordered by
  `seq`, so results equal FAISS flat exactly.
* Distances come back as floats; they are converted to int.
* Deleting an unknown id is silently accepted by Milvus; the base class checks first.
"""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact, Unavailable
from hashret.manifest import gallery_checksum, now_iso, write_manifest
from serve.gallery.base import REBUILD, Gallery, Hit, index_kind, new_gallery_manifest

TOPK_CAP = 16384  # Milvus' maximum top-k (and nq) per search request
ID_MAX_BYTES = 512
BATCH = 2000  # rows or queries per RPC, keeps messages well under gRPC limits
INDEX_TYPES = ("BIN_FLAT", "BIN_IVF_FLAT")
TOKEN_ENV = "HASHRET_MILVUS_TOKEN"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")


def _pymilvus():
    try:
        import pymilvus
    except Exception as e:  # ImportError, or pkg_resources missing (needs setuptools<80)
        raise Unavailable(
            f"index kind 'milvus' | pymilvus cannot be imported ({e}): "
            f"pip install 'pymilvus>=2.5,<2.6' milvus-lite 'setuptools<80'"
        ) from None
    return pymilvus


_UNSAFE = re.compile(r"[%'\"\\\x00-\x1f\x7f]")
_ESCAPED = re.compile(r"%([0-9A-F]{2})")


def _pk(id: str) -> str:
    """Primary key for an id: quotes, backslashes, % and control chars percent-encoded.

    pymilvus quotes ids into filter expressions without escaping, and Milvus Lite builds
    SQL from them, so an id like "O'Brien.jpg" would otherwise fail; ordinary ids are
    stored unchanged and stay readable in Milvus tools.
    """
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", id)


def _unpk(pk: str) -> str:
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), pk)


def _is_remote(uri: str) -> bool:
    return "://" in uri


def _chunks(seq: list, n: int = BATCH):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


@index_kind("milvus")
class MilvusGallery(Gallery):
    """Milvus or embedded Milvus Lite: the gallery lives in a collection, GAL/ holds the manifest."""

    summary = "Milvus collection (embedded Milvus Lite by default, or a cluster)"
    ACTIVATIONS = True
    CLI_OPTIONS = {
        "--milvus-uri": ("uri", {
            "default": None,
            "help": "milvus only: http://host:19530 for a cluster (default: GAL/milvus.db, embedded Milvus Lite)",
        }),
    }

    def __init__(self, path: Path, manifest: dict[str, Any]):
        super().__init__(path, manifest)
        ix = manifest["index"]
        self._uri = str(ix.get("uri", "milvus.db"))
        self._coll = str(ix.get("collection", "gallery"))
        self._index_type = str(ix.get("index_type", "BIN_FLAT"))
        self._nprobe = int(ix.get("nprobe", 16))
        self._client = None
        self._last_seq = 0

    # ---- connection -----------------------------------------------------------------------
    def _resolved_uri(self) -> str:
        if _is_remote(self._uri):
            return self._uri
        p = Path(self._uri)
        return str(p if p.is_absolute() else self._path / p)

    def _connect(self) -> None:
        pm = _pymilvus()
        uri = self._resolved_uri()
        try:
            self._client = pm.MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""))
        except Exception as e:
            raise Unavailable(f"milvus {uri} | cannot connect ({e}): check the uri and that Milvus is running") from None

    @classmethod
    def create(cls, path: Path, bits: int, model_sha256: str, options: dict[str, Any]) -> "MilvusGallery":
        allowed = {"uri", "collection", "index_type", "nlist", "nprobe", "activations"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise BadInput(f"index kind 'milvus' | unknown option(s) {', '.join(unknown)}: allowed {', '.join(sorted(allowed))}")
        uri = str(options.get("uri", "milvus.db"))
        if not _is_remote(uri):
            if not uri.endswith(".db"):
                raise BadInput(f"milvus uri {uri!r} | a Milvus Lite file must end in .db (or use http://host:19530)")
            p = Path(uri)
            if p.is_absolute() and p.resolve().is_relative_to(path.resolve()):
                uri = str(p.resolve().relative_to(path.resolve()))  # keep the folder movable
        coll = str(options.get("collection", "gallery"))
        if not _NAME.match(coll):
            raise BadInput(f"milvus collection {coll!r} | invalid: use letters, digits and _ (not first)")
        index_type = str(options.get("index_type", "BIN_FLAT")).upper()
        if index_type not in INDEX_TYPES:
            raise BadInput(f"milvus index_type {index_type!r} | unknown: choose one of {', '.join(INDEX_TYPES)}")
        index = {"kind": cls.kind, "uri": uri, "collection": coll, "index_type": index_type}
        if options.get("activations"):
            index["activations"] = True
        if index_type == "BIN_IVF_FLAT":
            index["nlist"] = int(options.get("nlist", 128))
            index["nprobe"] = int(options.get("nprobe", 16))
        manifest = new_gallery_manifest(bits, model_sha256, index)
        manifest["checksum"] = gallery_checksum(manifest)  # seals bits, model and the collection it names
        g = cls(path, manifest)
        g._connect()
        try:
            g._create_collection(index.get("nlist"))
            write_manifest(path, g._manifest)  # last: a failed create leaves no manifest
        except BaseException:
            g._close()
            raise
        return g

    def _create_collection(self, nlist: int | None) -> None:
        pm, c = _pymilvus(), self._client
        if c.has_collection(self._coll):
            raise BadInput(
                f"milvus collection {self._coll!r} at {self._resolved_uri()} | already exists: "
                f"drop it or choose another `collection`"
            )
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pm.DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        schema.add_field("code", pm.DataType.BINARY_VECTOR, dim=self._bits)
        schema.add_field("meta", pm.DataType.JSON)
        schema.add_field("seq", pm.DataType.INT64)
        if self.has_activations:
            schema.add_field("z", pm.DataType.FLOAT16_VECTOR, dim=self._bits)
        params = c.prepare_index_params()
        params.add_index(
            field_name="code", index_type=self._index_type, metric_type="HAMMING",
            params={"nlist": nlist} if nlist else {},
        )
        if self.has_activations:
            params.add_index(field_name="z", index_type="FLAT", metric_type="COSINE")
        c.create_collection(self._coll, schema=schema, index_params=params, consistency_level="Strong")

    @classmethod
    def shared_mode(cls, path: Path, manifest: dict[str, Any]) -> str:
        """A Milvus server is shared by every process that connects: reads and writes as usual.
        A Milvus Lite file is one process's."""
        uri = str(manifest["index"].get("uri", "milvus.db"))
        if _is_remote(uri):
            return "read-write"
        raise BadInput(f"gallery {path} | its Milvus Lite file ({uri}) can be opened by one process only: serve it "
                       f"with --workers 1, or build the gallery on a Milvus server (--milvus-uri http://HOST:19530)")

    @classmethod
    def open(cls, path: Path, manifest: dict[str, Any]) -> "MilvusGallery":
        g = cls(path, manifest)
        g._connect()
        try:
            c, where = g._client, f"milvus collection {g._coll!r} at {g._resolved_uri()}"
            if not c.has_collection(g._coll):
                raise MissingArtifact(f"{where} | not found: restore it or {REBUILD}")
            fields = {f["name"]: f for f in c.describe_collection(g._coll)["fields"]}
            dim = int(fields.get("code", {}).get("params", {}).get("dim", -1))
            if dim != g._bits or "seq" not in fields:
                raise ArtifactMismatch(
                    f"{where} | holds {dim}-bit codes, manifest {path / 'manifest.json'} says "
                    f"{g._bits} bits: {REBUILD}"
                )
            zdim = int(fields.get("z", {}).get("params", {}).get("dim", -1))
            if g.has_activations and zdim != g._bits:
                raise ArtifactMismatch(
                    f"{where} | has no {g._bits}-wide activations field `z`, manifest {path / 'manifest.json'} "
                    f"says it keeps activations: {REBUILD}"
                )
            try:
                c.load_collection(g._coll)
            except Exception as e:  # pymilvus' own errors: a damaged collection must still exit 2, named
                raise Unavailable(
                    f"{where} | Milvus cannot load it ({str(e)[:300]}): its files are Milvus' own, so repair or "
                    f"restore them with Milvus' tools or from a backup, or {REBUILD}"
                ) from None
        except BaseException:
            g._close()
            raise
        return g

    # ---- Gallery primitives ---------------------------------------------------------------
    def _query(self, **kw) -> list[dict]:
        return list(self._client.query(self._coll, **kw))

    def _size(self) -> int:
        return int(self._query(filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _seqs(self, ids: list[str]) -> dict[str, int]:
        """seq of each id already stored (absent ids are left out)."""
        out: dict[str, int] = {}
        for chunk in _chunks([_pk(i) for i in ids]):
            out.update((_unpk(r["id"]), int(r["seq"])) for r in self._query(ids=chunk, output_fields=["seq"]))
        return out

    def _upsert(self, ids, codes, metadata, activations=None) -> None:
        long = [i for i in ids if len(_pk(i).encode()) > ID_MAX_BYTES]
        if long:
            raise BadInput(f"upsert | id {long[0][:40]!r}… is longer than {ID_MAX_BYTES} bytes (Milvus VARCHAR limit)")
        existing = self._seqs(ids)
        # Wall-clock nanoseconds: increasing across restarts without reading the collection.
        base = max(time.time_ns(), self._last_seq + 1)
        self._last_seq = base + len(ids)
        rows = [
            {"id": _pk(i), "code": codes[r].tobytes(), "meta": metadata[r], "seq": existing.get(i, base + r)}
            for r, i in enumerate(ids)
        ]
        if self.has_activations:
            if activations is None:
                activations = np.full((len(ids), self._bits), np.nan, np.float16)
            for r, row in enumerate(rows):
                row["z"] = np.ascontiguousarray(activations[r], np.float16)
        for chunk in _chunks(rows):
            self._client.upsert(self._coll, chunk)

    def _activations_of(self, results):
        wanted = sorted({h.id for hits in results for h in hits})
        found: dict[str, np.ndarray] = {}
        for chunk in _chunks([_pk(i) for i in wanted]):
            for r in self._query(ids=chunk, output_fields=["z"]):
                z = r["z"]
                z = z[0] if isinstance(z, list) else z
                found[_unpk(r["id"])] = np.frombuffer(bytes(z), np.float16)
        nan = np.full(self._bits, np.nan, np.float16)
        return [np.stack([found.get(h.id, nan) for h in hits]) if hits else np.zeros((0, self._bits), np.float16)
                for hits in results]

    def _missing(self, ids):
        present = self._seqs(ids)
        return [i for i in ids if i not in present]

    def _delete(self, ids) -> None:
        for chunk in _chunks([_pk(i) for i in ids]):
            self._client.delete(self._coll, ids=chunk)

    def _raw_search(self, queries: np.ndarray, limit: int, extra: dict | None = None) -> list[list[tuple]]:
        params: dict[str, Any] = {"nprobe": self._nprobe} if self._index_type == "BIN_IVF_FLAT" else {}
        params.update(extra or {})
        out = []
        for chunk in _chunks([q.tobytes() for q in queries]):
            res = self._client.search(
                self._coll, data=chunk, anns_field="code", limit=limit, output_fields=["meta", "seq"],
                search_params={"metric_type": "HAMMING", "params": params},
            )
            for hits in res:
                out.append([
                    (int(round(h["distance"])), int(h["entity"]["seq"]), _unpk(h["id"]), h["entity"]["meta"] or {})
                    for h in hits
                ])
        return out

    def _search(self, queries, k):
        limit = k
        if k > TOPK_CAP:
            limit = min(k, self._size())
            if limit > TOPK_CAP:
                raise BadInput(
                    f"k {k} | Milvus returns at most {TOPK_CAP} hits per query: ask for fewer "
                    f"or use a faiss index"
                )
        rows = self._raw_search(queries, limit)
        if self._index_type == "BIN_FLAT":
            self._complete_ties(queries, rows, limit)
        return [
            [Hit(i, d, {str(a): str(b) for a, b in m.items()}) for d, _, i, m in sorted(r)[:k]]
            for r in rows
        ]

    def _complete_ties(self, queries: np.ndarray, rows: list[list[tuple]], limit: int) -> None:
        """Replace the hits at a full result's last distance by all hits at that distance."""
        by_dist: dict[int, list[int]] = defaultdict(list)
        for qi, r in enumerate(rows):
            if len(r) == limit:
                by_dist[r[-1][0]].append(qi)
        for d, qis in by_dist.items():
            ties = self._raw_search(queries[qis], TOPK_CAP, {"radius": d + 1, "range_filter": d})
            for qi, tied in zip(qis, ties):
                rows[qi] = [h for h in rows[qi] if h[0] < d] + tied

    def _get(self, id):
        res = self._query(ids=[_pk(id)], output_fields=["code", "meta"])
        if not res:
            return None
        code = res[0]["code"]
        code = code[0] if isinstance(code, list) else code
        return np.frombuffer(bytes(code), np.uint8).copy(), dict(res[0]["meta"] or {})

    def _ids(self):
        it = self._client.query_iterator(self._coll, batch_size=4096, filter="", output_fields=["seq"])
        rows = []
        try:
            while batch := it.next():
                rows.extend((int(r["seq"]), _unpk(r["id"])) for r in batch)
        finally:
            it.close()
        return [i for _, i in sorted(rows)]

    def _save(self) -> None:
        self._client.flush(self._coll)
        manifest = {**self._manifest, "size": self._size(), "saved": now_iso()}
        manifest["checksum"] = gallery_checksum(manifest)
        write_manifest(self._path, manifest)
        self._manifest = manifest

    def _close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

"""`hashret bench search`: Hamming k-NN search engines on packed binary codes, side by side.

Compared, on the same codes and queries:

* ``numpy``      exact brute force: hashret.codes.hamming (XOR + popcount) + argpartition;
* ``faiss-flat`` exact brute force: faiss.IndexBinaryFlat with counting k-selection (as the `faiss-flat` gallery);
* ``faiss-hnsw`` approximate graph: faiss.IndexBinaryHNSW at one or more efSearch values;
* ``milvus``     Milvus Lite (embedded, a local .db file), BIN_FLAT index, HAMMING metric;
* any other gallery index kind registered in serve.gallery.INDEX_KINDS, through its gallery.

The kinds offered are numpy plus the index-kind registry, so a newly registered kind is
benchmarked without an edit here. The four above drive their libraries directly (no gallery
wrapper: no ids, metadata or locks), so the numbers are the index's own cost; a gallery adds a
little Python per hit on top, which is what a kind without a direct driver is measured with.

Figures per (kind, size, k): one-query-at-a-time latency (p50/p90/p99 over --queries queries
after --warmup), batch latency (all queries in one call, median of --batch-repeats), recall@k
against the exact answer, build time and memory (index bytes, and the RSS growth of this
process; for Milvus, the RSS of its server process and the size of its .db folder).

Recall@k is tie-aware: with binary codes many items share a distance, so any item at the k-th
exact distance is an equally right answer. For one query with exact sorted distances e_1..e_k:
recall = (#returned with true distance < e_k + min(#returned at e_k, #exact at e_k)) / k,
with true distances recomputed from the codes (an engine cannot score by misreporting).

Data: ``real`` draws gallery-like codes with class structure: hashret.metrics.synthetic_codes
(class prototypes with bits flipped with probability --noise), drawn in chunks so 10M codes fit in
memory; the queries are further draws from the same classes. ``random`` is uniform bits.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine
from benchmarks.machine import add_out_arg, int_list, percentiles, print_table, str_list, write_result
from hashret.codes import check_bits
from hashret.errors import BadInput, Unavailable
from hashret.metrics import synthetic_codes

log = logging.getLogger("hashret.bench.search")

BASELINE = "numpy"  # exact brute force without any index: the reference every kind is timed against
DEFAULT_SIZES = "100000,1000000"
MILVUS_MAX = 100_000
HNSW_MAX = 2_000_000
BAR = {"name": "FAISS flat over 1M 64-bit codes, one query at a time, 1 thread",
       "kind": "faiss-flat", "size": 1_000_000, "bits": 64, "threads": 1, "target_ms": 1.0}


def all_kinds() -> tuple[str, ...]:
    """numpy, then every registered gallery index kind in registration order."""
    from serve.gallery import INDEX_KINDS

    return (BASELINE, *(name for name, _ in INDEX_KINDS.items()))


# --------------------------------------------------------------------------- data


def make_codes(n: int, bits: int, data: str = "real", n_classes: int = 1000, noise: float = 0.1,
               seed: int = 0, n_queries: int = 0, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Gallery codes uint8 [n, bits//8] and query codes uint8 [n_queries, bits//8].

    ``real``: hashret.metrics.synthetic_codes, `chunk` rows at a time so memory stays ~(n+Q)*bits/8;
    the queries are its first rows and the gallery the rest, so the queries do not depend on `n`
    and a smaller gallery is a prefix of a larger one. ``random``: uniform bits.
    """
    if data not in ("real", "random"):
        raise BadInput(f"--data {data!r} | unknown: choose real or random")
    check_bits(bits, "--bits")
    if data == "random":
        codes = np.random.default_rng(seed).integers(0, 256, size=(n_queries + n, bits // 8), dtype=np.uint8)
    else:
        codes, _ = synthetic_codes(n_queries + n, bits, n_classes, noise, seed, chunk=chunk)
    return codes[n_queries:], codes[:n_queries]


def _popcount_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """popcount(a XOR b) along the last axis (same shapes, uint8)."""
    x = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)
    return np.unpackbits(x, axis=-1).sum(axis=-1, dtype=np.int64)


def exact_distances(queries: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    """Sorted k smallest Hamming distances per query, int64 [Q, min(k, N)] (ground truth)."""
    from hashret.codes import hamming

    k = min(k, len(db))
    out = np.empty((len(queries), k), np.int64)
    step = max(1, (1 << 25) // max(1, len(db)))
    for s in range(0, len(queries), step):
        d = hamming(queries[s:s + step], db)
        part = np.partition(d, k - 1, axis=1)[:, :k] if k < d.shape[1] else d
        out[s:s + step] = np.sort(part, axis=1)
    return out


def recall_at_k(queries: np.ndarray, db: np.ndarray, ids: np.ndarray, exact: np.ndarray) -> float:
    """Tie-aware recall@k of returned ids [Q, k'] (-1 = none) against exact distances [Q, k]."""
    k = exact.shape[1]
    ids = np.asarray(ids, np.int64)[:, :k]
    valid = (ids >= 0) & (ids < len(db))
    true = _popcount_rows(queries[:, None, :], db[np.where(valid, ids, 0)])
    kth = exact[:, -1:]
    n_less = ((true < kth) & valid).sum(axis=1)
    n_eq = ((true == kth) & valid).sum(axis=1)
    n_eq_exact = (exact == kth).sum(axis=1)
    hit = n_less + np.minimum(n_eq, n_eq_exact)
    return float(np.mean(hit / k))


# --------------------------------------------------------------------------- searchers


class Searcher:
    """One engine: build(db) once, then search(queries, k) -> ids int64 [Q, k]."""

    kind = ""

    def __init__(self, bits: int, **params: Any):
        self.bits = bits
        self.params = params

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params.items() if k in self.shown)
        return f"{self.kind}({extra})" if extra else self.kind

    shown: tuple[str, ...] = ()

    def build(self, db: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def index_bytes(self) -> int | None:
        return None

    def extra_memory(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class NumpySearcher(Searcher):
    """Exact: hashret.codes.hamming + argpartition, then the k sorted by (distance, index)."""

    kind = "numpy"

    def build(self, db):
        self.db = np.ascontiguousarray(db)

    def search(self, queries, k):
        from hashret.codes import hamming

        n = len(self.db)
        k = min(k, n)
        out = np.empty((len(queries), k), np.int64)
        step = max(1, (1 << 25) // max(1, n))  # [step, N] uint16 temporaries stay <= 64 MiB
        for s in range(0, len(queries), step):
            d = hamming(queries[s:s + step], self.db)
            if k < n:
                idx = np.argpartition(d, k - 1, axis=1)[:, :k]
            else:
                idx = np.broadcast_to(np.arange(n), d.shape)
            dk = np.take_along_axis(d, idx, axis=1).astype(np.int64)
            order = np.lexsort((idx, dk), axis=1)
            out[s:s + step] = np.take_along_axis(idx, order, axis=1)
        return out

    def index_bytes(self):
        return int(self.db.nbytes)


class FaissFlatSearcher(Searcher):
    kind = "faiss-flat"

    def build(self, db):
        from serve.gallery.faiss_index import flat_index

        self.index = flat_index(self.bits)  # exactly what the faiss-flat gallery searches with
        self.index.add(db)

    def search(self, queries, k):
        _, ids = self.index.search(queries, min(k, self.index.ntotal))
        return ids

    def index_bytes(self):
        return int(self.index.ntotal * self.index.code_size)


def hnsw_default(option: str) -> int:
    """The faiss-hnsw gallery's default for `option` (M, ef_construction, ef_search)."""
    from serve.gallery import INDEX_KINDS

    return int(INDEX_KINDS.get("faiss-hnsw").OPTIONS[option][0])


class FaissHNSWSearcher(Searcher):
    kind = "faiss-hnsw"
    shown = ("ef_search",)

    def build(self, db):
        import faiss

        self.index = faiss.IndexBinaryHNSW(self.bits, int(self.params["M"]))
        self.index.hnsw.efConstruction = int(self.params["ef_construction"])
        self.index.add(db)

    def set_ef(self, ef: int) -> None:
        self.params["ef_search"] = int(ef)

    def search(self, queries, k):
        self.index.hnsw.efSearch = max(int(self.params["ef_search"]), k)
        _, ids = self.index.search(queries, min(k, self.index.ntotal))
        return ids

    def index_bytes(self):
        h = self.index.hnsw
        return int(self.index.ntotal * self.index.code_size + h.neighbors.size() * 4
                   + h.levels.size() * 4 + h.offsets.size() * 8)


class MilvusSearcher(Searcher):
    """Milvus Lite in-process server, BIN_FLAT + HAMMING (the `milvus` gallery's defaults)."""

    kind = "milvus"
    BATCH = 5000

    def build(self, db):
        try:
            from pymilvus import DataType, MilvusClient
        except Exception as e:
            raise Unavailable(f"milvus | pymilvus cannot be imported ({e}): pip install 'pymilvus>=2.5,<2.6' "
                              "milvus-lite 'setuptools<80'") from None
        self.tmp = Path(tempfile.mkdtemp(prefix="hashret-bench-milvus-"))
        t0 = time.perf_counter()
        self.client = MilvusClient(uri=str(self.tmp / "bench.db"))
        self.startup_s = time.perf_counter() - t0
        c = self.client
        schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("code", DataType.BINARY_VECTOR, dim=self.bits)
        params = c.prepare_index_params()
        params.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
        c.create_collection("bench", schema=schema, index_params=params, consistency_level="Strong")
        for a in range(0, len(db), self.BATCH):
            c.insert("bench", [{"id": i, "code": db[i].tobytes()} for i in range(a, min(len(db), a + self.BATCH))])
        c.flush("bench")
        self.n = len(db)

    def search(self, queries, k):
        k = min(k, self.n)
        res = self.client.search("bench", data=[q.tobytes() for q in queries], anns_field="code", limit=k,
                                 search_params={"metric_type": "HAMMING", "params": {}})
        out = np.full((len(queries), k), -1, np.int64)
        for r, hits in enumerate(res):
            ids = [int(h["id"]) for h in hits][:k]
            out[r, :len(ids)] = ids
        return out

    def extra_memory(self):
        pids = machine.child_pids()
        rss = sum(machine.rss_bytes(p) or 0 for p in pids)
        disk = sum(f.stat().st_size for f in self.tmp.rglob("*") if f.is_file())
        return {"server_rss_bytes": rss or None, "disk_bytes": disk, "startup_s": round(self.startup_s, 3)}

    def close(self):
        try:
            self.client.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


class GallerySearcher(Searcher):
    """A registered index kind without a direct driver, through its own gallery in a temp folder.

    Ids are the row numbers as strings; the timings include the gallery's checks, lock and
    per-hit Python, so they sit a little above the library's own cost.
    """

    BATCH = 10_000  # rows per upsert: each is one durable write

    def __init__(self, bits: int, kind: str, **params: Any):
        super().__init__(bits, **params)
        self.kind = kind
        self.tmp: Path | None = None
        self.gallery = None

    def build(self, db):
        from serve.gallery import create_gallery

        self.tmp = Path(tempfile.mkdtemp(prefix="hashret-bench-gallery-"))
        self.gallery = create_gallery(self.tmp / "gal", self.kind, self.bits, "benchmark", **self.params)
        for a in range(0, len(db), self.BATCH):
            b = min(len(db), a + self.BATCH)
            self.gallery.upsert([str(i) for i in range(a, b)], db[a:b])
        self.n = len(db)
        if len(db):  # a kind that needs a device this host lacks (torch-flat on cuda) is skipped here
            self.gallery.search(db[:1], 1)

    def search(self, queries, k):
        k = min(k, self.n)
        out = np.full((len(queries), k), -1, np.int64)
        for r, hits in enumerate(self.gallery.search(queries, k)):
            ids = [int(h.id) for h in hits][:k]
            out[r, :len(ids)] = ids
        return out

    def extra_memory(self):
        disk = sum(f.stat().st_size for f in self.tmp.rglob("*") if f.is_file()) if self.tmp else 0
        return {"disk_bytes": disk}

    def close(self):
        try:
            if self.gallery is not None:
                self.gallery.close()
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)


# kinds whose library is driven directly; every other registered kind goes through its gallery
DIRECT = {"numpy": NumpySearcher, "faiss-flat": FaissFlatSearcher, "milvus": MilvusSearcher}


def make_searcher(kind: str, bits: int, args) -> Searcher:
    if kind == "faiss-hnsw":
        return FaissHNSWSearcher(bits, M=args.hnsw_m, ef_construction=args.hnsw_ef_construction,
                                 ef_search=args.hnsw_ef_search[0])
    if kind in DIRECT:
        return DIRECT[kind](bits)
    if kind in all_kinds():
        return GallerySearcher(bits, kind)
    raise BadInput(f"--kinds {kind!r} | unknown: choose from {', '.join(all_kinds())}")


# --------------------------------------------------------------------------- timing


def _set_threads(n: int) -> int:
    try:
        import faiss
    except ImportError:
        return n
    faiss.omp_set_num_threads(n)
    return faiss.omp_get_max_threads()


def _faiss_build() -> str | None:
    """FAISS's compiled SIMD level (e.g. 'OPTIMIZE AVX2'): popcount speed depends on it."""
    try:
        import faiss

        text = faiss.get_compile_options()
    except Exception:
        return None
    try:  # faiss >= 1.12 dispatches SIMD at run time: record the level actually used
        text += f"; dispatched {faiss.SIMDConfig.get_level_name()}"
    except Exception:
        pass
    return text


def time_searcher(s: Searcher, queries: np.ndarray, db: np.ndarray, k: int, exact: np.ndarray,
                  warmup: int, batch_repeats: int) -> dict[str, Any]:
    """Per-query latencies (one query per call), batch latency, recall@k."""
    for i in range(min(warmup, len(queries))):
        s.search(queries[i:i + 1], k)
    lat = []
    ids_single = np.full((len(queries), min(k, len(db))), -1, np.int64)
    for i in range(len(queries)):
        t0 = time.perf_counter()
        ids = s.search(queries[i:i + 1], k)
        lat.append(time.perf_counter() - t0)
        ids_single[i, :ids.shape[1]] = ids[0]
    batch = []
    ids_batch = None
    for _ in range(max(1, batch_repeats)):
        t0 = time.perf_counter()
        ids_batch = s.search(queries, k)
        batch.append(time.perf_counter() - t0)
    lat_ms = np.array(lat) * 1e3
    bt = float(np.median(batch)) * 1e3
    return {
        "per_query": {**percentiles(lat_ms), "qps": round(len(lat) / (lat_ms.sum() / 1e3), 1)},
        "batch": {"queries": len(queries), "total_ms": round(bt, 3),
                  "per_query_ms": round(bt / len(queries), 4),
                  "qps": round(len(queries) / (bt / 1e3), 1), "repeats": len(batch)},
        "recall": round(recall_at_k(queries, db, ids_single, exact), 4),
        "recall_batch": round(recall_at_k(queries, db, ids_batch, exact), 4),
    }


def run_search_bench(sizes, bits: int = 64, n_queries: int = 100, ks=(10, 100), kinds=None,
                     data: str = "real", args=None, progress=print) -> dict[str, Any]:
    """Run every kind x size x k (default: all_kinds()).

    Returns {"config", "results", "skipped", "bars", "notes"}.
    """
    a = args
    kinds = list(kinds) if kinds else list(all_kinds())
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    notes = [
        "Libraries driven directly (no gallery wrapper): the index's own cost.",
        *(f"{k} has no direct driver: measured through its gallery (checks, lock and per-hit Python included)."
          for k in kinds if k not in DIRECT and k != "faiss-hnsw"),
        "recall = tie-aware recall@k against exact brute force (any item at the k-th exact distance counts).",
        f"per_query: one query per call, after {a.warmup} warm-up queries; batch: all {n_queries} "
        f"queries in one call, median of {a.batch_repeats}.",
    ]
    search_threads = _set_threads(a.threads if a.threads > 0 else (os.cpu_count() or 1))
    build_threads_req = a.build_threads if a.build_threads > 0 else (os.cpu_count() or 1)
    if "milvus" in kinds and any(n > a.milvus_max for n in sizes):
        notes.append(f"Milvus Lite is capped at {a.milvus_max:,} codes (--milvus-max): inserting more "
                     "through its local server takes minutes; larger sizes are listed as skipped.")
    if "faiss-hnsw" in kinds and any(n > a.hnsw_max for n in sizes):
        notes.append(f"HNSW is built only up to {a.hnsw_max:,} codes (--hnsw-max).")
    max_n = max(sizes)
    t0 = time.perf_counter()
    db_all, queries = make_codes(max_n, bits, data, a.classes, a.noise, a.seed, n_queries)
    progress(f"data: {max_n:,} {data} {bits}-bit codes + {n_queries} queries in {time.perf_counter() - t0:.1f} s")
    for n in sorted(sizes):
        db = np.ascontiguousarray(db_all[:n])
        t0 = time.perf_counter()
        exact = {k: exact_distances(queries, db, k) for k in ks}
        progress(f"size {n:,}: exact ground truth in {time.perf_counter() - t0:.1f} s")
        for kind in kinds:
            if kind == "milvus" and n > a.milvus_max:
                skipped.append({"kind": kind, "size": n, "reason": f"size > --milvus-max {a.milvus_max}"})
                continue
            if kind == "faiss-hnsw" and n > a.hnsw_max:
                skipped.append({"kind": kind, "size": n, "reason": f"size > --hnsw-max {a.hnsw_max}"})
                continue
            s = make_searcher(kind, bits, a)
            gc.collect()
            rss0 = machine.rss_bytes()
            bthreads = _set_threads(build_threads_req) if kind == "faiss-hnsw" else search_threads
            t0 = time.perf_counter()
            try:
                s.build(db)
            except Unavailable as e:
                skipped.append({"kind": kind, "size": n, "reason": str(e)})
                s.close()
                continue
            build_s = time.perf_counter() - t0
            _set_threads(search_threads)
            gc.collect()
            rss1 = machine.rss_bytes()
            mem = {"index_bytes": s.index_bytes(),
                   "rss_delta_bytes": (rss1 - rss0) if rss0 is not None and rss1 is not None else None,
                   **s.extra_memory()}
            efs = a.hnsw_ef_search if kind == "faiss-hnsw" else [None]
            try:
                for ef in efs:
                    if ef is not None:
                        s.set_ef(ef)
                    for k in ks:
                        r = time_searcher(s, queries, db, k, exact[k], a.warmup, a.batch_repeats)
                        row = {"kind": kind, "label": s.label, "size": n, "bits": bits, "data": data, "k": k,
                               "threads": search_threads, "build_threads": bthreads,
                               "params": dict(s.params), "build_s": round(build_s, 3), "memory": mem, **r}
                        results.append(row)
                        progress(f"  {s.label:<22} n={n:>10,} k={k:<4} p50 {r['per_query']['p50_ms']:.3f} ms "
                                 f"p99 {r['per_query']['p99_ms']:.3f} ms batch {r['batch']['per_query_ms']:.4f} "
                                 f"ms/q recall {r['recall']:.4f}")
            finally:
                s.close()
                del s
                gc.collect()
        del db
    bars = []
    for r in results:
        if (r["kind"], r["size"], r["bits"], r["threads"]) == (BAR["kind"], BAR["size"], BAR["bits"], BAR["threads"]):
            bars.append({**BAR, "k": r["k"], "measured_p50_ms": r["per_query"]["p50_ms"],
                         "measured_p99_ms": r["per_query"]["p99_ms"],
                         "met": r["per_query"]["p50_ms"] <= BAR["target_ms"]})
    config = {"sizes": list(sizes), "bits": bits, "queries": n_queries, "k": list(ks), "kinds": list(kinds),
              "data": data, "classes": a.classes, "noise": a.noise, "seed": a.seed, "warmup": a.warmup,
              "batch_repeats": a.batch_repeats, "threads": search_threads, "build_threads": build_threads_req,
              "hnsw": {"M": a.hnsw_m, "ef_construction": a.hnsw_ef_construction, "ef_search": a.hnsw_ef_search},
              "milvus_max": a.milvus_max, "hnsw_max": a.hnsw_max, "faiss_build": _faiss_build(),
              "faiss_flat_selection": "counting (IndexBinaryFlat.use_heap=False)"}
    return {"config": config, "results": results, "skipped": skipped, "bars": bars, "notes": notes}


# --------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int_list, default=int_list(DEFAULT_SIZES), metavar="N,N",
                   help=f"gallery sizes, comma-separated; 10000000 is opt-in (default: {DEFAULT_SIZES})")
    p.add_argument("--bits", type=int, default=64, help="code length in bits, a multiple of 8 (default: 64)")
    p.add_argument("--queries", type=int, default=100, help="number of query codes (default: 100)")
    p.add_argument("--k", type=int_list, default=[10, 100], metavar="K,K",
                   help="neighbours per query, comma-separated (default: 10,100)")
    kinds = all_kinds()
    p.add_argument("--kinds", type=str_list, default=list(kinds), metavar="KIND,KIND",
                   help=f"engines to compare: numpy and the gallery index kinds, from {', '.join(kinds)} "
                        f"(default: {','.join(kinds)})")
    p.add_argument("--data", choices=("real", "random"), default="real",
                   help="real: gallery-like codes with class structure; random: uniform bits (default: real)")
    p.add_argument("--classes", type=int, default=1000, help="classes of the 'real' codes (default: 1000)")
    p.add_argument("--noise", type=float, default=0.1,
                   help="bit-flip probability around each class prototype for 'real' codes (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the codes (default: 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="FAISS search threads; 0 = all cores. The 1 ms bar is for 1 thread (default: 1)")
    p.add_argument("--build-threads", type=int, default=0,
                   help="FAISS threads while building HNSW; 0 = all cores (default: 0)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up queries before timing (default: 5)")
    p.add_argument("--batch-repeats", type=int, default=3,
                   help="repeats of the all-queries-in-one-call timing; the median is kept (default: 3)")
    m, efc = hnsw_default("M"), hnsw_default("ef_construction")
    p.add_argument("--hnsw-m", type=int, default=m, help=f"HNSW graph degree M (default: {m}, as the gallery)")
    p.add_argument("--hnsw-ef-construction", type=int, default=efc,
                   help=f"HNSW efConstruction (default: {efc}, as the gallery)")
    p.add_argument("--hnsw-ef-search", type=int_list, default=[16, 64, 256], metavar="EF,EF",
                   help="HNSW efSearch values, one result row each: the recall/latency curve (default: 16,64,256)")
    p.add_argument("--milvus-max", type=int, default=MILVUS_MAX,
                   help=f"largest gallery sent to Milvus Lite (inserts are slow) (default: {MILVUS_MAX})")
    p.add_argument("--hnsw-max", type=int, default=HNSW_MAX,
                   help=f"largest gallery indexed with HNSW (build time grows fast) (default: {HNSW_MAX})")
    add_out_arg(p, "search")


def _validate(a) -> None:
    kinds = all_kinds()
    unknown = [k for k in a.kinds if k not in kinds]
    if unknown:
        raise BadInput(f"--kinds {','.join(unknown)} | unknown: choose from {', '.join(kinds)}")
    if not a.sizes or min(a.sizes) < 1:
        raise BadInput("--sizes | need positive gallery sizes, e.g. 100000,1000000")
    if a.queries < 1 or not a.k or min(a.k) < 1:
        raise BadInput("--queries/--k | need at least one query and k >= 1")
    if not a.hnsw_ef_search:
        raise BadInput("--hnsw-ef-search | give at least one value, e.g. 64")


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in results:
        m = r["memory"]
        mb = m.get("index_bytes") or m.get("disk_bytes")
        rows.append([r["label"], f"{r['size']:,}", r["bits"], r["k"], r["threads"], f"{r['build_s']:.2f}",
                     f"{mb / 2**20:.1f}" if mb else "-",
                     f"{r['per_query'].get('min_ms', float('nan')):.3f}",
                     f"{r['per_query']['p50_ms']:.3f}", f"{r['per_query']['p99_ms']:.3f}",
                     f"{r['batch']['per_query_ms']:.4f}", f"{r['recall']:.4f}"])
    return rows


TABLE_HEAD = ["engine", "size", "bits", "k", "thr", "build s", "index MiB", "q min ms", "q p50 ms", "q p99 ms",
              "batch ms/q", "recall@k"]


def run(args) -> int:
    _validate(args)
    out = run_search_bench(args.sizes, args.bits, args.queries, args.k, args.kinds, args.data, args)
    meta = machine.run_meta("search", threads={"faiss_search": out["config"]["threads"],
                                               "faiss_hnsw_build": out["config"]["build_threads"]},
                            argv=getattr(args, "_argv", None))
    doc = {**meta, **out}
    print()
    print_table(TABLE_HEAD, table_rows(out["results"]))
    for s in out["skipped"]:
        print(f"skipped: {s['kind']} at {s['size']:,}: {s['reason']}")
    for b in out["bars"]:
        print(f"bar: {b['name']} (k={b['k']}): p50 {b['measured_p50_ms']:.3f} ms, target <= {b['target_ms']} ms "
              f"-> {'met' if b['met'] else 'NOT met'} (informational)")
    for n in out["notes"]:
        print(f"note: {n}")
    path = write_result(doc, args.out)
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- report hooks


def report_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    return TABLE_HEAD, table_rows(doc.get("results", []))


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Recall@k vs per-query p50 latency, one panel per k, one series per (engine, size)."""
    from benchmarks.report import pyplot, save_figure

    plt = pyplot()
    results = doc.get("results", [])
    if plt is None or not results:
        return False
    ks = sorted({r["k"] for r in results})
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in results:
            if r["k"] == k:
                series.setdefault(f"{r['kind']} n={r['size']:,}", []).append(
                    (r.get("params", {}).get("ef_search", 0), r["per_query"]["p50_ms"], r["recall"]))
        for name, pts in series.items():
            pts.sort()  # HNSW: by efSearch, so the line is the recall/latency trade-off curve
            ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("per-query latency p50 (ms, log)")
        ax.set_ylabel(f"recall@{k}")
        ax.set_title(f"k={k}, {results[0]['bits']}-bit codes, {results[0]['threads']} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)

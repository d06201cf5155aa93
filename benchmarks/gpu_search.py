"""`python -m benchmarks.gpu_search`: brute-force Hamming k-NN on a GPU over millions of codes.

Methods (each where available):

* ``torch-flat`` the served index kind itself (serve/gallery/torch_index.py), as `hashret serve`
  searches a torch-flat gallery: its own chunking (not --max-matrix-bytes), exact FAISS tie order,
  distances by its fused CuPy kernel where CuPy runs, else by torch (the row's ``scan``);
* ``cupy-popc``  a CuPy elementwise kernel: __popcll(q XOR code) per 64-bit word, then a top-k;
* ``torch-lut``  torch: XOR the packed bytes, a 256-entry popcount lookup table, sum per code;
* ``torch-swar`` torch: XOR as int32 words and the SWAR bit-count (shift/mask/add), sum per code.

Top-k is torch.topk / cupy argpartition on the distances. Latency is measured one query per
call (p50/p99, synchronised) and for a batch of queries (chunked so the [chunk, N] distance
matrix stays within --max-matrix-bytes). Recall@k (tie-aware, see benchmarks.search) is checked
against exact CPU brute force on --check-queries queries. The same code runs on --device cpu
(torch methods), which is how it is tested without a GPU.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np

from benchmarks import machine, search
from benchmarks.cli import run_main, standalone_parser
from benchmarks.machine import add_out_arg, int_list, percentiles, print_table, str_list, write_result
from hashret.cliargs import add_device_arg
from hashret.errors import BadInput, HashretError, Unavailable

log = logging.getLogger("hashret.bench.gpu_search")

METHODS = ("torch-flat", "cupy-popc", "torch-lut", "torch-swar")


class TorchSearcher:
    """Packed codes on a torch device; search(queries uint8 [Q, nb], k) -> (dist, ids) numpy."""

    def __init__(self, db: np.ndarray, device: str, method: str, max_matrix_bytes: int):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.method = method
        self.n, self.nb = db.shape
        self.max_matrix_bytes = max_matrix_bytes
        if method == "torch-swar":
            if self.nb % 4:
                raise BadInput(f"torch-swar | needs bits a multiple of 32, got {self.nb * 8}")
            self.db = torch.from_numpy(np.ascontiguousarray(db).view(np.int32)).to(self.device)
        else:
            self.db = torch.from_numpy(np.ascontiguousarray(db)).to(self.device)
            lut = np.array([bin(i).count("1") for i in range(256)], np.uint8)
            self.lut = torch.from_numpy(lut).to(self.device)

    def bytes_on_device(self) -> int:
        return int(self.db.numel() * self.db.element_size())

    def _dist(self, q):
        torch = self.torch
        x = torch.bitwise_xor(q[:, None, :], self.db[None, :, :])  # [c, N, w]
        if self.method == "torch-lut":
            return self.lut[x.long()].sum(dim=2, dtype=torch.int32)
        m1, m2, m4 = 0x55555555, 0x33333333, 0x0F0F0F0F
        x = x - ((x >> 1) & m1)
        x = (x & m2) + ((x >> 2) & m2)
        x = (x + (x >> 4)) & m4
        x = (x + (x >> 8))
        x = (x + (x >> 16)) & 0x3F
        return x.sum(dim=2, dtype=torch.int32)

    def search(self, queries: np.ndarray, k: int):
        torch = self.torch
        k = min(k, self.n)
        qs = np.ascontiguousarray(queries)
        q = torch.from_numpy(qs.view(np.int32) if self.method == "torch-swar" else qs).to(self.device)
        # temporaries per query: XOR bytes + int64 LUT indices (lut) or ~3 int32 words (swar)
        per_query = self.n * self.nb * (9 if self.method == "torch-lut" else 3)
        chunk = max(1, self.max_matrix_bytes // max(1, per_query))
        dists, ids = [], []
        for s in range(0, q.shape[0], chunk):
            d = self._dist(q[s:s + chunk])
            v, i = torch.topk(d, k, dim=1, largest=False, sorted=True)
            dists.append(v)
            ids.append(i)
        d, i = torch.cat(dists), torch.cat(ids)
        return d.cpu().numpy(), i.cpu().numpy()

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


class CupySearcher:
    """__popcll over uint64 words in a CuPy elementwise kernel."""

    def __init__(self, db: np.ndarray, device: str, method: str, max_matrix_bytes: int):
        try:
            import cupy as cp
        except Exception as e:
            raise Unavailable(f"cupy-popc | cupy not importable ({type(e).__name__}: {e}): "
                              "pip install cupy-cuda13x (cupy-cuda12x on a CUDA 12 host)") from None
        if not device.startswith("cuda"):
            raise Unavailable("cupy-popc | needs --device cuda")
        self.cp = cp
        self.n, self.nb = db.shape
        if self.nb % np.dtype(np.uint64).itemsize:  # scanned as whole 64-bit words
            raise BadInput(f"cupy-popc | needs bits a multiple of 64, got {self.nb * 8}")
        self.w = self.nb // 8
        self.db = cp.asarray(np.ascontiguousarray(db).view(np.uint64))  # [N, w]
        self.max_matrix_bytes = max_matrix_bytes
        self.kernel = cp.ElementwiseKernel(
            "raw uint64 q, raw uint64 db, int32 w, int64 n", "int32 d",
            """
            long long qi = i / n, j = i % n;
            int s = 0;
            for (int t = 0; t < w; ++t) s += __popcll(q[qi * w + t] ^ db[j * w + t]);
            d = s;
            """,
            "hashret_hamming",
        )

    def bytes_on_device(self) -> int:
        return int(self.db.nbytes)

    def search(self, queries: np.ndarray, k: int):
        cp = self.cp
        k = min(k, self.n)
        q = cp.asarray(np.ascontiguousarray(queries).view(np.uint64))
        chunk = max(1, self.max_matrix_bytes // max(1, self.n * 4))
        dists, ids = [], []
        for s in range(0, q.shape[0], chunk):
            qc = q[s:s + chunk]
            d = cp.empty((qc.shape[0], self.n), cp.int32)
            self.kernel(qc, self.db, np.int32(self.w), np.int64(self.n), d)
            idx = cp.argpartition(d, k - 1, axis=1)[:, :k] if k < self.n else cp.broadcast_to(cp.arange(self.n), d.shape)
            dk = cp.take_along_axis(d, idx, axis=1)
            order = cp.argsort(dk, axis=1)
            dists.append(cp.take_along_axis(dk, order, axis=1))
            ids.append(cp.take_along_axis(idx, order, axis=1))
        return cp.asnumpy(cp.concatenate(dists)), cp.asnumpy(cp.concatenate(ids))

    def sync(self):
        self.cp.cuda.Device().synchronize()


class IndexSearcher:
    """The torch-flat index kind, searched as the gallery searches it (its chunking, its kernel)."""

    def __init__(self, db: np.ndarray, device: str):
        import torch

        from serve.gallery.torch_index import TorchFlatIndex, resolve_device

        self.torch = torch
        self.device = resolve_device(device, "--device")
        self.index = TorchFlatIndex(db.shape[1] * 8, self.device)
        self.index.add(db)

    def bytes_on_device(self) -> int:
        return self.index.bytes_on_device()

    def search(self, queries: np.ndarray, k: int):
        return self.index.search(queries, k)

    def details(self) -> dict[str, Any]:
        return {"scan": self.index.scan_method}

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)


def make(method: str, db: np.ndarray, device: str, max_matrix_bytes: int):
    if method == "torch-flat":
        return IndexSearcher(db, device)
    if method == "cupy-popc":
        return CupySearcher(db, device, method, max_matrix_bytes)
    if method in ("torch-lut", "torch-swar"):
        try:
            import torch
        except Exception as e:
            raise Unavailable(f"{method} | torch not importable ({e})") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise Unavailable(f"{method} | --device {device} but torch sees no CUDA GPU")
        return TorchSearcher(db, device, method, max_matrix_bytes)
    raise BadInput(f"--methods {method!r} | unknown: choose from {', '.join(METHODS)}")


def bench_method(s, queries: np.ndarray, db: np.ndarray, k: int, warmup: int, check: int, exact) -> dict:
    for i in range(warmup):
        s.search(queries[i % len(queries):i % len(queries) + 1], k)
    s.sync()
    lat = []
    for i in range(len(queries)):
        t = time.perf_counter()
        s.search(queries[i:i + 1], k)  # returns numpy: synchronised by the copy back
        lat.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    d, ids = s.search(queries, k)
    bt = (time.perf_counter() - t) * 1e3
    out = {"per_query": {**percentiles(lat), "qps": round(len(lat) / (sum(lat) / 1e3), 1)},
           "batch": {"queries": len(queries), "total_ms": round(bt, 3), "per_query_ms": round(bt / len(queries), 4),
                     "qps": round(len(queries) / (bt / 1e3), 1)}}
    if exact is not None:
        out["recall"] = round(search.recall_at_k(queries[:check], db, ids[:check], exact), 4)
        out["recall_queries"] = int(check)
    return out


def run_gpu_search(sizes, bits=64, n_queries=100, ks=(10, 100), methods=METHODS, device="cuda", data="real",
                   warmup=5, check_queries=10, max_matrix_bytes=1 << 30, seed=0, progress=print) -> dict:
    results, skipped = [], []
    max_n = max(sizes)
    t0 = time.perf_counter()
    db_all, queries = search.make_codes(max_n, bits, data, 1000, 0.1, seed, n_queries)
    progress(f"data: {max_n:,} {data} {bits}-bit codes + {n_queries} queries in {time.perf_counter() - t0:.1f} s")
    gpu = None
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                gpu = torch.cuda.get_device_name(torch.device(device))
        except Exception:
            pass
    for n in sorted(sizes):
        db = db_all[:n]
        check = min(check_queries, n_queries)
        exact = {k: search.exact_distances(queries[:check], db, k) for k in ks} if check else {}
        for method in methods:
            try:
                s = make(method, db, device, max_matrix_bytes)
            except HashretError as e:
                skipped.append({"method": method, "kind": method, "size": n, "reason": str(e)})
                progress(f"skip {method}: {e}")
                continue
            except Exception as e:
                skipped.append({"method": method, "kind": method, "size": n, "reason": f"{type(e).__name__}: {e}"})
                progress(f"skip {method}: {type(e).__name__}: {e}")
                continue
            for k in ks:
                try:
                    r = bench_method(s, queries, db, k, warmup, check, exact.get(k))
                except Exception as e:  # e.g. out of GPU memory at a large size
                    skipped.append({"method": method, "kind": method, "size": n, "k": k,
                                    "reason": f"failed: {type(e).__name__}: {e}"})
                    progress(f"skip {method} k={k}: {type(e).__name__}: {e}")
                    continue
                row = {"method": method, "device": device, "gpu": gpu, "size": n, "bits": bits, "k": k,
                       "device_bytes": s.bytes_on_device(), **getattr(s, "details", dict)(), **r}
                results.append(row)
                progress(f"  {method:<11} n={n:>11,} k={k:<4} p50 {r['per_query']['p50_ms']:.3f} ms "
                         f"batch {r['batch']['per_query_ms']:.4f} ms/q recall {r.get('recall', '-')}")
            del s
    config = {"sizes": list(sizes), "bits": bits, "queries": n_queries, "k": list(ks), "methods": list(methods),
              "device": device, "data": data, "warmup": warmup, "check_queries": check_queries,
              "max_matrix_bytes": max_matrix_bytes, "seed": seed}
    notes = ["Per-query latency includes the host->device query copy and the device->host result copy.",
             f"recall: tie-aware recall@k against exact CPU brute force on the first {check_queries} queries."]
    return {"config": config, "results": results, "skipped": skipped, "notes": notes}


HEAD = ["method", "device", "size", "bits", "k", "q p50 ms", "q p99 ms", "batch ms/q", "recall@k", "device MiB"]


def report_table(doc: dict[str, Any]):
    rows = []
    for r in doc.get("results", []):
        method = r["method"] + (f" ({r['scan']})" if r.get("scan") else "")
        rows.append([method, r.get("gpu") or r["device"], f"{r['size']:,}", r["bits"], r["k"],
                     f"{r['per_query']['p50_ms']:.3f}", f"{r['per_query']['p99_ms']:.3f}",
                     f"{r['batch']['per_query_ms']:.4f}", r.get("recall", "-"),
                     f"{r['device_bytes'] / 2**20:.1f}"])
    return HEAD, rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", type=int_list, default=[10_000_000], metavar="N,N",
                   help="gallery sizes (default: 10000000)")
    p.add_argument("--bits", type=int, default=64, help="code length (default: 64)")
    p.add_argument("--queries", type=int, default=100, help="query codes (default: 100)")
    p.add_argument("--k", type=int_list, default=[10, 100], metavar="K,K", help="neighbours (default: 10,100)")
    p.add_argument("--methods", type=str_list, default=list(METHODS), metavar="M,M",
                   help=f"from {', '.join(METHODS)} (default: all; unavailable ones are skipped)")
    add_device_arg(p, default="cuda", help="cuda, cuda:N or cpu (torch methods only)")
    p.add_argument("--data", choices=("real", "random"), default="real",
                   help="codes with class structure, or uniform bits (default: real)")
    p.add_argument("--warmup", type=int, default=5, help="untimed searches first (default: 5)")
    p.add_argument("--check-queries", type=int, default=10,
                   help="queries whose recall is checked against CPU brute force (default: 10)")
    p.add_argument("--max-matrix-bytes", type=int, default=1 << 30,
                   help="largest [queries, N] distance matrix per chunk (default: 1073741824)")
    p.add_argument("--seed", type=int, default=0, help="seed of the codes (default: 0)")
    add_out_arg(p, "gpu-search")


def run(args) -> int:
    out = run_gpu_search(args.sizes, args.bits, args.queries, args.k, args.methods, args.device, args.data,
                         args.warmup, args.check_queries, args.max_matrix_bytes, args.seed)
    meta = machine.run_meta("gpu-search", threads={"device": args.device}, argv=getattr(args, "_argv", None))
    doc = {**meta, **out}
    print()
    print_table(*report_table(doc))
    for s in out["skipped"]:
        print(f"skipped: {s['method']} at {s['size']:,}: {s['reason']}")
    path = write_result(doc, args.out)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(standalone_parser("python -m benchmarks.gpu_search", __doc__, add_args), run, argv)


if __name__ == "__main__":
    sys.exit(main())

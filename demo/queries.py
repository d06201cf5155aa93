"""Ask the running service, as any client would, and score what it answered.

Scores come from the served answers only (ids and their `label` metadata), never from the model, so
they measure the whole path: decode, engine, codes, index and the gRPC round trip.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hashret.metrics import mean_average_precision_ranked

K_RETRIEVAL = 10
K_SHOP = 5
RETRIES = 5  # Search calls answered RESOURCE_EXHAUSTED (a full queue) are retried with back-off


@dataclass
class Answer:
    path: str
    label: int
    hits: list = field(default_factory=list)  # serve.client.Hit
    ms: float = float("nan")
    error: str | None = None


def hit_label(h) -> int | None:
    """The class id a gallery item was indexed with; None when its metadata has none."""
    try:
        return int(h.metadata.get("label"))
    except (TypeError, ValueError):
        return None


def query_server(addr: str, queries, k: int, concurrency: int, what: str,
                 rerank_factor: int | None = None) -> tuple[list[Answer], float]:
    """Search each query image (one Search call each, `concurrency` in flight); per-call latency.

    rerank_factor: as the Search request field (None: the server's default, 0: Hamming order only).

    Returns the answers in query order and the wall time of the whole batch (for throughput).
    """
    import grpc

    from serve.client import RetrievalClient

    answers = [Answer(s.path, int(s.label)) for s in queries]
    done = [0]
    t_start = time.perf_counter()
    last = [t_start]

    with RetrievalClient(addr, timeout=120.0) as client:
        def one(a: Answer) -> None:
            try:
                data = Path(a.path).read_bytes()
            except OSError as e:
                a.error = f"cannot read ({e.strerror})"
                return
            for attempt in range(RETRIES):
                t = time.perf_counter()
                try:
                    a.hits = client.search(data, k=k, rerank_factor=rerank_factor)
                    a.ms = (time.perf_counter() - t) * 1e3
                    a.error = None
                    break
                except grpc.RpcError as e:
                    a.error = f"{e.code().name}: {e.details()}"
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                    time.sleep(0.05 * 2 ** attempt)
            done[0] += 1
            now = time.perf_counter()
            if now - last[0] > 15:
                last[0] = now
                print(f"      {what}: {done[0]}/{len(answers)} queries", flush=True)

        with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="hashret-demo-query") as pool:
            list(pool.map(one, answers))
    return answers, time.perf_counter() - t_start


def _relevance(answers: list[Answer], k: int) -> np.ndarray:
    """[Q, k] bool: whether each answer's hit at each rank has the query's class; a shorter
    answer list (a gallery smaller than k) is padded with misses."""
    rel = np.zeros((len(answers), k), dtype=bool)
    for i, a in enumerate(answers):
        for r, h in enumerate(a.hits[:k]):
            rel[i, r] = hit_label(h) == a.label
    return rel


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def retrieval_scores(answers: list[Answer], k: int = K_RETRIEVAL) -> dict:
    """mAP@k, precision@k and top-1 over the answered queries (failed ones are counted apart)."""
    ok = [a for a in answers if a.error is None]
    rel = _relevance(ok, k)
    return {"queries": len(answers), "failed": len(answers) - len(ok),
            f"mAP@{k}": mean_average_precision_ranked(rel) if ok else float("nan"),
            f"precision@{k}": _mean(rel.sum(axis=1) / k), "top1": _mean(rel[:, 0])}


def accuracy_scores(answers: list[Answer], k: int = K_SHOP) -> dict:
    """Top-1 and top-k accuracy: the query's class is the first hit / among the first k."""
    ok = [a for a in answers if a.error is None]
    rel = _relevance(ok, k)
    return {"queries": len(answers), "failed": len(answers) - len(ok), "top1": _mean(rel[:, 0]),
            f"top{k}": _mean(rel.any(axis=1))}


def offline_scores(exp_dir: Path, gallery_dir: Path, queries, backend: str, k: int = K_RETRIEVAL) -> dict:
    """mAP@k, binary and re-ranked, computed offline from what the server searched: the gallery's
    stored codes and activations, and the query photos encoded by the same engine (one at a time).

    A served answer that differs from these is a serving bug, not a model effect.
    """
    from hashret import codes as hcodes
    from hashret.engines import open_engine
    from hashret.images import PreprocessSpec, load_image
    from hashret.manifest import load_manifest
    from hashret.metrics import mean_average_precision, rerank_map
    from serve.gallery import open_gallery

    spec = PreprocessSpec.from_dict(load_manifest(exp_dir, kind="export").get("preprocessing") or {})
    with open_engine(exp_dir, backend, "cpu") as eng:
        qZ = np.concatenate([eng.encode(load_image(s.path, spec)[None]) for s in queries]).astype(np.float32)
    with open_gallery(gallery_dir) as g:
        ids = g.ids()
        rows = [g.get(i) for i in ids]
        dZ = g.stored_activations() if g.has_activations else None
    dB = np.stack([c for c, _ in rows])
    dL = np.array([int(m.get("label", -1)) for _, m in rows])
    qL = np.array([int(s.label) for s in queries])
    qB = hcodes.pack(qZ)
    out = {f"mAP@{k}": mean_average_precision(qB, dB, qL, dL, topk=k)}
    if dZ is not None:
        out[f"mAP@{k}(rerank)"] = rerank_map(qB, dB, qZ, dZ, qL, dL, topk=k)
    return out


def latency_stats(answers: list[Answer], wall_s: float, concurrency: int) -> dict:
    """Per-call latency percentiles (ms) of the answered queries, and the batch's throughput."""
    ms = np.array([a.ms for a in answers if a.error is None], dtype=float)
    if not len(ms):
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None,
                "throughput_qps": 0.0, "concurrency": concurrency}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2),
            "mean": round(float(ms.mean()), 2), "max": round(float(ms.max()), 2),
            "throughput_qps": round(len(ms) / max(wall_s, 1e-9), 2), "concurrency": concurrency}

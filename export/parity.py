"""Parity of every backend against the torch fp32 reference: does each one give the same codes?

Hash codes are signs, so what matters is not the usual max-abs-diff but how many bits flip and
whether rankings change. Per backend: status, file size, max |activation diff|, bit_agreement
(share of equal sign bits vs torch), at_risk (share of its activations with |z| < 0.05, i.e.
bits one small perturbation from flipping), mAP@all / mAP@10 and their delta vs torch, the same
two after re-ranking each Hamming shortlist by cosine (hashret.metrics.rerank_map, what a server
over a gallery built with this backend's activations answers),
top10_overlap (mean share of each query's Hamming top-10 that torch's top-10 also holds), and
bs=1 latency. Functions are reusable (the benchmarks call `parity_rows`).
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from hashret.codes import hamming, pack
from hashret.engines import backend_spec, open_engine
from hashret.errors import HashretError, Unavailable
from hashret.fsutil import write_json_atomic
from hashret.metrics import rerank_map
from hashret.manifest import now_iso

from export.data import batches
from export.golden import split_maps

log = logging.getLogger(__name__)

AT_RISK = 0.05
REFERENCE = "torch"
COLUMNS = ("backend", "status", "file_mb", "max_abs_diff", "bit_agreement", "at_risk", "mAP@all", "mAP@10",
           "mAP@all(rerank)", "mAP@10(rerank)", "mAP_delta", "top10_overlap", "latency_ms_bs1")


def parse_backend(text: str) -> tuple[str, dict]:
    """"openvino:precision=bf16,threads=2" -> ("openvino", {"precision": "bf16", "threads": 2})."""
    name, _, rest = text.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        opts[k.strip()] = int(v) if v.strip().isdigit() else v.strip()
    return name.strip(), opts


def encode_all(engine, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([engine.encode(b) for b in batches(images, batch)])


def latency_ms(engine, image: np.ndarray, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of encode() on one image (a batch of 1)."""
    x = image[None] if image.ndim == 3 else image[:1]
    for _ in range(warmup):
        engine.encode(x)
    times = []
    for _ in range(max(1, runs)):
        t = time.perf_counter()
        engine.encode(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def top_k_overlap(B: np.ndarray, R: np.ndarray, is_query: np.ndarray, k: int = 10) -> float:
    """Mean |topk(B) ∩ topk(R)| / k over queries, rankings by Hamming distance (stable ties)."""
    qB, dB, qR, dR = B[is_query], B[~is_query], R[is_query], R[~is_query]
    if len(qB) == 0 or len(dB) == 0:
        return float("nan")
    k = min(k, len(dB))
    a = np.argsort(hamming(qB, dB), axis=1, kind="stable")[:, :k]
    b = np.argsort(hamming(qR, dR), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def rerank_maps(acts: np.ndarray, labels: np.ndarray, is_query: np.ndarray) -> dict:
    """mAP@all(rerank) and mAP@10(rerank) of the golden split (NaN when a side is empty)."""
    if not is_query.any() or is_query.all():
        return {"mAP@all(rerank)": float("nan"), "mAP@10(rerank)": float("nan")}
    q, d = acts[is_query], acts[~is_query]
    qL, dL = labels[is_query], labels[~is_query]
    return {
        "mAP@all(rerank)": rerank_map(pack(q), pack(d), q, d, qL, dL, topk=None),
        "mAP@10(rerank)": rerank_map(pack(q), pack(d), q, d, qL, dL, topk=10),
    }


def compare(acts: np.ndarray, ref: np.ndarray, labels: np.ndarray, is_query: np.ndarray,
            ref_maps: dict | None = None) -> dict:
    """The parity columns of one backend's activations against the reference activations."""
    maps = split_maps(acts, labels, is_query)
    ref_maps = ref_maps or split_maps(ref, labels, is_query)
    return {
        "max_abs_diff": float(np.abs(acts - ref).max()),
        "bit_agreement": float(((acts >= 0) == (ref >= 0)).mean()),
        "at_risk": float((np.abs(acts) < AT_RISK).mean()),
        "mAP@all": maps["mAP@all"],
        "mAP@10": maps["mAP@10"],
        **rerank_maps(acts, labels, is_query),
        "mAP_delta": maps["mAP@all"] - ref_maps["mAP@all"],
        "top10_overlap": top_k_overlap(pack(acts), pack(ref), is_query),
    }


def run_backend(exp_dir, backend: str, images: np.ndarray, *, device: str = "cpu", latency_runs: int = 20,
                batch: int = 32) -> tuple[np.ndarray, dict]:
    """Encode images with one backend ("name[:opt=v,...]"); returns (activations, facts)."""
    name, opts = parse_backend(backend)
    with open_engine(exp_dir, name, device, **opts) as eng:
        acts = encode_all(eng, images, batch)
        lat = latency_ms(eng, images[0], latency_runs) if latency_runs > 0 else float("nan")
        facts = {"latency_ms_bs1": lat, "engine": eng.describe()}
    f = Path(exp_dir) / backend_spec(name).file
    facts["file_mb"] = f.stat().st_size / 1e6 if f.is_file() else float("nan")
    return acts, facts


def parity_rows(exp_dir, backends: Sequence[str], images: np.ndarray, labels: np.ndarray, is_query: np.ndarray, *,
                reference: np.ndarray | None = None, device: str = "cpu", latency_runs: int = 20,
                batch: int = 32, progress: bool = True) -> list[dict]:
    """One row per backend; the torch fp32 reference is computed first unless given."""
    from tqdm import tqdm

    rows = []
    if reference is None or REFERENCE in backends:
        ref, facts = run_backend(exp_dir, REFERENCE, images, device="cpu", latency_runs=latency_runs, batch=batch)
        if reference is None:
            reference = ref
        if REFERENCE in backends:
            rows.append({"backend": REFERENCE, "status": "ok", **compare(ref, reference, labels, is_query), **facts})
    ref_maps = split_maps(reference, labels, is_query)
    todo = [b for b in backends if b != REFERENCE]
    for b in tqdm(todo, desc="parity", unit="backend", disable=not progress or len(todo) < 2, leave=False):
        try:
            acts, facts = run_backend(exp_dir, b, images, device=device, latency_runs=latency_runs, batch=batch)
        except Unavailable as e:
            rows.append({"backend": b, "status": f"skipped: {e}"})
            continue
        except HashretError as e:
            rows.append({"backend": b, "status": f"error: {e}"})
            continue
        except Exception as e:  # a backend bug must not hide the other rows
            log.exception("parity: backend %s failed", b)
            rows.append({"backend": b, "status": f"error: {type(e).__name__}: {e}"})
            continue
        rows.append({"backend": b, "status": "ok", **compare(acts, reference, labels, is_query, ref_maps), **facts})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
    """A plain-text table; a skipped or failed row shows its status and dashes."""
    cells = [[c for c in columns]]
    for r in rows:
        status = r.get("status", "")
        short = status if len(status) <= 60 else status[:57] + "..."
        cells.append([short if c == "status" else _fmt(r.get(c)) for c in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parity_report(exp_dir: str | os.PathLike, backends: Sequence[str], golden: dict, *, splits=None,
                  spec=None, max_query: int = 500, max_database: int = 1000, latency_runs: int = 20,
                  device: str = "cpu", seed: int = 0) -> dict:
    """Parity on the golden set and, when `splits` is given, on a capped query/database split;
    writes EXP/parity.json and returns it."""
    report = {"created": now_iso(), "reference": REFERENCE, "at_risk_threshold": AT_RISK, "device": device}
    g_rows = parity_rows(exp_dir, backends, golden["images"], golden["labels"], golden["is_query"],
                         reference=golden["activations"], device=device, latency_runs=latency_runs)
    report["golden"] = {"n": int(len(golden["labels"])), "queries": int(golden["is_query"].sum()), "rows": g_rows}
    if splits is not None and spec is not None and (max_query > 0 and max_database > 0):
        from export.data import load_images, pick

        q = pick(splits.query, max_query, seed)
        qs = set(q)
        d = pick([s for s in splits.database if s not in qs], max_database, seed + 1)
        images = load_images(q + d, spec, "parity images")
        labels = np.array([s.label for s in q + d], dtype=np.int64)
        is_query = np.array([True] * len(q) + [False] * len(d))
        rows = parity_rows(exp_dir, backends, images, labels, is_query, device=device, latency_runs=0)
        report["dataset"] = {"root": splits.root, "format": splits.format, "queries": len(q), "database": len(d),
                             "rows": rows}
    write_json_atomic(Path(exp_dir) / "parity.json", json_safe(report))
    return report


def json_safe(obj):
    """NaN/inf -> None, so parity.json is strict JSON that any tool can read."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj

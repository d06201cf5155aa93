"""`hashret bench engine EXP`: encoder latency and throughput per backend x batch size.

Every backend of hashret.engines that this machine can run (and whose file the export holds)
encodes random uint8 images [B, crop, crop, 3] after --warmup calls; each of the next --iters
calls (or as many as fit in --max-seconds) is timed end to end, numpy in -> numpy out, so
host<->device copies are included on a GPU. Reported per (backend, batch): p50/p90/p99 latency
of one call, per-image latency, and images/s = B / mean latency. Backends that cannot run here
are listed with the reason (package missing, no GPU, file not exported, ...).

Backends are the engine registry's (hashret.engines.ENGINES), in registration order, so a newly
registered backend is timed without touching this file. Threads: --threads N is passed as each
backend's own thread option, named by its registry entry (torch `threads`, ONNX Runtime
`intra_op_threads`, OpenVINO `threads`); 0 leaves each library's default. The thread counts in
force are recorded per backend from the engine's describe() (the keys naming threads).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks import machine
from benchmarks.machine import add_out_arg, int_list, percentiles, print_table, str_list, write_result
from hashret.cliargs import add_device_arg
from hashret.errors import BadInput, HashretError

log = logging.getLogger("hashret.bench.engine")

DEFAULT_BATCHES = "1,8,32,128"


def all_backends() -> list[str]:
    """Every registered backend, in registration order (the reference, torch, first)."""
    from hashret.engines import ENGINES

    return [name for name, _ in ENGINES.items()]


def thread_options(backend: str, threads: int) -> dict[str, int]:
    """--threads N as `backend`'s own option ({} for 0, an unregistered name, or no thread option)."""
    from hashret.engines import ENGINES

    if threads <= 0 or backend not in ENGINES:
        return {}
    return ENGINES.get(backend).thread_options(threads)


def parse_option(text: str) -> tuple[str, Any]:
    """'precision=fp32' -> ('precision', 'fp32'); ints, floats, true/false parsed; a value with
    commas (or empty) is a tuple of ints, e.g. 'graph_batches=1,8,32' or 'graph_batches='."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. precision=fp32")
    v = value.strip()
    if v == "" or "," in v:
        try:
            return key.strip(), tuple(int(p) for p in v.split(",") if p.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a comma list must hold integers") from None
    if v.lower() in ("true", "false"):
        return key.strip(), v.lower() == "true"
    for conv in (int, float):
        try:
            return key.strip(), conv(v)
        except ValueError:
            pass
    return key.strip(), v


def _threads_in_force(eng) -> dict[str, Any]:
    """The thread counts the engine reports (each runner's describe() names its own)."""
    try:
        d = eng.describe()
    except Exception:
        return {}
    return {k: v for k, v in d.items() if "thread" in k.lower()}


def _describe(eng) -> dict[str, Any]:
    try:
        d = eng.describe()
    except Exception:
        return {}
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in d.items()}


def time_batches(eng, size: int, batches: list[int], iters: int, warmup: int, max_seconds: float,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Latency of eng.encode on random [B, size, size, 3] uint8 batches, one dict per batch size."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in batches:
        x = rng.integers(0, 256, size=(b, size, size, 3), dtype=np.uint8)
        t_start = time.perf_counter()
        for _ in range(warmup):
            eng.encode(x)
        warm_s = time.perf_counter() - t_start
        lat = []
        t0 = time.perf_counter()
        cpu0 = time.process_time()  # every thread of this process: the engine's own pool included
        while len(lat) < iters:
            t = time.perf_counter()
            eng.encode(x)
            lat.append((time.perf_counter() - t) * 1e3)
            if time.perf_counter() - t0 > max_seconds and len(lat) >= 3:
                break
        cpu_ms = (time.process_time() - cpu0) * 1e3 / len(lat)
        p = percentiles(lat)
        rows.append({"batch": b, "iters": len(lat), "warmup": warmup, "warmup_s": round(warm_s, 3),
                     **p, "per_image_ms": round(p["mean_ms"] / b, 4),
                     "cpu_ms_per_batch": round(cpu_ms, 4), "cpu_ms_per_image": round(cpu_ms / b, 4),
                     "img_per_s": round(b / (p["mean_ms"] / 1e3), 2),
                     "stopped_by_time": len(lat) < iters})
    return rows


def run_engine_bench(exp: str | Path, backends: list[str], device: str = "cpu", batches=(1, 8, 32, 128),
                     iters: int = 20, warmup: int = 3, threads: int = 0, options: dict | None = None,
                     max_seconds: float = 20.0, label: str = "",
                     opener: Callable | None = None, size: int | None = None,
                     progress=print) -> dict[str, Any]:
    """Benchmark each backend; `opener(exp, backend, device, **opts)` defaults to open_engine."""
    if opener is None:
        from hashret.engines import open_engine as opener
    exp_info: dict[str, Any] = {"path": str(exp)}
    if size is None:
        from hashret.manifest import load_manifest

        m = load_manifest(exp, kind="export")
        try:
            size = int(m["preprocessing"]["crop"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{exp}/manifest.json | lacks preprocessing.crop: re-export it") from None
        exp_info.update(bits=m.get("bits"), crop=size, backbone=(m.get("backbone") or {}).get("name"),
                        method=(m.get("method") or {}).get("name"),
                        files=sorted(((m.get("export") or {}).get("files") or {}).keys()))
    results, skipped = [], []
    for backend in backends:
        opts = {**thread_options(backend, threads), **(options or {})}  # an explicit --option wins
        t0 = time.perf_counter()
        try:
            eng = opener(exp, backend, device, **opts)
        except HashretError as e:
            skipped.append({"backend": backend, "device": device, "reason": str(e)})
            progress(f"skip {backend}: {e}")
            continue
        except Exception as e:  # a backend that fails to load must not end the whole run
            skipped.append({"backend": backend, "device": device, "reason": f"failed to load: {type(e).__name__}: {e}"})
            progress(f"skip {backend}: failed to load: {type(e).__name__}: {e}")
            continue
        load_s = time.perf_counter() - t0
        try:
            rows = time_batches(eng, size, list(batches), iters, warmup, max_seconds)
            thr = _threads_in_force(eng)
            desc = _describe(eng)
        except Exception as e:
            skipped.append({"backend": backend, "device": device, "reason": f"failed while running: {type(e).__name__}: {e}"})
            progress(f"skip {backend}: failed while running: {type(e).__name__}: {e}")
            continue
        finally:
            try:
                eng.close()
            except Exception:
                pass
        name = label.replace("{backend}", backend) if label else backend
        for r in rows:
            results.append({"backend": backend, "label": name, "device": device,
                            "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
                            "threads": thr, "engine": desc, "load_s": round(load_s, 3), **r})
            progress(f"  {name:<16} {device:<6} batch {r['batch']:>4}: p50 {r['p50_ms']:9.3f} ms "
                     f"p99 {r['p99_ms']:9.3f} ms  {r['img_per_s']:9.1f} img/s ({r['iters']} iters)")
    config = {"exp": exp_info, "backends": list(backends), "device": device, "batches": list(batches),
              "iters": iters, "warmup": warmup, "threads": threads, "max_seconds": max_seconds,
              "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in (options or {}).items()},
              "label": label, "input": "random uint8 images, numpy in -> numpy out (copies included)"}
    return {"config": config, "results": results, "skipped": skipped}


# --------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("exp", metavar="EXP", help="export folder from `hashret export` (its manifest.json names the files)")
    p.add_argument("--backends", type=str_list, default=None, metavar="B,B",
                   help=f"backends to time, from {', '.join(all_backends())} (default: every registered backend; "
                        "those this machine or export cannot run are listed as skipped)")
    add_device_arg(p, default="cpu",
                   help="device passed to every engine: cpu, cuda[:N]; for ort also tensorrt (the TensorRT EP)")
    p.add_argument("--batches", type=int_list, default=int_list(DEFAULT_BATCHES), metavar="B,B",
                   help=f"batch sizes (default: {DEFAULT_BATCHES})")
    p.add_argument("--iters", type=int, default=20, help="timed calls per batch size (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default: 3)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a batch size after this many seconds (at least 3 calls) (default: 20)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per engine, passed as each backend's own thread option (torch threads / "
                        "ORT intra-op / OpenVINO threads); 0 = each library's default (default: 0)")
    p.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="engine option for every backend, repeatable, e.g. precision=fp32 or graph_batches= "
                        "(default: none)")
    p.add_argument("--label", default="",
                   help="name of these rows in tables and plots; {backend} is replaced by the backend, "
                        "e.g. '{backend}@cuda-ep' or torch-fp16-graphs (default: the backend)")
    add_out_arg(p, "engine")


def report_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["backend", "device", "batch", "iters", "p50 ms", "p90 ms", "p99 ms", "ms/img", "img/s", "threads"]
    rows = []
    for r in doc.get("results", []):
        thr = ", ".join(f"{k}={v}" for k, v in (r.get("threads") or {}).items()) or "default"
        rows.append([r.get("label") or r["backend"], r["device"], r["batch"], r["iters"], f"{r['p50_ms']:.3f}",
                     f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['per_image_ms']:.3f}",
                     f"{r['img_per_s']:.1f}", thr])
    return head, rows


def plot(doc: dict[str, Any], path: Path) -> bool:
    """p50 latency vs batch and images/s vs batch, one line per backend (log-log)."""
    from benchmarks.report import pyplot, save_figure

    plt = pyplot()
    res = doc.get("results", [])
    if plt is None or not res:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in res:
        series.setdefault(f"{r.get('label') or r['backend']} ({r['device']})", []).append(r)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch"])
        xs = [r["batch"] for r in rows]
        a1.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=name)
        a2.plot(xs, [r["img_per_s"] for r in rows], marker="o", label=name)
    for ax, yl in ((a1, "latency per call, p50 (ms)"), (a2, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    a1.set_title("latency vs batch")
    a2.set_title("throughput vs batch")
    return save_figure(fig, path)


def run(args) -> int:
    known = all_backends()
    backends = args.backends or known
    unknown = [b for b in backends if b not in known]
    if unknown:
        raise BadInput(f"--backends {','.join(unknown)} | unknown backend: choose from {', '.join(known)}")
    if min(args.batches) < 1 or args.iters < 1 or args.warmup < 0:
        raise BadInput("--batches/--iters/--warmup | need batch sizes >= 1, iters >= 1, warmup >= 0")
    out = run_engine_bench(args.exp, backends, args.device, args.batches, args.iters, args.warmup,
                           args.threads, dict(args.option), args.max_seconds, args.label)
    threads = {r["label"]: r["threads"] for r in out["results"]}
    meta = machine.run_meta("engine", threads={"requested": args.threads or "library default", **threads},
                            argv=getattr(args, "_argv", None))
    doc = {**meta, **out}
    print()
    head, rows = report_table(doc)
    print_table(head, rows)
    for s in out["skipped"]:
        print(f"skipped: {s['backend']} ({s['device']}): {s['reason']}")
    path = write_result(doc, args.out)
    print(f"wrote {path}")
    return 0

"""Machine and environment facts recorded with every benchmark figure.

A number without the machine it came from is not comparable, so every JSON under
benchmarks/results/ carries `run_meta(...)`: the exact command line, the date, the CPU model,
core counts, the thread counts the benchmark used, the GPU (if any) and package versions,
and which code ran: `git describe --always --dirty` and, for a checkout with uncommitted edits,
the sha256 of `git diff HEAD` (hashret.provenance). A dirty checkout may not write into
benchmarks/results/ unless the command says `--allow-dirty`, which the file then records.
Nothing here imports a heavy package: torch is queried only when already imported.
"""
from __future__ import annotations

import contextvars
import datetime as _dt
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# Packages whose versions matter to some benchmark (absent ones are recorded as null).
PACKAGES = (
    "faiss-cpu", "faiss-gpu", "pymilvus", "milvus-lite", "onnx", "onnxruntime", "onnxruntime-gpu",
    "openvino", "tensorrt", "grpcio", "protobuf", "matplotlib", "cupy-cuda12x", "cupy-cuda13x",
)

# Environment variables that change how many threads the numeric libraries use.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OV_NUM_THREADS",
              "CUDA_VISIBLE_DEVICES")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_counts() -> dict[str, Any]:
    """Logical CPUs of the machine, CPUs this process may run on, and any cgroup CPU quota."""
    out: dict[str, Any] = {"logical": os.cpu_count()}
    try:
        out["usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        out["usable"] = os.cpu_count()
    text = _read("/proc/cpuinfo") or ""
    cores = {(blk.get("physical id"), blk.get("core id")) for blk in _cpuinfo_blocks(text)}
    cores.discard((None, None))
    out["physical_cores"] = len(cores) or None
    quota = _read("/sys/fs/cgroup/cpu.max")  # cgroup v2: "max 100000" or "200000 100000"
    if quota:
        q, _, period = quota.strip().partition(" ")
        if q != "max" and period:
            out["cgroup_cpu_quota"] = round(int(q) / int(period), 2)
    return out


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks = []
    for chunk in text.split("\n\n"):
        d = {}
        for line in chunk.splitlines():
            k, _, v = line.partition(":")
            d[k.strip()] = v.strip()
        if d:
            blocks.append(d)
    return blocks


def memory_bytes() -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def gpus() -> list[dict[str, Any]]:
    """GPUs seen by nvidia-smi (or by torch, when torch is already imported); [] if none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )
            rows = [r for r in res.stdout.splitlines() if r.strip()] if res.returncode == 0 else []
            if rows:
                out = []
                for r in rows:
                    parts = [p.strip() for p in r.split(",")]
                    out.append({"name": parts[0], "driver": parts[1] if len(parts) > 1 else None,
                                "memory": parts[2] if len(parts) > 2 else None})
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [{"name": torch.cuda.get_device_name(i), "driver": None,
                         "memory": f"{torch.cuda.get_device_properties(i).total_memory >> 20} MiB"}
                        for i in range(torch.cuda.device_count())]
        except Exception:
            pass
    return []


def rss_bytes(pid: int | str = "self") -> int | None:
    """Current resident set size of a process (VmRSS from /proc), None where unreadable."""
    text = _read(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def child_pids(pid: int | None = None) -> list[int]:
    """Direct and indirect children of `pid` (default: this process), from /proc."""
    root = os.getpid() if pid is None else pid
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        stat = _read(f"/proc/{d.name}/stat")
        if not stat:
            continue
        try:  # the comm field may contain spaces: ppid is the 2nd field after the last ')'
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
    out, frontier = [], {root}
    while frontier:
        nxt = {p for p, pp in parent.items() if pp in frontier and p not in out}
        out.extend(sorted(nxt))
        frontier = nxt
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: `hashret bench ...` for the installed entry point."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    head = argv[0]
    name = Path(head).name
    if name == "hashret":
        head = "hashret"
    elif name == "__main__.py" and Path(head).parent.name in ("hashret", "benchmarks"):
        head = f"python -m {Path(head).parent.name}"
    elif name.endswith(".py") and Path(head).parent.name == "benchmarks":
        head = f"python -m benchmarks.{name[:-3]}"
    rest = shlex.join(argv[1:])
    return f"{head} {rest}" if rest else head


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def machine_info(threads: dict[str, Any] | None = None) -> dict[str, Any]:
    """CPU, cores, memory, GPU, OS and the thread settings in force."""
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu_model": cpu_model(),
        "cpus": cpu_counts(),
        "memory_bytes": memory_bytes(),
        "gpus": gpus(),
        "threads_used": dict(threads or {}),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def package_versions() -> dict[str, Any]:
    from hashret.manifest import versions

    return {k: v for k, v in versions(*PACKAGES).items()}


#: Set by the `hashret bench` / `python -m benchmarks.X` entry points from `--allow-dirty` for the
#: command they run, so run_meta records it and write_result honours it without every benchmark
#: passing it along.
allow_dirty: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_dirty", default=False)

PROVENANCE_KEYS = ("git_commit", "git_describe", "dirty", "diff_sha256", "allow_dirty")


def provenance() -> dict[str, Any]:
    """The code that ran: git_commit, git_describe, dirty, diff_sha256 and this command's allow_dirty."""
    from hashret.provenance import result_fields

    return result_fields(allow_dirty.get())


def run_meta(benchmark: str, threads: dict[str, Any] | None = None,
             argv: list[str] | None = None) -> dict[str, Any]:
    """The header of every results JSON: what ran, when, where, from which code, with which versions."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "benchmark": benchmark,
        "command": command_line(argv),
        "argv": argv,
        "cwd": os.getcwd(),
        "date": now_iso(),
        **provenance(),
        "machine": machine_info(threads),
        "versions": package_versions(),
    }


def describe(meta: dict[str, Any]) -> str:
    """One line about the machine: 'AMD EPYC, 2 logical CPUs (2 usable), 23.5 GiB, no GPU'."""
    m = meta.get("machine", {})
    cpus = m.get("cpus", {})
    mem = m.get("memory_bytes")
    gpu = ", ".join(g.get("name", "?") for g in m.get("gpus") or []) or "no GPU"
    memtxt = f", {mem / 2**30:.1f} GiB RAM" if mem else ""
    return (f"{m.get('cpu_model', '?')}, {cpus.get('logical', '?')} logical CPUs "
            f"({cpus.get('usable', '?')} usable){memtxt}, {gpu}")


# --------------------------------------------------------------------------- shared helpers
# (argument parsing, percentiles, tables and result files used by every benchmark)


def int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (argparse type); accepts 1e6-style and 1_000_000 numbers."""
    import argparse

    out = []
    for part in str(text).split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        try:
            v = float(part) if any(c in part for c in "eE.") else int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number: pass e.g. 1,8,32") from None
        if int(v) != v:
            raise argparse.ArgumentTypeError(f"{part!r} is not a whole number")
        out.append(int(v))
    if not out:
        raise argparse.ArgumentTypeError("empty list: pass e.g. 1,8,32")
    return out


def str_list(text: str) -> list[str]:
    """'a,b' -> ['a', 'b'] (argparse type)."""
    return [p.strip() for p in str(text).split(",") if p.strip()]


def percentiles(ms, qs=(50, 90, 99)) -> dict[str, float]:
    """{'p50_ms', 'p90_ms', 'p99_ms', 'mean_ms', 'min_ms', 'max_ms', 'n'} of latencies in ms."""
    import numpy as np

    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    out = {f"p{q}_ms": round(float(np.percentile(a, q)), 4) for q in qs}
    out.update(mean_ms=round(float(a.mean()), 4), min_ms=round(float(a.min()), 4),
               max_ms=round(float(a.max()), 4), n=int(a.size))
    return out


def format_table(head: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with right-aligned numbers."""
    cells = [[str(c) for c in head]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(head: list[str], rows: list[list[Any]]) -> None:
    print(format_table(head, rows), flush=True)


def default_out(name: str) -> str:
    return f"benchmarks/results/{name}.json"


def add_out_arg(p, name: str) -> None:
    """`--out FILE.json` (the shared output flag) defaulting to benchmarks/results/NAME.json."""
    from hashret.cliargs import add_output_args

    add_output_args(p, metavar="FILE.json", default=default_out(name), help="where to write the results JSON",
                    progress=False, title=None)
    add_allow_dirty_arg(p)


def add_allow_dirty_arg(p) -> None:
    """`--allow-dirty`: let a checkout with uncommitted edits write into benchmarks/results/."""
    from hashret.provenance import ALLOW_DIRTY_FLAG, ALLOW_DIRTY_HELP

    p.add_argument(ALLOW_DIRTY_FLAG, action="store_true", help=ALLOW_DIRTY_HELP)


def check_results_write(out: str | os.PathLike | None) -> None:
    """Refuse a write into benchmarks/results/ from a dirty checkout unless this command allows it."""
    from hashret.provenance import check_results_write as check

    check(out, allow_dirty.get())


def write_result(doc: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write a results JSON atomically (parents created), with the provenance fields filled in.

    A doc built without run_meta gets provenance() here; one with it keeps what was recorded
    when its header was made. Inside benchmarks/results/ a dirty checkout is refused unless
    --allow-dirty (check_results_write), the entry points' early check repeated at the last step.
    """
    from hashret.fsutil import write_json_atomic

    if any(k not in doc for k in PROVENANCE_KEYS):
        doc = {**provenance(), **doc}
    check_results_write(out)
    path = Path(out)
    write_json_atomic(path, doc)
    return path

"""Operating-system names for the server's threads, so per-thread CPU can be read from outside.

Python (before 3.14) names its threads for Python only: `top -H`, py-spy's native view and
/proc/PID/task/TID/comm show every one of them under the process name, next to the engine's
worker threads, which inherit the name of the thread that created them. `hashret bench serve`
splits the server's CPU time by these names (benchmarks.serve_load.thread_groups), so the
service names what it starts:

- `hashret-batcher`: the thread that runs inference batches;
- `hashret-engine`: threads the engine library started while it was opened and warmed up
  (OpenVINO, ONNX Runtime and OpenMP thread pools);
- `hashret-decode…`, `hashret-gallery…`, `hashret-snapshot`…: the pools and workers named in
  Python, given their Python name (the kernel keeps 15 bytes of it).

Linux only; elsewhere, or when /proc cannot be written, nothing is named and nothing fails.
"""
from __future__ import annotations

import os
import threading

MAX_NAME = 15  # TASK_COMM_LEN - 1


def thread_ids() -> set[int]:
    """Kernel ids of this process's threads (empty where /proc has no task list)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def set_name(name: str, tid: int | None = None) -> bool:
    """Give thread `tid` (default: the calling one) the OS name `name` (cut to 15 bytes)."""
    tid = threading.get_native_id() if tid is None else tid
    data = name.encode("ascii", "replace")[:MAX_NAME]
    try:
        with open(f"/proc/self/task/{tid}/comm", "wb") as f:
            f.write(data)
        return True
    except OSError:
        return False


def name_current() -> None:
    """The calling thread's Python name as its OS name (a ThreadPoolExecutor initializer)."""
    set_name(threading.current_thread().name)


def name_new(before: set[int], name: str) -> int:
    """Name `name` the threads started since `before` (from thread_ids()) that Python did not
    start (those name themselves); returns how many were named."""
    python = {t.native_id for t in threading.enumerate()}
    n = 0
    for tid in thread_ids() - before - python:
        n += set_name(name, tid)
    return n

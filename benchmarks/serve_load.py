"""`hashret bench serve`: a gRPC load generator for the retrieval service (like perf_analyzer).

For each concurrency level C, C asyncio workers (grpc.aio) spread over up to --channels channels
send Search (or SearchBatch) requests back to back, each waiting for its answer before the next
(closed loop), until --requests requests were sent or --seconds passed, whichever comes first.
Reported per level: requests/s, latency p50/p90/p99/mean of successful calls, and every failure
counted by its gRPC status code (RESOURCE_EXHAUSTED = the server's queue was full, ...).

Target: --addr HOST:PORT (an already running server), or --model EXP --gallery GAL to start
`hashret serve` as a child process on 127.0.0.1 with a free port (stopped at the end). The load
generator runs in this process, the server in its own, so they do not share a GIL; on a small
machine they still share the CPU cores, which the JSON records.

Server CPU per request: with a started server (or --server-pid) each level also reads the server
process's CPU time (user + system, all threads, from /proc) just before and after its timed
requests, and splits the CPU per request into the engine (a same-run baseline of the engine
alone, at the mean batch size the server formed), decoding (the same photos decoded alone) and
the rest (gRPC, protobuf, hand-offs between threads, bookkeeping). CPU time, unlike latency,
is not inflated by the load generator or other programs sharing the cores. The same CPU is also
read per thread (`by_thread`): `hashret serve` names its threads (serve.threadnames), so the
engine's threads, the decode threads, the event loop and the others are seen apart, including
what the engine spends inside the server beyond its baseline. The same load is then sent to a
bare grpc.aio echo server (benchmarks.echo_server), once answering at once and once at each
level's own rate in groups of its mean batch: its CPU per request is the floor Python gRPC puts
under "the rest" for that traffic.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.echo_server import ECHO_METHOD
from benchmarks.machine import add_out_arg, int_list, percentiles, print_table, write_result
from hashret.datasets import IMAGE_SUFFIXES
from hashret.errors import BadInput, MissingArtifact, Unavailable

log = logging.getLogger("hashret.bench.serve")

DEFAULT_CONCURRENCY = "1,4,16,64"


# --------------------------------------------------------------------------- images


def synthetic_images(n: int = 8, size: tuple[int, int] = (320, 240), seed: int = 0) -> list[bytes]:
    """n JPEG files (smooth colour gradients + noise) for when no --images are given."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(n):
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = ((xx / w + yy / h) / 2)[..., None]
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load_images(spec: list[str] | None, limit: int = 256) -> tuple[list[bytes], str]:
    """Bytes of the image files named (files or folders, searched recursively), or synthetic ones."""
    if not spec:
        return synthetic_images(), "8 synthetic 320x240 JPEGs"
    paths: list[Path] = []
    for s in spec:
        p = Path(s)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise MissingArtifact(f"--images {p} | not found: pass image files or a folder of them")
    if not paths:
        raise BadInput(f"--images {' '.join(spec)} | holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files")
    paths = paths[:: max(1, len(paths) // limit)][:limit]
    return [p.read_bytes() for p in paths], f"{len(paths)} files from {', '.join(spec)}"


# --------------------------------------------------------------------------- server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM a child that is still running; SIGKILL it if it has not exited after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class ChildServer:
    """`hashret serve` in a child process on 127.0.0.1:<free port>, stopped with SIGTERM."""

    def __init__(self, model: str, gallery: str, extra: list[str] | None = None, start_timeout: float = 180.0):
        for p, what in ((model, "--model"), (gallery, "--gallery")):
            if not Path(p).exists():
                raise MissingArtifact(f"{what} {p} | not found")
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="hashret-bench-serve-", suffix=".log", delete=False)
        self.cmd = [sys.executable, "-m", "hashret", "serve", "--model", str(model), "--gallery", str(gallery),
                    "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "text", *(extra or [])]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start(self) -> "ChildServer":
        from serve.client import wait_serving

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_serving(self.addr, self.proc, self.start_timeout, self.log_tail)
        except RuntimeError as e:
            self.stop()
            raise Unavailable(str(e)) from None
        return self

    def stop(self) -> None:
        stop_process(self.proc, 30)

    def __enter__(self) -> "ChildServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


class EchoChild:
    """benchmarks.echo_server in a child process on 127.0.0.1:<free port>, stopped with SIGTERM."""

    def __init__(self, reply_bytes: int, start_timeout: float = 60.0, every_ms: float = 0.0, group: int = 1):
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "benchmarks.echo_server", "--port", str(self.port),
                    "--reply-bytes", str(int(reply_bytes))]
        if every_ms > 0:  # answered in groups at a given rhythm (see benchmarks.echo_server)
            self.cmd += ["--answer-every-ms", f"{every_ms:.3f}", "--answer-group", str(int(group))]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> EchoChild:
        import grpc

        root = Path(__file__).resolve().parents[1]  # where `benchmarks` imports from
        self.proc = subprocess.Popen(self.cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        until = time.monotonic() + self.start_timeout
        with grpc.insecure_channel(self.addr) as ch:
            while True:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:]
                    raise Unavailable(f"echo server | exited with {self.proc.returncode} before serving:\n{err}")
                try:
                    grpc.channel_ready_future(ch).result(timeout=0.5)
                    return self
                except grpc.FutureTimeoutError:
                    if time.monotonic() > until:
                        self.__exit__()
                        raise Unavailable(f"echo server | not listening on {self.addr} after "
                                          f"{self.start_timeout:.0f} s") from None

    def __exit__(self, *exc) -> None:
        stop_process(self.proc, 15)


def is_loopback(addr: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost targets (HOST:PORT, [v6]:PORT)."""
    host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 or addr.startswith("[") else addr
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- CPU time

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_cpu_ticks(pid: int) -> int | None:
    """utime + stime + cutime + cstime of /proc/PID/stat (None when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and brackets: fields are counted after the last ')'
    # (state is field 3, so utime, stime, cutime, cstime, fields 14-17, are [11:15])
    return sum(int(v) for v in text.rsplit(")", 1)[1].split()[11:15])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far: every thread, ended ones
    included (the kernel folds them into the process), and its child processes, live or reaped."""
    own = _stat_cpu_ticks(pid)
    if own is None:
        raise Unavailable(f"server pid {pid} | /proc/{pid}/stat cannot be read: pass the id of a server "
                          "process running on this machine")
    live = (_stat_cpu_ticks(c) for c in machine.child_pids(pid))
    return (own + sum(t for t in live if t is not None)) / CLK_TCK


def thread_cpu_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """{thread id: (OS thread name, user + system ticks)} of the live threads of process `pid`
    and of its child processes (the workers of `hashret serve --workers N`)."""
    out = {}
    for proc in (pid, *machine.child_pids(pid)):
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                text = Path(f"/proc/{proc}/task/{tid}/stat").read_text()
            except OSError:  # ended since the listing
                continue
            name = text[text.index("(") + 1:text.rindex(")")]
            f = text.rsplit(")", 1)[1].split()
            out[int(tid)] = (name, int(f[11]) + int(f[12]))
    return out


def loop_threads(pid: int) -> set[int]:
    """The threads that run the server's asyncio loops: each process's main thread, the workers'
    with `--workers N` (the supervisor's own main thread then only waits, and counts as other)."""
    return set(machine.child_pids(pid)) or {pid}


# OS thread names that `hashret serve` gives its threads (serve.threadnames) -> the part of the work
THREAD_GROUPS = (("hashret-batcher", "engine"), ("hashret-engine", "engine"), ("hashret-decode", "decode"),
                 ("hashret-gpu-dec", "decode"))


def thread_groups(pid: int, before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
                  total_s: float, requests: int, loops: set[int] | None = None) -> dict[str, Any] | None:
    """A level's server CPU per request by the threads that spent it, in ms.

    engine: the batcher thread and the engine library's workers; decode: the decode threads; loop:
    the main thread (the asyncio loop: gRPC's Python side, request handling, searches answered on
    the loop), or `loops` (loop_threads: the workers' main threads); other: the rest of the total
    (gRPC's C threads, gallery pool, snapshots, metrics, threads that ended), so the four add up to
    the total. `threads`: ms per request of each named thread outside engine and decode, for the curious.
    """
    if not requests or not after:
        return None
    loops = {pid} if loops is None else loops
    groups = {"engine": 0, "decode": 0, "loop": 0}
    named: dict[str, int] = {}
    for tid, (name, ticks) in after.items():
        spent = ticks - before.get(tid, (name, 0))[1]
        group = "loop" if tid in loops else next((g for prefix, g in THREAD_GROUPS if name.startswith(prefix)), None)
        if group is not None:
            groups[group] += spent
        if group in (None, "loop"):
            key = "main (asyncio loop)" if tid in loops else name
            named[key] = named.get(key, 0) + spent
    ms = {g: t * 1e3 / CLK_TCK / requests for g, t in groups.items()}
    ms["other"] = total_s * 1e3 / requests - sum(ms.values())
    return {**{f"{g}_ms": round(v, 4) for g, v in ms.items()},
            "threads": {k: round(t * 1e3 / CLK_TCK / requests, 4)
                        for k, t in sorted(named.items(), key=lambda kv: -kv[1]) if t > 0}}


def _workers(server_args: list[str]) -> int:
    """The --workers N among `hashret serve` arguments (argparse keeps the last), else 1."""
    n = 1
    for i, a in enumerate(server_args):
        if a == "--workers" and i + 1 < len(server_args):
            n = server_args[i + 1]
        elif a.startswith("--workers="):
            n = a.split("=", 1)[1]
    try:
        return max(1, int(n))
    except ValueError:
        return 1  # `hashret serve` refuses it with its own message


def _load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through sorted points, continued by the end segments' slopes."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def engine_cpu_per_image(mean_batch: float, engine_rows: list[dict[str, Any]]) -> float | None:
    """Engine CPU ms per image at the mean batch size a level formed, from the baseline's CPU per batch.

    CPU per batch is close to affine in the batch size (a fixed cost per call plus a cost per
    image), so summed over a level's batches it depends on their mean size alone; between the
    batch sizes the baseline timed it is interpolated linearly.
    """
    pts = sorted((r["batch"], r["cpu_ms_per_batch"]) for r in engine_rows if r.get("cpu_ms_per_batch") is not None)
    if not pts or mean_batch <= 0:
        return None
    b = max(float(pts[0][0]), mean_batch)
    return _interp(b, [p[0] for p in pts], [p[1] for p in pts]) / b


def cpu_split(row: dict[str, Any], baseline: dict[str, Any] | None, cores: int) -> dict[str, Any] | None:
    """A level's server CPU per request as engine + decode + rest, and the requests/s that the
    engine and decode figures alone allow on `cores` cores (None without the parts it needs)."""
    total = (row.get("server_cpu") or {}).get("ms_per_request")
    stages = row.get("stages") or {}
    items, batches = (stages.get("inference_item") or {}).get("count"), (stages.get("inference_batch") or {}).get("count")
    if total is None or not baseline or not items or not batches:
        return None
    mean_batch = items / batches
    per_image = engine_cpu_per_image(mean_batch, baseline.get("results") or [])
    decode = (baseline.get("decode") or {}).get("cpu_ms_per_image")
    if per_image is None or decode is None:
        return None
    n = row.get("images_per_request", 1)
    engine_ms, decode_ms = per_image * n, decode * n
    return {"mean_batch": round(mean_batch, 2), "total_ms": round(total, 4), "engine_ms": round(engine_ms, 4),
            "decode_ms": round(decode_ms, 4), "rest_ms": round(total - engine_ms - decode_ms, 4),
            "cores": cores, "ceiling_requests_per_s": round(cores * 1e3 / (engine_ms + decode_ms), 1),
            "requests_per_s": row.get("requests_per_s")}


CLIENT_BOUND = 0.9  # a load-generator process this busy may be what limits requests/s


def format_client(row: dict[str, Any]) -> str:
    """The load generator's CPU line: per request, and its busiest process's share of a core."""
    c = row["client_cpu"]
    per = "-" if c["ms_per_request"] is None else f"{c['ms_per_request']:.3f} ms"
    busiest = c["busiest_core_share"]
    text = (f"load generator: {per} CPU per request over {c['processes']} process"
            f"{'es' if c['processes'] > 1 else ''}, the busiest at "
            f"{'-' if busiest is None else f'{busiest:.0%}'} of a core")
    if busiest is not None and busiest >= CLIENT_BOUND:
        text += " (it may be the limit here: more --clients)"
    return text


def format_cpu(row: dict[str, Any]) -> str:
    cpu, sp = row.get("server_cpu") or {}, row.get("cpu_split")
    la = f"load avg {row['load_avg_1m'][0]} -> {row['load_avg_1m'][1]}" if row.get("load_avg_1m") else ""
    th = cpu.get("by_thread")
    threads = (f"\n      by thread: engine {th['engine_ms']:.3f} + decode {th['decode_ms']:.3f} + loop "
               f"{th['loop_ms']:.3f} + other {th['other_ms']:.3f}") if th else ""
    if sp:
        return (f"server CPU per request {sp['total_ms']:.3f} ms = engine {sp['engine_ms']:.3f} (mean batch "
                f"{sp['mean_batch']}) + decode {sp['decode_ms']:.3f} + rest {sp['rest_ms']:.3f}; engine + decode "
                f"allow {sp['ceiling_requests_per_s']:.0f} req/s on {sp['cores']} cores, achieved "
                f"{row['requests_per_s']}; {la}{threads}")
    return f"server CPU per request {cpu.get('ms_per_request', '-')} ms; {la}{threads}"


# --------------------------------------------------------------------------- load


def server_info(addr: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """A summary of the server's Info RPC ({} when it has none)."""
    import grpc

    from serve._proto import retrieval_pb2 as pb
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    md = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        with grpc.insecure_channel(addr) as ch:
            r = pb_grpc.RetrievalStub(ch).Info(pb.InfoRequest(), timeout=timeout, metadata=md)
    except grpc.RpcError as e:
        return {"error": f"{e.code().name}: {e.details()}"}
    try:
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(r, preserving_proto_field_name=True)
    except Exception as e:  # informational only: never fail the benchmark over it
        return {"model_id": r.model_id, "backend": r.backend, "note": f"Info not fully decoded ({e})"}


def search_reply_bytes(addr: str, image: bytes, k: int, token: str | None = None, timeout: float = 30.0) -> int | None:
    """Serialized size of the server's Search answer to `image` (the echo floor answers as much)."""
    import grpc

    from serve._proto import retrieval_pb2 as pb
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    md = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        with grpc.insecure_channel(addr) as ch:
            return pb_grpc.RetrievalStub(ch).Search(pb.SearchRequest(image=image, k=k), timeout=timeout,
                                                     metadata=md).ByteSize()
    except grpc.RpcError:
        return None


def open_channels(addr: str, channels: int, concurrency: int) -> tuple[list, list]:
    """Up to `channels` (at most `concurrency`) grpc.aio channels, each its own TCP connection, and stubs."""
    import grpc

    from serve._proto import retrieval_pb2_grpc as pb_grpc

    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20),
            # distinct channels must not share one TCP connection
            ("grpc.use_local_subchannel_pool", 1)]
    n_ch = max(1, min(channels, concurrency))
    chans = [grpc.aio.insecure_channel(addr, options=opts + [("grpc.channel_id", i)]) for i in range(n_ch)]
    return chans, [pb_grpc.RetrievalStub(c) for c in chans]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers that differ by at most one, the larger ones first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


async def _drive(addr: str, images: list[bytes], concurrency: int, max_requests: int, seconds: float,
                 k: int, rpc: str, batch_items: int, channels: int, timeout: float,
                 token: str | None, warmup: int, start: Callable[[], None] | None = None) -> dict[str, Any]:
    """One load generator: connect, warm up, call `start()`, then the timed closed loop.

    Returns the raw outcome: latencies (ms), requests issued, failures by status, the timed
    phase's start and end (time.monotonic(), comparable across processes) and this process's own
    CPU time over it (all its threads, gRPC's included)."""
    import grpc

    from serve._proto import retrieval_pb2 as pb

    chans, stubs = open_channels(addr, channels, concurrency)
    n_ch = len(chans)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    reqs = [pb.SearchRequest(image=img, k=k) for img in images]
    if rpc == "Echo":  # benchmarks.echo_server: the image bytes as they are, raw bytes back
        stubs = [c.unary_unary(ECHO_METHOD) for c in chans]

    def call(stub, i):
        if rpc == "Echo":
            return stub(images[i % len(images)], timeout=timeout, metadata=md)
        if rpc == "SearchBatch":
            items = [reqs[(i + j) % len(reqs)] for j in range(batch_items)]
            return stub.SearchBatch(pb.SearchBatchRequest(items=items), timeout=timeout, metadata=md)
        return stub.Search(reqs[i % len(reqs)], timeout=timeout, metadata=md)

    try:
        await asyncio.gather(*(c.channel_ready() for c in chans))
        for i in range(warmup):  # connections up, server-side caches and batcher warm
            try:
                await call(stubs[i % n_ch], i)
            except grpc.RpcError:
                pass
        issued = 0
        lat: list[float] = []
        errors: dict[str, int] = {}
        item_errors: dict[str, int] = {}
        if start is not None:
            start()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        deadline = t0 + seconds

        async def worker(w: int):
            nonlocal issued
            stub = stubs[w % n_ch]
            while issued < max_requests and time.monotonic() < deadline:
                i = issued
                issued += 1
                t = time.perf_counter()
                try:
                    resp = await call(stub, i)
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    continue
                lat.append((time.perf_counter() - t) * 1e3)
                if rpc == "SearchBatch":
                    for r in resp.results:
                        if r.WhichOneof("result") == "error":
                            item_errors[r.error.status] = item_errors.get(r.error.status, 0) + 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        t1 = time.monotonic()
        cpu_s = time.process_time() - cpu0
    finally:
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)
    return {"lat": lat, "issued": issued, "errors": errors, "item_errors": item_errors, "channels": n_ch,
            "t0": t0, "t1": t1, "cpu_s": cpu_s}


def _client_process(out, go, kwargs: dict[str, Any]) -> None:
    """A load-generator process (spawned): `_drive`, its timed loop held until the parent says go."""
    def start():
        out.put({"ready": True})
        go.wait()

    try:
        out.put(asyncio.run(_drive(**kwargs, start=start)))
    except BaseException as e:  # noqa: BLE001 - the parent must hear why, not wait for it
        out.put({"failed": f"{type(e).__name__}: {e}"})


CLIENT_START_S = 120.0  # most seconds to spawn a client, import gRPC and warm up, per level


def _drive_processes(n: int, kwargs: dict[str, Any], begin: Callable[[], None]) -> list[dict[str, Any]]:
    """`_drive` in `n` spawned processes that share the level's concurrency, requests and channels
    and start their timed loops together, after `begin()`. Spawned, not forked: this process may
    hold gRPC's threads from an earlier level, and gRPC does not survive a fork."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    shares = zip(split_evenly(kwargs["concurrency"], n), split_evenly(kwargs["max_requests"], n),
                 split_evenly(max(kwargs["channels"], n), n))
    procs = [ctx.Process(target=_client_process, name=f"hashret-load-{i}", daemon=True,
                         args=(out, go, {**kwargs, "concurrency": c, "max_requests": r, "channels": ch}))
             for i, (c, r, ch) in enumerate(shares)]

    def collect(key: str, limit_s: float) -> list[dict[str, Any]]:
        """One message with `key` from every client; a failure or a dead client ends the level."""
        got: list[dict[str, Any]] = []
        limit = time.monotonic() + limit_s
        while len(got) < n:
            try:
                msg = out.get(timeout=0.5)
            except queue.Empty:
                dead = [f"{p.name} (exit status {p.exitcode})" for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > limit:
                    why = f"{', '.join(dead)} died" if dead else f"no {key} message within {limit_s:.0f} s"
                    raise Unavailable(f"load generator | a client process failed: {why}") from None
                continue
            if "failed" in msg:
                raise Unavailable(f"load generator | a client process failed: {msg['failed']}")
            got.append(msg)
        return got

    for p in procs:
        p.start()
    try:
        collect("ready", CLIENT_START_S)
        begin()
        go.set()
        return collect("lat", kwargs["seconds"] + kwargs["timeout"] + CLIENT_START_S)
    finally:
        go.set()  # clients still waiting (another one failed) run their share and leave
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()


def _load_level(addr: str, images: list[bytes], concurrency: int, max_requests: int, seconds: float,
                k: int, rpc: str, batch_items: int, channels: int, timeout: float,
                token: str | None, warmup: int, server_pid: int | None = None, clients: int = 1) -> dict[str, Any]:
    """One concurrency level, from `clients` load-generator processes (this one when 1)."""
    before: dict[str, Any] = {}

    def begin():  # every connection is up and warm: the timed requests start now
        before["load"] = _load_avg()
        if server_pid:
            before["cpu"], before["threads"] = process_cpu_seconds(server_pid), thread_cpu_ticks(server_pid)

    kwargs = {"addr": addr, "images": images, "concurrency": concurrency, "max_requests": max_requests,
              "seconds": seconds, "k": k, "rpc": rpc, "batch_items": batch_items, "channels": channels,
              "timeout": timeout, "token": token, "warmup": warmup}
    n = min(clients, concurrency, max_requests)
    raws = [asyncio.run(_drive(**kwargs, start=begin))] if n <= 1 else _drive_processes(n, kwargs, begin)
    # every request has its answer here, so the server's work for them is done
    cpu_s = process_cpu_seconds(server_pid) - before["cpu"] if server_pid else None
    lat = [x for r in raws for x in r["lat"]]
    by_thread = thread_groups(server_pid, before["threads"], thread_cpu_ticks(server_pid), cpu_s, len(lat),
                              loop_threads(server_pid)) if server_pid else None
    elapsed = max(r["t1"] for r in raws) - min(r["t0"] for r in raws)
    issued = sum(r["issued"] for r in raws)
    errors: dict[str, int] = {}
    item_errors: dict[str, int] = {}
    for r in raws:
        for mine, theirs in ((errors, r["errors"]), (item_errors, r["item_errors"])):
            for code, count in theirs.items():
                mine[code] = mine.get(code, 0) + count
    ok = len(lat)
    per_req = batch_items if rpc == "SearchBatch" else 1
    client_cpu = sum(r["cpu_s"] for r in raws)
    busiest = max(r["cpu_s"] / (r["t1"] - r["t0"]) for r in raws) if all(r["t1"] > r["t0"] for r in raws) else None
    return {"concurrency": concurrency, "channels": sum(r["channels"] for r in raws), "rpc": rpc,
            "images_per_request": per_req, "clients": len(raws),
            "sent": issued, "ok": ok, "errors": dict(sorted(errors.items())), "error_count": sum(errors.values()),
            "item_errors": item_errors, "duration_s": round(elapsed, 3),
            "requests_per_s": round(ok / elapsed, 2) if elapsed > 0 else None,
            "images_per_s": round(ok * per_req / elapsed, 2) if elapsed > 0 else None,
            "stopped_by": "requests" if issued >= max_requests else "time", **percentiles(lat),
            "load_avg_1m": [before["load"], _load_avg()],
            "client_cpu": {"processes": len(raws), "cpu_s": round(client_cpu, 3),
                           "ms_per_request": round(client_cpu * 1e3 / ok, 4) if ok else None,
                           "busiest_core_share": round(busiest, 3) if busiest is not None else None},
            **({"server_cpu": {"pid": server_pid, "cpu_s": round(cpu_s, 3), "requests": ok,
                               "ms_per_request": round(cpu_s * 1e3 / ok, 4) if ok else None,
                               **({"by_thread": by_thread} if by_thread else {})}}
               if server_pid else {})}


def run_load(addr: str, images: list[bytes], concurrency=(1, 4, 16, 64), max_requests: int = 500,
             seconds: float = 10.0, k: int = 10, rpc: str = "Search", batch_items: int = 8,
             channels: int = 16, timeout: float = 30.0, token: str | None = None, warmup: int = 5,
             progress=print, metrics: str | None = None, server_pid: int | None = None,
             baseline: dict[str, Any] | None = None, clients: int = 1) -> list[dict[str, Any]]:
    """One result dict per concurrency level (see _load_level); with `metrics` (the server's
    /metrics URL or HOST:PORT) each row also gets "stages": the server's per-stage split over
    that level (serve.stages.stage_split), warm-up requests included. With `server_pid` each row
    gets "server_cpu" (the process's CPU time over the timed requests) and, with `metrics` and an
    engine `baseline` too, "cpu_split" (see cpu_split). `clients` > 1 spreads each level over
    that many load-generator processes (at most one per request in flight); every row gets
    "client_cpu", the load generator's own CPU, to tell when it, not the server, set the pace."""
    if not images:
        raise BadInput("images | none to send")
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise BadInput(f"clients {clients!r} | must be an integer >= 1")
    from serve.stages import format_split, scrape_stages, stage_split

    rows = []
    for c in concurrency:
        before = scrape_stages(metrics) if metrics else None
        r = _load_level(addr, images, int(c), max_requests, seconds, k, rpc, batch_items, channels, timeout,
                        token, warmup, server_pid, clients)
        if metrics:
            r["stages"] = stage_split(before, scrape_stages(metrics))
        if server_pid:
            split = cpu_split(r, baseline, int(machine.cpu_counts().get("usable") or 1))
            if split is not None:
                r["cpu_split"] = split
        rows.append(r)
        errs = ", ".join(f"{k2}={v}" for k2, v in r["errors"].items()) or "none"
        p50 = r.get("p50_ms")
        progress(f"  concurrency {c:>4}: {r['requests_per_s']} req/s, p50 {p50 if p50 is not None else '-'} ms, "
                 f"p99 {r.get('p99_ms', '-')} ms, ok {r['ok']}/{r['sent']}, errors: {errs}")
        progress(f"    {format_client(r)}")
        if metrics:
            progress(f"    server stages (mean): {format_split(r['stages'])}")
        if server_pid:
            progress(f"    {format_cpu(r)}")
    return rows


# --------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target (one of)")
    g.add_argument("--addr", metavar="HOST:PORT",
                   help="a running server on this machine, e.g. 127.0.0.1:50051 (default: none)")
    g.add_argument("--allow-remote", action="store_true",
                   help="accept an --addr that is not loopback: only for a server you run and may load-test "
                        "(default: loopback only)")
    g.add_argument("--model", metavar="EXP", help="with --gallery: start `hashret serve` on 127.0.0.1 (default: none)")
    g.add_argument("--gallery", metavar="GAL", help="gallery folder for the started server (default: none)")
    g.add_argument("--server-args", default="", metavar="'ARGS'",
                   help="extra flags for the started server, e.g. '--backend openvino --max-batch 16' (default: none)")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int_list, default=int_list(DEFAULT_CONCURRENCY), metavar="C,C",
                   help=f"requests in flight at once, one level after another (default: {DEFAULT_CONCURRENCY})")
    g.add_argument("--requests", type=int, default=500, help="most requests per level (default: 500)")
    g.add_argument("--seconds", type=float, default=10.0, help="most seconds per level (default: 10)")
    g.add_argument("--warmup", type=int, default=5, help="untimed requests before each level (default: 5)")
    g.add_argument("--channels", type=int, default=16,
                   help="gRPC channels (TCP connections) the workers share, capped at the concurrency (default: 16)")
    g.add_argument("--clients", type=int, default=1, metavar="N",
                   help="load-generator processes that share each level's requests in flight, channels and "
                        "requests, started together; one Python process tops out at a few thousand requests/s, so "
                        "a many-core or GPU server needs several (default: 1, this process)")
    g.add_argument("--rpc", choices=("Search", "SearchBatch"), default="Search", help="RPC to call (default: Search)")
    g.add_argument("--batch-items", type=int, default=8, help="images per SearchBatch request (default: 8)")
    g.add_argument("-k", "--k", type=int, default=10, help="neighbours per search (default: 10)")
    g.add_argument("--images", nargs="+", metavar="DIR-or-FILE",
                   help="query images, files or folders (default: 8 synthetic JPEGs)")
    g.add_argument("--timeout", type=float, default=30.0, help="deadline per request in seconds (default: 30)")
    g.add_argument("--no-baseline", action="store_true",
                   help="with --model: skip timing the server's engine alone (batch 1, 8, 32, 64) before the load; "
                        "that baseline is what the service-overhead bars compare against (default: time it)")
    g.add_argument("--token-file", metavar="FILE",
                   help="bearer token file, for servers started with --require-token-for-reads (default: none)")
    g.add_argument("--metrics", metavar="URL",
                   help="the server's Prometheus endpoint (http://HOST:PORT/metrics or HOST:PORT), read before and "
                        "after each level to print the per-stage latency split; several, comma-separated, are summed "
                        "(one per worker of `hashret serve --workers N`) (default: with --model the started "
                        "server's own, every worker's; with --addr none)")
    g = p.add_argument_group("server CPU")
    g.add_argument("--server-pid", type=int, metavar="PID",
                   help="with --addr: the server's process id on this machine, to read its CPU time per request "
                        "from /proc (default: the started server's with --model; none with --addr)")
    g.add_argument("--no-echo", action="store_true",
                   help="skip the bare grpc.aio echo servers that are sent the same load after the real one "
                        "(answering at once, and at the real server's rate in groups of its mean batch) to give "
                        "Python gRPC's own CPU per request (default: run them whenever server CPU is read)")
    add_out_arg(p, "serve")


def report_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    head = ["concurrency", "channels", "rpc", "ok/sent", "req/s", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors",
            "client CPU ms/req (busiest)"]
    rows = []
    for r in doc.get("results", []):
        f = (lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-")
        cc = r.get("client_cpu") or {}
        busiest = cc.get("busiest_core_share")
        rows.append([r["concurrency"], r["channels"], r["rpc"], f"{r['ok']}/{r['sent']}", r["requests_per_s"],
                     r["images_per_s"], f(r.get("p50_ms")), f(r.get("p90_ms")), f(r.get("p99_ms")),
                     ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "none",
                     f"{f(cc.get('ms_per_request'))} ({busiest:.0%})" if busiest is not None else "-"])
    if any("server_cpu" in r for r in doc.get("results", [])):  # runs that read the server's CPU time
        head += ["CPU ms/req", "engine", "decode", "rest", "echo floor", "echo same rhythm", "loop+other threads",
                 "ceiling req/s", "load avg"]
        for r, out in zip(doc["results"], rows):
            cpu, sp = r.get("server_cpu") or {}, r.get("cpu_split") or {}
            th = cpu.get("by_thread") or {}
            la = r.get("load_avg_1m") or []
            out += [f(cpu.get("ms_per_request")), f(sp.get("engine_ms")), f(sp.get("decode_ms")),
                    f(sp.get("rest_ms")), f(cpu.get("echo_ms_per_request")),
                    f(cpu.get("echo_same_pattern_ms_per_request")),
                    f(th["loop_ms"] + th["other_ms"]) if th else "-", sp.get("ceiling_requests_per_s", "-"),
                    "/".join(map(str, la)) or "-"]
    return head, rows


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Requests/s and p50/p99 latency vs concurrency."""
    from benchmarks.report import pyplot, save_figure

    plt = pyplot()
    res = sorted(doc.get("results", []), key=lambda r: r["concurrency"])
    if plt is None or not res:
        return False
    xs = [r["concurrency"] for r in res]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(xs, [r["requests_per_s"] or 0 for r in res], marker="o")
    a1.set_ylabel("requests/s")
    a1.set_title("throughput vs concurrency")
    for q in ("p50_ms", "p99_ms"):
        a2.plot(xs, [r.get(q) for r in res], marker="o", label=q[:3])
    a2.set_yscale("log")
    a2.set_ylabel("latency (ms)")
    a2.set_title("latency vs concurrency")
    a2.legend()
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# Service-overhead bars: what the server may add on top of its engine measured alone.
LATENCY_ALLOWANCE_MS = 2.0
THROUGHPUT_SHARE = 0.8
BAR_CONCURRENCY = 16
REST_CPU_MS = 0.7  # server CPU per request outside the engine and decoding, at BAR_CONCURRENCY
# the sizes a loaded server forms lie between these, where engine CPU per batch is interpolated
BASELINE_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def engine_baseline(model: str, server_args: list[str], info: dict[str, Any], images: list[bytes]) -> dict[str, Any]:
    """Time the server's own engine (same EXP, backend, device, threads) offline, right now."""
    from benchmarks.engine import run_engine_bench
    from serve.cli import add_args as add_serve_args

    # The server's own parser, so its defaults (backend, device, engine threads) are the ones in force.
    p = argparse.ArgumentParser(add_help=False)
    add_serve_args(p)
    known, _ = p.parse_known_args(["--model", model, "--gallery", "-", *server_args])
    backend = str(info.get("backend", known.backend)).split(" ")[0] or known.backend
    print(f"engine baseline: {backend} on {known.device}, batch {', '.join(map(str, BASELINE_BATCHES))} "
          "(the server is idle meanwhile)")
    out = run_engine_bench(model, [backend], known.device, batches=BASELINE_BATCHES, iters=40, warmup=5,
                           threads=known.engine_threads or 0, max_seconds=10.0,
                           progress=lambda m: print(f"  {m.strip()}"))
    out["decode"] = decode_cost(model, images)
    print(f"  decode + resize + crop: {out['decode']['ms_per_image']:.3f} ms per image on one thread, "
          f"{out['decode']['cpu_ms_per_image']:.3f} ms CPU")
    return out


def decode_cost(model: str, images: list[bytes], seconds: float = 2.0) -> dict[str, Any]:
    """What the server spends per image before inference (hashret.images.load_image, one thread)."""
    from hashret.images import PreprocessSpec, load_image
    from hashret.manifest import load_manifest

    spec = PreprocessSpec.from_dict(load_manifest(model, kind="export")["preprocessing"])
    times = []
    until = time.perf_counter() + seconds
    cpu0 = time.thread_time()  # PIL decodes and resizes on the calling thread
    while time.perf_counter() < until or len(times) < len(images):
        data = images[len(times) % len(images)]
        t0 = time.perf_counter()
        load_image(data, spec)
        times.append(time.perf_counter() - t0)
    cpu_ms = (time.thread_time() - cpu0) * 1e3 / len(times)
    return {"images": len(times), "ms_per_image": round(1e3 * sorted(times)[len(times) // 2], 4),
            "cpu_ms_per_image": round(cpu_ms, 4)}


def overhead_bars(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Served Search p50 (concurrency 1) vs engine bs=1 + 2 ms; img/s at concurrency 16 vs 80% of the best."""
    eng = baseline.get("results") or []
    if not eng:
        return []
    bs1 = next((r for r in eng if r["batch"] == 1), None)
    best = max(eng, key=lambda r: r["img_per_s"])
    bars = []
    c1 = next((r for r in rows if r["concurrency"] == 1 and r.get("p50_ms") is not None), None)
    if c1 is not None and bs1 is not None and c1["rpc"] == "Search":
        target = bs1["p50_ms"] + LATENCY_ALLOWANCE_MS
        bars.append({"name": "served Search p50 at concurrency 1 <= engine batch-1 p50 + 2 ms",
                     "measured": round(c1["p50_ms"], 3), "target": round(target, 3), "unit": "ms",
                     "met": c1["p50_ms"] <= target,
                     "text": f"served Search p50 at concurrency 1: {c1['p50_ms']:.2f} ms; engine alone at batch 1: "
                             f"{bs1['p50_ms']:.2f} ms, so the service adds {c1['p50_ms'] - bs1['p50_ms']:.2f} ms "
                             f"(target <= {LATENCY_ALLOWANCE_MS:g} ms)"})
    cn = next((r for r in rows if r["concurrency"] == BAR_CONCURRENCY), None)
    if cn is not None and cn.get("images_per_s"):
        target = THROUGHPUT_SHARE * best["img_per_s"]
        share = cn["images_per_s"] / best["img_per_s"]
        ceiling = ""
        decode_ms = (baseline.get("decode") or {}).get("ms_per_image")
        cores = int(machine.cpu_counts().get("usable") or 1)
        if decode_ms and best["device"] == "cpu":
            # the engine's best rate already uses every core; decoding needs core time on top
            limit = cores / (cores / best["img_per_s"] + decode_ms / 1e3)
            ceiling = (f"; decoding ({decode_ms:.2f} ms per image) on the same {cores} cores caps any server at "
                       f"{limit:.0f} img/s ({limit / best['img_per_s']:.0%}) before gRPC")
        bars.append({"name": f"images/s at concurrency {BAR_CONCURRENCY} >= 80% of the engine's best offline batch",
                     "measured": round(cn["images_per_s"], 1), "target": round(target, 1), "unit": "img/s",
                     "met": cn["images_per_s"] >= target,
                     "text": f"images/s at concurrency {BAR_CONCURRENCY}: {cn['images_per_s']:.0f}; engine alone at "
                             f"its best batch ({best['batch']}): {best['img_per_s']:.0f} img/s, so "
                             f"{share:.0%} (target >= {THROUGHPUT_SHARE:.0%}){ceiling}"})
    sp = (cn or {}).get("cpu_split")
    if sp is not None:
        cpu = cn.get("server_cpu") or {}
        th, same = cpu.get("by_thread"), cpu.get("echo_same_pattern_ms_per_request")
        seen = ""
        if th:  # what the threads themselves spent: the engine's share in the server, not alone
            seen += (f"; by thread: engine {th['engine_ms']:.2f}, decode {th['decode_ms']:.2f}, event loop + other "
                     f"{th['loop_ms'] + th['other_ms']:.2f}")
        if same is not None:
            seen += f"; a bare grpc.aio server answering at the same rate in the same groups: {same:.2f}"
        # The rest is a difference of three measurements: a baseline that ran slower than the same work
        # inside the server shrinks it. Met only when the service's own threads agree.
        met = sp["rest_ms"] <= REST_CPU_MS
        if met and th and th["loop_ms"] + th["other_ms"] > REST_CPU_MS:
            met = False
            seen += (f"; NOT met although the rest is under the target: the event loop and the other threads "
                     f"alone spent {th['loop_ms'] + th['other_ms']:.2f} ms (the engine or decode baseline ran "
                     f"slower than the same work inside the server)")
        bars.append({"name": f"server CPU per request outside engine and decode at concurrency {BAR_CONCURRENCY} "
                             f"<= {REST_CPU_MS} ms",
                     "measured": sp["rest_ms"], "target": REST_CPU_MS, "unit": "ms", "met": met,
                     "text": f"server CPU per request at concurrency {BAR_CONCURRENCY}: {sp['total_ms']:.2f} ms = "
                             f"engine {sp['engine_ms']:.2f} + decode {sp['decode_ms']:.2f} + rest "
                             f"{sp['rest_ms']:.2f} (target rest <= {REST_CPU_MS} ms); {cn['requests_per_s']:.0f} "
                             f"req/s of the {sp['ceiling_requests_per_s']:.0f} that engine + decode allow on "
                             f"{sp['cores']} cores{seen}"})
    return bars


def answer_pattern(row: dict[str, Any]) -> tuple[float, int] | None:
    """(every ms, group) in which a level's server answered: its mean batch, at its request rate."""
    stages = row.get("stages") or {}
    items, batches = (stages.get("inference_item") or {}).get("count"), (stages.get("inference_batch") or {}).get("count")
    rate = row.get("requests_per_s")
    if not items or not batches or not rate or row.get("images_per_request", 1) != 1:
        return None
    group = max(1, round(items / batches))
    return 1e3 * group / rate, group


def echo_same_pattern(rows: list[dict[str, Any]], images: list[bytes], reply_bytes: int, args) -> list[dict[str, Any]]:
    """Each level's load again, on an echo server that answers at the level's rate in groups of its
    mean batch (benchmarks.echo_server --answer-every-ms/--answer-group): Python gRPC's CPU per
    request when requests come and go as they did for the real server, its loop asleep in between."""
    out = []
    for r in rows:
        pattern = answer_pattern(r)
        if pattern is None or "server_cpu" not in r:
            continue
        every_ms, group = pattern
        print(f"  echo answering {group} every {every_ms:.1f} ms (concurrency {r['concurrency']}'s rhythm):")
        with EchoChild(reply_bytes, every_ms=every_ms, group=group) as e:
            er = run_load(e.addr, images, [r["concurrency"]], args.requests, args.seconds, args.k, "Echo",
                          args.batch_items, args.channels, args.timeout, None, args.warmup, server_pid=e.proc.pid,
                          clients=args.clients)[0]
        er["answer_every_ms"], er["answer_group"] = round(every_ms, 3), group
        er["command"] = machine.command_line(["python", *e.cmd[1:]])
        r["server_cpu"]["echo_same_pattern_ms_per_request"] = er["server_cpu"]["ms_per_request"]
        out.append(er)
    return out


def run(args) -> int:
    if bool(args.addr) == bool(args.model or args.gallery):
        raise BadInput("target | pass either --addr HOST:PORT or --model EXP --gallery GAL")
    if args.addr and not args.allow_remote and not is_loopback(args.addr):
        raise BadInput(f"--addr {args.addr} | not a loopback address: this load generator drives servers on "
                       "this machine; pass --allow-remote for a server of your own elsewhere")
    if args.model and not args.gallery or args.gallery and not args.model:
        raise BadInput("--model/--gallery | both are needed to start a server")
    if min(args.concurrency) < 1 or args.requests < 1 or args.seconds <= 0 or args.clients < 1:
        raise BadInput("--concurrency/--requests/--seconds/--clients | must be positive")
    server_pid = getattr(args, "server_pid", None)
    if server_pid is not None and args.model:
        raise BadInput("--server-pid | only with --addr: a started server's CPU is read anyway")
    if server_pid is not None:
        process_cpu_seconds(server_pid)  # a wrong pid fails now, not after the first level
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    images, img_desc = load_images(args.images)
    server = None
    started = None
    metrics = getattr(args, "metrics", None)
    if args.model:
        extra = shlex.split(args.server_args)
        if metrics is None:  # the split needs the started server's /metrics: open it if not asked for
            i = extra.index("--metrics-port") + 1 if "--metrics-port" in extra else len(extra)
            if i < len(extra) and extra[i] != "0":
                mport = extra[i]
            else:  # argparse keeps the last of repeated flags: this one wins over a 'pick any' 0
                mport = str(free_port())
                extra += ["--metrics-port", mport]
            # `--workers N`: worker i serves its own metrics on port + i; the stages are their sum
            metrics = ",".join(f"127.0.0.1:{int(mport) + i}" for i in range(_workers(extra)))
        server = ChildServer(args.model, args.gallery, extra)
        t0 = time.perf_counter()
        server.start()
        started = {"command": machine.command_line(["hashret", *server.cmd[3:]]),
                   "startup_s": round(time.perf_counter() - t0, 2)}
        addr = server.addr
        server_pid = server.proc.pid
        print(f"started {started['command']} in {started['startup_s']} s")
    else:
        addr = args.addr
    baseline = None
    reply_bytes = None
    try:
        info = server_info(addr, token)
        if server is not None and not args.no_baseline:
            baseline = engine_baseline(args.model, shlex.split(args.server_args), info, images)
        if server_pid:
            reply_bytes = search_reply_bytes(addr, images[0], args.k, token, args.timeout)
        rows = run_load(addr, images, args.concurrency, args.requests, args.seconds, args.k, args.rpc,
                        args.batch_items, args.channels, args.timeout, token, args.warmup, metrics=metrics,
                        server_pid=server_pid, baseline=baseline, clients=args.clients)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    echo = None
    if server_pid and not getattr(args, "no_echo", False):
        # after the real server stopped, so the two never share the cores
        reply_bytes = reply_bytes or 700
        print(f"bare grpc.aio echo server (benchmarks.echo_server), {reply_bytes}-byte answers, the same load:")
        with EchoChild(reply_bytes) as e:
            echo_rows = run_load(e.addr, images, args.concurrency, args.requests, args.seconds, args.k, "Echo",
                                 args.batch_items, args.channels, args.timeout, None, args.warmup,
                                 server_pid=e.proc.pid, clients=args.clients)
        echo = {"command": machine.command_line(["python", *e.cmd[1:]]), "reply_bytes": reply_bytes,
                "results": echo_rows}
        for r in rows:
            er = next((x for x in echo_rows if x["concurrency"] == r["concurrency"]), None)
            if er is not None and "server_cpu" in r:
                r["server_cpu"]["echo_ms_per_request"] = er["server_cpu"]["ms_per_request"]
        echo["same_pattern"] = echo_same_pattern(rows, images, reply_bytes, args)
    config = {"addr": addr, "started_server": started, "server_info": info, "images": img_desc,
              "concurrency": args.concurrency, "requests": args.requests, "seconds": args.seconds,
              "warmup": args.warmup, "channels": args.channels, "clients": args.clients, "rpc": args.rpc,
              "batch_items": args.batch_items, "k": args.k, "timeout_s": args.timeout}
    notes = ["Closed loop: each worker waits for its answer before sending the next request.",
             ("client_cpu: the load generator's own CPU time (all its processes and threads) over each level's "
              "timed requests; busiest_core_share near 1 means a client process was busy all the time and may "
              "have set the pace."),
             "Latency percentiles are over successful calls; failures are counted by gRPC status code."]
    if started:
        notes.append("Server and load generator ran on the same machine and shared its CPU cores.")
    generator = ("1 asyncio event loop" if args.clients == 1
                 else f"up to {args.clients} processes, 1 asyncio event loop each")
    meta = machine.run_meta("serve", threads={"load_generator": generator,
                                              "server": args.server_args or "server defaults"},
                            argv=getattr(args, "_argv", None))
    doc = {**meta, "config": config, "results": rows, "notes": notes}
    if server_pid:
        notes.append("server_cpu: the server process's user + system CPU time (all threads, from /proc) over "
                     "each level's timed requests, per successful request. cpu_split: engine = the engine alone "
                     "in this process at the level's mean batch size (CPU per batch interpolated between the "
                     "baseline's batch sizes) and decode = these images decoded alone, both per request; rest = "
                     "the remainder (gRPC, protobuf, thread hand-offs, bookkeeping); ceiling = cores x 1000 / "
                     "(engine + decode) requests/s.")
    if echo is not None:
        doc["echo_floor"] = echo
        notes.append("echo_floor: a bare grpc.aio server answering the same requests with as many bytes as a "
                     "Search answer, run after the real server: Python gRPC's own CPU per request.")
    if baseline is not None:
        doc["engine_baseline"] = baseline
        doc["bars"] = overhead_bars(rows, baseline)
        notes.append("Bars compare with the engine timed alone in this run (same EXP, backend and threads, "
                     "random uint8 input: no decoding, no gRPC), so both sides saw the same machine state.")
    print()
    head, trows = report_table(doc)
    print_table(head, trows)
    for b in doc.get("bars", []):
        print(f"bar: {b['text']} -> {'met' if b['met'] else 'NOT met'}")
    path = write_result(doc, args.out)
    print(f"wrote {path}")
    return 0

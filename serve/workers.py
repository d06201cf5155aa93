"""`hashret serve --workers N`: N server processes on one port, for hosts where one event loop is the cap.

One Python process answers Search on one asyncio loop. Measured on our 2-core VM (bench serve,
serve-effnet-dch64.json), the loop and gRPC's own threads cost 0.7-1.1 ms of CPU per request,
so one process tops out near 1,000 Search/s however many cores or GPUs the host has. Here a
supervisor starts N ordinary servers (serve.server) that listen on the same port with
SO_REUSEPORT; the kernel spreads incoming connections over them. Each worker has its own engine,
batcher, decode threads and gallery handle.

The gallery is opened by every worker at once (Gallery.shared_mode): FAISS kinds read-only
(writes answer FAILED_PRECONDITION; change the gallery with one process, then restart the
workers), Milvus on a server read-write (Milvus is the shared store). Per-process state that a
client cannot address (Admin rollover, shadowing) is refused with --workers > 1.

Hand-shake: the supervisor sends each worker its ServeConfig over stdin (tokens stay out of
argv). The worker loads everything, says "loaded" on a pipe of its own, and opens the port only
after "go": the supervisor says it once all workers have loaded, so no worker takes traffic
while its siblings still warm up and compete for the cores. A worker whose stdin closes (the
supervisor died) drains and stops. A worker that dies later is restarted; one that keeps dying
stops the whole set (a crash loop is for the operator's supervisor, systemd or Kubernetes).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from hashret.errors import BadInput, Unavailable

log = logging.getLogger("hashret.serve.workers")

FD_ENV = "HASHRET_WORKER_FD"  # the worker's end of its "loaded"/"serving" pipe
RESTARTS = 5  # at most this many restarts ...
RESTART_WINDOW_S = 60.0  # ... within this many seconds, else the whole set stops
LOAD_TIMEOUT_S = 900.0  # a model + gallery that takes longer to open is stuck


# ---------------------------------------------------------------------- planning (no processes)
def worker_configs(cfg, n: int) -> list:
    """The N workers' ServeConfigs, or BadInput naming what cannot be shared by N processes.

    Thread defaults are split so N workers together use what one server would: engine threads
    max(1, CPUs // N) each, CPU decode threads max(1, min(4, CPUs // N)) each. --metrics-port P
    becomes P + i for worker i (0 stays 0: any free port each; every worker logs its own).
    """
    from serve.gallery import shared_mode

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInput(f"--workers {n!r} | must be an integer >= 1")
    if cfg.admin_token:
        raise BadInput("--admin-token-file | the Admin service (rollover) drives one process; with --workers > 1 "
                       "roll a new model out by starting a new set of workers on the new pair, or serve with "
                       "--workers 1")
    if cfg.shadow_fraction:
        raise BadInput("--shadow-fraction | shadowing needs the Admin service, which --workers > 1 does not run")
    if cfg.tracer_provider is not None:
        raise BadInput("tracer_provider | cannot be handed to worker processes: use otel=True")
    mode = shared_mode(cfg.gallery)
    cpus = os.cpu_count() or 1
    engine_threads = cfg.engine_threads or max(1, cpus // n)
    decode_threads = cfg.decode_threads
    if decode_threads is None and cfg.decode == "cpu":
        decode_threads = max(1, min(4, cpus // n))
    out = []
    for i in range(n):
        metrics = cfg.metrics_port
        if metrics:
            metrics = int(metrics) + i
        out.append(replace(cfg, reuse_port=True, read_only_gallery=mode == "read-only", engine_threads=engine_threads,
                           decode_threads=decode_threads, metrics_port=metrics))
    return out


def hold_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to host:port with SO_REUSEPORT, which keeps the port ours
    until the workers listen on it. Port 0 picks a free one. A port that anything already uses,
    even another set of workers, is refused: sharing it would mix two deployments' traffic."""
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BadInput(f"--host {host!r} | cannot be resolved ({e})") from None
    family, _, _, _, addr = infos[0]

    def tcp_socket() -> socket.socket:  # bound as gRPC binds its own
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        if family == socket.AF_INET6:  # dual-stack whatever net.ipv6.bindv6only says: IPv4 users count
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return s

    if port:  # a plain bind fails when any socket, shared or not, holds the port
        probe = tcp_socket()
        try:
            probe.bind(addr)
        except OSError as e:
            raise Unavailable(f"--port {port} | cannot listen on {host}:{port} ({e.strerror}): is another "
                              f"server running?") from None
        finally:
            probe.close()
    s = tcp_socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        raise Unavailable(f"--port {port} | cannot listen on {host}:{port} ({e.strerror})") from None
    return s


# ---------------------------------------------------------------------- the supervisor
@dataclass
class _Worker:
    index: int
    cfg: object
    proc: subprocess.Popen | None = None
    started: float = 0.0
    loaded: bool = False
    serving: bool = False
    info: dict = field(default_factory=dict)


class Supervisor:
    """Starts, watches and stops the workers; `run()` blocks until they are all gone."""

    def __init__(self, cfg, n: int, log_format: str = "json", verbose: bool = False):
        self.cfgs = worker_configs(cfg, n)
        self.log_format, self.verbose = log_format, verbose
        self.grace_s = float(cfg.grace_s)
        self.workers = [_Worker(i, c) for i, c in enumerate(self.cfgs)]
        self.events: queue.Queue = queue.Queue()
        self.restarts: deque[float] = deque()
        self.port = 0
        self.exit_code = 0

    # -- processes
    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        env = dict(os.environ, **{FD_ENV: str(wfd)})
        cmd = [sys.executable, "-m", "serve.workers", "--index", str(w.index), "--log-format", self.log_format]
        if self.verbose:
            cmd.append("--verbose")
        w.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=(wfd,), env=env)
        os.close(wfd)
        w.started, w.loaded, w.serving = time.monotonic(), False, False
        w.proc.stdin.write(pickle.dumps(replace(w.cfg, port=self.port)))
        w.proc.stdin.flush()
        threading.Thread(target=self._read, args=(w, w.proc, r), name=f"hashret-worker-{w.index}",
                         daemon=True).start()

    def _read(self, w: _Worker, proc: subprocess.Popen, fd: int) -> None:
        """Forward a worker's hand-shake lines, then its exit, to the supervisor's queue."""
        with os.fdopen(fd, "rb") as f:
            for line in f:
                word, _, rest = line.decode("utf-8", "replace").strip().partition(" ")
                self.events.put((word, w, proc, json.loads(rest) if rest else {}))
        self.events.put(("exited", w, proc, {"code": proc.wait()}))

    def _go(self, w: _Worker) -> None:
        try:
            w.proc.stdin.write(b"go\n")
            w.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it is exiting; its "exited" event follows

    # -- main loop
    def run(self) -> int:
        holder = hold_port(self.cfgs[0].host, int(self.cfgs[0].port))
        self.port = holder.getsockname()[1]
        old = {s: signal.signal(s, lambda *_: self.events.put(("stop", None, None, {})))
               for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for w in self.workers:
                self._spawn(w)
            self._loop(holder)
        finally:
            holder.close()
            for s, h in old.items():
                signal.signal(s, h)
            self._stop_all()
        return self.exit_code

    def _loop(self, holder: socket.socket) -> None:
        all_serving = False
        while True:
            try:
                word, w, proc, data = self.events.get(timeout=1.0)
            except queue.Empty:
                if not all_serving:
                    late = [w for w in self.workers if not w.loaded and time.monotonic() - w.started > LOAD_TIMEOUT_S]
                    if late:
                        log.error("worker %d | not loaded after %.0f s: stopping", late[0].index, LOAD_TIMEOUT_S)
                        self.exit_code = 1
                        return
                continue
            if word == "stop":
                log.info("stopping workers", extra={"fields": {"workers": len(self.workers), "grace_s": self.grace_s}})
                return
            if proc is not w.proc:
                continue  # from a worker process already replaced
            if word == "loaded":
                w.loaded = True
                if all_serving or all(x.loaded for x in self.workers):
                    for x in self.workers:  # all at once at start; a restarted one alone later
                        if x.loaded and not x.serving:
                            self._go(x)
            elif word == "serving":
                w.serving, w.info = True, data
                if not all_serving and all(x.serving for x in self.workers):
                    all_serving = True
                    holder.close()  # the workers hold the port now
                    log.info("serving", extra={"fields": {
                        "address": data.get("address"), "workers": len(self.workers),
                        "pids": [x.proc.pid for x in self.workers],
                        "metrics_ports": [x.info.get("metrics_port") for x in self.workers],
                        "gallery_read_only": self.cfgs[0].read_only_gallery,
                    }})
                elif all_serving:
                    log.info("worker %d | serving again (pid %d)", w.index, w.proc.pid)
            elif word == "exited":
                code = data["code"]
                if not all_serving:
                    log.error("worker %d | exited with %s before serving: stopping", w.index, code)
                    self.exit_code = code if isinstance(code, int) and code > 0 else 1
                    return
                now = time.monotonic()
                while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
                    self.restarts.popleft()
                if len(self.restarts) >= RESTARTS:
                    log.error("worker %d | exited with %s, the %d-th restart within %.0f s: stopping all",
                              w.index, code, RESTARTS + 1, RESTART_WINDOW_S)
                    self.exit_code = 1
                    return
                self.restarts.append(now)
                log.warning("worker %d | exited with %s: restarting it (the others keep serving)", w.index, code)
                self._spawn(w)

    def _stop_all(self) -> None:
        """SIGTERM (each drains in-flight requests for --grace-s), then SIGKILL what is left."""
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.grace_s + 15.0
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d | did not stop within %.0f s: killing it", w.index, self.grace_s + 15.0)
                w.proc.kill()
                w.proc.wait()
            if w.proc.stdin:
                try:
                    w.proc.stdin.close()
                except OSError:
                    pass


def run_workers(cfg, n: int, log_format: str = "json", verbose: bool = False) -> int:
    """Serve with N worker processes until SIGTERM/SIGINT; the exit code for the CLI."""
    return Supervisor(cfg, n, log_format, verbose).run()


# ---------------------------------------------------------------------- one worker process
def _worker_main(argv: list[str] | None = None) -> int:
    import argparse
    import asyncio

    from hashret.errors import HashretError
    from serve import server as srv

    p = argparse.ArgumentParser(description="one worker of `hashret serve --workers N` (started by it, not by hand)")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if args.log_format == "json":
        srv.setup_json_logging(level)
    else:
        logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s worker {args.index} %(name)s: %(message)s")
    fd = int(os.environ.pop(FD_ENV))
    out = os.fdopen(fd, "wb", buffering=0)
    stdin = sys.stdin.buffer
    cfg = pickle.load(stdin)

    def say(word: str, **data) -> None:
        out.write(f"{word} {json.dumps(data)}\n".encode())

    async def before_start(server) -> None:
        say("loaded")
        line = await asyncio.get_running_loop().run_in_executor(None, stdin.readline)
        if line.strip() != b"go":
            raise SystemExit(0)  # the supervisor went away before the port opened

    async def after_start(server) -> None:
        say("serving", address=server.bound_address, metrics_port=server.metrics_port, pid=os.getpid())
        loop = asyncio.get_running_loop()

        def orphan_watch() -> None:  # EOF: the supervisor is gone; nobody would stop us
            while stdin.readline():
                pass
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(server.stop()))

        threading.Thread(target=orphan_watch, name="hashret-orphan-watch", daemon=True).start()

    try:
        asyncio.run(srv._serve_async(cfg, before_start, after_start))
    except HashretError as e:
        log.error("worker %d | %s", args.index, e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())

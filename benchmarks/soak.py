"""Soak test of the retrieval service: sustained mixed load, errors by code, p99 and RSS over time.

    python -m benchmarks.soak --addr 127.0.0.1:50051 --token-file token.txt --seconds 600
    python -m benchmarks.soak --model runs/exp --gallery galleries/grocery --seconds 600 --out soak.json

`--concurrency` asyncio workers (grpc.aio, spread over a few channels) send requests back to
back for `--seconds`, each picking Search, SearchBatch or Upsert by the weights in `--mix`.
Reported: requests, errors by gRPC status code (overall and per RPC), latency percentiles per
`--window` seconds (is p99 drifting?), and the server's resident memory over time (is it
leaking?) when the script started the server itself (--model/--gallery) or was given --pid.

Only loopback targets are accepted (127.0.0.0/8, ::1, localhost): a soak is a load test on your
own machine, never traffic against someone else's server.

With --model/--gallery the gallery is copied to a temporary folder first (the soak's Upserts
must not grow your gallery; --in-place writes into it), and `hashret serve` is started on a
free 127.0.0.1 port with a generated bearer token, so Upserts are authorized.

Exit code: 0, or 1 when a call failed with a status code outside `--allow` (default:
RESOURCE_EXHAUSTED, the server's documented back-pressure answer), or when the server's RSS
grew by more than `--max-rss-growth-mb` from a baseline taken after `--rss-warmup-s` of load.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.cli import run_main
from benchmarks.machine import add_allow_dirty_arg, run_meta, write_result
from benchmarks.serve_load import load_images as _load_images
from benchmarks.serve_load import open_channels
from benchmarks.serve_load import synthetic_images  # noqa: F401  (re-exported: the tests build images with it)
from hashret.cliargs import add_output_args
from hashret.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MIX = "search=0.7,batch=0.2,upsert=0.1"
RPCS = {"search": "Search", "batch": "SearchBatch", "upsert": "Upsert"}


# Under load the server's RSS first climbs (ONNX Runtime's arena grows to each new batch shape,
# gRPC and the decode threads allocate their buffers), then stays flat: leaks are judged from a
# baseline taken once that is over. From two measured 4-minute soaks (README, "Soak test"): +406
# and +438 MB, over within 7 s on a quiet machine but with a last +36 MB step at 54 s on a busy one
# (bigger batches form later), flat after; growth after 60 s was 1.3 and 5.9 MB. A 10-minute soak
# leaves 540 s to judge, in which a leak of ~10 KB per request at those 15-20 req/s passes 100 MB.
RSS_WARMUP_S = 60.0
DEFAULT_MAX_RSS_GROWTH_MB = 100.0


class SoakError(BadInput):
    """A usage error (exit code 2, reported by the shared benchmark `main`)."""


# ---------------------------------------------------------------------------- helpers
def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost' (never resolved: no DNS traffic)."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def split_addr(addr: str) -> tuple[str, int]:
    """'127.0.0.1:50051' / '[::1]:50051' / 'localhost:50051' -> (host, port)."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SoakError(f"--addr {addr!r} | expected HOST:PORT, e.g. 127.0.0.1:50051")
    return host, int(port)


def check_loopback(addr: str) -> str:
    host, _ = split_addr(addr)
    if not is_loopback_host(host):
        raise SoakError(f"--addr {addr} | not a loopback address: the soak only drives servers on this machine "
                        "(127.0.0.1, ::1 or localhost)")
    return addr


def rss_bytes(pid: int | str = "self") -> int | None:
    """VmRSS of a process from /proc (None when it is gone or unreadable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_mix(text: str) -> dict[str, float]:
    """'search=0.7,batch=0.2,upsert=0.1' -> normalized weights."""
    out: dict[str, float] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition("=")
        name = name.strip().lower()
        if name not in RPCS:
            raise SoakError(f"--mix {text!r} | unknown kind {name!r}: use {', '.join(RPCS)}")
        try:
            out[name] = float(w)
        except ValueError:
            raise SoakError(f"--mix {text!r} | weight {w!r} of {name} is not a number") from None
        if out[name] < 0:
            raise SoakError(f"--mix {text!r} | weight of {name} is negative")
    total = sum(out.values())
    if total <= 0:
        raise SoakError(f"--mix {text!r} | give at least one positive weight, e.g. {DEFAULT_MIX}")
    return {k: v / total for k, v in out.items() if v > 0}


def load_images(spec: Sequence[str] | None, limit: int = 64) -> list[bytes]:
    return _load_images(spec, limit)[0]


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return round(v[i], 3)


# ---------------------------------------------------------------------------- server process
class ServerProcess:
    """`python -m hashret serve` as a child process on 127.0.0.1:<free port>.

    The child's stdout+stderr go to a log file (`log_text()`); `stop()` sends SIGTERM (graceful),
    `kill()` SIGKILL (a crash). Used by the soak and by the reliability tests.
    """

    def __init__(self, model, gallery, extra: Sequence[str] = (), token: str | None = None,
                 port: int | None = None, env: dict | None = None, log_dir: str | os.PathLike | None = None):
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.token = token
        self.argv = [sys.executable, "-m", "hashret", "serve", "--model", str(model), "--gallery", str(gallery),
                     "--host", "127.0.0.1", "--port", str(self.port), *map(str, extra)]
        fd, self.log_path = tempfile.mkstemp(prefix="hashret-serve-", suffix=".log", dir=log_dir)
        os.close(fd)
        self.env = {**os.environ, **(env or {})}
        pp = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{pp}" if pp else str(ROOT)
        if token is not None:
            self.env["HASHRET_TOKEN"] = token
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def spawn(self) -> "ServerProcess":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=str(ROOT), stdin=subprocess.DEVNULL)
        finally:
            log.close()
        return self

    def wait_serving(self, timeout: float = 120.0) -> "ServerProcess":
        from serve.client import wait_serving

        try:
            wait_serving(self.addr, self.proc, timeout, lambda: self.log_text()[-4000:])
        except RuntimeError:
            self.kill()
            raise
        return self

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        return self.spawn().wait_serving(timeout)

    def wait_exit(self, timeout: float = 120.0) -> int:
        """For a server expected to refuse to start: its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int | None:
        return rss_bytes(self.proc.pid) if self.alive() else None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def cleanup(self) -> None:
        self.kill()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------- load
class _Recorder:
    """Every call's (end time, latency, rpc, code), plus RSS samples."""

    def __init__(self):
        self.calls: list[tuple[float, float, str, str]] = []
        self.item_errors: dict[str, int] = {}
        self.rss: list[tuple[float, int]] = []


async def _drive(addr: str, *, seconds: float, concurrency: int, mix: dict[str, float], images: list[bytes],
                 token: str | None, k: int, batch_items: int, timeout: float, channels: int, seed: int,
                 pid: int | None, rss_every: float, rec: _Recorder, t0_box: list) -> None:
    import grpc

    from serve._proto import retrieval_pb2 as pb

    chans, stubs = open_channels(addr, channels, concurrency)
    n_ch = len(chans)
    md = (("authorization", f"Bearer {token}"),) if token else ()
    kinds, weights = list(mix), [mix[x] for x in mix]
    run_id = secrets.token_hex(4)
    counter = [0]

    async def one(stub, kind: str, rng: random.Random):
        img = images[rng.randrange(len(images))]
        if kind == "search":
            return await stub.Search(pb.SearchRequest(image=img, k=k), timeout=timeout, metadata=md)
        if kind == "batch":
            items = [pb.SearchRequest(image=images[rng.randrange(len(images))], k=k) for _ in range(batch_items)]
            resp = await stub.SearchBatch(pb.SearchBatchRequest(items=items), timeout=timeout, metadata=md)
            for r in resp.results:
                if r.WhichOneof("result") == "error":
                    rec.item_errors[r.error.status] = rec.item_errors.get(r.error.status, 0) + 1
            return resp
        counter[0] += 1
        item = pb.UpsertItem(id=f"soak/{run_id}/{counter[0]}", image=img, metadata={"source": "soak"})
        return await stub.Upsert(iter([item]), timeout=timeout, metadata=md)

    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), 30)
        t0 = time.monotonic()
        t0_box.append(t0)
        end = t0 + seconds

        async def worker(w: int):
            rng = random.Random(seed * 100003 + w)
            stub = stubs[w % n_ch]
            while time.monotonic() < end:
                kind = rng.choices(kinds, weights)[0]
                t = time.monotonic()
                try:
                    await one(stub, kind, rng)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                now = time.monotonic()
                rec.calls.append((now - t0, (now - t) * 1e3, RPCS[kind], code))
                if code == "UNAVAILABLE":
                    await asyncio.sleep(0.05)  # a dead server: do not spin

        async def sampler():
            while True:
                r = rss_bytes(pid) if pid else None
                if r is not None:
                    rec.rss.append((time.monotonic() - t0, r))
                await asyncio.sleep(rss_every)

        samp = asyncio.ensure_future(sampler()) if pid else None
        try:
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        finally:
            if samp is not None:
                samp.cancel()
                try:
                    await samp
                except asyncio.CancelledError:
                    pass
        if pid:
            r = rss_bytes(pid)
            if r is not None:
                rec.rss.append((time.monotonic() - t0, r))
    finally:
        await asyncio.gather(*(c.close() for c in chans), return_exceptions=True)


def judge_rss(samples: Sequence[tuple[float, int]], warmup_s: float = RSS_WARMUP_S,
              before: int | None = None) -> dict[str, Any]:
    """RSS samples (seconds since the load began, bytes) -> start, baseline, end, peak and growth in MB.

    `growth_mb` is end minus baseline, where the baseline comes after `warmup_s` of load (or after
    half the run, when it is shorter than twice that, so a short soak still has a half to judge)
    and `before` is the reading taken before the load began (default: the first sample). Baseline
    and end are medians of three samples, so one taken mid-burst does not decide either.
    """
    if not samples:
        return {}
    mb = 2**20
    duration = samples[-1][0]
    warm = min(float(warmup_s), duration / 2)
    after = [(t, r) for t, r in samples if t >= warm] or list(samples[-1:])
    head = after[:3]
    base = statistics.median(r for _, r in head)
    end = statistics.median(r for _, r in samples[-3:])
    start = before if before is not None else samples[0][1]
    judged_s = max(samples[-1][0] - head[0][0], 1e-9)
    return {
        "start_mb": round(start / mb, 1), "warmup_s": round(warm, 1), "baseline_at_s": round(head[0][0], 1),
        "baseline_mb": round(base / mb, 1), "warmup_growth_mb": round((base - start) / mb, 1),
        "end_mb": round(end / mb, 1), "peak_mb": round(max(r for _, r in samples) / mb, 1),
        "growth_mb": round((end - base) / mb, 1),
        "growth_mb_per_min": round((end - base) / mb / judged_s * 60, 2) if len(samples) > 3 else None,
        "samples": [[round(t, 1), round(r / mb, 1)] for t, r in samples],
    }


def summarize(rec: _Recorder, seconds: float, window: float, rss_before: int | None,
              rss_warmup_s: float = RSS_WARMUP_S) -> dict[str, Any]:
    calls = rec.calls
    errors: dict[str, int] = {}
    by_rpc: dict[str, dict[str, int]] = {}
    lat_by_code: dict[str, list[float]] = {}
    for _, ms, rpc, code in calls:
        if code != "OK":
            errors[code] = errors.get(code, 0) + 1
        by_rpc.setdefault(rpc, {}).setdefault(code, 0)
        by_rpc[rpc][code] += 1
        lat_by_code.setdefault(code, []).append(ms)
    ok_lat = lat_by_code.get("OK", [])
    n_win = max(1, int(-(-seconds // window)))
    windows = []
    for w in range(n_win):
        lo, hi = w * window, min(seconds, (w + 1) * window)
        sel = [c for c in calls if lo <= c[0] < hi or (w == n_win - 1 and c[0] >= hi)]
        ok = [c[1] for c in sel if c[3] == "OK"]
        errs: dict[str, int] = {}
        for c in sel:
            if c[3] != "OK":
                errs[c[3]] = errs.get(c[3], 0) + 1
        rss = [r for t, r in rec.rss if lo <= t < hi + (1e9 if w == n_win - 1 else 0)]
        windows.append({
            "t0_s": round(lo, 1), "t1_s": round(hi, 1), "requests": len(sel), "ok": len(ok), "errors": errs,
            "req_per_s": round(len(sel) / max(hi - lo, 1e-9), 1),
            "p50_ms": percentile(ok, 50), "p99_ms": percentile(ok, 99),
            "rss_mb": round(max(rss) / 2**20, 1) if rss else None,
        })
    rss = judge_rss(rec.rss, rss_warmup_s, rss_before)
    return {
        "requests": len(calls),
        "ok": len(ok_lat),
        "errors": dict(sorted(errors.items())),
        "by_rpc": {k: dict(sorted(v.items())) for k, v in sorted(by_rpc.items())},
        "item_errors": dict(sorted(rec.item_errors.items())),
        "latency_ms": {"p50": percentile(ok_lat, 50), "p90": percentile(ok_lat, 90),
                       "p99": percentile(ok_lat, 99), "max": round(max(ok_lat), 3) if ok_lat else None},
        "latency_ms_by_code": {c: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99),
                                   "max": round(max(v), 3)} for c, v in sorted(lat_by_code.items())},
        "req_per_s": round(len(calls) / seconds, 1) if seconds > 0 else None,
        "windows": windows,
        "rss": rss,
    }


def run_soak(addr: str, *, seconds: float = 600.0, concurrency: int = 64, mix: dict[str, float] | str = DEFAULT_MIX,
             images: list[bytes] | None = None, token: str | None = None, k: int = 10, batch_items: int = 4,
             timeout: float = 30.0, channels: int = 8, window: float = 10.0, pid: int | None = None,
             rss_every: float = 1.0, seed: int = 0, rss_warmup_s: float = RSS_WARMUP_S) -> dict[str, Any]:
    """Drive the server at `addr` (loopback only) and return the summary dict (see `summarize`)."""
    check_loopback(addr)
    if isinstance(mix, str):
        mix = parse_mix(mix)
    if seconds <= 0 or concurrency < 1 or window <= 0 or timeout <= 0:
        raise SoakError("--seconds/--concurrency/--window/--timeout | must be positive")
    if rss_warmup_s < 0:
        raise SoakError(f"--rss-warmup-s {rss_warmup_s:g} | is negative: give the seconds of load before the "
                        f"RSS baseline (default: {RSS_WARMUP_S:g})")
    images = images or synthetic_images()
    rec = _Recorder()
    rss_before = rss_bytes(pid) if pid else None
    t0_box: list = []
    asyncio.run(_drive(addr, seconds=seconds, concurrency=concurrency, mix=mix, images=images, token=token, k=k,
                       batch_items=batch_items, timeout=timeout, channels=channels, seed=seed, pid=pid,
                       rss_every=rss_every, rec=rec, t0_box=t0_box))
    out = summarize(rec, seconds, window, rss_before, rss_warmup_s)
    out["config"] = {"addr": addr, "seconds": seconds, "concurrency": concurrency, "mix": mix, "k": k,
                     "batch_items": batch_items, "timeout_s": timeout, "channels": channels, "window_s": window,
                     "pid": pid, "images": len(images), "seed": seed, "rss_warmup_s": rss_warmup_s}
    return out


# ---------------------------------------------------------------------------- report
def table(rows: list[list[Any]], head: list[str]) -> str:
    cells = [head] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per --window (also what `hashret bench report` shows for a soak result)."""
    rows = [[f"{w['t0_s']:g}-{w['t1_s']:g}", w["requests"], w["req_per_s"], w["ok"],
             ", ".join(f"{k}={v}" for k, v in w["errors"].items()) or "none", w["p50_ms"], w["p99_ms"], w["rss_mb"]]
            for w in doc["windows"]]
    return ["window s", "requests", "req/s", "ok", "errors", "p50 ms", "p99 ms", "rss MB"], rows


def rss_line(rss: dict[str, Any]) -> str:
    if not rss:
        return "server RSS: not measured (pass --pid, or let the soak start the server with --model/--gallery)"
    return (f"server RSS: start {rss['start_mb']} MB, {rss['baseline_mb']} MB after {rss['baseline_at_s']:g} s of "
            f"warm-up, end {rss['end_mb']} MB, peak {rss['peak_mb']} MB: growth since warm-up {rss['growth_mb']} MB"
            + (f" ({rss['growth_mb_per_min']} MB/min)" if rss.get("growth_mb_per_min") is not None else ""))


def report(doc: dict[str, Any]) -> str:
    head, rows = report_table(doc)
    out = [table(rows, head), ""]
    errs = ", ".join(f"{k}={v}" for k, v in doc["errors"].items()) or "none"
    lat = doc["latency_ms"]
    out.append(f"total: {doc['requests']} requests ({doc['req_per_s']}/s), ok {doc['ok']}, errors: {errs}")
    out.append(f"latency of successful calls: p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
    for code, v in doc.get("latency_ms_by_code", {}).items():
        if code != "OK":  # how fast a refusal comes back (a full queue must not hold callers)
            out.append(f"latency of {code}: p50 {v['p50']} ms, p99 {v['p99']} ms, max {v['max']} ms (n={v['n']})")
    for rpc, codes in doc["by_rpc"].items():
        out.append(f"  {rpc}: " + ", ".join(f"{k}={v}" for k, v in codes.items()))
    out.append(rss_line(doc["rss"]))
    return "\n".join(out)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\nexamples:\n"
        "  python -m benchmarks.soak --addr 127.0.0.1:50051 --token-file token.txt --pid 12345\n"
        "  python -m benchmarks.soak --model runs/exp --gallery galleries/grocery --seconds 600 --out soak.json",
    )
    g = p.add_argument_group("target (one of)")
    g.add_argument("--addr", metavar="HOST:PORT", help="a running server on this machine (loopback only)")
    g.add_argument("--model", metavar="EXP", help="with --gallery: start `hashret serve` on 127.0.0.1 for the soak")
    g.add_argument("--gallery", metavar="GAL", help="gallery for the started server (copied first, see --in-place)")
    g.add_argument("--server-args", default="", metavar="'ARGS'",
                   help="extra flags for the started server, given with '=': --server-args='--queue-size 2 "
                        "--max-batch 8' (default: none)")
    g.add_argument("--in-place", action="store_true", help="let Upserts write into --gallery itself (default: a copy)")
    g.add_argument("--pid", type=int, default=None, help="with --addr: the server's process id, to sample its RSS")
    g = p.add_argument_group("load")
    g.add_argument("--seconds", type=float, default=600.0, help="how long to drive the server (default: 600)")
    g.add_argument("--concurrency", type=int, default=64, help="requests in flight at once (default: 64)")
    g.add_argument("--mix", default=DEFAULT_MIX, help=f"weights of the RPC kinds (default: {DEFAULT_MIX})")
    g.add_argument("--channels", type=int, default=8, help="gRPC channels the workers share (default: 8)")
    g.add_argument("-k", "--k", type=int, default=10, help="neighbours per search (default: 10)")
    g.add_argument("--batch-items", type=int, default=4, help="images per SearchBatch call (default: 4)")
    g.add_argument("--timeout", type=float, default=30.0, help="deadline per call in seconds (default: 30)")
    g.add_argument("--images", nargs="+", metavar="DIR-or-FILE", help="query images (default: 8 synthetic JPEGs)")
    g.add_argument("--token", default=None, help="bearer token for Upsert (default: $HASHRET_TOKEN)")
    g.add_argument("--token-file", default=None, help="file holding the bearer token (default: none)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the request mix (default: 0)")
    g = p.add_argument_group("report")
    g.add_argument("--window", type=float, default=10.0, help="seconds per row of the over-time table (default: 10)")
    g.add_argument("--allow", default="RESOURCE_EXHAUSTED",
                   help="status codes that do not fail the run, comma-separated (default: RESOURCE_EXHAUSTED)")
    g.add_argument("--max-rss-growth-mb", type=float, default=DEFAULT_MAX_RSS_GROWTH_MB,
                   help="fail (exit 1) when the server's RSS grew by more than this after the warm-up "
                        f"(default: {DEFAULT_MAX_RSS_GROWTH_MB:g})")
    g.add_argument("--rss-warmup-s", type=float, default=RSS_WARMUP_S,
                   help="seconds of load before the RSS baseline is taken; half the run when it is shorter "
                        f"than twice this (default: {RSS_WARMUP_S:g})")
    add_output_args(g, metavar="JSON", help="write the full result as JSON here (default: none)", progress=False)
    add_allow_dirty_arg(g)
    return p


def _token(args) -> str | None:
    from hashret.tokens import load_token, parse_token

    if args.token_file or not args.token:
        return load_token(args.token_file)  # the server's rule, so a file it accepts works here too
    return parse_token(args.token, "--token")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(build_parser(), _main, argv)


def _main(args) -> int:
    if bool(args.addr) == bool(args.model or args.gallery):
        raise SoakError("target | pass either --addr HOST:PORT or --model EXP --gallery GAL")
    if args.model and not args.gallery or args.gallery and not args.model:
        raise SoakError("--model/--gallery | both are needed to start a server")
    if args.addr:
        check_loopback(args.addr)
    mix = parse_mix(args.mix)
    images = load_images(args.images)
    token = _token(args)
    server = None
    workdir = None
    pid = args.pid
    addr = args.addr
    try:
        if args.model:
            for pth, flag in ((args.model, "--model"), (args.gallery, "--gallery")):
                if not Path(pth).exists():
                    raise SoakError(f"{flag} {pth} | not found")
            gal = Path(args.gallery)
            if not args.in_place:
                workdir = tempfile.mkdtemp(prefix="hashret-soak-")
                gal = Path(workdir) / gal.name
                shutil.copytree(args.gallery, gal, ignore=shutil.ignore_patterns(".lock"))
            token = token or secrets.token_hex(16)
            server = ServerProcess(args.model, gal, shlex.split(args.server_args), token=token)
            t = time.monotonic()
            server.start()
            print(f"started hashret serve on {server.addr} (pid {server.pid}) in {time.monotonic() - t:.1f} s",
                  flush=True)
            addr, pid = server.addr, server.pid
        elif "upsert" in mix and not token:
            raise SoakError("--mix includes upsert | pass --token or --token-file (or set HASHRET_TOKEN): "
                            "the server refuses writes without it")
        print(f"soak: {args.seconds:g} s, concurrency {args.concurrency}, mix "
              + ", ".join(f"{k}={v:.2f}" for k, v in mix.items()) + f", target {addr}", flush=True)
        doc = run_soak(addr, seconds=args.seconds, concurrency=args.concurrency, mix=mix, images=images,
                       token=token, k=args.k, batch_items=args.batch_items, timeout=args.timeout,
                       channels=args.channels, window=args.window, pid=pid, seed=args.seed,
                       rss_warmup_s=args.rss_warmup_s)
        if server is not None:
            doc["server"] = {"argv": ["hashret", *server.argv[3:]], "alive_at_end": server.alive()}
    finally:
        if server is not None:
            server.stop()
            if server.proc is not None and server.proc.returncode not in (0, None):
                print(f"server exit code {server.proc.returncode}; log tail:\n{server.log_text()[-2000:]}",
                      file=sys.stderr)
            server.cleanup()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    allowed = {c.strip().upper() for c in args.allow.split(",") if c.strip()}
    bad = {c: n for c, n in doc["errors"].items() if c not in allowed}
    growth = (doc["rss"] or {}).get("growth_mb")
    doc["verdict"] = {"unexpected_errors": bad, "allowed": sorted(allowed),
                      "rss_growth_mb": growth, "max_rss_growth_mb": args.max_rss_growth_mb,
                      "rss_baseline_at_s": (doc["rss"] or {}).get("baseline_at_s")}
    # the shared results header, so a soak JSON sits in benchmarks/results/ like any benchmark's
    doc = {**run_meta("soak"), **doc, "notes": [rss_line(doc["rss"])]}
    print()
    print(report(doc))
    if args.out:
        write_result(doc, args.out)
        print(f"wrote {args.out}")
    rc = 0
    if bad:
        print(f"FAIL: status codes outside --allow: {bad}", file=sys.stderr)
        rc = 1
    if growth is not None and growth > args.max_rss_growth_mb:
        print(f"FAIL: server RSS grew {growth} MB after the warm-up > --max-rss-growth-mb {args.max_rss_growth_mb:g}",
              file=sys.stderr)
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())

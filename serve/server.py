"""Assembling and running the gRPC retrieval server: engine + gallery + batcher + grpc.aio server,
health, reflection, Prometheus metrics, JSON logs, TLS, bearer-token auth, graceful shutdown.

Startup refuses to serve a gallery built by another model: the export manifest's model id
(sha256 of model.onnx, verified against the file by `open_engine`) and bit count must equal
the gallery's, or startup fails naming both. Every check runs before the port is bound.

Shutdown (SIGTERM/SIGINT or `stop()`): health turns NOT_SERVING, new Retrieval calls get
UNAVAILABLE (clients retry elsewhere) while health checks still answer, in-flight calls drain
for up to `grace_s`, then the gRPC server stops and the batcher, gallery and engine close.
A FAISS gallery is snapshotted in the background whenever its WAL passes the configured bound,
and once more before it closes (serve.snapshots).
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hashret.engines.base import out_of_memory
from hashret.errors import ArtifactMismatch, BadInput, MissingArtifact, Unavailable
from hashret.images import PreprocessSpec
from hashret.manifest import versions
from serve import threadnames
from serve._proto import retrieval_pb2_grpc as pb_grpc
from serve.batcher import Batcher
from serve.gpu_decode import DecodeCollector
from serve.service import Limits, RetrievalService, exp_summary
from serve.servicer import SERVICE_NAME, RetrievalServicer
from serve.snapshots import SnapshotCollector, SnapshotPolicy, Snapshotter

log = logging.getLogger("hashret.serve")

TOKEN_ENV = "HASHRET_TOKEN"
WRITE_METHODS = ("Upsert", "Delete")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServeConfig:
    """Everything `hashret serve` can set; see serve.cli for the user-facing help."""

    model: str | os.PathLike
    gallery: str | os.PathLike
    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "ort"
    device: str = "cpu"
    engine_threads: int | None = None  # as the backend's own thread option (None: the library's default)
    max_batch: int = 32
    max_delay_us: int = 2000
    queue_size: int = 256
    decode_threads: int | None = None  # None: min(4, CPUs)
    limits: Limits = field(default_factory=Limits)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    token: str | None = None
    require_token_for_reads: bool = False
    metrics_port: int | None = None  # None: no metrics endpoint; 0: any free port
    grace_s: float = 10.0
    snapshots: SnapshotPolicy = field(default_factory=SnapshotPolicy)  # FAISS galleries: WAL bound
    otel: bool = False  # OpenTelemetry spans per stage (serve.stages); $HASHRET_OTEL turns it on too
    tracer_provider: object = None  # an OpenTelemetry TracerProvider to use instead of --otel's own
    admin_token: str | None = None  # enables the Admin service (model rollover, serve.pairs); None: off
    shadow_fraction: float = 0.0  # share of live searches re-run on a loaded candidate (serve.shadow)
    rerank_factor: int = 10  # Hamming top-(k * this) re-ranked by cosine (serve.gallery); 0: off
    decode: str = "cpu"  # where JPEGs are decoded: cpu, or cuda[:N] for batched nvJPEG (serve.gpu_decode)
    search_device: str | None = None  # torch-flat galleries: search here instead of the built-for device
    # `hashret serve --workers N` (serve.workers) sets these in each worker process:
    reuse_port: bool = False  # share the port with the other workers (SO_REUSEPORT)
    read_only_gallery: bool = False  # open the gallery read-only (FAISS kinds), so all workers can


# ---- logging ---------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line (ts, level, logger, msg, plus a record's `fields` dict)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    """Route all logging to stderr as JSON lines (replaces the root handlers)."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(level)


# ---- metrics ---------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics in a registry of their own (several servers can share a process)."""

    LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                       0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self, tracer_provider=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from serve.stages import Stages

        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("hashret_rpc_latency_seconds", "RPC latency by method", ["method"],
                                 buckets=self.LATENCY_BUCKETS, registry=r)
        self._latency_of: dict = {}
        self.errors = Counter("hashret_rpc_errors_total", "RPCs that failed, by method and status code",
                              ["method", "code"], registry=r)
        self.batch_size = Histogram("hashret_batch_size", "images per inference batch",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.inference = Histogram("hashret_inference_seconds", "engine time per batch",
                                   buckets=self.LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("hashret_queue_depth", "requests waiting for inference or being decoded",
                                 registry=r)
        self.gallery_size = Gauge("hashret_gallery_size", "items in the gallery", registry=r)
        self.out_of_memory = Counter("hashret_inference_out_of_memory", "inference batches that ran out of "
                                     "memory: encoded again in halves (a single image that does not fit fails)",
                                     registry=r)
        # hashret_stage_seconds{stage=...}: where a request's time went (serve.stages)
        self.stages = Stages(r, tracer_provider)
        self._http = None
        self.port: int | None = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        child = self._latency_of.get(method)
        if child is None:  # `labels()` takes a lock and builds a key: once per method, not per call
            child = self._latency_of[method] = self.latency.labels(method)
        child.observe(seconds)
        if code != "OK":
            self.errors.labels(method, code).inc()

    def split_when(self, error: BaseException) -> bool:
        """The batcher's test for errors worth a retry in halves (out of memory), counted."""
        if not out_of_memory(error):
            return False
        self.out_of_memory.inc()
        return True

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        self.stages.batch(size, seconds)

    def bind(self, depth: Callable[[], int], gallery_size: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)
        self.gallery_size.set_function(gallery_size)

    def serve(self, host: str, port: int) -> int:
        from prometheus_client import start_http_server

        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise Unavailable(f"--metrics-port {port} | cannot listen on {host}:{port} ({e.strerror}): choose another port") from None
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


# ---- auth and shutdown gate ------------------------------------------------------------
def load_token(token_file: str | None) -> str | None:
    """The bearer token: --token-file's first non-empty line, stripped, else $HASHRET_TOKEN, else None.

    A file (or variable) with more than one non-empty line is refused (BadInput, exit 2), never
    cut at the first: see hashret.tokens.
    """
    from hashret.tokens import load_token as _load

    return _load(token_file, env=TOKEN_ENV)


def _abort_handler(handler, code: grpc.StatusCode, message: str):
    """A handler shaped like `handler` (same streaming, same deserializer) that only aborts."""

    async def deny(request_or_iterator, context):
        await context.abort(code, message)

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


def _guard_decoding(handler, method: str, observe: Callable | None):
    """`handler` with the request parsed inside it, so a malformed message gets INVALID_ARGUMENT.

    When grpc's own deserializer fails it answers UNKNOWN and logs a traceback per request, which
    lets anyone who can connect flood the log; bad bytes are bad input like any other.
    """
    deserialize = handler.request_deserializer
    if deserialize is None or handler.response_streaming:
        return handler

    def parse(raw):
        try:
            return deserialize(raw)
        except Exception:  # protobuf's DecodeError, or anything a corrupt message provokes
            raise BadInput(f"{method} | request is not a valid protobuf message for this RPC "
                           f"({len(raw)} bytes): use the hashret.v1 stubs") from None

    kw = {"request_deserializer": None, "response_serializer": handler.response_serializer}
    if handler.request_streaming:
        inner_stream = handler.stream_unary

        async def stream_unary(raw_iterator, context):
            async def requests():  # a BadInput here reaches the servicer, which answers it
                async for raw in raw_iterator:
                    yield parse(raw)

            return await inner_stream(requests(), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner = handler.unary_unary

    async def unary_unary(raw, context):
        try:
            request = parse(raw)
        except BadInput as e:
            if observe is not None:
                observe(method, grpc.StatusCode.INVALID_ARGUMENT.name, 0.0)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)


class Gate(grpc.aio.ServerInterceptor):
    """Bearer-token checks for writes (and optionally reads) and refusal while draining.

    Health and reflection are never gated: load balancers and grpcurl must always reach them.
    """

    def __init__(self, token: str | None, require_token_for_reads: bool, observe: Callable | None = None):
        self._token = token.encode() if token else None
        self._reads_too = require_token_for_reads
        self._observe = observe
        self.draining = False
        self._guarded: dict[str, tuple] = {}  # method -> (handler, the same with guarded decoding)

    def _check_token(self, metadata) -> str | None:
        """None when authorized, else the reason."""
        if self._token is None:
            return (f"this server has no token configured, so writes are disabled: start it with "
                    f"--token-file or ${TOKEN_ENV}")
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        v = values[0]
        v = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        scheme, _, given = v.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            return "invalid bearer token"
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").partition("/")
        if handler is None or service != SERVICE_NAME:
            return handler
        if self.draining:
            return self._deny(handler, method, grpc.StatusCode.UNAVAILABLE, "server | shutting down: retry on another replica")
        if method in WRITE_METHODS or self._reads_too:
            why = self._check_token(details.invocation_metadata)
            if why:
                return self._deny(handler, method, grpc.StatusCode.UNAUTHENTICATED, f"{method} | {why}")
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _guard_decoding(handler, method, self._observe))
            self._guarded[method] = cached
        return cached[1]

    def _deny(self, handler, method: str, code: grpc.StatusCode, message: str):
        if self._observe is not None:
            self._observe(method, code.name, 0.0)
        return _abort_handler(handler, code, message)


# ---- assembly --------------------------------------------------------------------------
def _credentials(cfg: ServeConfig):
    if not (cfg.tls_cert or cfg.tls_key):
        if cfg.tls_client_ca:
            raise BadInput("--tls-client-ca | needs --tls-cert and --tls-key too")
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise BadInput("--tls-cert/--tls-key | give both the certificate chain and its private key")

    def read(path, flag):
        p = Path(path)
        if not p.is_file():
            raise MissingArtifact(f"{flag} {p} | not found")
        return p.read_bytes()

    ca = read(cfg.tls_client_ca, "--tls-client-ca") if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(read(cfg.tls_key, "--tls-key"), read(cfg.tls_cert, "--tls-cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _check_config(cfg: ServeConfig) -> None:
    if isinstance(cfg.port, bool) or not isinstance(cfg.port, int) or not 0 <= cfg.port <= 65535:
        raise BadInput(f"--port {cfg.port!r} | must be 0..65535 (0: any free port)")
    if cfg.metrics_port is not None and not 0 <= int(cfg.metrics_port) <= 65535:
        raise BadInput(f"--metrics-port {cfg.metrics_port!r} | must be 0..65535")
    if cfg.max_message_bytes < cfg.limits.max_image_bytes + 1024:
        raise BadInput(
            f"--max-message-bytes {cfg.max_message_bytes} | must exceed --max-image-bytes "
            f"({cfg.limits.max_image_bytes}) so an allowed image fits in a request"
        )
    if cfg.grace_s < 0:
        raise BadInput(f"--grace-s {cfg.grace_s} | must be >= 0")
    if not 0.0 <= float(cfg.shadow_fraction) <= 1.0:
        raise BadInput(f"--shadow-fraction {cfg.shadow_fraction} | must be between 0 and 1")
    if cfg.admin_token and cfg.admin_token == cfg.token:
        raise BadInput("--admin-token-file | holds the same token as --token-file: give the Admin service a "
                       "token of its own, so a write token can never drive a rollover")


def _open_parts(cfg: ServeConfig, engine=None):
    """EXP manifest (read once) -> gallery checked against its model id and bits -> engine.

    Closes what it opened on failure.
    """
    from hashret.engines import backend_spec, open_engine
    from serve.gallery import open_gallery_for_export

    gallery, manifest, mid = open_gallery_for_export(cfg.gallery, cfg.model, search_device=cfg.search_device,
                                                     read_only=cfg.read_only_gallery)
    bits = gallery.bits
    try:
        try:
            spec = PreprocessSpec.from_dict(manifest["preprocessing"])
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{cfg.model}/manifest.json | lacks preprocessing: re-export it") from None
        before = threadnames.thread_ids()
        if engine is None:
            # each runner names its thread option its own way; its registry entry says which
            opts = backend_spec(cfg.backend).thread_options(cfg.engine_threads)
            engine = open_engine(cfg.model, cfg.backend, cfg.device, manifest=manifest, **opts)
        elif int(engine.bits) != bits:  # one handed in was not opened from this EXP's manifest
            raise BadInput(f"engine | outputs {engine.bits} bits, {cfg.model} says {bits}")
        _warm_up(engine, spec, cfg.model, bits)
        threadnames.name_new(before, "hashret-engine")  # its thread pools, started by now
    except BaseException:
        gallery.close()
        raise
    return manifest, mid, spec, gallery, engine


def _warm_up(engine, spec: PreprocessSpec, model_dir, bits: int) -> None:
    """One inference before serving: pays lazy initialization up front, and a model whose real
    output width disagrees with its manifest is refused at start instead of failing every request."""
    import numpy as np

    try:
        engine.encode(np.zeros((1, spec.crop, spec.crop, 3), np.uint8))
    except RuntimeError as e:
        raise ArtifactMismatch(
            f"{model_dir} | the model does not produce what its manifest says ({bits} bits): {e}; re-export it"
        ) from None


class HashretServer:
    """A built (not yet started) server; `start()`, then `wait()` or `stop()` on the same event loop."""

    def __init__(self, cfg: ServeConfig, engine=None):
        _check_config(cfg)
        self.cfg = cfg
        self.service = None
        from serve.stages import otel_requested, otel_tracer_provider

        provider = cfg.tracer_provider
        if provider is None and otel_requested(cfg.otel):
            provider = otel_tracer_provider()  # before anything opens: a missing SDK is bad input
        self.metrics = Metrics(provider)
        manifest, mid, spec, gallery, engine = _open_parts(cfg, engine)
        try:
            self._build(manifest, mid, spec, gallery, engine)
        except BaseException:
            if getattr(self, "service", None) is not None:
                self.service.close()  # batcher, pools, gallery, engine
            else:
                gallery.close()
                engine.close()
            raise

    def _build(self, manifest, mid, spec, gallery, engine) -> None:
        self.service = self._new_service(manifest, mid, spec, gallery, engine)
        self.metrics.registry.register(SnapshotCollector(self.service.snapshots))
        self._build_rpc()

    def _new_service(self, manifest, mid, spec, gallery, engine) -> RetrievalService:
        """One serving pair around opened parts; the live one at start, candidates later (serve.pairs)."""
        cfg = self.cfg
        batcher = Batcher(
            engine.encode, max_batch=cfg.max_batch, max_delay_us=cfg.max_delay_us, queue_size=cfg.queue_size,
            on_batch=self.metrics.observe_batch, split_when=self.metrics.split_when,
        )
        info = {
            "model": exp_summary(manifest),
            "backend": f"{getattr(engine, 'name', cfg.backend)} ({cfg.device})",
            "versions": versions("grpcio", "protobuf", "onnxruntime", "openvino", "faiss-cpu", "pymilvus", "Pillow"),
        }
        decoder = None
        if cfg.decode != "cpu":  # each decode thread holds one image in the GPU decoder's next batch
            from serve.gpu_decode import GpuDecoder

            decoder = GpuDecoder(spec, cfg.decode, max_bytes=cfg.limits.max_image_bytes,
                                 max_pixels=cfg.limits.max_pixels, max_batch=cfg.max_batch)
        decode_threads = cfg.decode_threads or (cfg.max_batch if decoder else min(4, os.cpu_count() or 1))
        snapshots = Snapshotter(gallery, cfg.snapshots)
        try:
            service = RetrievalService(
                engine, gallery, model_id=mid, spec=spec, batcher=batcher, limits=cfg.limits,
                decode_threads=decode_threads, info=info, snapshots=snapshots, stages=self.metrics.stages,
                rerank_factor=cfg.rerank_factor, decoder=decoder,
            )
        except BaseException:
            if decoder is not None:
                decoder.close()
            raise
        snapshots.start()
        return service

    def _open_candidate(self, exp: str, gal: str) -> RetrievalService:
        """Open, check and warm a pair for LoadCandidate (blocking); closes what it opened on failure."""
        from dataclasses import replace

        manifest, mid, spec, gallery, engine = _open_parts(replace(self.cfg, model=exp, gallery=gal))
        try:
            return self._new_service(manifest, mid, spec, gallery, engine)
        except BaseException:
            gallery.close()
            engine.close()
            raise

    def _build_rpc(self) -> None:
        from serve.pairs import Pairs
        from serve.shadow import Shadow

        cfg = self.cfg
        shadow = Shadow(cfg.shadow_fraction, registry=self.metrics.registry) if cfg.admin_token else None
        self.pairs = Pairs(self.service, self._open_candidate if cfg.admin_token else None, shadow=shadow)
        self.servicer = RetrievalServicer(self.service, observe=self._observe, pairs=self.pairs)
        self.gate = Gate(cfg.token, cfg.require_token_for_reads, observe=self._observe)
        self.health = grpc_health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[self.gate],
            options=[
                ("grpc.max_receive_message_length", int(cfg.max_message_bytes)),
                ("grpc.max_send_message_length", int(cfg.max_message_bytes)),
                # never share a port with another process by accident; --workers shares it on purpose
                ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
            ],
        )
        pb_grpc.add_RetrievalServicer_to_server(self.servicer, self.server)
        services = (SERVICE_NAME,)
        if cfg.admin_token:
            from serve.admin import ADMIN_SERVICE_NAME, AdminServicer

            pb_grpc.add_AdminServicer_to_server(AdminServicer(self.pairs, cfg.admin_token), self.server)
            services += (ADMIN_SERVICE_NAME,)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*services, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
        addr = f"{host}:{cfg.port}"
        creds = _credentials(cfg)
        try:
            self.port = self.server.add_secure_port(addr, creds) if creds else self.server.add_insecure_port(addr)
        except RuntimeError as e:
            raise Unavailable(f"--port {cfg.port} | cannot listen on {addr} ({e}): is another server running?") from None
        if not self.port:
            raise Unavailable(f"--port {cfg.port} | cannot listen on {addr}: is another server running?")
        self.tls = creds is not None
        self.metrics.bind(lambda: self.pairs.live.batcher.depth, lambda: self.pairs.live.gallery.size)
        # --decode cuda: where images were decoded, fallbacks by reason, batch splits (nothing on the CPU path)
        self.metrics.registry.register(DecodeCollector(lambda: self.pairs.live.decoder))
        self.metrics_port = None
        self._stopped = asyncio.Event()
        self._stopping = False
        if cfg.token and not self.tls and cfg.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("bearer token sent without TLS on %s: anyone on the network can read it", cfg.host)

    def _observe(self, method: str, code: str, seconds: float) -> None:
        self.metrics.observe_rpc(method, code, seconds)
        level = logging.DEBUG if code == "OK" and method not in WRITE_METHODS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "rpc %s %s", method, code,
                    extra={"fields": {"rpc": method, "code": code, "ms": round(seconds * 1e3, 3)}})

    @property
    def address(self) -> str:
        """Where a client on this machine dials (a wildcard host becomes 127.0.0.1)."""
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def bound_address(self) -> str:
        """The address the server listens on, as bound: 0.0.0.0:PORT stays 0.0.0.0, so the log tells
        an operator the port is open beyond loopback."""
        host = self.cfg.host or "0.0.0.0"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.host, int(self.cfg.metrics_port))
        await self.server.start()
        await self.health.set(grpc_health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        i = self.service.info()
        log.info("serving", extra={"fields": {
            "address": self.bound_address, "tls": self.tls, "model_id": self.service.model_id,
            "backend": i["backend"], "gallery": i["gallery"]["path"], "gallery_kind": i["gallery"]["kind"],
            "gallery_size": self.service.gallery.size, "metrics_port": self.metrics_port,
        }})

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, refuse new calls, drain in-flight ones, then close everything."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.cfg.grace_s if grace_s is None else grace_s
        until = time.monotonic() + grace
        try:
            await self.health.enter_graceful_shutdown()
            self.gate.draining = True
            log.info("draining", extra={"fields": {"in_flight": self.servicer.in_flight, "grace_s": grace}})
            while self.servicer.in_flight and time.monotonic() < until:
                await asyncio.sleep(0.01)
            await self.server.stop(max(0.0, until - time.monotonic()))
            await self.pairs.aclose()  # the live pair and any standby
        finally:
            self.metrics.close()
            self._stopped.set()
            log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def _serve_async(cfg: ServeConfig, before_start=None, after_start=None) -> None:
    """Build, start, serve until SIGTERM/SIGINT. `before_start(server)` / `after_start(server)`
    (coroutines): serve.workers' hand-shake with the supervisor, around the port opening."""
    server = HashretServer(cfg)
    if before_start is not None:
        try:
            await before_start(server)
        except BaseException:
            server.service.close()
            raise
    await server.start()
    if after_start is not None:
        await after_start(server)
    # What is loaded by now (torch, the engine, the gallery) lives as long as the process. Frozen,
    # it is left out of the cyclic collector's passes, which otherwise walk it again and again as
    # requests allocate (under load, a py-spy profile of the event loop showed it among the largest
    # items; frozen, it nearly vanished).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        except (NotImplementedError, RuntimeError):  # not the main thread / not POSIX
            pass
    await server.wait()


def serve(cfg: ServeConfig) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully (blocking)."""
    asyncio.run(_serve_async(cfg))


class BackgroundServer:
    """A HashretServer on an event loop in a thread of its own: for tests, the demo and embedding.

        with BackgroundServer(cfg) as srv:
            client = RetrievalClient(srv.address)
    """

    def __init__(self, cfg: ServeConfig, engine=None):
        self.cfg = cfg
        self._engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: HashretServer | None = None
        self._stop_lock = threading.Lock()
        self._stop_future = None

    def start(self) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._run, name="hashret-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            async def boot():
                self.server = HashretServer(self.cfg, self._engine)
                await self.server.start()

            loop.run_until_complete(boot())
        except BaseException as e:  # noqa: BLE001 - handed to the starting thread
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self.server.wait())
        finally:
            loop.close()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop_async(self, grace_s: float | None = None):
        """Begin a graceful stop (once); returns a concurrent Future that completes when stopped."""
        with self._stop_lock:
            if self._stop_future is None:
                self._stop_future = asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop)
            return self._stop_future

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop; returns when the server thread has ended (idempotent)."""
        if self.server is None or self._thread is None:
            return
        if self._stop_future is None and not self._thread.is_alive():
            return
        self.stop_async(grace_s).result()
        self._thread.join(30)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

"""Where a request's time goes: per-stage latency histograms and optional OpenTelemetry spans.

A whole-RPC latency summary cannot tell an operator whether a slow Search waited for a batch,
for the model or for the index. So each stage of the pipeline is timed on its own, into ONE
Prometheus histogram with a `stage` label (`hashret_stage_seconds`), which lets new stages
(re-ranking, issue 10) appear without a new metric and lets a dashboard stack them.

Stages (the label values; `STAGES`):

    decode           image bytes -> uint8 tensor (decode, resize, crop), in the decode pool
    queue_wait       tensor queued -> its batch starts inference (the dynamic batcher's wait)
    inference_batch  one engine call, observed once per batch
    inference_item   one engine call divided by the images in it, observed once per image:
                     the amortized model cost of an image, which batching is meant to lower
    search           the index lookup of one query code
    rerank           re-ranking a candidate list (observed by the re-rank code, where present)
    total            one image's whole path: Search, each SearchBatch item and Encode

Code that adds a stage times it with `stages.time("name")` (a context manager) or calls
`stages.observe("name", seconds)`; any name in `STAGES` is accepted, others are a programming
error (ValueError), so a typo cannot create a metric series nobody charts.

Buckets (`STAGE_BUCKETS`, seconds): 0.1 ms to 2.5 s, roughly 1-2-5 steps with extra resolution
between 1 and 100 ms where CNN inference, batching waits and decoding of phone photos land;
the 0.1-0.5 ms buckets resolve in-memory FAISS searches and small decodes.

OpenTelemetry (optional extra `hashret[otel]`, i.e. `opentelemetry-sdk`): when enabled
(`hashret serve --otel`, or HASHRET_OTEL=1), each Search/Encode request becomes a span
`hashret.<rpc>` with one child span per stage it went through, timed exactly as the histograms
(the inference child carries the batch size). Spans are emitted when the request ends, from
timestamps taken as it ran, because the stages run on three different threads (decode pool,
batcher worker, event loop) and live context propagation across them would cost more than the
stage being measured.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from hashret.errors import BadInput

log = logging.getLogger("hashret.serve")

STAGES = ("decode", "queue_wait", "inference_batch", "inference_item", "search", "rerank", "total")
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
STAGE_METRIC = "hashret_stage_seconds"
OTEL_ENV = "HASHRET_OTEL"

_current: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("hashret_trace", default=None)
# set by `untimed()`: work the server does on the side (shadow searches) is not client latency
_untimed: contextvars.ContextVar[bool] = contextvars.ContextVar("hashret_untimed", default=False)


@contextlib.contextmanager
def untimed() -> Iterator[None]:
    """Requests made inside this block (in this task) record no stages and no spans: for traffic
    the server makes on its own, such as shadow searches on a rollover candidate, which would
    otherwise inflate `total` and friends beyond what clients saw. Engine batches are still
    counted (`inference_*` measure the engine's work, whoever asked)."""
    token = _untimed.set(True)
    try:
        yield
    finally:
        _untimed.reset(token)


def otel_requested(flag: bool = False) -> bool:
    """--otel, or HASHRET_OTEL set to 1/true/yes/on."""
    return bool(flag) or os.environ.get(OTEL_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def otel_tracer_provider():
    """The tracer provider `--otel` uses: the process's own if one was configured (an SDK
    provider set by the embedding application or opentelemetry-instrument), else a new SDK one
    exporting over OTLP when opentelemetry-exporter-otlp is installed, or as JSON lines on
    stderr otherwise (stdout belongs to the CLI's output)."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
        )
    except ImportError:
        raise BadInput(f"--otel / ${OTEL_ENV} | the opentelemetry-sdk package is not installed: "
                       f"pip install 'hashret[otel]', or leave tracing off") from None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    except ImportError:
        exporter = ConsoleSpanExporter(out=sys.stderr, formatter=lambda s: s.to_json(indent=None) + "\n")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _check(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} | unknown: use one of {', '.join(STAGES)} (serve.stages.STAGES)")
    return stage


@dataclass
class _Span:
    stage: str
    start: float  # time.monotonic() seconds
    end: float
    attrs: dict = field(default_factory=dict)


@dataclass
class RequestTrace:
    """The stages one request went through, collected as it runs (see `Stages.request`)."""

    name: str
    start: float
    spans: list[_Span] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)


class Stages:
    """Per-stage histograms in `registry` (None: timing only, nothing exported) and, with a
    `tracer_provider`, OpenTelemetry spans. One per server: several servers share a process."""

    def __init__(self, registry=None, tracer_provider=None):
        self.histogram = None
        if registry is not None:
            from prometheus_client import Histogram

            self.histogram = Histogram(STAGE_METRIC, "seconds spent per pipeline stage (see serve.stages)",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=registry)
            self._children = {s: self.histogram.labels(s) for s in STAGES}
        self.tracer = tracer_provider.get_tracer("hashret.serve") if tracer_provider is not None else None

    # ---- histograms --------------------------------------------------------------------
    def observe(self, stage: str, seconds: float, count: int = 1) -> None:
        """One observation (or `count` equal ones) of `stage`, histogram only (`span` also traces)."""
        _check(stage)
        if self.histogram is not None and not _untimed.get():
            h = self._children[stage]
            for _ in range(count):
                h.observe(seconds)

    def span(self, stage: str, start: float, end: float, observe: bool = True, **attrs) -> None:
        """Record a stage that ran from `start` to `end` (time.monotonic() seconds), wherever it ran:
        into the histogram (unless `observe` is False: counted elsewhere, e.g. once per batch) and
        into the current request's trace."""
        if _untimed.get():
            return
        child = self._children.get(stage) if self.histogram is not None else None
        if child is None:
            _check(stage)
        elif observe:
            child.observe(max(0.0, end - start))
        trace = _current.get()
        if trace is not None and self.tracer is not None:
            trace.spans.append(_Span(stage, start, end, attrs))

    @contextlib.contextmanager
    def time(self, stage: str, **attrs) -> Iterator[None]:
        """Time the body as `stage` (the body's exceptions pass through, still timed)."""
        _check(stage)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.span(stage, t0, time.monotonic(), **attrs)

    def batch(self, size: int, seconds: float) -> None:
        """One inference batch: the per-batch and the amortized per-image observations."""
        self.observe("inference_batch", seconds)
        if size > 0:
            self.observe("inference_item", seconds / size, count=size)

    # ---- requests ----------------------------------------------------------------------
    @contextlib.contextmanager
    def request(self, name: str, **attrs) -> Iterator[RequestTrace]:
        """One image's whole path (stage `total`); the stages recorded inside it, in this task or
        from threads via `span`, become its child spans when tracing is on."""
        if _untimed.get():
            yield RequestTrace(name, time.monotonic(), attrs=dict(attrs))  # timed by nobody
            return
        trace = RequestTrace(name, time.monotonic(), attrs=dict(attrs))
        token = _current.set(trace)
        error = None
        try:
            yield trace
        except BaseException as e:
            error = e
            raise
        finally:
            _current.reset(token)
            end = time.monotonic()
            if error is None:  # a refused request's "total" would drag the latency histogram down
                self.observe("total", end - trace.start)
            if self.tracer is not None:
                try:
                    self._emit(trace, end, error)
                except Exception:  # tracing must never fail a request
                    log.exception("could not emit the spans of %s", name)

    def _emit(self, trace: RequestTrace, end: float, error: BaseException | None) -> None:
        from opentelemetry import trace as otel
        from opentelemetry.trace import Status, StatusCode

        # spans want wall-clock nanoseconds; the stages were timed on the monotonic clock
        offset = time.time_ns() - time.monotonic_ns()

        def ns(t: float) -> int:
            return int(t * 1e9) + offset

        root = self.tracer.start_span(f"hashret.{trace.name}", start_time=ns(trace.start), attributes=trace.attrs)
        if error is not None:
            root.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        ctx = otel.set_span_in_context(root)
        for s in trace.spans:
            child = self.tracer.start_span(s.stage, context=ctx, start_time=ns(s.start), attributes=s.attrs)
            child.end(end_time=ns(s.end))
        root.end(end_time=ns(end))


NULL_STAGES = Stages()  # for services built without a server (tests, embedding): times nothing


# ---- reading the split back (bench serve) ------------------------------------------------
def scrape_stages(url: str, timeout: float = 10.0) -> dict[str, dict]:
    """{stage: {"count", "sum", "buckets": [(le, cumulative count), ...]}} from a /metrics URL
    (HOST:PORT is taken as http://HOST:PORT/metrics); {} when the server exports no stages.
    Several URLs, comma-separated (the workers of `hashret serve --workers N`), are summed."""
    import urllib.request

    if "," in url:
        total: dict[str, dict] = {}
        for one in url.split(","):
            for stage, d in scrape_stages(one.strip(), timeout).items():
                t = total.setdefault(stage, {"count": 0.0, "sum": 0.0, "buckets": {}})
                t["count"] += d["count"]
                t["sum"] += d["sum"]
                for le, c in d["buckets"]:
                    t["buckets"][le] = t["buckets"].get(le, 0.0) + c
        return {k: {**d, "buckets": sorted(d["buckets"].items())} for k, d in total.items()}

    from prometheus_client.parser import text_string_to_metric_families

    from hashret.errors import Unavailable

    if "://" not in url:
        url = f"http://{url}/metrics"
    try:
        text = urllib.request.urlopen(url, timeout=timeout).read().decode()
    except (OSError, ValueError) as e:  # URLError is an OSError; a malformed URL a ValueError
        raise Unavailable(f"metrics {url} | cannot be read ({e}): start the server with --metrics-port "
                          f"and pass that port") from None
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != STAGE_METRIC:
            continue
        for s in fam.samples:
            d = out.setdefault(s.labels.get("stage", ""), {"count": 0.0, "sum": 0.0, "buckets": []})
            if s.name.endswith("_count"):
                d["count"] = s.value
            elif s.name.endswith("_sum"):
                d["sum"] = s.value
            elif s.name.endswith("_bucket"):
                d["buckets"].append((float(s.labels["le"]), s.value))
    for d in out.values():
        d["buckets"].sort()
    return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear inside the bucket holding the q-th observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lo_le, lo_n = 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return lo_le  # beyond the last finite bucket: its bound is all we know
            return lo_le + (le - lo_le) * ((rank - lo_n) / (n - lo_n) if n > lo_n else 0.0)
        lo_le, lo_n = le, n
    return lo_le


def stage_split(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per stage, what happened between two scrapes: count, mean_ms, p50_ms, p99_ms (quantiles
    interpolated within STAGE_BUCKETS, so as coarse as they are). Stages not observed are left out."""
    out = {}
    for stage in STAGES:
        a = after.get(stage)
        if a is None:
            continue
        b = before.get(stage, {"count": 0.0, "sum": 0.0, "buckets": []})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        prev = dict(b["buckets"])
        diff = [(le, c - prev.get(le, 0.0)) for le, c in a["buckets"]]
        p50, p99 = _quantile(diff, 0.5), _quantile(diff, 0.99)
        out[stage] = {"count": int(n), "mean_ms": round((a["sum"] - b["sum"]) / n * 1e3, 3),
                      "p50_ms": None if p50 is None else round(p50 * 1e3, 3),
                      "p99_ms": None if p99 is None else round(p99 * 1e3, 3)}
    return out


def format_split(split: dict[str, dict]) -> str:
    """One line: 'decode 1.20 ms, queue_wait 0.41 ms, ...' (means; p99 in brackets)."""
    return ", ".join(f"{s} {d['mean_ms']:.2f} ms (p99 {d['p99_ms'] if d['p99_ms'] is not None else '-'})"
                     for s, d in split.items()) or "no stage metrics"

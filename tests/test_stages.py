"""Per-stage latency (serve.stages): histograms on a real server, the split `bench serve` reads
back from /metrics, and OpenTelemetry spans through the SDK's in-memory exporter."""
from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from serve.client import RetrievalClient
from serve.server import BackgroundServer
from serve.stages import (
    STAGE_BUCKETS,
    STAGES,
    Stages,
    _quantile,
    otel_requested,
    scrape_stages,
    stage_split,
)
from tests import test_serve

# the EXP, gallery and query fixtures of the serving tests (one model export per module)
exp_dir, spec, engine, data, gallery_dir = (test_serve.exp_dir, test_serve.spec, test_serve.engine,
                                            test_serve.data, test_serve.gallery_dir)
copy_gallery, config = test_serve.copy_gallery, test_serve.config

SERVED = ("decode", "queue_wait", "inference_batch", "inference_item", "search", "total")


def _sample(reg: CollectorRegistry, stage: str, suffix: str) -> float:
    return reg.get_sample_value(f"hashret_stage_seconds_{suffix}", {"stage": stage}) or 0.0


# ---- the helper on its own ------------------------------------------------------------------
def test_observe_time_and_batch_fill_the_labelled_histogram():
    reg = CollectorRegistry()
    st = Stages(reg)
    with st.time("rerank"):
        time.sleep(0.003)
    st.batch(4, 0.02)
    assert _sample(reg, "rerank", "count") == 1 and _sample(reg, "rerank", "sum") >= 0.003
    assert _sample(reg, "inference_batch", "count") == 1 and _sample(reg, "inference_batch", "sum") == pytest.approx(0.02)
    # the amortized per-image cost: four observations of a quarter of the batch
    assert _sample(reg, "inference_item", "count") == 4
    assert _sample(reg, "inference_item", "sum") == pytest.approx(0.02)
    assert reg.get_sample_value("hashret_stage_seconds_bucket", {"stage": "inference_item", "le": "0.005"}) == 4


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="'rerannk' | unknown: use one of"):
        Stages(CollectorRegistry()).observe("rerannk", 0.001)


def test_buckets_cover_sub_millisecond_to_seconds():
    assert list(STAGE_BUCKETS) == sorted(STAGE_BUCKETS)
    assert STAGE_BUCKETS[0] <= 0.0001 and STAGE_BUCKETS[-1] >= 1.0
    assert sum(1 for b in STAGE_BUCKETS if 0.001 <= b <= 0.1) >= 10  # resolution where inference lands


def test_failed_request_is_not_counted_in_total():
    reg = CollectorRegistry()
    st = Stages(reg)
    with pytest.raises(RuntimeError), st.request("Search"):
        raise RuntimeError("boom")
    with st.request("Search"):
        pass
    assert _sample(reg, "total", "count") == 1


def test_quantile_interpolates_like_prometheus():
    buckets = [(0.001, 0.0), (0.002, 10.0), (0.005, 20.0), (float("inf"), 20.0)]
    assert _quantile(buckets, 0.5) == pytest.approx(0.002)
    assert _quantile(buckets, 0.25) == pytest.approx(0.0015)
    assert _quantile([(0.001, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_otel_switch(monkeypatch):
    monkeypatch.delenv("HASHRET_OTEL", raising=False)
    assert not otel_requested() and otel_requested(True)
    monkeypatch.setenv("HASHRET_OTEL", "1")
    assert otel_requested()
    monkeypatch.setenv("HASHRET_OTEL", "0")
    assert not otel_requested()


def test_serve_cli_has_otel_flag():
    import argparse

    from serve.cli import add_args, config_from_args

    p = argparse.ArgumentParser()
    add_args(p)
    assert "(default: off)" in next(a.help for a in p._actions if a.dest == "otel")
    args = p.parse_args(["--model", "m", "--gallery", "g", "--otel"])
    assert config_from_args(args).otel is True
    assert config_from_args(p.parse_args(["--model", "m", "--gallery", "g"])).otel is False


# ---- a real server --------------------------------------------------------------------------
def test_server_exports_every_stage_and_bench_reads_the_split(exp_dir, gallery_dir, tmp_path_factory, data):
    from benchmarks import serve_load

    queries = data[2]
    cfg = config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "stages"))
    with BackgroundServer(cfg) as srv:
        url = f"127.0.0.1:{srv.metrics_port}"
        before = scrape_stages(url)
        with RetrievalClient(srv.address, timeout=30) as c:
            for q in queries[:4]:
                c.search(q, k=3)
            c.search_batch(queries[4:7], k=3)
            c.encode(queries[0])
        # the batch histograms are observed just after the batch's answers go out: let them land
        until = time.monotonic() + 10
        while True:
            after = scrape_stages(url)
            split = stage_split(before, after)
            if split.get("inference_item", {}).get("count") == 8 or time.monotonic() > until:
                break
            time.sleep(0.05)
        # 4 searches + 3 batch items + 1 encode, each decoded, queued, inferred once
        for stage in ("decode", "queue_wait", "inference_item", "total"):
            assert split[stage]["count"] == 8, (stage, split[stage])
        assert split["search"]["count"] == 7  # Encode does not search
        assert 1 <= split["inference_batch"]["count"] <= 8
        assert "rerank" not in split  # nothing re-ranks yet: no empty series is reported
        # the parts fit inside the whole (per request, so also on average)
        parts = sum(after[s]["sum"] - before.get(s, {"sum": 0.0})["sum"] for s in ("decode", "queue_wait", "search"))
        total = after["total"]["sum"] - before.get("total", {"sum": 0.0})["sum"]
        assert 0 < parts < total
        assert split["decode"]["mean_ms"] > 0 and split["inference_batch"]["mean_ms"] > 0
        # the old metrics keep their names
        import urllib.request

        text = urllib.request.urlopen(f"http://{url}/metrics", timeout=10).read().decode()
        for name in ("hashret_rpc_latency_seconds_bucket", "hashret_inference_seconds_count", "hashret_batch_size"):
            assert name in text

        time.sleep(0.2)  # the same: the last batch's observation, before the next level's first scrape
        lines: list[str] = []
        rows = serve_load.run_load(srv.address, [Path(q).read_bytes() for q in queries[:3]], concurrency=[2],
                                   max_requests=6, seconds=30, warmup=0, progress=lines.append, metrics=url)
        assert rows[0]["ok"] == 6
        assert rows[0]["stages"]["total"]["count"] == 6 and rows[0]["stages"]["search"]["count"] == 6
        assert any("server stages (mean): decode" in ln for ln in lines), lines

        # the CLI: `hashret bench serve --addr ... --metrics ...` stores the split with each level
        from tests.test_benchmarks import parse

        out = tmp_path_factory.mktemp("bench") / "serve.json"
        time.sleep(0.2)
        args = parse(["serve", "--addr", srv.address, "--metrics", f"http://{url}/metrics", "--concurrency", "1,2",
                      "--requests", "4", "--warmup", "1", "--out", str(out)])
        assert serve_load.run(args) == 0
    doc = json.loads(out.read_text())
    for row in doc["results"]:
        assert row["ok"] == 4
        assert row["stages"]["search"]["count"] == 5  # 4 timed + 1 warm-up
        assert row["stages"]["decode"]["p99_ms"] >= row["stages"]["decode"]["p50_ms"] > 0


def test_otel_spans_per_stage(exp_dir, gallery_dir, tmp_path_factory, data):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "otel"), tracer_provider=provider)
    q = data[2][0]
    with BackgroundServer(cfg) as srv, RetrievalClient(srv.address, timeout=30) as c:
        c.search(q, k=5)
        with pytest.raises(grpc.RpcError):
            c.search(b"not an image", k=5)
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "hashret.Search"]
    assert len(roots) == 2
    ok = next(r for r in roots if r.status.is_ok)
    bad = next(r for r in roots if not r.status.is_ok)
    assert "BadInput" in bad.status.description
    children = [s for s in spans if s.parent is not None and s.parent.span_id == ok.context.span_id]
    names = [s.name for s in children]
    assert sorted(names) == sorted(["decode", "queue_wait", "inference_batch", "search"]), names
    assert all(s.context.trace_id == ok.context.trace_id for s in children)
    for s in children:  # timed as they ran, inside the request
        assert ok.start_time <= s.start_time <= s.end_time <= ok.end_time, s.name
    by = {s.name: s for s in children}
    assert by["decode"].end_time <= by["queue_wait"].start_time + 1000  # same clock, in order (1 us rounding)
    assert by["queue_wait"].end_time <= by["inference_batch"].start_time + 1000
    assert by["inference_batch"].end_time <= by["search"].start_time + 1000
    assert by["inference_batch"].attributes["batch_size"] >= 1
    assert ok.attributes["k"] == 5
    assert set(SERVED) <= set(STAGES)


def test_otel_flag_builds_an_sdk_provider_when_none_is_configured():
    from opentelemetry.sdk.trace import TracerProvider

    from serve.stages import otel_tracer_provider

    provider = otel_tracer_provider()
    try:
        assert isinstance(provider, TracerProvider)
        reg = CollectorRegistry()
        st = Stages(reg, provider)
        with st.request("Search"), st.time("search"):
            pass
        assert _sample(reg, "search", "count") == 1 and _sample(reg, "total", "count") == 1
    finally:
        provider.shutdown()


def test_unreadable_metrics_endpoint_names_the_fix():
    from hashret.errors import Unavailable

    with pytest.raises(Unavailable, match=r"metrics http://127.0.0.1:1/metrics \| cannot be read .*--metrics-port"):
        scrape_stages("127.0.0.1:1", timeout=2)


def test_untimed_requests_record_nothing():
    from serve.stages import untimed

    reg = CollectorRegistry()
    st = Stages(reg)
    with untimed(), st.request("Search"), st.time("search"):
        st.span("decode", 0.0, 1.0)
    with st.request("Search"), st.time("search"):
        pass
    assert _sample(reg, "total", "count") == 1 and _sample(reg, "search", "count") == 1
    assert _sample(reg, "decode", "count") == 0

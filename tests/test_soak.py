"""The soak script (benchmarks/soak.py) in CI: a short mixed soak, an overload run, loopback-only.

* short soak: `python -m benchmarks.soak --model EXP --gallery GAL` (it starts `hashret serve`
  itself) for 8 s at concurrency 16 with the default Search/SearchBatch/Upsert mix: no status
  code other than RESOURCE_EXHAUSTED, every RPC kind succeeds, p99 reported per window, the
  server's RSS growth bounded;
* overload: a server with --queue-size 2 under 64 concurrent clients answers the excess with
  RESOURCE_EXHAUSTED at once (far below the deadline), never with a wall of DEADLINE_EXCEEDED,
  and keeps serving the admitted requests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import soak
from tests.test_fuzz import build_gallery, shared_exp

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return shared_exp(tmp_path_factory)


@pytest.fixture(scope="module")
def gallery(exp, tmp_path_factory) -> Path:
    return build_gallery(exp, tmp_path_factory.mktemp("soak") / "gal")


def test_short_soak_cli(exp, gallery, tmp_path):
    out = tmp_path / "soak.json"
    before = sorted(p.name for p in gallery.iterdir())
    cmd = [sys.executable, "-m", "benchmarks.soak", "--model", str(exp), "--gallery", str(gallery),
           "--seconds", "8", "--concurrency", "16", "--window", "2", "--timeout", "30",
           "--server-args=--engine-threads 1 --decode-threads 2", "--max-rss-growth-mb", "150",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    summary = (f"soak: {doc['requests']} requests ({doc['req_per_s']}/s), errors {doc['errors']}, "
               f"p99 {doc['latency_ms']['p99']} ms, RSS {doc['rss'].get('start_mb')} -> {doc['rss'].get('end_mb')} MB")
    print(summary)
    assert set(doc["errors"]) <= {"RESOURCE_EXHAUSTED"}, summary
    assert doc["requests"] >= 50 and doc["ok"] >= 0.9 * doc["requests"], summary
    for rpc in ("Search", "SearchBatch", "Upsert"):
        assert doc["by_rpc"].get(rpc, {}).get("OK", 0) > 0, f"no successful {rpc}: {summary}"
    assert doc["item_errors"] == {}, summary
    assert len(doc["windows"]) == 4 and all(w["requests"] > 0 for w in doc["windows"]), doc["windows"]
    assert all(w["p99_ms"] is not None and w["rss_mb"] for w in doc["windows"]), doc["windows"]
    assert doc["rss"]["growth_mb"] < 150 and len(doc["rss"]["samples"]) >= 4, doc["rss"]
    assert doc["server"]["alive_at_end"]
    # the table is printed, and the user's gallery was not written to (the soak upserts into a copy)
    assert "p99 ms" in r.stdout and "server RSS" in r.stdout
    assert sorted(p.name for p in gallery.iterdir()) == before
    assert not (gallery / "wal.jsonl").exists() or (gallery / "wal.jsonl").stat().st_size == 0


def test_overload_gets_resource_exhausted_fast(exp, gallery, tmp_path):
    import shutil

    gal = tmp_path / "gal"
    shutil.copytree(gallery, gal, ignore=shutil.ignore_patterns(".lock"))
    srv = soak.ServerProcess(exp, gal, ["--queue-size", "2", "--max-batch", "2", "--engine-threads", "1",
                                        "--decode-threads", "2", "--log-format", "text"], token="t")
    deadline = 8.0
    try:
        srv.start()
        images = soak.synthetic_images(8, (640, 480))  # decoding holds a queue slot for a while
        doc = soak.run_soak(srv.addr, seconds=6, concurrency=64, mix="search=0.8,batch=0.2", images=images,
                            timeout=deadline, window=2, pid=srv.pid, batch_items=4)
        alive = srv.alive()
    finally:
        srv.stop()
        log = srv.log_text()
        srv.cleanup()
    errors, by_code = doc["errors"], doc["latency_ms_by_code"]
    summary = (f"overload: {doc['requests']} requests, ok {doc['ok']}, errors {errors}, latency by code "
               f"{ {c: (v['p99'], v['max']) for c, v in by_code.items()} }")
    print("\n" + summary)
    assert alive, log[-3000:]
    assert errors.get("RESOURCE_EXHAUSTED", 0) >= 10, summary
    assert doc["ok"] >= 10, summary  # admitted requests are still served
    assert set(errors) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, summary
    assert errors.get("DEADLINE_EXCEEDED", 0) <= 0.01 * doc["requests"], "a wall of DEADLINE_EXCEEDED: " + summary
    # a rejection never waits for queue space: it comes back in a fraction of the deadline (the
    # margin covers 2 CPU cores shared by this load generator, the server and other work)
    rejected = by_code["RESOURCE_EXHAUSTED"]
    assert rejected["p99"] < deadline * 1000 / 4, "rejections are not fast: " + summary
    assert rejected["max"] < deadline * 1000 / 2, "rejections are not fast: " + summary
    # SearchBatch items rejected for a full queue come back as per-item RESOURCE_EXHAUSTED
    assert set(doc["item_errors"]) <= {"RESOURCE_EXHAUSTED"}, doc["item_errors"]


@pytest.mark.parametrize("addr", ["10.1.2.3:50051", "example.com:50051", "0.0.0.0:50051", "[2001:db8::1]:50051"])
def test_soak_refuses_non_loopback_targets(addr, capsys):
    assert soak.main(["--addr", addr, "--seconds", "1", "--mix", "search=1"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    with pytest.raises(soak.SoakError):
        soak.run_soak(addr, seconds=1)


def test_soak_helpers(monkeypatch):
    monkeypatch.delenv("HASHRET_TOKEN", raising=False)
    assert all(soak.is_loopback_host(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert soak.parse_mix("search=7,batch=2,upsert=1") == pytest.approx({"search": 0.7, "batch": 0.2, "upsert": 0.1})
    for bad in ("search=0", "delete=1", "search=x", "search=-1"):
        with pytest.raises(soak.SoakError):
            soak.parse_mix(bad)
    with pytest.raises(soak.SoakError, match="token"):  # upserts against a running server need the token
        soak._main(soak.build_parser().parse_args(["--addr", "127.0.0.1:1", "--mix", "upsert=1"]))


def test_operating_doc_mentions_only_real_flags():
    """README's "Operating hashret": every --flag it names exists in `hashret serve`, `hashret query` or the soak."""
    import re

    from hashret.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    assert "## Operating hashret" in readme, "README.md has no 'Operating hashret' section"
    section = readme.split("## Operating hashret", 1)[1]
    known: set[str] = set()
    for parser in (build_parser("serve"), build_parser("query"), soak.build_parser()):
        stack = [parser]
        while stack:
            p = stack.pop()
            for a in p._actions:
                known.update(a.option_strings)
                if getattr(a, "choices", None) and isinstance(a.choices, dict):
                    stack.extend(a.choices.values())
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", section))
    assert mentioned, "no flags found"
    assert mentioned <= known, f"flags in README's Operating section that no parser has: {sorted(mentioned - known)}"
    for flag in ("--max-image-bytes", "--max-pixels", "--max-message-bytes", "--max-k", "--queue-size",
                 "--max-batch", "--max-delay-us", "--metrics-port", "--grace-s", "--tls-cert", "--tls-key",
                 "--tls-client-ca", "--token-file", "--require-token-for-reads"):
        assert flag in mentioned, f"README's Operating section does not document {flag}"

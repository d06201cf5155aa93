"""The Node.js client (clients/node) against a real server: same answers as the Python client.

Skipped only where `node` is not installed. Where node is installed but the client's npm
packages are not, this fails: CI installs them (`npm ci --prefix clients/node`, see .ci/run),
so a missing install must not pass as a skip.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from serve.client import RetrievalClient
from serve.server import BackgroundServer
from tests import test_serve
from tests.pki import make_pki

# the EXP, gallery and query fixtures of the serving tests (one model export per module)
exp_dir, spec, engine, data, gallery_dir = (test_serve.exp_dir, test_serve.spec, test_serve.engine,
                                            test_serve.data, test_serve.gallery_dir)
copy_gallery, config, TOKEN = test_serve.copy_gallery, test_serve.config, test_serve.TOKEN

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "clients" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH: the Node.js client is not tested here")


@pytest.fixture(scope="module", autouse=True)
def node_modules():
    missing = [p for p in ("@grpc/grpc-js", "@grpc/proto-loader") if not (NODE_DIR / "node_modules" / p).is_dir()]
    if missing:
        pytest.fail(f"clients/node/node_modules | {', '.join(missing)} not installed while node is on PATH: "
                    f"run `npm ci --prefix clients/node`")


def node(*args: str, token_file: Path | None = None, timeout: float = 60) -> tuple[int, dict]:
    """Run clients/node/cli.js; (exit code, its JSON output)."""
    cmd = [NODE, str(NODE_DIR / "cli.js"), *args]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != "HASHRET_TOKEN"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert p.returncode in (0, 1), f"node client crashed ({p.returncode}):\n{p.stderr}"
    return p.returncode, json.loads(p.stdout)


def pairs(hits) -> list[tuple]:
    """(id, distance, metadata) from either client's hits."""
    return [(h["id"], h["distance"], h["metadata"]) if isinstance(h, dict) else (h.id, h.distance, h.metadata)
            for h in hits]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tok") / "token"
    p.write_text(TOKEN + "\n")
    return p


@pytest.fixture(scope="module")
def server(exp_dir, gallery_dir, tmp_path_factory):
    with BackgroundServer(config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "node"), metrics_port=None)) as srv:
        yield srv


def test_search_and_search_batch_equal_the_python_client(server, data):
    queries = [str(q) for q in data[2][:4]]
    with RetrievalClient(server.address, timeout=30) as py:
        model_id = py.info().model_id
        for q in queries[:2]:
            rc, out = node("search", server.address, q, "-k", "7")
            assert rc == 0 and out["model_id"] == model_id
            assert pairs(out["hits"]) == pairs(py.search(q, k=7))
        rc, out = node("search", server.address, queries[0], "-k", "60", "--max-distance", "20")
        assert rc == 0 and pairs(out["hits"]) == pairs(py.search(queries[0], k=60, max_distance=20))
        not_image = str(Path(__file__))  # a text file: the server refuses that item alone
        rc, out = node("search-batch", server.address, *queries[2:], not_image, "-k", "5")
        assert rc == 0 and out["model_id"] == model_id
        expected = py.search_batch([*queries[2:], not_image], k=5)
        assert len(out["results"]) == len(expected) == 3
        for got, want in zip(out["results"][:2], expected[:2]):
            assert pairs(got["hits"]) == pairs(want)
        assert out["results"][2]["error"]["status"] == expected[2].status == "INVALID_ARGUMENT"


def test_encode_and_info(server, data):
    q = str(data[2][0])
    with RetrievalClient(server.address, timeout=30) as py:
        code, bits = py.encode(q)
        rc, out = node("encode", server.address, q)
        assert rc == 0 and out["bits"] == bits == 64 and bytes.fromhex(out["code"]) == code
        rc, info = node("info", server.address)
        assert rc == 0 and info["model_id"] == py.info().model_id
        assert info["limits"]["max_k"] == py.info().limits.max_k


def test_upsert_needs_the_token(server, data, token_file, tmp_path):
    q = str(data[2][5])
    rc, out = node("upsert", server.address, "--id", "node-item", "--image", q, "--meta", "source=node")
    assert rc == 1 and out["error"]["status"] == "UNAUTHENTICATED"
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    rc, out = node("upsert", server.address, "--id", "node-item", "--image", q, token_file=wrong)
    assert rc == 1 and out["error"]["status"] == "UNAUTHENTICATED"
    with RetrievalClient(server.address, timeout=30) as py:
        assert all(h.id != "node-item" for h in py.search(q, k=100))  # refused writes wrote nothing
        size = py.info().gallery.size
        rc, out = node("upsert", server.address, "--id", "node-item", "--image", q, "--meta", "source=node",
                       token_file=token_file)
        assert rc == 0 and out == {"count": 1, "gallery_size": size + 1}
        top = py.search(q, k=1)[0]
        assert (top.id, top.distance, top.metadata) == ("node-item", 0, {"source": "node"})
        code, _ = py.encode(q)
        rc, out = node("upsert", server.address, "--id", "node-code", "--code", code.hex(), token_file=token_file)
        assert rc == 0 and out["count"] == 1
        assert {h.id for h in py.search(q, k=2)} == {"node-item", "node-code"}
        py_del = RetrievalClient(server.address, token=TOKEN, timeout=30)
        try:
            assert py_del.delete(["node-item", "node-code"]) == 2
        finally:
            py_del.close()


def test_mutual_tls(exp_dir, gallery_dir, tmp_path_factory, data):
    pem = make_pki(tmp_path_factory.mktemp("node-tls"))
    cfg = config(exp_dir, copy_gallery(gallery_dir, tmp_path_factory, "node-tls"), metrics_port=None,
                 tls_cert=str(pem["srv"]), tls_key=str(pem["srv_key"]), tls_client_ca=str(pem["ca"]))
    q = str(data[2][1])
    mtls = ["--ca", str(pem["ca"]), "--cert", str(pem["cli"]), "--key", str(pem["cli_key"])]
    with BackgroundServer(cfg) as srv:
        with RetrievalClient(srv.address, timeout=30,
                             tls={"ca": pem["ca"], "cert": pem["cli"], "key": pem["cli_key"]}) as py:
            want = pairs(py.search(q, k=5))
        rc, out = node("search", srv.address, q, "-k", "5", *mtls)
        assert rc == 0 and pairs(out["hits"]) == want
        rogue = ["--ca", str(pem["ca"]), "--cert", str(pem["rogue_cli"]), "--key", str(pem["rogue_cli_key"])]
        for args in (rogue, ["--ca", str(pem["rogue_ca"])], []):  # untrusted client, untrusted server, plaintext
            rc, out = node("search", srv.address, q, "-k", "5", "--timeout", "5", *args)
            assert rc == 1 and out["error"]["status"] == "UNAVAILABLE", (args, out)
            assert out["error"]["code"] == grpc.StatusCode.UNAVAILABLE.value[0]

"""Access control of the retrieval server: TLS, mutual TLS, bearer tokens, and opaque ids.

Certificates are generated here (a CA, a server certificate for 127.0.0.1/localhost, a client
certificate, and a second, untrusted CA with its own client). Servers run in-process
(BackgroundServer) on 127.0.0.1 with a free port.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import grpc
import pytest

from benchmarks.soak import synthetic_images
from serve.client import Item, RetrievalClient
from serve.server import BackgroundServer, ServeConfig
from tests.pki import make_pki
from tests.test_fuzz import build_gallery, shared_exp

TOKEN = "access-token-7f3a9c"
SC = grpc.StatusCode


# ---- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return shared_exp(tmp_path_factory)


@pytest.fixture(scope="module")
def gallery(exp, tmp_path_factory) -> Path:
    return build_gallery(exp, tmp_path_factory.mktemp("access") / "gal", n=16)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _copy(gal: Path, tmp: Path) -> Path:
    dst = tmp / "gal"
    shutil.copytree(gal, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def cfg(exp, gal, **kw) -> ServeConfig:
    base = dict(model=exp, gallery=gal, host="127.0.0.1", port=0, metrics_port=None, grace_s=0.5, decode_threads=1,
                token=TOKEN)
    base.update(kw)
    return ServeConfig(**base)


QUERIES = synthetic_images(3, (120, 90), seed=42)


def snapshot_state(addr: str, gal: Path) -> tuple:
    """What must not change after refused writes: size, search results, the WAL's bytes."""
    with RetrievalClient(addr, timeout=30) as c:
        size = c.info().gallery.size
        results = [[(h.id, h.distance, tuple(sorted(h.metadata.items()))) for h in c.search(q, k=8)] for q in QUERIES]
    return size, results, (gal / "wal.jsonl").read_bytes()


# ---- TLS ---------------------------------------------------------------------------------
def test_tls_server(exp, gallery, pki, tmp_path):
    with BackgroundServer(cfg(exp, _copy(gallery, tmp_path), tls_cert=str(pki["srv"]), tls_key=str(pki["srv_key"]))) as srv:
        port = srv.port
        with RetrievalClient(f"127.0.0.1:{port}", tls={"ca": pki["ca"]}, timeout=30) as c:
            assert c.health() == "SERVING" and len(c.search(QUERIES[0], k=3)) == 3
        with RetrievalClient(f"localhost:{port}", tls={"ca": pki["ca"]}, timeout=30) as c:
            assert c.info().gallery.size == 16
        failures = {
            "plaintext client": {"tls": False},
            "client trusting another CA": {"tls": {"ca": pki["rogue_ca"]}},
            "client checking another name": {"tls": {"ca": pki["ca"], "server_name": "evil.example"}},
        }
        for what, kw in failures.items():
            with RetrievalClient(f"127.0.0.1:{port}", timeout=5, **kw) as c:
                with pytest.raises(grpc.RpcError) as ei:
                    c.search(QUERIES[0], k=3)
                assert ei.value.code() == SC.UNAVAILABLE, what


def test_mutual_tls_server(exp, gallery, pki, tmp_path):
    config = cfg(exp, _copy(gallery, tmp_path), tls_cert=str(pki["srv"]), tls_key=str(pki["srv_key"]),
                 tls_client_ca=str(pki["ca"]))
    with BackgroundServer(config) as srv:
        good = {"ca": pki["ca"], "cert": pki["cli"], "key": pki["cli_key"]}
        with RetrievalClient(srv.address, tls=good, timeout=30, token=TOKEN) as c:
            assert len(c.search(QUERIES[0], k=3)) == 3
            assert c.upsert([Item("mtls/ok", image=QUERIES[1])]) == 1
        failures = {
            "no client certificate": {"tls": {"ca": pki["ca"]}},
            "client certificate from another CA": {"tls": {"ca": pki["ca"], "cert": pki["rogue_cli"],
                                                           "key": pki["rogue_cli_key"]}},
            "plaintext client": {"tls": False},
        }
        for what, kw in failures.items():
            with RetrievalClient(srv.address, timeout=5, token=TOKEN, **kw) as c:
                for call in (lambda: c.search(QUERIES[0], k=3), lambda: c.health()):
                    with pytest.raises(grpc.RpcError) as ei:
                        call()
                    assert ei.value.code() == SC.UNAVAILABLE, what


def test_tls_flags_are_checked_at_start(exp, gallery, pki, tmp_path):
    from hashret.errors import BadInput, MissingArtifact

    gal = _copy(gallery, tmp_path)
    with pytest.raises(BadInput, match="--tls-cert/--tls-key"):
        BackgroundServer(cfg(exp, gal, tls_cert=str(pki["srv"]))).start()
    with pytest.raises(BadInput, match="--tls-client-ca"):
        BackgroundServer(cfg(exp, gal, tls_client_ca=str(pki["ca"]))).start()
    with pytest.raises(MissingArtifact, match="--tls-key .*nope.pem"):
        BackgroundServer(cfg(exp, gal, tls_cert=str(pki["srv"]), tls_key=str(tmp_path / "nope.pem"))).start()


# ---- tokens --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(exp, gallery, tmp_path_factory):
    gal = _copy(gallery, tmp_path_factory.mktemp("access-served"))
    with BackgroundServer(cfg(exp, gal)) as srv:
        srv.gallery_dir = gal
        yield srv


BAD_CREDENTIALS = {
    "no token": None,
    "wrong token": "wrong-token",
    "token prefix": TOKEN[:-1],
    "token plus suffix": TOKEN + "x",
}


def test_writes_without_the_right_token_are_refused_and_change_nothing(server):
    gal = server.gallery_dir
    before = snapshot_state(server.address, gal)
    victim = before[1][0][0][0]  # an id that exists
    attempts = 0
    for what, token in BAD_CREDENTIALS.items():
        with RetrievalClient(server.address, token=token, timeout=30) as c:
            for call in (lambda: c.upsert([Item("intruder", image=QUERIES[0])]),
                         lambda: c.upsert([Item(victim, code=b"\0" * 8)]),
                         lambda: c.delete([victim])):
                attempts += 1
                with pytest.raises(grpc.RpcError) as ei:
                    call()
                assert ei.value.code() == SC.UNAUTHENTICATED, (what, ei.value.details())
    # other schemes and malformed headers
    from serve._proto import retrieval_pb2 as pb
    from serve._proto import retrieval_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.RetrievalStub(ch)
        for header in (f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}", "Bearer ", f"bearer  {TOKEN}x"):
            attempts += 1
            with pytest.raises(grpc.RpcError) as ei:
                stub.Delete(pb.DeleteRequest(ids=[victim]), timeout=30, metadata=(("authorization", header),))
            assert ei.value.code() == SC.UNAUTHENTICATED, header
    assert snapshot_state(server.address, gal) == before, f"{attempts} refused writes changed the gallery"
    # the right token works (and proves the refusals were about the token only)
    with RetrievalClient(server.address, token=TOKEN, timeout=30) as c:
        assert c.upsert([Item("authorized", code=b"\1" * 8)]) == 1
        assert c.delete(["authorized"]) == 1


def test_without_a_configured_token_writes_are_disabled(exp, gallery, tmp_path, monkeypatch):
    monkeypatch.delenv("HASHRET_TOKEN", raising=False)
    with BackgroundServer(cfg(exp, _copy(gallery, tmp_path), token=None)) as srv:
        with RetrievalClient(srv.address, token="anything", timeout=30) as c:
            assert len(c.search(QUERIES[0], k=2)) == 2  # reads stay open
            with pytest.raises(grpc.RpcError) as ei:
                c.upsert([Item("x", code=b"\0" * 8)])
            assert ei.value.code() == SC.UNAUTHENTICATED and "writes are disabled" in ei.value.details()


def test_require_token_for_reads(exp, gallery, tmp_path):
    with BackgroundServer(cfg(exp, _copy(gallery, tmp_path), require_token_for_reads=True)) as srv:
        for token in (None, "wrong"):
            with RetrievalClient(srv.address, token=token, timeout=30) as c:
                assert c.health() == "SERVING"  # probes never need the token
                for call in (lambda: c.search(QUERIES[0], k=2), lambda: c.search_batch(QUERIES[:2], k=2),
                             lambda: c.encode(QUERIES[0]), lambda: c.info()):
                    with pytest.raises(grpc.RpcError) as ei:
                        call()
                    assert ei.value.code() == SC.UNAUTHENTICATED
        with RetrievalClient(srv.address, token=TOKEN, timeout=30) as c:
            assert len(c.search(QUERIES[0], k=2)) == 2 and c.info().gallery.size == 16
            assert len(c.encode(QUERIES[0])[0]) == 8


def test_token_from_file_or_environment(tmp_path, monkeypatch):
    from hashret.cli import build_parser
    from hashret.errors import BadInput, MissingArtifact
    from serve.cli import config_from_args
    from serve.server import load_token

    f = tmp_path / "token"
    f.write_text("  file-token \n")
    monkeypatch.setenv("HASHRET_TOKEN", "env-token")
    assert load_token(str(f)) == "file-token"  # the file wins over the environment
    assert load_token(None) == "env-token"
    monkeypatch.delenv("HASHRET_TOKEN")
    assert load_token(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BadInput, match="empty"):
        load_token(str(tmp_path / "empty"))
    with pytest.raises(MissingArtifact, match="not found"):
        load_token(str(tmp_path / "missing"))
    args = build_parser("serve").parse_args(["serve", "--model", "m", "--gallery", "g", "--token-file", str(f),
                                             "--require-token-for-reads"])
    c = config_from_args(args)
    assert c.token == "file-token" and c.require_token_for_reads


TOKEN_FILES = {  # contents -> the token, or the refusal's text
    "\n  abc  \n\n": "abc",
    "abc": "abc",
    "\r\n\tabc def\r\n": "abc def",  # inner spaces survive: the server strips only the ends
    "abc\ndef": "holds 2 non-empty lines (1, 2) but a token is one line: keep only the token in it",
    "\nabc\n\n# a comment\n": "holds 2 non-empty lines (2, 4)",
    "abc\x7fdef": "line 1 holds '\\x7f' at column 4, which an authorization header cannot carry",
    "tökén": "line 1 holds 'ö' at column 2",
    " \n\t\n": "is empty: put the token on its first line",
}


@pytest.mark.parametrize("text", list(TOKEN_FILES))
def test_token_file_is_its_one_non_empty_line(text, tmp_path, monkeypatch):
    """The rule of `hashret serve`, `hashret query` and the soak alike (hashret.tokens)."""
    from benchmarks import soak
    from hashret.errors import BadInput
    from serve.query import load_token as query_token
    from serve.server import load_token

    monkeypatch.delenv("HASHRET_TOKEN", raising=False)
    f = tmp_path / "token.txt"
    f.write_text(text, encoding="utf-8")
    soak_args = soak.build_parser().parse_args(["--addr", "127.0.0.1:1", "--token-file", str(f)])
    readers = {"serve": lambda: load_token(str(f)), "query": lambda: query_token(str(f)),
               "soak": lambda: soak._token(soak_args)}
    want = TOKEN_FILES[text]
    accepted = want in ("abc", "abc def")
    for who, read in readers.items():
        if accepted:
            assert read() == want, who
        else:
            with pytest.raises(BadInput) as ei:
                read()
            assert str(ei.value).startswith(f"--token-file {f} | ") and want in str(ei.value), (who, str(ei.value))
    # the environment variable follows the same rule
    monkeypatch.setenv("HASHRET_TOKEN", text)
    if accepted:
        assert load_token(None) == want
    elif text.strip():
        with pytest.raises(BadInput, match=r"^\$HASHRET_TOKEN \| "):
            load_token(None)
    else:
        assert load_token(None) is None  # set but blank: as if unset


def test_server_with_a_two_line_token_file_refuses_to_start(exp, gallery, tmp_path):
    """`abc\ndef` would make a token no client can send, so every write would fail: exit 2 at start instead."""
    from benchmarks.soak import ServerProcess

    f = tmp_path / "token.txt"
    f.write_text("abc\ndef\n")
    srv = ServerProcess(exp, _copy(gallery, tmp_path), ["--token-file", str(f)], env={"HASHRET_TOKEN": ""})
    try:
        rc = srv.spawn().wait_exit(timeout=120)
        log = srv.log_text()
    finally:
        srv.cleanup()
    assert rc == 2, log[-2000:]
    assert f"--token-file {f} | holds 2 non-empty lines" in log and "keep only the token in it" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


# ---- the serving log line ----------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1"])
def test_serving_log_names_the_address_bound(exp, gallery, tmp_path, caplog, host):
    caplog.set_level("INFO", logger="hashret.serve")
    with BackgroundServer(cfg(exp, _copy(gallery, tmp_path), host=host)) as srv:
        with RetrievalClient(srv.address, timeout=30) as c:  # dialled at 127.0.0.1 either way
            assert c.health() == "SERVING"
        port = srv.port
    serving = [r for r in caplog.records if r.name == "hashret.serve" and r.getMessage() == "serving"]
    assert len(serving) == 1, [r.getMessage() for r in caplog.records]
    assert port > 0 and serving[0].fields["address"] == f"{host}:{port}", serving[0].fields


# ---- ids and payloads are data, never paths -------------------------------------------------
PATH_IDS = ["../../etc/passwd", "/etc/passwd", "..\\..\\windows\\win.ini", "file:///etc/shadow", "~/.ssh/id_rsa",
            "/proc/self/environ", "gal/../../manifest.json", "wal.jsonl"]


class OpenRecorder:
    """Records every file the process opens (audit hook) while `active`: the server must open none named
    in a request."""

    def __init__(self):
        self.active = False
        self.opened: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            self.opened.append(os.fsdecode(args[0]))


_RECORDER: OpenRecorder | None = None


def test_path_like_ids_are_opaque_and_never_opened(server, tmp_path):
    global _RECORDER
    _RECORDER = _RECORDER or OpenRecorder()
    secret = tmp_path / "secret.jpg"  # a real image file: if the server ever read a path, this would decode
    secret.write_bytes(QUERIES[2])
    files_before = sorted(p.name for p in server.gallery_dir.iterdir())
    images = synthetic_images(len(PATH_IDS), (100, 80), seed=77)
    _RECORDER.opened.clear()
    _RECORDER.active = True
    (tmp_path / "probe").write_text("x")  # the recorder sees opens (from any thread)
    assert str(tmp_path / "probe") in _RECORDER.opened
    try:
        with RetrievalClient(server.address, token=TOKEN, timeout=30) as c:
            items = [Item(i, image=img, metadata={"path": i, "file": str(secret)}) for i, img in zip(PATH_IDS, images)]
            assert c.upsert(items) == len(PATH_IDS)
            for i, img in zip(PATH_IDS, images):
                hits = c.search(img, k=100, max_distance=2)  # its own code: distance 0 (2: batch rounding)
                match = [h for h in hits if h.id == i]
                assert match and match[0].metadata == {"path": i, "file": str(secret)}, (i, [h.id for h in hits])
            for payload in (str(secret).encode(), b"/etc/passwd", b"../../etc/passwd", b"file://" + str(secret).encode()):
                for call in (lambda: c.search(payload, k=1), lambda: c.encode(payload),
                             lambda: c.upsert([Item("p", image=payload)])):
                    with pytest.raises(grpc.RpcError) as ei:
                        call()
                    assert ei.value.code() == SC.INVALID_ARGUMENT and "not a decodable image" in ei.value.details()
            assert c.delete(PATH_IDS) == len(PATH_IDS)
    finally:
        _RECORDER.active = False
    opened = set(_RECORDER.opened)
    named = {str(secret), "/etc/passwd", "/etc/shadow", "/proc/self/environ"} | set(PATH_IDS)
    assert not [p for p in opened if p in named or p.endswith(("passwd", "win.ini", "id_rsa", "secret.jpg"))], opened
    # the ids created no files either: the gallery folder holds the same files as before
    assert sorted(p.name for p in server.gallery_dir.iterdir()) == files_before

"""A small synchronous client of the Retrieval service, for scripts and services that embed it.

    from serve.client import RetrievalClient
    with RetrievalClient("127.0.0.1:50051") as c:
        for hit in c.search("photo.jpg", k=5):
            print(hit.id, hit.distance, hit.metadata)

Failures raise grpc.RpcError (`e.code()`, `e.details()`); per-item SearchBatch failures come
back as `ItemError` values in the result list instead, as the service sends them.
Only grpc and the generated stubs are imported: no torch, faiss or image code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve._proto import retrieval_pb2 as pb
from serve._proto import retrieval_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Hit:
    id: str
    distance: int
    metadata: dict[str, str] = field(default_factory=dict)
    score: float | None = None  # cosine of the activations when the search was re-ranked


@dataclass(frozen=True)
class ItemError:
    """One failed SearchBatch item: the gRPC status name and code, and why."""

    status: str
    code: int
    message: str


@dataclass
class Item:
    """One Upsert item: exactly one of `image` (bytes or a path) or `code` (packed bytes)."""

    id: str
    image: bytes | str | os.PathLike | None = None
    code: bytes | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


def _image_bytes(image) -> bytes:
    """Bytes as given, or the file's bytes for a path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def _hits(msgs) -> list[Hit]:
    return [Hit(h.id, int(h.distance), dict(h.metadata), h.score if h.HasField("score") else None) for h in msgs]


class RetrievalClient:
    """One channel to a Retrieval server.

    tls: False (plaintext), True (TLS with the system roots), or a dict with any of
    `ca` (PEM path or bytes of the CA that signed the server), `cert` and `key` (a client
    certificate for mutual TLS) and `server_name` (override the name checked in the cert).
    timeout: default deadline per call, in seconds (None: none).
    """

    def __init__(
        self,
        addr: str,
        token: str | None = None,
        tls: bool | dict = False,
        timeout: float | None = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.addr = addr
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls:
            opts = tls if isinstance(tls, dict) else {}

            def pem(v):
                return None if v is None else (bytes(v) if isinstance(v, (bytes, bytearray)) else Path(v).read_bytes())

            creds = grpc.ssl_channel_credentials(
                root_certificates=pem(opts.get("ca")),
                private_key=pem(opts.get("key")),
                certificate_chain=pem(opts.get("cert")),
            )
            if opts.get("server_name"):
                options.append(("grpc.ssl_target_name_override", opts["server_name"]))
            self.channel = grpc.secure_channel(addr, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(addr, options=options)
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    @staticmethod
    def _request(image, k: int, max_distance: int | None, rerank_factor: int | None = None) -> pb.SearchRequest:
        req = pb.SearchRequest(image=_image_bytes(image), k=k)
        if max_distance is not None:
            req.max_distance = max_distance
        if rerank_factor is not None:
            req.rerank_factor = rerank_factor
        return req

    def search(self, image, k: int = 10, max_distance: int | None = None, timeout: float | None = None,
               rerank_factor: int | None = None) -> list[Hit]:
        """Nearest gallery items to one image (bytes or a path), nearest first.

        rerank_factor: re-rank the Hamming top-(k * factor) by cosine; 0 off; None (default) the server's.
        """
        req = self._request(image, k, max_distance, rerank_factor)
        return _hits(self.stub.Search(req, **self._kw(timeout)).hits)

    def search_batch(self, images: Iterable, k: int = 10, max_distance: int | None = None,
                     timeout: float | None = None) -> list[list[Hit] | ItemError]:
        """One result per image: its hits, or an ItemError for an image the server refused."""
        req = pb.SearchBatchRequest(items=[self._request(i, k, max_distance) for i in images])
        out: list[list[Hit] | ItemError] = []
        for r in self.stub.SearchBatch(req, **self._kw(timeout)).results:
            if r.WhichOneof("result") == "error":
                out.append(ItemError(r.error.status, int(r.error.code), r.error.message))
            else:
                out.append(_hits(r.hits.hits))
        return out

    def encode(self, image, timeout: float | None = None) -> tuple[bytes, int]:
        """(packed code, bits) of one image."""
        r = self.stub.Encode(pb.EncodeRequest(image=_image_bytes(image)), **self._kw(timeout))
        return r.code, int(r.bits)

    def upsert(self, items: Iterable[Item], timeout: float | None = None) -> int:
        """Add or replace items (streamed; all-or-nothing on the server); returns how many were written."""

        def stream():
            for it in items:
                msg = pb.UpsertItem(id=it.id, metadata=dict(it.metadata or {}))
                if it.code is not None:
                    msg.code = bytes(it.code)
                if it.image is not None:
                    msg.image = _image_bytes(it.image)
                yield msg

        return int(self.stub.Upsert(stream(), **self._kw(timeout)).count)

    def delete(self, ids: Iterable[str], timeout: float | None = None) -> int:
        return int(self.stub.Delete(pb.DeleteRequest(ids=list(ids)), **self._kw(timeout)).count)

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return self.stub.Info(pb.InfoRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's health status name: SERVING, NOT_SERVING, ..."""
        r = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout if timeout is None else timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_serving(addr: str, proc, timeout: float, log_tail=lambda: "") -> None:
    """Poll grpc.health.v1 at `addr` until SERVING; fail early if the server process `proc` exits.

    Raises RuntimeError carrying `log_tail()` (the server's last log lines) on exit or timeout.
    """
    import time

    until = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < until:
            if proc.poll() is not None:
                raise RuntimeError(f"hashret serve exited with {proc.returncode} before serving:\n{log_tail()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"hashret serve did not report SERVING within {timeout:.0f} s:\n{log_tail()}")

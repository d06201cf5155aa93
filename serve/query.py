"""`hashret query IMAGE... --addr HOST:PORT`: search a running server with image files and print the hits."""
from __future__ import annotations

import argparse
import json
import sys


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Send image files to a running `hashret serve` and print the nearest gallery items\n"
        "(id, Hamming distance, metadata) for each.\n\n"
        "example:\n  hashret query photo.jpg other.png --addr 127.0.0.1:50051 -k 5"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to search with")
    p.add_argument("--addr", default="127.0.0.1:50051", help="server address HOST:PORT (default: 127.0.0.1:50051)")
    p.add_argument("-k", type=int, default=10, help="results per image (default: 10)")
    p.add_argument("--max-distance", type=int, default=None,
                   help="drop results more than this many bits away (default: no limit)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image (default: a table)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: 30)")
    p.add_argument("--token-file", metavar="FILE",
                   help="bearer token, for servers started with --require-token-for-reads (default: $HASHRET_TOKEN)")
    p.add_argument("--tls", action="store_true", help="use TLS (default: plaintext)")
    p.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server certificate (default: system roots)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")


def run(args: argparse.Namespace) -> int:
    import grpc

    from serve.client import RetrievalClient

    tls: bool | dict = False
    if args.tls or args.tls_ca or args.tls_cert:
        tls = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}
    failed = 0
    with RetrievalClient(args.addr, token=load_token(args.token_file), tls=tls, timeout=args.timeout) as client:
        for path in args.images:
            try:
                hits = client.search(path, k=args.k, max_distance=args.max_distance)
            except OSError as e:
                failed += 1
                _report(args, path, error=f"cannot read ({e.strerror})")
                continue
            except grpc.RpcError as e:
                failed += 1
                _report(args, path, error=f"{e.code().name}: {e.details()}")
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                    break  # the next image would fail the same way
                continue
            _report(args, path, hits=hits)
    return 2 if failed else 0


def load_token(token_file: str | None) -> str | None:
    """--token-file's first non-empty line, else $HASHRET_TOKEN (the server's rule: hashret.tokens)."""
    from hashret.tokens import load_token as _load

    return _load(token_file)


def _report(args, path: str, hits=None, error: str | None = None) -> None:
    if args.json:
        obj = {"image": path}
        if error is not None:
            obj["error"] = error
        else:
            obj["hits"] = [{"id": h.id, "distance": h.distance, "metadata": h.metadata} for h in hits]
        print(json.dumps(obj))
        return
    if error is not None:
        print(f"{path}: error: {error}", file=sys.stderr)
        return
    print(f"{path}: {len(hits)} hit(s)")
    width = max((len(h.id) for h in hits), default=2)
    for rank, h in enumerate(hits, 1):
        md = " ".join(f"{k}={v}" for k, v in sorted(h.metadata.items()))
        print(f"  {rank:>3}  {h.distance:>4}  {h.id:<{width}}  {md}")

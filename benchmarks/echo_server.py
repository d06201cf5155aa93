"""A bare grpc.aio echo server: the floor that Python gRPC alone puts under any servicer.

`hashret bench serve` starts it after the retrieval server and drives it with the same load
(same images as request bodies, same concurrency and channels) to read its CPU time per
request from /proc. What our server spends outside the engine and decoding can be compared
with this number: the part of it that a bare grpc.aio server spends too is gRPC's, not ours.

One unary method, `/hashret.bench.Echo/Echo`, raw bytes in and out (no protobuf parsing, no
interceptors, no metrics): it answers every request with the same `--reply-bytes` bytes, sized
like a Search response, on one asyncio event loop as `hashret serve` runs.

    python -m benchmarks.echo_server --port 50099 --reply-bytes 700
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

ECHO_METHOD = "/hashret.bench.Echo/Echo"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def serve(host: str, port: int, reply_bytes: int) -> None:
    import grpc

    reply = b"\x00" * reply_bytes

    async def echo(request: bytes, context) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        ECHO_METHOD.split("/")[1], {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    if not server.add_insecure_port(f"{host}:{port}"):
        raise SystemExit(f"error: --port {port} | cannot listen on {host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo server on {host}:{port}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (required)")
    p.add_argument("--reply-bytes", type=int, default=700,
                   help="size of every answer, e.g. a Search response's (default: 700)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.echo_server",
                                description=__doc__.strip().splitlines()[0])
    add_args(p)
    args = p.parse_args(argv)
    if not 0 < args.port < 65536 or args.reply_bytes < 0:
        p.error("--port must be 1..65535 and --reply-bytes >= 0")
    asyncio.run(serve(args.host, args.port, args.reply_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A bare grpc.aio echo server: the floor that Python gRPC alone puts under any servicer.

`hashret bench serve` starts it after the retrieval server and drives it with the same load
(same images as request bodies, same concurrency and channels) to read its CPU time per
request from /proc. What our server spends outside the engine and decoding can be compared
with this number: the part of it that a bare grpc.aio server spends too is gRPC's, not ours.

One unary method, `/hashret.bench.Echo/Echo`, raw bytes in and out (no protobuf parsing, no
interceptors, no metrics): it answers every request with the same `--reply-bytes` bytes, sized
like a Search response, on one asyncio event loop as `hashret serve` runs.

Answered at once, requests arrive and leave as fast as the loop can turn, and each wake-up of
the loop is shared by many of them. The retrieval server answers at the engine's pace instead,
a batch at a time, and its loop sleeps in between. `--answer-every-ms T --answer-group N` holds
requests and answers the N oldest every T ms, the way the batcher releases them, so the floor is
read at the same rate and in the same groups (the bench takes T and N from the server's run).

    python -m benchmarks.echo_server --port 50099 --reply-bytes 700
    python -m benchmarks.echo_server --port 50099 --reply-bytes 700 --answer-every-ms 45 --answer-group 7
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

ECHO_METHOD = "/hashret.bench.Echo/Echo"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def serve(host: str, port: int, reply_bytes: int, every_ms: float = 0.0, group: int = 1) -> None:
    import collections

    import grpc

    reply = b"\x00" * reply_bytes
    held: collections.deque[asyncio.Future] = collections.deque()
    loop = asyncio.get_running_loop()

    async def echo(request: bytes, context) -> bytes:
        if every_ms > 0:
            f = loop.create_future()
            held.append(f)
            await f
        return reply

    async def release() -> None:  # the batcher's rhythm: the `group` oldest every `every_ms`
        tick = every_ms / 1e3
        next_at = loop.time() + tick
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += tick
            for _ in range(min(group, len(held))):
                f = held.popleft()
                if not f.done():
                    f.set_result(None)

    handler = grpc.method_handlers_generic_handler(
        ECHO_METHOD.split("/")[1], {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    if not server.add_insecure_port(f"{host}:{port}"):
        raise SystemExit(f"error: --port {port} | cannot listen on {host}:{port}")
    await server.start()
    releaser = asyncio.ensure_future(release()) if every_ms > 0 else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo server on {host}:{port}", flush=True)
    await stop.wait()
    if releaser is not None:
        releaser.cancel()
    await server.stop(1.0)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (required)")
    p.add_argument("--reply-bytes", type=int, default=700,
                   help="size of every answer, e.g. a Search response's (default: 700)")
    p.add_argument("--answer-every-ms", type=float, default=0.0, metavar="T",
                   help="hold requests and answer them in groups every T milliseconds, as a server answers "
                        "batch by batch (default: 0, answer each at once)")
    p.add_argument("--answer-group", type=int, default=1, metavar="N",
                   help="with --answer-every-ms: how many held requests (the oldest) each tick answers (default: 1)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.echo_server",
                                description=__doc__.strip().splitlines()[0])
    add_args(p)
    args = p.parse_args(argv)
    if not 0 < args.port < 65536 or args.reply_bytes < 0:
        p.error("--port must be 1..65535 and --reply-bytes >= 0")
    if args.answer_every_ms < 0 or args.answer_group < 1:
        p.error("--answer-every-ms must be >= 0 and --answer-group >= 1")
    asyncio.run(serve(args.host, args.port, args.reply_bytes, args.answer_every_ms, args.answer_group))
    return 0


if __name__ == "__main__":
    sys.exit(main())

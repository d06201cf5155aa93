"""`hashret serve`: flags -> ServeConfig -> serve(). Nothing else lives here."""
from __future__ import annotations

import argparse
import logging

from hashret.cliargs import add_engine_args
from hashret.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Serve image search over gRPC: send a photo, get the most similar gallery items.\n\n"
        "example:\n"
        "  hashret serve --model runs/exp --gallery galleries/grocery --port 50051\n"
        "  hashret query photo.jpg --addr 127.0.0.1:50051 -k 5\n\n"
        "The gallery must have been built (hashret index build) with the same exported model;\n"
        "the server refuses to start otherwise. Health (grpc.health.v1) and reflection are on,\n"
        "so `grpcurl -plaintext 127.0.0.1:50051 list` works. Stop with Ctrl-C or SIGTERM:\n"
        "in-flight requests finish first (--grace-s)."
    )
    g = p.add_argument_group("what to serve")
    g.add_argument("--model", required=True, metavar="EXP", help="export folder from `hashret export` (required)")
    g.add_argument("--gallery", required=True, metavar="GAL", help="gallery folder from `hashret index build` (required)")
    add_engine_args(g, title=None, default_backend="ort", backend_help="inference engine")
    g.add_argument("--engine-threads", type=int, default=None, metavar="N",
                   help="threads the engine uses per batch, passed as the backend's own thread option "
                        "(default: the engine's choice, all cores)")

    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for all IPv4 interfaces, :: for all IPv6 and IPv4 ones "
                        "(default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: 50051)")
    g.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="serve Prometheus metrics at http://HOST:N/metrics (default: off)")
    g.add_argument("--grace-s", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on shutdown (default: 10)")
    g.add_argument("--otel", action="store_true",
                   help="emit OpenTelemetry spans per request and stage; needs the hashret[otel] extra, "
                        "exports over OTLP when opentelemetry-exporter-otlp is installed, else to stderr; "
                        "$HASHRET_OTEL=1 does the same (default: off)")

    g = p.add_argument_group("batching and load")
    g.add_argument("--max-batch", type=int, default=32, help="most images per inference call (default: 32)")
    g.add_argument("--max-delay-us", type=int, default=2000,
                   help="longest a request waits for others to join its batch, in microseconds; "
                        "it only waits when more requests are already on their way (default: 2000)")
    g.add_argument("--queue-size", type=int, default=256,
                   help="requests admitted at once; beyond that clients get RESOURCE_EXHAUSTED and should retry "
                        "(default: 256)")
    g.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server processes sharing the port (SO_REUSEPORT), each with its own engine: for hosts "
                        "where one process's event loop is the limit (about 1,000 Search/s). FAISS galleries are "
                        "then served read-only (writes refused); Milvus galleries need a Milvus server; no Admin "
                        "service. Engine and decode threads are split among the workers; --metrics-port P gives "
                        "worker i port P+i (default: 1)")
    g.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="threads decoding and resizing images; with --decode cuda, images in flight to the "
                        "GPU decoder (default: min(4, CPUs); with --decode cuda, --max-batch)")
    g.add_argument("--decode", default="cpu", metavar="DEV",
                   help="where JPEGs are decoded and resized: cpu, or cuda / cuda:N for batched nvJPEG decoding "
                        "and resizing on the GPU (needs torchvision with CUDA; other formats and unusual JPEGs "
                        "still decode on the CPU; refused at start without a GPU) (default: cpu)")
    g.add_argument("--search-device", default=None, metavar="DEV",
                   help="torch-flat galleries only: scan the codes on this device (cuda, cuda:N or cpu) instead "
                        "of the one the gallery was built for (default: the gallery's)")

    g = p.add_argument_group("request limits")
    g.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"largest accepted image file (default: {DEFAULT_MAX_BYTES})")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest accepted width x height, against decompression bombs (default: {DEFAULT_MAX_PIXELS})")
    g.add_argument("--max-k", type=int, default=1000, help="most results one search may ask for (default: 1000)")
    g.add_argument("--max-batch-items", type=int, default=64, help="most images in one SearchBatch call (default: 64)")
    g.add_argument("--rerank-factor", type=int, default=10, metavar="F",
                   help="re-rank each search's Hamming top-(k*F) by cosine of the stored activations; a request "
                        "may set its own; 0 = off; galleries without activations are never re-ranked (default: 10)")
    g.add_argument("--max-message-bytes", type=int, default=None,
                   help="largest gRPC message (default: 64 MiB, or more when --max-image-bytes needs it)")

    from serve.snapshots import DEFAULT_EVERY_MB, DEFAULT_EVERY_RECORDS

    g = p.add_argument_group("snapshots (FAISS galleries; Milvus keeps its own log)")
    g.add_argument("--snapshot-every-records", type=int, default=DEFAULT_EVERY_RECORDS, metavar="N",
                   help="snapshot the gallery in the background once its write-ahead log holds N records "
                        f"(writes); a restart replays at most about this many (default: {DEFAULT_EVERY_RECORDS})")
    g.add_argument("--snapshot-every-mb", type=float, default=DEFAULT_EVERY_MB, metavar="MB",
                   help="... or once the write-ahead log reaches MB mebibytes, whichever comes first "
                        f"(default: {DEFAULT_EVERY_MB:g})")

    g = p.add_argument_group("security")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate chain; with --tls-key enables TLS (default: plaintext)")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    g.add_argument("--tls-client-ca", metavar="PEM",
                   help="CA that client certificates must be signed by: enables mutual TLS (default: off)")
    g.add_argument("--token-file", metavar="FILE",
                   help="file holding the bearer token that Upsert/Delete require (default: $HASHRET_TOKEN; "
                        "with neither, writes are refused)")
    g.add_argument("--admin-token-file", metavar="FILE",
                   help="file holding the bearer token of the Admin service (model rollover: LoadCandidate, "
                        "Promote, Rollback; see `hashret rollover`); must differ from the write token "
                        "(default: no Admin service)")
    g.add_argument("--shadow-fraction", type=float, default=0.0, metavar="P",
                   help="share of live searches re-run on a loaded candidate model after answering, to export "
                        "top-k overlap and rank correlation with the live answer (default: 0, off)")
    g.add_argument("--require-token-for-reads", action="store_true",
                   help="require the token for Search/Encode/Info too (default: reads are open)")
    g.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="json: one JSON object per line for log collectors (default: json)")


def config_from_args(args: argparse.Namespace):
    from hashret.tokens import read_token_file
    from serve.server import DEFAULT_MAX_MESSAGE_BYTES, ServeConfig, load_token
    from serve.service import Limits
    from serve.snapshots import SnapshotPolicy

    limits = Limits(
        max_k=args.max_k, max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels,
        max_batch_items=args.max_batch_items,
    )
    max_msg = args.max_message_bytes or max(DEFAULT_MAX_MESSAGE_BYTES, args.max_image_bytes + (1 << 20))
    return ServeConfig(
        model=args.model, gallery=args.gallery, host=args.host, port=args.port, backend=args.backend,
        device=args.device, engine_threads=args.engine_threads, max_batch=args.max_batch,
        max_delay_us=args.max_delay_us, queue_size=args.queue_size, decode_threads=args.decode_threads,
        limits=limits, max_message_bytes=max_msg, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, token=load_token(args.token_file),
        require_token_for_reads=args.require_token_for_reads, metrics_port=args.metrics_port, grace_s=args.grace_s,
        snapshots=SnapshotPolicy(every_records=args.snapshot_every_records, every_mb=args.snapshot_every_mb),
        otel=getattr(args, "otel", False),
        admin_token=read_token_file(args.admin_token_file, "--admin-token-file") if args.admin_token_file else None,
        shadow_fraction=args.shadow_fraction, rerank_factor=args.rerank_factor,
        decode=check_decode(args.decode), search_device=args.search_device,
    )


def check_decode(value: str) -> str:
    """--decode's value, refused early when it is no device name (availability is checked at start)."""
    from hashret.errors import BadInput

    v = str(value).strip()
    if v != "cpu" and not (v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
        raise BadInput(f"--decode {value!r} | must be cpu, cuda or cuda:N")
    return v


def run(args: argparse.Namespace) -> int:
    from serve.server import serve, setup_json_logging

    verbose = getattr(args, "verbose", False)
    if args.log_format == "json":
        setup_json_logging(logging.DEBUG if verbose else logging.INFO)
    cfg = config_from_args(args)
    if args.workers != 1:
        from serve.workers import run_workers

        return run_workers(cfg, args.workers, args.log_format, verbose)
    serve(cfg)
    return 0

"""`hashret bench {engine,serve,search,parity,gpu-search,report}`: the benchmark suite's entry point.

Every benchmark prints a table and writes one JSON (default benchmarks/results/<name>.json)
recording the exact command line, the date, the machine (CPU model, cores, threads used, GPU)
and package versions, plus the code that ran (`git describe --always --dirty`, and the sha256 of
`git diff HEAD` when dirty); a dirty checkout writes into benchmarks/results/ only with
--allow-dirty. `hashret bench report` turns those files into benchmarks/RESULTS.md with plots.
Timings are figures, never pass/fail checks.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from hashret.errors import HashretError

# name -> (module with add_args(parser) and run(args) -> int, one-line help, examples)
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "engine": (
        "benchmarks.engine",
        "inference latency/throughput of an exported model on every backend x batch size",
        "examples:\n  hashret bench engine exp/ --batches 1,8,32 --iters 50\n"
        "  hashret bench engine exp/ --backends ort,openvino --threads 2",
    ),
    "serve": (
        "benchmarks.serve_load",
        "gRPC load test of the retrieval service: latency percentiles, requests/s and the server's CPU per "
        "request (engine, decode, the rest, and a bare gRPC echo server's) per concurrency",
        "examples:\n  hashret bench serve --model exp/ --gallery gal/ --concurrency 1,4,16 --seconds 10\n"
        "  hashret bench serve --addr 127.0.0.1:50051 --images photos/\n"
        "  hashret bench serve --addr 127.0.0.1:50051 --server-pid 4242   # + the server's CPU per request",
    ),
    "search": (
        "benchmarks.search",
        "Hamming k-NN search: numpy vs FAISS flat vs FAISS HNSW vs Milvus Lite (latency, recall, memory)",
        "examples:\n  hashret bench search                       # 100k and 1M 64-bit codes, 1 thread; the HNSW\n"
        "                                             # build of 1M dominates (~3 min on 2 busy cores)\n"
        "  hashret bench search --sizes 10000000 --kinds numpy,faiss-flat   # opt-in 10M\n"
        "  hashret bench search --sizes 2000 --kinds faiss-flat,faiss-hnsw --out /tmp/s.json",
    ),
    "parity": (
        "benchmarks.parity_bench",
        "export parity table (mAP and code agreement) across every backend and code length",
        "examples:\n  hashret bench parity --runs runs/r16,runs/r64\n"
        "  hashret bench parity --bits 16,32,64      # trains each on the cached features first",
    ),
    "gpu-search": (
        "benchmarks.gpu_search",
        "brute-force Hamming search on a GPU (CuPy / torch popcount) over millions of codes",
        "examples:\n  hashret bench gpu-search --sizes 10000000          # on a CUDA machine\n"
        "  hashret bench gpu-search --device cpu --sizes 20000 --methods torch-lut",
    ),
    "snapshot": (
        "benchmarks.snapshot_bench",
        "FAISS gallery snapshots: WAL replay speed, how long writes wait, the 200,000-Upsert WAL bound",
        "examples:\n  hashret bench snapshot --part replay\n"
        "  hashret bench snapshot --part write-wait --size 1000000\n"
        "  hashret bench snapshot --part upserts --upserts 200000     # minutes: a real server",
    ),
    "report": (
        "benchmarks.report",
        "regenerate benchmarks/RESULTS.md, its plots and README.md's generated blocks from "
        "benchmarks/results/*.json; list stale results",
        "examples:\n  hashret bench report\n"
        "  hashret bench report --check          # exit 1 when a generated figure differs from its JSON\n"
        "  hashret bench report --results /tmp/r --out /tmp/r/RESULTS.md   # a trial folder; README untouched",
    ),
}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Run `hashret bench NAME --help` for a benchmark's options."
    sub = parser.add_subparsers(dest="bench", metavar="NAME")
    for name, (module, help_text, examples) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        importlib.import_module(module).add_args(p)
        p.set_defaults(_bench_module=module)
    parser.set_defaults(_bench_parser=parser)


def run(args: argparse.Namespace) -> int:
    module = getattr(args, "_bench_module", None)
    if not module:
        args._bench_parser.print_help()
        return 2
    with _results_guard(args):
        return int(importlib.import_module(module).run(args) or 0)


@contextlib.contextmanager
def _results_guard(args: argparse.Namespace):
    """Apply --allow-dirty for this command, and refuse a dirty write into benchmarks/results/ up front.

    The refusal comes before the benchmark runs (minutes, for some) rather than at write time;
    write_result checks again in case the checkout changed meanwhile.
    """
    from benchmarks import machine

    token = machine.allow_dirty.set(bool(getattr(args, "allow_dirty", False)))
    try:
        machine.check_results_write(getattr(args, "out", None))
        yield
    finally:
        machine.allow_dirty.reset(token)


def standalone_parser(prog: str, doc: str | None,
                      add_args: Callable[[argparse.ArgumentParser], object]) -> argparse.ArgumentParser:
    """The parser of `python -m benchmarks.NAME`: the module's own flags, its docstring's first line."""
    p = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0] if doc else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def run_main(parser: argparse.ArgumentParser, command: Callable[[argparse.Namespace], int],
             argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn a HashretError into `error: ...` on stderr and its exit code.

    The one `main()` of every benchmark that runs on its own, so `python -m benchmarks.X` answers
    a bad input the way `hashret bench X` does instead of with a traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        with _results_guard(args):
            return int(command(args) or 0)
    except HashretError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.cli NAME ...` (the same as `hashret bench NAME ...`)."""
    return run_main(standalone_parser("hashret bench", __doc__, add_args), run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""The `hashret` entry point: it only dispatches to each stage's `add_args` / `run`.

Stage modules are imported lazily so `hashret --help` and light commands start fast.
Exit codes: 0 ok, 1 a check or threshold failed, 2 bad input, a missing/mismatched artifact, or out of memory.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap

from hashret import __version__
from hashret.errors import HashretError, first_line

# name -> (module exposing add_args(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train.train", "train a hash head (HashNet or DCH) on cached backbone features"),
    "export": ("export.cli", "export a RUN folder to ONNX / INT8 / FP16 / TensorRT / Triton, with a parity report"),
    "check": ("export.check", "regression check of an exported model against its golden set (for CI)"),
    "index": ("serve.index_cli", "build a gallery index (FAISS or Milvus) from images"),
    "serve": ("serve.cli", "run the gRPC retrieval service"),
    "query": ("serve.query", "query a running service with image files"),
    "rollover": ("serve.rollover_cli", "switch a running service to a new model: rebuild, shadow, promote"),
    "bench": ("benchmarks.cli", "benchmarks: engine, serve, search, parity"),
    "demo": ("demo.cli", "the whole job end to end on the Grocery data"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hashret",
        description="Deep-hashing image retrieval: train, export, index and serve binary-code image search.",
        epilog="Run `hashret COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hashret {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           )
        if name == command:
            importlib.import_module(module).add_args(p)
            p.set_defaults(_module=module)
            _keep_names_whole(p)
    return parser


def _keep_names_whole(parser: argparse.ArgumentParser) -> None:
    """Wrap every help text of `parser` and its sub-commands at spaces only.

    argparse wraps at hyphens too, which splits names a user has to type (a backend such as
    "ort-int8" shown as "ort-" / "int8"). Each command keeps its own formatter class otherwise.
    """
    todo = [parser]
    while todo:
        p = todo.pop()
        base = p.formatter_class
        if not getattr(base, "_whole_words", False):
            p.formatter_class = type(base.__name__, (_WholeWords, base), {})
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


class _WholeWords(argparse.HelpFormatter):
    _whole_words = True

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except HashretError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from hashret.engines.base import out_of_memory

        if not out_of_memory(e):
            raise
        # a traceback says nothing more here; the way out is a smaller batch or a freer device
        print(f"error: {command} | out of memory ({first_line(e, 300)}): run it with a smaller batch "
              f"(--batch, --max-batch) or on a device with more free memory", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

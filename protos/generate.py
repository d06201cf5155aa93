"""Regenerate the committed Python stubs of the gRPC API (serve/_proto/) from protos/.

    python protos/generate.py            # rewrite serve/_proto/
    python protos/generate.py --check    # exit 1 when the committed stubs are stale

Why a script: protoc names the generated imports after the proto package
(`from hashret.v1 import retrieval_pb2`), which would clash with the real `hashret`
package; the stubs live in `serve._proto`, so that import is rewritten here. The proto's
own name stays `hashret/v1/retrieval.proto`, which is what reflection (grpcurl) shows.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PROTOS = ["hashret/v1/retrieval.proto"]
OUT = ROOT / "serve" / "_proto"
PACKAGE = "serve._proto"

INIT = '''"""Generated gRPC stubs of protos/hashret/v1/retrieval.proto: do not edit, run protos/generate.py."""
'''


def _protoc(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(PROTOS)}")


def generate(out_dir: str | Path) -> list[Path]:
    """Write the fixed-up stubs into `out_dir` (created); return the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _protoc(tmp)
        for proto in PROTOS:
            pkg = Path(proto).parent  # hashret/v1
            dotted = ".".join(pkg.parts)
            for f in sorted((tmp / pkg).iterdir()):
                text = f.read_text()
                text = text.replace(f"from {dotted} import ", f"from {PACKAGE} import ")
                dst = out_dir / f.name
                dst.write_text(text)
                written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text(INIT)
    written.append(init)
    return sorted(written)


def stale_files(committed: str | Path = OUT) -> list[str]:
    """Names of stubs that differ between a fresh generation and `committed`."""
    committed = Path(committed)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(tmp)
        bad = []
        for f in fresh:
            old = committed / f.name
            if not old.is_file() or old.read_bytes() != f.read_bytes():
                bad.append(f.name)
        extra = {p.name for p in committed.glob("*.py*")} - {f.name for f in fresh}
        return sorted(bad + list(extra))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report stale stubs (exit 1 if any)")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale_files()
        if bad:
            print(f"stale stubs in {OUT}: {', '.join(bad)}; run python protos/generate.py", file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    if OUT.exists():
        for p in OUT.glob("*_pb2*.py*"):
            p.unlink()
        shutil.rmtree(OUT / "__pycache__", ignore_errors=True)
    for f in generate(OUT):
        print(f.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())

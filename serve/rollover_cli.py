"""`hashret rollover`: switch a running server to a new model without downtime.

Steps: list the live gallery's items over the Admin service -> encode their images with the new
export into a new gallery -> LoadCandidate -> shadow live traffic for --shadow-s seconds -> print
the overlap report -> Promote only with --yes (and, with --min-overlap, only when the answers
agree at least that much). The server reads EXP and GAL from the paths given here, so this
command runs where the server's filesystem is (the same host or a shared volume).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ADMIN_TOKEN_ENV = "HASHRET_ADMIN_TOKEN"


def add_args(p: argparse.ArgumentParser) -> None:
    from hashret.cliargs import add_engine_args, add_output_args, add_progress_arg
    from serve.index_cli import add_kind_args

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Roll a running `hashret serve` over to a new model: rebuild its gallery with the new\n"
        "export, load it beside the live pair, compare answers on live traffic, then promote.\n\n"
        "example:\n"
        "  hashret rollover runs/exp2 --out galleries/grocery-v2 --image-root ../shared/datasets/grocery \\\n"
        "      --addr 127.0.0.1:50051 --admin-token-file admin.token --shadow-s 300 --yes\n\n"
        "The server must run with --admin-token-file (and --shadow-fraction > 0 for a report).\n"
        "Items are re-encoded from their stored 'path' metadata, relative to --image-root.\n"
        "Until Promote the old model answers; after it, Rollback (Admin API) returns to it."
    )
    p.add_argument("exp", metavar="EXP", help="export folder of the new model (from `hashret export`)")
    src = p.add_argument_group("gallery rebuild")
    src.add_argument("--image-root", metavar="DIR", default=None,
                     help="folder that relative 'path' metadata of the items is resolved against "
                          "(default: paths must be absolute)")
    src.add_argument("--skip-bad", action="store_true",
                     help="leave out items whose image is missing or undecodable and list them (default: fail)")
    add_kind_args(src)
    eng = add_engine_args(p, backend_help="engine that encodes the images here")
    eng.add_argument("--batch", type=int, default=32, help="images per engine call (default: 32)")
    out = add_output_args(p, metavar="GAL", required=True, help="new gallery folder to create", progress=False)
    out.add_argument("--overwrite", action="store_true", help="replace GAL if it exists (default: refuse)")
    add_progress_arg(out)
    net = p.add_argument_group("server")
    net.add_argument("--addr", default="127.0.0.1:50051", help="server address HOST:PORT (default: 127.0.0.1:50051)")
    net.add_argument("--admin-token-file", metavar="FILE",
                     help=f"file holding the server's admin token (default: ${ADMIN_TOKEN_ENV})")
    net.add_argument("--timeout", type=float, default=300.0,
                     help="seconds per Admin call; LoadCandidate opens and warms a model (default: 300)")
    net.add_argument("--tls", action="store_true", help="use TLS (default: plaintext)")
    net.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server certificate (default: system roots)")
    net.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (default: none)")
    net.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (default: none)")
    go = p.add_argument_group("shadow and promote")
    go.add_argument("--shadow-s", type=float, default=60.0,
                    help="seconds of live traffic to compare on the candidate before the report (default: 60)")
    go.add_argument("--min-overlap", type=float, default=None, metavar="X",
                    help="with --yes, promote only when the mean top-k overlap is at least X; exit 1 otherwise "
                         "(default: no threshold)")
    go.add_argument("--yes", action="store_true",
                    help="promote after the report (default: leave the candidate loaded, not live)")


class AdminClient:
    """The Admin stub with the admin token attached; a small wrapper for this command and tests."""

    def __init__(self, addr: str, token: str | None, tls: bool | dict = False, timeout: float | None = 300.0):
        import grpc

        from serve._proto import retrieval_pb2 as pb
        from serve._proto import retrieval_pb2_grpc as pb_grpc
        from serve.client import RetrievalClient

        self._pb = pb
        self._retrieval = RetrievalClient(addr, tls=tls, timeout=timeout)  # its channel carries no write token
        self.channel: grpc.Channel = self._retrieval.channel
        self.stub = pb_grpc.AdminStub(self.channel)
        self._kw = {"timeout": timeout, "metadata": (("authorization", f"Bearer {token}"),) if token else ()}

    def load_candidate(self, exp, gallery):
        return self.stub.LoadCandidate(self._pb.LoadCandidateRequest(exp=str(exp), gallery=str(gallery)), **self._kw)

    def promote(self):
        return self.stub.Promote(self._pb.PromoteRequest(), **self._kw)

    def rollback(self):
        return self.stub.Rollback(self._pb.RollbackRequest(), **self._kw)

    def unload(self):
        return self.stub.Unload(self._pb.UnloadRequest(), **self._kw)

    def status(self):
        return self.stub.Status(self._pb.PairsStatusRequest(), **self._kw)

    def items(self) -> list[tuple[str, dict[str, str]]]:
        return [(m.id, dict(m.metadata)) for m in self.stub.ListItems(self._pb.ListItemsRequest(), **self._kw)]

    def close(self) -> None:
        self._retrieval.close()

    def __enter__(self) -> "AdminClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_images(items, image_root: str | None, skip_bad: bool) -> tuple[list[str], list[str], list[dict], list[str]]:
    """(paths, ids, metadata, skipped 'id | reason') for items whose 'path' metadata names a file."""
    from hashret.errors import BadInput, MissingArtifact

    paths, ids, metas, skipped = [], [], [], []
    for i, md in items:
        rel = md.get("path")
        if not rel:
            why = f"item {i!r} | has no 'path' metadata, so its image cannot be re-encoded"
        else:
            p = Path(rel)
            if not p.is_absolute():
                if image_root is None:
                    raise BadInput(f"item {i!r} | path {rel!r} is relative: pass --image-root")
                p = Path(image_root) / p
            if p.is_file():
                paths.append(str(p))
                ids.append(i)
                metas.append(md)
                continue
            why = f"item {i!r} | image {p} not found"
        if not skip_bad:
            raise MissingArtifact(f"{why}: fix it, or pass --skip-bad to leave such items out")
        skipped.append(why)
    return paths, ids, metas, skipped


def format_report(status, listed: int, built: int, shadow_s: float) -> str:
    sh = status.shadow
    lines = [
        f"live model       {status.live_model_id[:12]}  ({status.live_gallery})",
        f"candidate model  {status.standby_model_id[:12]}  ({status.standby_gallery})",
        f"gallery items    {listed} live, {built} re-encoded",
        f"shadowed         {sh.compared} searches in {shadow_s:g} s (fraction {sh.fraction:g}; "
        f"{sh.dropped} dropped, {sh.failed} failed)",
    ]
    if sh.compared:
        lines += [f"top-k overlap    {sh.mean_overlap:.3f} (mean |live ∩ candidate| / k)",
                  f"rank corr.       {sh.mean_rank_correlation:.3f} (mean Spearman rho over the union)"]
    else:
        lines.append("top-k overlap    n/a: no live searches were shadowed (is --shadow-fraction > 0 and traffic flowing?)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import grpc

    from hashret.errors import BadInput
    from hashret.tokens import load_token
    from serve.index_cli import build, kind_options

    token = load_token(args.admin_token_file, env=ADMIN_TOKEN_ENV, flag="--admin-token-file")
    if token is None:
        raise BadInput(f"--admin-token-file | not given and ${ADMIN_TOKEN_ENV} is unset: the Admin service needs its token")
    if args.shadow_s < 0:
        raise BadInput(f"--shadow-s {args.shadow_s} | must be >= 0")
    tls: bool | dict = False
    if args.tls or args.tls_ca or args.tls_cert:
        tls = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}
    with AdminClient(args.addr, token, tls=tls, timeout=args.timeout) as admin:
        try:
            items = admin.items()
            paths, ids, metas, skipped = resolve_images(items, args.image_root, args.skip_bad)
            for s in skipped:
                print(f"skipped: {s}", file=sys.stderr)
            summary = build(args.exp, args.out, paths, ids, metas, kind=args.kind, gallery_options=kind_options(args),
                            backend=args.backend, device=args.device, batch=args.batch, skip_bad=args.skip_bad,
                            overwrite=args.overwrite, progress=not args.no_progress)
            print(f"built {args.out}: {summary['size']} items for model {str(summary.get('model_id', ''))[:12]}")
            admin.load_candidate(os.path.abspath(args.exp), os.path.abspath(args.out))
            until = time.monotonic() + args.shadow_s
            while time.monotonic() < until:
                time.sleep(min(1.0, max(0.0, until - time.monotonic())))
            status = admin.status()
            print(format_report(status, len(items), int(summary["size"]), args.shadow_s))
            if not args.yes:
                print("not promoted (no --yes): the candidate stays loaded; promote or unload it with the Admin API")
                return 0
            if args.min_overlap is not None and (not status.shadow.compared
                                                 or status.shadow.mean_overlap < args.min_overlap):
                print(f"not promoted: mean overlap {status.shadow.mean_overlap:.3f} over {status.shadow.compared} "
                      f"searches is below --min-overlap {args.min_overlap:g}", file=sys.stderr)
                return 1
            status = admin.promote()
            print(f"promoted: live model is now {status.live_model_id[:12]}; the previous one "
                  f"({status.standby_model_id[:12]}) stays loaded for Rollback")
            return 0
        except grpc.RpcError as e:
            print(f"rollover | {e.code().name}: {e.details()}", file=sys.stderr)
            return 2

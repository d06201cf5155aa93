"""`hashret demo`: the whole job end to end on the Grocery data.

train (hash head on cached backbone features) -> export (ONNX, INT8) -> index build (database
split, and the 81 iconic catalogue images) -> serve on 127.0.0.1 (in-process BackgroundServer on
a free port) -> query it over gRPC with the test photos -> mAP@10 from the served results, latency
percentiles, example hits, an HTML contact sheet, and the snap-to-shop view (photos against the
catalogue: top-1 / top-5 accuracy).

Outputs live in --workdir: run/, export/, gallery/, gallery-iconic/, summary.json, queries.jsonl,
demo.html and steps.json (what each finished step was made from: a re-run reuses a step whose
inputs and options are unchanged and whose outputs exist; --fresh redoes everything).
"""
from __future__ import annotations

import argparse
import logging
import time

from demo import steps
from demo.data import GROCERY_REPO, NO_DOWNLOAD_ENV
from demo.report import print_results
from hashret.cliargs import add_data_args, add_engine_args
from hashret.codes import check_bits
from hashret.errors import BadInput
from hashret.provenance import ALLOW_DIRTY_FLAG, ALLOW_DIRTY_HELP, check_results_write


def add_args(p: argparse.ArgumentParser) -> None:
    from hashret.models import BACKBONES
    from train.losses import LOSSES
    from train.train import DEFAULT_METHOD  # the demo trains what `hashret train` would

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "The whole job end to end on the Grocery data: train, export, index, serve, query over gRPC,\n"
        "report mAP@10 / latency / snap-to-shop accuracy and write an HTML contact sheet."
    )
    p.epilog = (
        "examples:\n"
        "  hashret demo                                  # everything, defaults (long on a small CPU)\n"
        "  hashret demo --limit 60 --epochs 5 --queries 60 --workdir /tmp/quick   # a quick look\n\n"
        "Data: --data, else $HASHRET_DATA, else ../shared/datasets/grocery beside the checkout, else\n"
        f"WORKDIR/data/grocery; when none holds the dataset it is downloaded from {GROCERY_REPO}\n"
        f"(set {NO_DOWNLOAD_ENV}=1 to never touch the network).\n"
        "Re-running reuses every finished step whose options are unchanged; --fresh redoes them all\n"
        "(the backbone feature cache, $HASHRET_CACHE or ~/.cache/hashret, is always reused)."
    )
    g = p.add_argument_group("data and output")
    add_data_args(g, with_format=False,  # the demo reads GroceryStoreDataset and nothing else
                  data_help="GroceryStoreDataset folder (default: $HASHRET_DATA, else ../shared/datasets/grocery)")
    g.add_argument("--workdir", default="hashret-demo", metavar="DIR",
                   help="where every artifact and report goes (default: ./hashret-demo)")
    g.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    g.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N images per split, spread evenly over the classes (quick trials) (default: all)")
    g.add_argument("--download-timeout", type=float, default=10.0, metavar="S",
                   help="network timeout in seconds when the dataset has to be downloaded (default: 10)")
    g.add_argument("--results", default=None, metavar="FILE.json",
                   help="also write the summary as a results file (the command, the code that ran: git describe, "
                        "dirty, sha256 of the diff; and the summary), e.g. benchmarks/results/demo-csq64-summary.json "
                        "(default: none)")
    g.add_argument(ALLOW_DIRTY_FLAG, action="store_true", help=ALLOW_DIRTY_HELP)
    g = p.add_argument_group("training and export")
    g.add_argument("--backbone", default="efficientnet-lite0", choices=BACKBONES.names(),
                   help="(default: efficientnet-lite0)")
    g.add_argument("--method", default=DEFAULT_METHOD, choices=LOSSES.names(), help=f"(default: {DEFAULT_METHOD})")
    g.add_argument("--bits", type=int, default=64, help="code length, a multiple of 8 (default: 64)")
    g.add_argument("--epochs", type=int, default=60, help="head training epochs (default: 60)")
    g.add_argument("--seed", type=int, default=0, help="(default: 0)")
    g.add_argument("--formats", default="onnx,onnx-int8", metavar="LIST",
                   help="export formats, see `hashret export --help` (default: onnx,onnx-int8)")
    g.add_argument("--exporter", default="auto", choices=("auto", "dynamo", "legacy"),
                   help="torch.onnx exporter, passed to `hashret export` (legacy is faster) (default: auto)")
    g.add_argument("--parity", type=int, default=100, metavar="N",
                   help="query images in the export's parity table (database 3N); 0 skips it (default: 100)")
    g = p.add_argument_group("serving and queries")
    add_engine_args(g, default_backend="ort", backend_help="engine the server runs", with_device=False)
    g.add_argument("--queries", type=int, default=None, metavar="N",
                   help="test photos sent to the server, spread evenly over the classes (default: all 2,485)")
    g.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="Search calls in flight at once; latency is measured per call (default: 4)")
    g.add_argument("--sheet", type=int, default=40, metavar="N",
                   help="queries shown in demo.html, spread evenly; 0 shows all (default: 40)")
    g.add_argument("--examples", type=int, default=3, metavar="N", help="example hits printed (default: 3)")


def check_options(args: argparse.Namespace) -> None:
    """Refuse bad numbers before anything slow starts."""
    for name in ("limit", "queries"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise BadInput(f"--{name} {v} | must be at least 1 (leave it out for all)")
    if args.epochs < 1:
        raise BadInput(f"--epochs {args.epochs} | must be at least 1")
    if args.concurrency < 1:
        raise BadInput(f"--concurrency {args.concurrency} | must be at least 1")
    check_bits(args.bits, "--bits")
    check_results_write(args.results, args.allow_dirty)  # now, not after the whole demo has run


def run(args: argparse.Namespace) -> int:
    check_options(args)
    t_start = time.perf_counter()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are about CPU flags
    demo = steps.Demo.start(args)
    data = steps.locate_data(demo)
    if args.fresh:
        demo.clear_outputs()
    steps.train(demo, data)
    steps.export(demo, data)
    steps.build_galleries(demo, data)
    retrieval = steps.search_database(demo, data)
    shop = steps.snap_to_shop(demo, data)
    summary, shown = steps.write_reports(demo, data, retrieval, shop, t_start)
    print_results(summary, retrieval.answers, shown, data.names, data.ds_dir, data.short,
                  n_database=len(data.splits.database), n_test=len(data.splits.query), workdir=demo.workdir)
    if args.results:
        print(f"wrote      {steps.write_results_file(args.results, summary, args.allow_dirty)}")
    return 1 if retrieval.scores["failed"] + shop.scores["failed"] else 0

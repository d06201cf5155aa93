"""The README's quality table: every registered loss x bits 16/32/64 on one dataset, binary and continuous mAP.

    python -m train.table --data ../shared/datasets/grocery --out benchmarks/results/train_table.json

Each cell is a full `hashret train` run (features come from the cache after the first one).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hashret.cli import main as hashret
from hashret.cliargs import add_data_args, add_output_args
from hashret.codes import check_bits
from hashret.datasets import default_data_root
from hashret.errors import BadInput, HashretError
from hashret.fsutil import write_json_atomic
from hashret.manifest import now_iso, versions
from train.losses import LOSSES


def main(argv=None) -> int:
    # every registered loss, built-ins first (the README's row order)
    methods = ",".join(name for name, _ in LOSSES.items())
    p = argparse.ArgumentParser(prog="python -m train.table", description=__doc__.splitlines()[0])
    add_data_args(p)
    p.add_argument("--backbone", default="efficientnet-lite0", help="(default: efficientnet-lite0)")
    p.add_argument("--bits", default="16,32,64", help="comma-separated code lengths (default: 16,32,64)")
    p.add_argument("--methods", default=methods, help=f"comma-separated losses (default: {methods})")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    add_output_args(p, default="benchmarks/results/train_table.json", metavar="OUT", progress=False,
                    help="JSON file to write the rows to")
    p.add_argument("--keep-runs", default=None, help="keep the run folders here (default: temporary)")
    args = p.parse_args(argv)
    try:
        return _table(args, argv)
    except HashretError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _table(args, argv) -> int:
    # Checked before the first run, so a typo does not surface an hour into the table.
    for method in args.methods.split(","):
        LOSSES.get(method)
    try:
        bit_list = [int(b) for b in args.bits.split(",")]
    except ValueError:
        raise BadInput(f"--bits {args.bits!r} | not a comma-separated list of integers: pass e.g. 16,32,64") from None
    for bits in bit_list:
        check_bits(bits, "--bits")
    data = args.data or default_data_root()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep_runs or tmp)
        for method in args.methods.split(","):
            for bits in bit_list:
                out = base / f"{method}{bits}"
                t0 = time.time()
                code = hashret(["train", "--data", str(data), "--format", args.format, "--backbone", args.backbone,
                                "--method", method, "--bits", str(bits), "--seed", str(args.seed),
                                "--out", str(out), "--no-progress"])
                if code:
                    return code
                m = json.loads((out / "metrics.json").read_text())
                rows.append({"method": method, "bits": bits, "mAP@all": m["mAP@all"], "mAP@10": m["mAP@10"],
                             "precision@10": m["precision@10"], "precision@H<=2": m["precision@H<=2"],
                             "mAP@all(continuous)": m["mAP@all(continuous)"],
                             "mAP@10(continuous)": m["mAP@10(continuous)"],
                             "head_seconds": m["timing_s"]["head"], "wall_seconds": round(time.time() - t0, 1)})
    print("| method | bits | mAP@all | mAP@10 | continuous mAP@all | continuous mAP@10 | head train s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['bits']} | {r['mAP@all']:.4f} | {r['mAP@10']:.4f} | "
              f"{r['mAP@all(continuous)']:.4f} | {r['mAP@10(continuous)']:.4f} | {r['head_seconds']:.1f} |")
    write_json_atomic(args.out, {"command": " ".join(["python -m train.table", *(argv or sys.argv[1:])]),
                                 "created": now_iso(), "data": str(data), "backbone": args.backbone,
                                 "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's quality table: every registered loss x bits 16/32/64 x 3 seeds on one dataset, as mean ± std.

The first of `--backbones` gets that whole grid; each further backbone gets the rows of
`--backbone-methods` (default: train's default method, the best at 64 bits) at every `--bits`,
so the backbone's effect is read off the same cells.

    python -m train.table --data ../shared/datasets/grocery --out benchmarks/results/train_table.json --readme README.md

Each cell is a full `hashret train` run per seed (features come from the cache after the first one).
The JSON keeps every run and the per-cell summary; `render_markdown` turns it into the README table,
which lives between TABLE_BEGIN and TABLE_END so it is regenerated, never edited by hand
(`--from-json` re-renders without training).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hashret.cli import main as hashret
from hashret.cliargs import add_data_args, add_output_args
from hashret.codes import check_bits
from hashret.datasets import SplitOptions, default_data_root, read_dataset
from hashret.errors import BadInput, HashretError, MissingArtifact
from hashret.fsutil import atomic_write, write_json_atomic
from hashret.manifest import now_iso, versions
from hashret.provenance import ALLOW_DIRTY_FLAG, ALLOW_DIRTY_HELP, check_results_write, git_provenance, result_fields
from train.losses import LOSSES

log = logging.getLogger("hashret.table")

# Lite0 is the table's original backbone (its runs keep their folder names); Lite2 the largest Lite.
DEFAULT_BACKBONES = "efficientnet-lite0,efficientnet-lite2"

TABLE_BEGIN = "<!-- train_table:begin -->"
TABLE_END = "<!-- train_table:end -->"

# metrics.json key -> column title, in column order. A key a run does not report (re-ranking, on a
# tree where train's evaluation has not got it yet) is left out of the JSON and shown as "n/a".
COLUMNS = {
    "mAP@all": "mAP@all",
    "mAP@10": "mAP@10",
    "mAP@all(tie-aware)": "tie-aware mAP@all",
    "mAP@all(rerank)": "rerank mAP@all",
    "mAP@10(rerank)": "rerank mAP@10",
}
# Also kept per run (not summarized in the README): references that explain the columns.
EXTRA = ("mAP@10(tie-aware)", "precision@10", "precision@H<=2", "mAP@all(continuous)", "mAP@10(continuous)")


def main(argv=None) -> int:
    # every registered loss, built-ins first (the README's row order)
    methods = ",".join(name for name, _ in LOSSES.items())
    p = argparse.ArgumentParser(prog="python -m train.table", description=__doc__.splitlines()[0])
    add_data_args(p)
    p.add_argument("--backbones", default=DEFAULT_BACKBONES,
                   help="comma-separated backbones: the first gets every method, the others --backbone-methods "
                        f"(default: {DEFAULT_BACKBONES})")
    p.add_argument("--backbone-methods", default=None,
                   help="comma-separated losses run on the backbones after the first (default: hashret train's "
                        "default method, the best at 64 bits)")
    p.add_argument("--bits", default="16,32,64", help="comma-separated code lengths (default: 16,32,64)")
    p.add_argument("--methods", default=methods, help=f"comma-separated losses (default: {methods})")
    p.add_argument("--seed", type=int, default=0, help="first seed; the others follow it (default: 0)")
    p.add_argument("--repeats", type=int, default=3,
                   help="seeds per cell (seed, seed+1, ...), summarized as mean ± sample std (default: 3)")
    p.add_argument("--limit", type=int, default=None,
                   help="passed to hashret train: first N images of each split, for trials (default: all)")
    p.add_argument("--epochs", type=int, default=None,
                   help="passed to hashret train; trials only, the table uses each loss's own (default: per loss)")
    add_output_args(p, default="benchmarks/results/train_table.json", metavar="OUT", progress=False,
                    help="JSON file to write the rows to")
    p.add_argument(ALLOW_DIRTY_FLAG, action="store_true", help=ALLOW_DIRTY_HELP)
    p.add_argument("--keep-runs", default=None,
                   help="keep the run folders here; a re-run reuses the finished ones (default: temporary)")
    p.add_argument("--readme", default=None,
                   help=f"also rewrite this file's table between {TABLE_BEGIN} and {TABLE_END} (default: none)")
    p.add_argument("--from-json", action="store_true",
                   help="train nothing: render --out (an existing table) into --readme and print it (default: off)")
    args = p.parse_args(argv)
    try:
        return _table(args, argv)
    except HashretError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _table(args, argv) -> int:
    if args.from_json:
        table = load_table(args.out)
    else:
        check_results_write(args.out, args.allow_dirty)  # before an hour of training, not after it
        table = run_table(args, argv)
        check_results_write(args.out, args.allow_dirty)
        write_json_atomic(args.out, table)
    md = render_markdown(table)
    print(md)
    if args.readme:
        update_readme(args.readme, md)
    return 0


def run_table(args, argv) -> dict:
    # Checked before the first run, so a typo does not surface an hour into the table.
    method_list = args.methods.split(",")
    from hashret.models import BACKBONES
    from train.train import DEFAULT_METHOD

    backbone_list = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if not backbone_list:
        raise BadInput(f"--backbones {args.backbones!r} | empty: pass e.g. {DEFAULT_BACKBONES}")
    other_methods = (args.backbone_methods or DEFAULT_METHOD).split(",")
    for b in backbone_list:
        BACKBONES.get(b)
    for method in (*method_list, *other_methods):
        LOSSES.get(method)
    plan = [(backbone_list[0], m) for m in method_list] + [(b, m) for b in backbone_list[1:] for m in other_methods]
    try:
        bit_list = [int(b) for b in args.bits.split(",")]
    except ValueError:
        raise BadInput(f"--bits {args.bits!r} | not a comma-separated list of integers: pass e.g. 16,32,64") from None
    for bits in bit_list:
        check_bits(bits, "--bits")
    if args.repeats < 1:
        raise BadInput(f"--repeats {args.repeats} | needs at least one seed per cell: pass 1 or more")
    seeds = list(range(args.seed, args.seed + args.repeats))
    data = args.data or default_data_root()
    extra = [*(["--limit", str(args.limit)] if args.limit else []), *(["--epochs", str(args.epochs)] if args.epochs else [])]
    runs = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep_runs or tmp)
        for backbone, method in plan:
            for bits in bit_list:
                for seed in seeds:
                    out = base / f"{run_prefix(backbone)}{method}{bits}-s{seed}"
                    t0 = time.time()
                    kept = args.keep_runs and finished_run(out, method, bits, seed, args, backbone)
                    if not kept:
                        code = hashret(["train", "--data", str(data), "--format", args.format,
                                        "--backbone", backbone, "--method", method, "--bits", str(bits),
                                        "--seed", str(seed), "--out", str(out), "--no-progress", *extra])
                        if code:
                            raise BadInput(f"hashret train --backbone {backbone} --method {method} --bits {bits} "
                                           f"--seed {seed} | exited {code}: see its message above, fix it and "
                                           "re-run the table")
                    m = json.loads((out / "metrics.json").read_text())
                    runs.append({"backbone": backbone, "method": method, "bits": bits, "seed": seed,
                                 **{k: m[k] for k in (*COLUMNS, *EXTRA) if k in m},
                                 "head_seconds": m["timing_s"]["head"],
                                 "wall_seconds": m["timing_s"]["total"] if kept else round(time.time() - t0, 1),
                                 **({"resumed": True} if kept else {})})
    return {
        "command": " ".join(["python -m train.table", *(argv if argv is not None else sys.argv[1:])]),
        "created": now_iso(),
        **result_fields(getattr(args, "allow_dirty", False)),
        "machine": machine(),
        "data": str(data), "backbone": backbone_list[0], "backbones": backbone_list, "limit": args.limit, "epochs": args.epochs,
        "protocol": "database = train+val, queries = test (the dataset's standard split)",
        "seeds": seeds,
        "versions": versions(),
        "total_seconds": round(time.time() - t_start, 1),  # small when the runs were resumed
        "runs_wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
        "rows": summarize(runs, backbone_list[0]),
        "best_64": best_method([r for r in summarize(runs) if r["backbone"] == backbone_list[0]], 64),
        "runs": runs,
    }


def run_prefix(backbone: str) -> str:
    """Run folders of Lite0 keep their old names (`csq64-s0`), so earlier --keep-runs folders resume."""
    return "" if backbone == "efficientnet-lite0" else f"{backbone}-"


def finished_run(out: Path, method: str, bits: int, seed: int, args, backbone: str | None = None) -> bool:
    """Whether --keep-runs already holds this cell's finished run, made with the same settings.

    A table is 27 runs; this lets one that was stopped carry on instead of starting over. A folder
    from other settings (or a tree whose metrics lack a column this table now reports) is retrained.
    """
    try:
        m = json.loads((out / "manifest.json").read_text())
        metrics = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    from train.train import tuned_default

    t = m.get("training", {})
    epochs = args.epochs if args.epochs is not None else tuned_default(LOSSES.get(method), "epochs")
    same = (m.get("bits") == bits and m.get("method", {}).get("name") == method and t.get("seed") == seed
            and m.get("backbone", {}).get("name") == (backbone or args.backbones.split(",")[0])
            and t.get("limit") == args.limit
            and t.get("finetune") == "none" and t.get("epochs") == epochs
            and all(k in metrics for k in (*COLUMNS, "timing_s")))
    if same:  # the same images and labels, as train fingerprints them (after --limit)
        splits = read_dataset(args.data or default_data_root(), args.format, SplitOptions(seed=seed))
        if args.limit:
            for name in ("train", "database", "query"):
                setattr(splits, name, getattr(splits, name)[: args.limit])
        same = m.get("dataset", {}).get("fingerprint") == splits.fingerprint()
    if same:
        log.info("table: reusing the finished run %s", out)
    return same


def machine() -> dict:
    """Where the table ran: CPU model, cores and the torch threads each run used (timings depend on it)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "git_dirty": _git_dirty(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform()}


def _git_dirty() -> bool | None:
    """Whether the working tree differs from its commit (the numbers then belong to uncommitted code)."""
    return git_provenance()["dirty"]


def summarize(runs: list[dict], backbone: str = "efficientnet-lite0") -> list[dict]:
    """One row per (backbone, method, bits): mean and sample std over its seeds of every column the runs
    report. A run without a backbone (a table from before the column) is `backbone`'s."""
    cells: dict[tuple[str, str, int], list[dict]] = {}
    for r in runs:
        cells.setdefault((r.get("backbone", backbone), r["method"], r["bits"]), []).append(r)
    rows = []
    for (bb, method, bits), rs in cells.items():
        row = {"backbone": bb, "method": method, "bits": bits, "seeds": [r["seed"] for r in rs]}
        for key in (*COLUMNS, "head_seconds"):
            values = [r[key] for r in rs if key in r]
            if len(values) == len(rs):  # a column some seeds lack would average different things
                row[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        rows.append(row)
    return rows


def best_method(rows: list[dict], bits: int, key: str = "mAP@all") -> str | None:
    """The method with the highest mean `key` at `bits`, or None when no row has that length."""
    at = [r for r in rows if r["bits"] == bits and key in r]
    return max(at, key=lambda r: r[key]["mean"])["method"] if at else None


def load_table(path) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingArtifact(f"{path} | no table there: run python -m train.table first, or pass --out") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} | not a readable table ({e}): re-run python -m train.table") from None
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list) or \
            not all(isinstance(r, dict) and "method" in r and "bits" in r for r in table["rows"]):
        raise BadInput(f"{path} | has no rows of method/bits cells: re-run python -m train.table")
    return table


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if not isinstance(v, dict):
        return "n/a"
    return f"{v['mean']:.4f} ± {v['std']:.4f}" if len(row.get("seeds", [])) > 1 else f"{v['mean']:.4f}"


def render_markdown(table: dict) -> str:
    """The README's table (and the line under it saying where and how it was made) from the JSON."""
    first = table.get("backbone", "efficientnet-lite0")
    rows = [{**r, "backbone": r.get("backbone", first)} for r in table["rows"]]
    seeds = table.get("seeds") or sorted({s for r in rows for s in r.get("seeds", [])})
    lines = ["| backbone | method | bits | " + " | ".join(COLUMNS.values()) + " | head train s |",
             "|---|---|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for r in rows:
        head = r.get("head_seconds")
        head = f"{head['mean']:.1f}" if isinstance(head, dict) else "n/a"
        lines.append(f"| {r['backbone']} | {r['method']} | {r['bits']} | " + " | ".join(_cell(r, k) for k in COLUMNS)
                     + f" | {head} |")
    m, v = table.get("machine", {}), table.get("versions", {})
    note = (f"\nMean ± sample std over seeds {', '.join(map(str, seeds))}; "
            f"`{table.get('command', 'python -m train.table')}` on {m.get('cores', '?')} cores "
            f"({m.get('cpu', 'unknown CPU')}, torch threads: {m.get('torch_threads', '?')}), "
            f"{str(table.get('created', ''))[:10]}, commit "
            f"{table.get('git_describe') or str(v.get('git_commit', 'unknown'))[:10]}"
            f"{' plus uncommitted changes' if m.get('git_dirty') else ''}.")
    missing = [t for k, t in COLUMNS.items() if not any(k in r for r in rows)]
    if missing:
        note += f" Not measured in this table: {', '.join(missing)} (n/a)."
    best = best_method([r for r in rows if r["backbone"] == first], 64)
    if best:
        note += f" Best at 64 bits on mean mAP@all: **{best}**."
        same = [r for r in rows if r["method"] == best and r["bits"] == 64 and isinstance(r.get("mAP@all"), dict)]
        if len({r["backbone"] for r in same}) > 1:
            top = max(same, key=lambda r: r["mAP@all"]["mean"])
            note += (f" Backbones at 64-bit {best}: "
                     + ", ".join(f"{r['backbone']} {r['mAP@all']['mean']:.4f}" for r in same)
                     + f" mean mAP@all (best: **{top['backbone']}**).")
    return "\n".join(lines) + "\n" + note


def update_readme(path, markdown: str) -> None:
    """Replace what lies between the table markers in `path` with `markdown`."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise MissingArtifact(f"--readme {path} | cannot read it ({e}): pass the README's path") from None
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_BEGIN) > text.index(TABLE_END):
        raise BadInput(f"--readme {path} | needs exactly one {TABLE_BEGIN} followed by one {TABLE_END}: "
                       "put them around the table to regenerate")
    before, rest = text.split(TABLE_BEGIN)
    _, after = rest.split(TABLE_END)
    new = f"{before}{TABLE_BEGIN}\n{markdown}\n{TABLE_END}{after}"
    atomic_write(p, lambda f: f.write(new.encode()))


if __name__ == "__main__":
    sys.exit(main())

"""`hashret bench report` / `python -m benchmarks.report`: RESULTS.md from the results JSONs.

Reads every benchmarks/results/*.json written by `hashret bench ...` (or gpu.sh), and writes
benchmarks/RESULTS.md: per figure its table, the exact command line that produced it, the date,
the machine and package versions, plus PNG plots under benchmarks/results/plots/ (latency vs
batch, throughput vs concurrency, mAP vs bits, recall vs latency). RESULTS.md is generated: edit
the JSONs (re-run the benchmark) instead of the markdown.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.cli import run_main, standalone_parser
from hashret.cliargs import add_output_args

log = logging.getLogger("hashret.bench.report")

DEFAULT_RESULTS = "benchmarks/results"
DEFAULT_OUT = "benchmarks/RESULTS.md"
ORDER = ("search", "engine", "serve", "parity", "gpu-search", "gpu")
TITLES = {
    "search": "Hamming search engines",
    "engine": "Inference engines",
    "serve": "gRPC service under load",
    "parity": "Export parity (mAP across backends and code lengths)",
    "gpu-search": "GPU brute-force Hamming search",
    "gpu": "GPU run (gpu.sh)",
    "soak": "Soak: sustained mixed load, p99 and RSS over time",
    "snapshot-replay": "Gallery snapshots: WAL replay speed at start",
    "snapshot-write-wait": "Gallery snapshots: how long writes and searches wait (1M items)",
    "snapshot-upserts": "Gallery snapshots: 200,000 Upserts keep the WAL bounded",
}
# benchmark -> module exposing report_table(doc) -> (head, rows) and optionally plot(doc, path)
MODULES = {
    "search": "benchmarks.search",
    "engine": "benchmarks.engine",
    "serve": "benchmarks.serve_load",
    "parity": "benchmarks.parity_bench",
    "gpu-search": "benchmarks.gpu_search",
    "soak": "benchmarks.soak",
    "snapshot-replay": "benchmarks.snapshot_bench",
    "snapshot-write-wait": "benchmarks.snapshot_bench",
    "snapshot-upserts": "benchmarks.snapshot_bench",
}


# --------------------------------------------------------------------------- loading


def load_results(folder: str | os.PathLike) -> tuple[list[tuple[Path, dict]], list[str]]:
    """(path, doc) of every results JSON in `folder` (sorted), and problems with the others."""
    folder = Path(folder)
    docs, problems = [], []
    for p in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"{p.name}: unreadable ({e})")
            continue
        if not isinstance(doc, dict) or "benchmark" not in doc:
            problems.append(f"{p.name}: not a benchmark result (no 'benchmark' key)")
            continue
        docs.append((p, doc))

    def key(item):
        b = item[1].get("benchmark", "")
        return (ORDER.index(b) if b in ORDER else len(ORDER), b, item[0].stem != b, item[0].name)

    return sorted(docs, key=key), problems


# --------------------------------------------------------------------------- markdown


def md_table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |",
             "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _short_versions(v: dict[str, Any]) -> str:
    keep = [f"{k} {val}" for k, val in v.items() if val and k != "git_commit"]
    commit = v.get("git_commit")
    return ", ".join(keep) + (f"; commit {commit[:10]}" if commit else "")


def generic_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Scalar columns of doc['results'] (for benchmarks report.py has no module for)."""
    rows = [r for r in doc.get("results", []) if isinstance(r, dict)]
    head: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in head and (v is None or isinstance(v, (str, int, float, bool))):
                head.append(k)
    return head, [[_fmt(r.get(h)) for h in head] for r in rows]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _module_for(doc: dict[str, Any]):
    name = MODULES.get(doc.get("benchmark", ""))
    if not name:
        return None
    try:
        return importlib.import_module(name)
    except Exception as e:  # a module being rewritten must not break the whole report
        log.warning("report: cannot import %s (%s); using a generic table", name, e)
        return None


def section(path: Path, doc: dict[str, Any], plots_dir: Path | None, md_dir: Path) -> str:
    b = doc.get("benchmark", "?")
    out = [f"## {TITLES.get(b, b)} — `{path.name}`", ""]
    out.append(f"- **Command:** `{doc.get('command') or ' '.join(doc.get('argv', []))}`")
    out.append(f"- **Date:** {doc.get('date', '?')}")
    out.append(f"- **Machine:** {machine.describe(doc)}")
    load = doc.get("machine", {}).get("load_avg_1m")
    if load is not None:
        cpus = doc.get("machine", {}).get("cpus", {}).get("usable") or "?"
        out.append(f"- **Load when started:** {load} (1-minute load average on {cpus} usable CPUs; "
                   "above the CPU count, other work was competing for the cores)")
    threads = doc.get("machine", {}).get("threads_used")
    if threads:
        out.append("- **Threads used:** " + ", ".join(f"{k}={v}" for k, v in threads.items()))
    if doc.get("versions"):
        out.append(f"- **Versions:** {_short_versions(doc['versions'])}")
    cfg = doc.get("config")
    if cfg:
        out.append(f"- **Config:** `{json.dumps(cfg, sort_keys=True)}`")
    out.append("")
    mod = _module_for(doc)
    try:
        head, rows = mod.report_table(doc) if mod and hasattr(mod, "report_table") else generic_table(doc)
    except Exception as e:
        log.warning("report: %s: table failed (%s); using a generic table", path.name, e)
        head, rows = generic_table(doc)
    out.append(md_table(head, rows) if rows else "_No results in this file._")
    out.append("")
    for bar in doc.get("bars", []):
        if bar.get("text"):
            out.append(f"- **Bar:** {bar['text']}: **{'met' if bar.get('met') else 'not met'}**")
            continue
        out.append(f"- **Bar:** {bar.get('name')} (k={bar.get('k')}): p50 {bar.get('measured_p50_ms')} ms, "
                   f"target <= {bar.get('target_ms')} ms: **{'met' if bar.get('met') else 'not met'}**"
                   + (f" (previously measured {bar['previous_ms']} ms)" if bar.get("previous_ms") else ""))
    for s in doc.get("skipped", []):
        what = s.get("kind") or s.get("backend") or s.get("name") or "?"
        where = f" at {s['size']:,}" if isinstance(s.get("size"), int) else ""
        out.append(f"- Skipped {what}{where}: {s.get('reason', '')}")
    for n in doc.get("notes", []):
        out.append(f"- Note: {n}")
    if plots_dir is not None and mod is not None and hasattr(mod, "plot"):
        png = plots_dir / f"{path.stem}.png"
        try:
            if mod.plot(doc, png):
                rel = os.path.relpath(png, md_dir)
                out += ["", f"![{b}: {path.stem}]({rel})"]
        except Exception as e:
            log.warning("report: %s: plot failed (%s)", path.name, e)
    out.append("")
    return "\n".join(out)


def render(docs: list[tuple[Path, dict]], problems: list[str], results_dir: Path, out: Path,
           plots_dir: Path | None) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `hashret bench report` on {machine.now_iso()} from `{results_dir}/*.json` "
        "— do not edit by hand: re-run the benchmark (its command line is listed with each table), "
        "then `hashret bench report`.",
        "",
        "Timings are measurements on the machine named with each table; they vary with load and are "
        "never test assertions.",
        "",
    ]
    machines: dict[str, list[str]] = {}
    for p, d in docs:
        machines.setdefault(machine.describe(d), []).append(p.name)
    if machines:
        lines += ["## Machines", "", md_table(["machine", "figures"],
                                             [[m, ", ".join(f)] for m, f in machines.items()]), ""]
    else:
        lines += ["_No results yet: run e.g. `hashret bench search`._", ""]
    for p, d in docs:
        lines.append(section(p, d, plots_dir, out.parent))
    if problems:
        lines += ["## Files not included", ""] + [f"- {x}" for x in problems] + [""]
    return "\n".join(lines).rstrip() + "\n"


def generate(results_dir: str | os.PathLike = DEFAULT_RESULTS, out: str | os.PathLike = DEFAULT_OUT,
             plots_dir: str | os.PathLike | None = "", plots: bool = True) -> Path:
    """Write RESULTS.md (and plots unless plots=False); plots_dir '' = RESULTS_DIR/plots."""
    from hashret.errors import MissingArtifact
    from hashret.fsutil import atomic_write

    results_dir, out = Path(results_dir), Path(out)
    if not results_dir.is_dir():
        raise MissingArtifact(f"results folder {results_dir} | not found: run a benchmark first, "
                              "e.g. `hashret bench search`")
    pdir = None
    if plots:
        pdir = Path(plots_dir) if plots_dir else results_dir / "plots"
        pdir.mkdir(parents=True, exist_ok=True)
    docs, problems = load_results(results_dir)
    text = render(docs, problems, results_dir, out, pdir)
    atomic_write(out, lambda f: f.write(text), mode="w")
    return out


# --------------------------------------------------------------------------- plotting helpers


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def save_figure(fig, path: Path) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return True


# --------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                   help=f"folder of results JSONs (default: {DEFAULT_RESULTS})")
    add_output_args(p, metavar="FILE.md", default=DEFAULT_OUT, help="markdown file to write", progress=False,
                    title=None)
    p.add_argument("--plots", default="", metavar="DIR",
                   help="folder for PNG plots (default: RESULTS/plots)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (default: plots on)")


def run(args) -> int:
    path = generate(args.results, args.out, args.plots, plots=not args.no_plots)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(standalone_parser("python -m benchmarks.report", __doc__, add_args), run, argv)


if __name__ == "__main__":
    sys.exit(main())

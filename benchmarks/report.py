"""`hashret bench report` / `python -m benchmarks.report`: RESULTS.md and the README's figures from the results JSONs.

Reads every benchmarks/results/*.json written by `hashret bench ...`, `python -m train.table`,
`hashret demo` or gpu.sh, and writes:

* benchmarks/RESULTS.md: per file its table, the exact command line that produced it, the date,
  the machine, package versions and the commit, plus PNG plots under benchmarks/results/plots/;
* every generated block of README.md: the text between `<!-- gen:NAME begin -->` and
  `<!-- gen:NAME end -->` (and the quality table between train.table's own markers) is rendered
  from the JSON files BLOCKS names for it.

Both are generated: re-run the benchmark instead of editing the markdown. `--check` writes
nothing and exits 1 when a block or RESULTS.md differs from what the JSONs give (the test suite
runs the same check). Each run also prints, per results file, its commit and whether the code of
its benchmark changed after that commit ("stale"): such a figure no longer describes today's code.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.cli import run_main, standalone_parser
from hashret.cliargs import add_output_args

log = logging.getLogger("hashret.bench.report")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = "benchmarks/results"
DEFAULT_OUT = "benchmarks/RESULTS.md"
DEFAULT_README = "README.md"
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
    "train-table": "Quality table: every loss x code length x 3 seeds (python -m train.table)",
    "demo": "The one-command demo (hashret demo): summary.json",
    "backbones": "Backbones: first extraction, engine latency and mAP (python -m benchmarks.backbones)",
    "extract": "First feature extraction: torch eager vs the trunk engines (python -m benchmarks.extract_bench)",
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
    "backbones": "benchmarks.backbones",
    "extract": "benchmarks.extract_bench",
}
# result kind -> source files whose change makes its figures stale (the benchmark's own module;
# a results file may name others under "sources")
SOURCES = {
    **{b: (m.replace(".", "/") + ".py",) for b, m in MODULES.items()},
    "gpu": ("benchmarks/gpu.sh",),
    "train-table": ("train/table.py",),
    "demo": ("demo",),
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
        kind = result_kind(doc)
        if kind is None:
            problems.append(f"{p.name}: not a benchmark result (no 'benchmark' key)")
            continue
        docs.append((p, {"benchmark": kind, **doc}))

    def key(item):
        b = item[1].get("benchmark", "")
        return (ORDER.index(b) if b in ORDER else len(ORDER), b, item[0].stem != b, item[0].name)

    return sorted(docs, key=key), problems


def result_kind(doc: Any) -> str | None:
    """The benchmark a results JSON belongs to: its 'benchmark' key, or the shape of the two
    files that are not written by `hashret bench` (train.table's table, a demo's summary)."""
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("benchmark"), str):
        return doc["benchmark"]
    if isinstance(doc.get("rows"), list) and "seeds" in doc:
        return "train-table"
    if isinstance(doc.get("summary"), dict) and "retrieval" in doc["summary"]:
        return "demo"
    return None


# --------------------------------------------------------------------------- commits and staleness


def _field(doc: dict, key: str) -> Any:
    """A provenance field wherever a writer put it: top level, 'versions' or 'machine'."""
    for where in (doc, doc.get("versions") or {}, doc.get("machine") or {}):
        if isinstance(where, dict) and where.get(key) is not None:
            return where[key]
    return None


def provenance(doc: dict) -> dict[str, Any]:
    """{'commit', 'describe', 'dirty'} recorded in a results JSON (None where it says nothing)."""
    dirty = _field(doc, "dirty")
    if dirty is None:
        dirty = _field(doc, "git_dirty")
    return {"commit": _field(doc, "git_commit"), "describe": _field(doc, "git_describe"), "dirty": dirty}


def commit_label(doc: dict) -> str:
    p = provenance(doc)
    label = p["describe"] or (p["commit"] or "unknown")[:10]
    if label.endswith("-dirty"):  # `git describe --dirty` says it already
        label = label[:-len("-dirty")]
    return label + (" plus uncommitted changes" if p["dirty"] else "")


def _git(*args: str, repo: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)


def freshness(path: Path, doc: dict, repo: Path = REPO) -> dict[str, Any]:
    """Whether the benchmark's code changed after the commit a results file was made from.

    'stale' is True when the last commit touching the benchmark's sources is not an ancestor of
    (or equal to) the file's commit, None when git cannot tell (no git, no sources known), and the
    commit is flagged when git does not know it (made from a commit that was never pushed here).
    """
    kind = doc.get("benchmark", "?")
    sources = tuple(doc.get("sources") or SOURCES.get(kind, ()))
    commit = provenance(doc)["commit"]
    out: dict[str, Any] = {"file": path.name, "kind": kind, "commit": commit_label(doc), "sources": list(sources),
                           "stale": None, "why": ""}
    if not commit:
        out.update(stale=True, why="records no commit")
        return out
    try:
        if _git("cat-file", "-e", f"{commit}^{{commit}}", repo=repo).returncode != 0:
            out.update(stale=True, why=f"commit {commit[:10]} unknown to git here")
            return out
        if not sources:
            out["why"] = "no benchmark sources known"
            return out
        last = _git("log", "-1", "--format=%H", "--", *sources, repo=repo).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        out["why"] = f"git unavailable ({e})"
        return out
    if not last:
        out.update(stale=False, why="sources not in git history")
        return out
    newer = _git("merge-base", "--is-ancestor", last, commit, repo=repo).returncode != 0
    out.update(stale=newer, why=f"{', '.join(sources)} changed in {last[:10]}, after it" if newer else "current")
    return out


def freshness_table(docs: list[tuple[Path, dict]], repo: Path = REPO) -> tuple[list[str], list[list[Any]]]:
    rows = []
    for p, d in docs:
        f = freshness(p, d, repo)
        rows.append([f["file"], f["commit"], {True: "STALE", False: "current", None: "?"}[f["stale"]], f["why"]])
    return ["file", "commit", "code since", "why"], rows


# --------------------------------------------------------------------------- markdown


def md_table(head: list[str], rows: list[list[Any]], align: str = "") -> str:
    """A markdown table; align has one letter per column, l or r (default: first left, others right)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    align = align or "l" + "r" * (len(head) - 1)
    lines = ["| " + " | ".join(cell(h) for h in head) + " |",
             "|" + "|".join(" --- " if a == "l" else " ---: " for a in align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _short_versions(v: dict[str, Any]) -> str:
    # the commit has its own line (commit_label), with the dirty flag
    return ", ".join(f"{k} {val}" for k, val in v.items()
                     if val and k not in ("git_commit", "git_describe", "dirty", "diff_sha256", "allow_dirty"))


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
    out.append(f"- **Date:** {doc.get('date') or doc.get('created') or '?'}")
    out.append(f"- **Machine:** {describe_machine(doc)}")
    out.append(f"- **Commit:** {commit_label(doc)}")
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
    if b in MARKDOWN_SECTIONS:
        out.append(MARKDOWN_SECTIONS[b](doc))
    else:
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
                   f"target <= {bar.get('target_ms')} ms: **{'met' if bar.get('met') else 'not met'}**")
    for s in doc.get("skipped", []):
        what = s.get("kind") or s.get("backend") or s.get("name") or "?"
        where = f" at {s['size']:,}" if isinstance(s.get("size"), int) else ""
        out.append(f"- Skipped {what}{where}: {s.get('reason', '')}")
    for n in doc.get("notes", []):
        out.append(f"- Note: {n}")
    if plots_dir is not None:  # linked when the PNG is there, so --check sees what generate wrote
        png = plots_dir / f"{path.stem}.png"
        if png.is_file():
            rel = os.path.relpath(png, md_dir)
            out += ["", f"![{b}: {path.stem}]({rel})"]
    out.append("")
    return "\n".join(out)


def write_plots(docs: list[tuple[Path, dict]], plots_dir: Path) -> None:
    for path, doc in docs:
        mod = _module_for(doc)
        if mod is None or not hasattr(mod, "plot"):
            continue
        try:
            mod.plot(doc, plots_dir / f"{path.stem}.png")
        except Exception as e:
            log.warning("report: %s: plot failed (%s)", path.name, e)


def describe_machine(doc: dict[str, Any]) -> str:
    """machine.describe for `hashret bench` files; train.table records its machine its own way."""
    m = doc.get("machine") or {}
    if "cpu_model" in m or "cpus" in m:
        return machine.describe(doc)
    if "cpu" in m:
        return f"{m['cpu']}, {m.get('cores', '?')} cores, torch threads {m.get('torch_threads', '?')}"
    return "not recorded in this file"


def _train_table_section(doc: dict[str, Any]) -> str:
    from train.table import render_markdown

    return render_markdown(doc)


def _demo_section(doc: dict[str, Any]) -> str:
    return render_demo({"demo": doc})


# kinds whose table is markdown written by their own renderer rather than report_table's rows
MARKDOWN_SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "train-table": _train_table_section,
    "demo": _demo_section,
}


def render(docs: list[tuple[Path, dict]], problems: list[str], results_dir: Path, out: Path,
           plots_dir: Path | None) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `hashret bench report` from `{os.path.relpath(results_dir, out.parent)}/*.json` "
        "(relative to this file) "
        "— do not edit by hand: re-run the benchmark (its command line is listed with each table), "
        "then `hashret bench report`. `hashret bench report` also prints which files are stale "
        "(their benchmark's code changed after the commit they name).",
        "",
        "Timings are measurements on the machine named with each table; they vary with load and are "
        "never test assertions.",
        "",
    ]
    machines: dict[str, list[str]] = {}
    for p, d in docs:
        machines.setdefault(describe_machine(d), []).append(p.name)
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


def results_markdown(results_dir: Path, out: Path, plots_dir: Path | None) -> str:
    docs, problems = load_results(results_dir)
    return render(docs, problems, results_dir, out, plots_dir)


def generate(results_dir: str | os.PathLike = DEFAULT_RESULTS, out: str | os.PathLike = DEFAULT_OUT,
             plots_dir: str | os.PathLike | None = "", plots: bool = True) -> Path:
    """Write RESULTS.md (and plots unless plots=False); plots_dir '' = RESULTS_DIR/plots."""
    from hashret.fsutil import atomic_write

    results_dir, out = _results_dir(results_dir), Path(out)
    pdir = Path(plots_dir) if plots_dir else results_dir / "plots"
    if plots:
        pdir.mkdir(parents=True, exist_ok=True)
        write_plots(load_results(results_dir)[0], pdir)
    text = results_markdown(results_dir, out, pdir)
    atomic_write(out, lambda f: f.write(text), mode="w")
    return out


def _results_dir(results_dir: str | os.PathLike) -> Path:
    from hashret.errors import MissingArtifact

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise MissingArtifact(f"results folder {results_dir} | not found: run a benchmark first, "
                              "e.g. `hashret bench search`")
    return results_dir


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


# --------------------------------------------------------------------------- generated README blocks
# A block is the text between its two markers in a markdown file; `render` turns the results JSONs
# it names into that text. A file named but absent renders as "not measured yet" with the command
# that writes it (benchmarks/rerun_all.sh runs them all), so a figure is never left without one.


@dataclass(frozen=True)
class Block:
    name: str
    files: tuple[str, ...]                       # results JSONs (names inside the results folder)
    render: Callable[[dict[str, dict | None]], str]
    begin: str = ""                              # markers; default <!-- gen:NAME begin/end -->
    end: str = ""

    @property
    def markers(self) -> tuple[str, str]:
        return (self.begin or f"<!-- gen:{self.name} begin -->", self.end or f"<!-- gen:{self.name} end -->")


BLOCKS: dict[str, Block] = {}


def register_block(name: str, *files: str, begin: str = "", end: str = ""):
    """Decorator: `render(docs)` produces the README block NAME from FILES (docs[file] is None when absent)."""
    def wrap(fn):
        if name in BLOCKS:
            raise ValueError(f"README block {name!r} is already registered")
        BLOCKS[name] = Block(name, tuple(files), fn, begin, end)
        return fn
    return wrap


# results file -> the command that writes it (as in benchmarks/rerun_all.sh)
COMMANDS = {
    "parity-effnet-dch64-subset.json": "hashret bench parity --exps EXP --split subset --out "
                                       "benchmarks/results/parity-effnet-dch64-subset.json",
    "backbones.json": "python -m benchmarks.backbones --data ../shared/datasets/grocery",
    "extract-effnet-lite0.json": "python -m benchmarks.extract_bench --data ../shared/datasets/grocery",
    "engine-resnet50-random.json": "hashret bench engine EXP --backends ort,ort-int8,openvino-int8 --batches 1 "
                                   "--threads 2 --out benchmarks/results/engine-resnet50-random.json",
}


def _missing(file: str) -> str:
    cmd = COMMANDS.get(file, "benchmarks/rerun_all.sh")
    return f"_Not measured yet: `{cmd}` writes `benchmarks/results/{file}` (see benchmarks/rerun_all.sh)._"


def _source(doc: dict, file: str) -> str:
    """Where a figure comes from, as one clause: file, command, date, commit, load."""
    load = (doc.get("machine") or {}).get("load_avg_1m")
    date = str(doc.get("date") or doc.get("created") or "?")[:10]
    return (f"`benchmarks/results/{file}`: `{doc.get('command', '?')}`, {date}, commit {commit_label(doc)}"
            + (f", 1-minute load average {load} at start" if load is not None else ""))


BACKEND_LABELS = {"torch": "torch fp32 (reference)", "ort": "ORT fp32", "openvino": "OpenVINO f32",
                  "openvino:precision=bf16": "OpenVINO bf16", "ort-int8": "ORT int8",
                  "openvino-int8": "OpenVINO int8", "ort-fp16": "ORT fp16 (CPU EP)"}


def _label(backend: str) -> str:
    return BACKEND_LABELS.get(backend, backend)


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v if v is not None else "?")


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


@register_block("train_table", "train_table.json",
                begin="<!-- train_table:begin -->", end="<!-- train_table:end -->")
def render_train_table(docs: dict[str, dict | None]) -> str:
    doc = docs["train_table.json"]
    if doc is None:
        return _missing("train_table.json")
    from train.table import render_markdown

    return render_markdown(doc)


# The quality targets of the project's brief, against which the seeds are read.
QUALITY_BARS = {"hashnet": 0.70, "dch": 0.75}


@register_block("train_reading", "train_table.json")
def render_train_reading(docs: dict[str, dict | None]) -> str:
    doc = docs["train_table.json"]
    if doc is None:
        return _missing("train_table.json")
    backbone = doc.get("backbone")
    rows = [r for r in doc["rows"] if r.get("backbone", backbone) == backbone and isinstance(r.get("mAP@all"), dict)]
    runs = [r for r in doc.get("runs", []) if r.get("backbone", backbone) == backbone]
    def mean(r: dict, k: str) -> float | None:
        return r[k]["mean"] if isinstance(r.get(k), dict) else None

    bits = sorted({r["bits"] for r in rows})
    best = {b: max((r for r in rows if r["bits"] == b), key=lambda r: mean(r, "mAP@all")) for b in bits}
    parts = ["Reading it (generated from `benchmarks/results/train_table.json`): best mean mAP@all "
             + ", ".join(f"at {b} bits **{best[b]['method']}** ({mean(best[b], 'mAP@all'):.4f})" for b in bits) + "."]
    gaps = [(mean(r, "mAP@all") - mean(r, "mAP@all(tie-aware)"), r) for r in rows
            if mean(r, "mAP@all(tie-aware)") is not None]
    if gaps:
        lo, hi = min(g for g, _ in gaps), max(g for g, _ in gaps)
        top = max(bits)
        g64, r64 = max(((g, r) for g, r in gaps if r["bits"] == top), key=lambda x: x[0])
        p_h2 = [x["precision@H<=2"] for x in runs if x.get("method") == r64["method"] and x.get("bits") == top
                and x.get("precision@H<=2") is not None]
        parts.append(f"Binary mAP@all is {lo:+.4f} to {hi:+.4f} above the tie-aware figure (that much of it "
                     f"comes from the gallery's order); at {top} bits the gap is largest for {r64['method']} "
                     f"({g64:.4f})" + (f", whose precision@H<=2 is {sum(p_h2) / len(p_h2):.2f}" if p_h2 else "")
                     + ".")
    gains = [(mean(r, "mAP@all(rerank)") - mean(r, "mAP@all"), r) for r in rows
             if mean(r, "mAP@all(rerank)") is not None]
    if gains:
        up = sum(1 for g, _ in gains if g > 0)
        line = f"Re-ranking the Hamming shortlist by the float activations raises mean mAP@all in {up} of {len(gains)} cells"
        top = max(bits)
        for g, r in gains:
            if r["bits"] == top and r["method"] == best[top]["method"]:
                d10 = (mean(r, "mAP@10(rerank)") or 0) - (mean(r, "mAP@10") or 0)
                line += f"; for {top}-bit {r['method']} it adds {g:.4f} to mAP@all and {d10:.4f} to mAP@10"
        parts.append(line + ".")
    for method, bar in QUALITY_BARS.items():
        seeds = sorted((x["seed"], x["mAP@all"]) for x in runs
                       if x.get("method") == method and x.get("bits") == 64 and x.get("mAP@all") is not None)
        if seeds:
            below = sum(1 for _, v in seeds if v < bar)
            parts.append(f"{method} 64-bit by seed ({'/'.join(str(s) for s, _ in seeds)}): "
                         f"{' / '.join(f'{v:.4f}' for _, v in seeds)} against its bar of {bar:.2f}, "
                         f"{below} of {len(seeds)} below it.")
    return " ".join(parts)


@register_block("backbones", "backbones.json")
def render_backbones(docs: dict[str, dict | None]) -> str:
    doc = docs["backbones.json"]
    if doc is None:
        return _missing("backbones.json")
    from benchmarks.backbones import render_markdown

    return render_markdown(doc)


@register_block("demo", "demo-csq64-summary.json")
def render_demo(docs: dict[str, dict | None]) -> str:
    doc = next(iter(docs.values()))
    if doc is None:
        return _missing("demo-csq64-summary.json")
    s = doc["summary"]
    r, snap, off = s["retrieval"], s.get("snap_to_shop") or {}, s.get("offline") or {}
    lat = r.get("latency_ms") or {}
    binary = r.get("binary") or {}
    same = r.get("offline_same_engine") or {}
    out = (f"One full run (`{doc.get('command', 'hashret demo')}`, commit {commit_label(doc)}; {s.get('model', '?')}, "
           f"concurrency {lat.get('concurrency', '?')}, {_n(r.get('queries'))} queries, {_n(r.get('failed', 0))} failed): "
           f"served mAP@10 {_f(binary.get('mAP@10'), '{:.4f}')} in Hamming order and {_f(r.get('mAP@10'), '{:.4f}')} "
           f"re-ranked (offline with the same engine: {_f(same.get('mAP@10'), '{:.4f}')} / "
           f"{_f(same.get('mAP@10(rerank)'), '{:.4f}')}; the training run's torch codes: "
           f"{_f(off.get('mAP@10'), '{:.4f}')} / {_f(off.get('mAP@10(rerank)'), '{:.4f}')}), per-query p50 "
           f"{_f(lat.get('p50'), '{:.0f}')} ms / p99 {_f(lat.get('p99'), '{:.0f}')} ms")
    if snap:
        out += (f", snap-to-shop top-1 {_f(snap.get('top1'), '{:.2f}')} and top-5 {_f(snap.get('top5'), '{:.2f}')} "
                "against the catalogue's iconic images")
    return out + ". From `benchmarks/results/demo-csq64-summary.json` (the demo's `summary.json`)."


def _parity_table(doc: dict, file: str) -> str:
    res = doc["results"][0]
    ds = res.get("dataset") or {}
    rows = [[_label(r.get("backend", "?")), _f(r.get("file_mb"), "{:.1f}"), _f(r.get("bit_agreement"), "{:.4f}"),
             _f(r.get("at_risk"), "{:.4f}"), _f(r.get("mAP@all"), "{:.4f}"), _f(r.get("mAP_delta"), "{:+.4f}"),
             _f(r.get("top10_overlap"), "{:.3f}"), _f(r.get("latency_ms_bs1"), "{:.1f}")]
            for r in res.get("rows", []) if r.get("status") == "ok"]
    head = (f"{res.get('bits', '?')}-bit {res.get('method', '?')} {res.get('backbone', '?')}, "
            f"{_n(ds.get('queries'))} queries x {_n(ds.get('database'))} database images "
            f"({ds.get('split', '?')} split), {describe_machine(doc)}; {_source(doc, file)}:")
    return head + "\n\n" + md_table(["backend", "file MB", "bit_agreement", "at_risk", "mAP@all", "mAP_delta",
                                     "top10_overlap", "bs=1 ms"], rows)


@register_block("export_parity", "parity-effnet-dch64-subset.json", "engine-resnet50-random.json")
def render_export_parity(docs: dict[str, dict | None]) -> str:
    out = []
    for file in ("parity-effnet-dch64-subset.json",):
        out.append(_parity_table(docs[file], file) if docs[file] else _missing(file))
    eng = docs["engine-resnet50-random.json"]
    if eng is None:
        out.append(_missing("engine-resnet50-random.json"))
    else:
        bs1 = {r["backend"]: r for r in eng.get("results", []) if r.get("batch") == 1 and r.get("p50_ms")}
        parts = [f"{_label(b)} {r['p50_ms']:.1f} ms" for b, r in bs1.items()]
        if "ort" in bs1 and "ort-int8" in bs1:
            parts.append(f"ORT int8 / fp32 {bs1['ort-int8']['p50_ms'] / bs1['ort']['p50_ms']:.2f}x")
        threads = (eng.get("config") or {}).get("threads") or "library default"
        out.append(f"ResNet50 (random weights: timing only), bs=1 p50 with {threads} threads: " + ", ".join(parts)
                   + f"; {_source(eng, 'engine-resnet50-random.json')}.")
    return "\n\n".join(out)


def _search_row(doc: dict, kind: str, size: int, k: int = 10) -> dict | None:
    return next((r for r in doc.get("results", []) if r.get("label", r.get("kind")) == kind
                 and r.get("size") == size and r.get("k") == k), None)


@register_block("headline", "engine-effnet-dch64.json", "serve-effnet-dch64.json", "search.json",
                "search-flat-1m.json")
def render_headline(docs: dict[str, dict | None]) -> str:
    rows: list[list[Any]] = []
    def met(bar: dict) -> str:
        return f"{bar.get('text') or bar.get('name')}: **{'met' if bar.get('met') else 'not met'}**"

    eng = docs["engine-effnet-dch64.json"]
    if eng:
        bs1 = [r for r in eng.get("results", []) if r.get("batch") == 1 and r.get("p50_ms") is not None]
        rows.append([f"engine bs=1 p50: {' / '.join(_label(r['backend']) for r in bs1)}",
                     " / ".join(f"{r['p50_ms']:.1f}" for r in bs1) + " ms", "", "engine-effnet-dch64.json"])
        best = max((r for r in eng.get("results", []) if r.get("img_per_s")), key=lambda r: r["img_per_s"], default=None)
        if best:
            rows.append([f"best offline throughput ({_label(best['backend'])}, bs {best['batch']})",
                         f"{best['img_per_s']:.0f} img/s", "", "engine-effnet-dch64.json"])
    srv = docs["serve-effnet-dch64.json"]
    if srv:
        by_c = {r.get("concurrency"): r for r in srv.get("results", [])}
        info = (srv.get("config") or {}).get("server_info") or {}
        base = {r.get("batch"): r for r in (srv.get("engine_baseline") or {}).get("results", [])}
        bars = srv.get("bars") or []
        if 1 in by_c:
            r = by_c[1]
            gallery = (info.get("gallery") or {}).get("size", "?")
            rows.append([f"served `Search` p50, concurrency 1, {gallery}-item gallery, {info.get('backend', '?')}",
                         f"{r['p50_ms']:.1f} ms ({r['requests_per_s']:.0f} req/s)"
                         + (f"; the engine alone in the same run {base[1]['p50_ms']:.1f} ms" if 1 in base else ""),
                         met(bars[0]) if bars else "", "serve-effnet-dch64.json"])
        hi = [c for c in (16, 64) if c in by_c]
        if hi:
            errs = sum(by_c[c].get("error_count", 0) for c in hi)
            rows.append([f"served throughput at concurrency {' / '.join(map(str, hi))}",
                         " / ".join(f"{by_c[c]['images_per_s']:.0f}" for c in hi) + " img/s, "
                         + ("no errors" if not errs else f"{errs} errors"),
                         met(bars[1]) if len(bars) > 1 else "", "serve-effnet-dch64.json"])
        cpu = (by_c.get(16) or {}).get("server_cpu") or {}
        rest = next((b for b in bars if "outside engine and decode" in b.get("name", "")), None)
        if cpu.get("ms_per_request") is not None:
            th = cpu.get("by_thread")
            rows.append(["server CPU per request at concurrency 16 (from /proc; by thread: the threads' own "
                         "time; echo: a bare grpc.aio server at the same rate and grouping)",
                         f"{cpu['ms_per_request']:.2f} ms"
                         + (f"; by thread: engine {th['engine_ms']:.2f}, decode {th['decode_ms']:.2f}, event loop "
                            f"+ other {th['loop_ms'] + th['other_ms']:.2f}" if th else "")
                         + (f"; echo {cpu['echo_same_pattern_ms_per_request']:.2f} ms"
                            if cpu.get("echo_same_pattern_ms_per_request") is not None else ""),
                         met(rest) if rest else "", "serve-effnet-dch64.json"])
    flat = docs["search-flat-1m.json"]
    if flat:
        for bar in flat.get("bars", []):
            if bar.get("k") == 10:
                rows.append([f"FAISS flat, 1M 64-bit codes, {bar.get('threads', 1)} thread, one query (k 10)",
                             f"{bar['measured_p50_ms']:.2f} ms p50, {bar['measured_p99_ms']:.2f} ms p99",
                             f"<= {bar['target_ms']} ms p50: **{'met' if bar.get('met') else 'not met'}**",
                             "search-flat-1m.json"])
    s = docs["search.json"]
    if s:
        ef = ((s.get("config") or {}).get("hnsw") or {})
        h = _search_row(s, "faiss-hnsw(ef_search=64)", 1_000_000)
        if h:
            rows.append([f"FAISS HNSW (M {ef.get('M', '?')}, efSearch 64), 1M codes, k 10",
                         f"{h['per_query']['p50_ms']:.2f} ms p50, recall@10 {h['recall']:.3f}", "", "search.json"])
        n1, n10, f10 = (_search_row(s, "numpy", 1_000_000), _search_row(s, "numpy", 10_000_000),
                        _search_row(s, "faiss-flat", 10_000_000))
        if n1 and n10:
            rows.append(["numpy brute force, 1M / 10M codes, k 10",
                         f"{n1['per_query']['p50_ms']:.1f} / {n10['per_query']['p50_ms']:.0f} ms p50"
                         + (f" (FAISS flat at 10M: {f10['per_query']['p50_ms']:.1f} ms)" if f10 else ""), "",
                         "search.json"])
        m = _search_row(s, "milvus", 100_000)
        if m:
            rows.append(["Milvus Lite, 100k codes, k 10", f"{m['per_query']['p50_ms']:.1f} ms p50", "", "search.json"])
    if not rows:
        return _missing("engine-effnet-dch64.json")
    present = [(f, d) for f, d in docs.items() if d]
    machines = sorted({describe_machine(d) for _, d in present})
    loads = ", ".join(f"{f} {(d.get('machine') or {}).get('load_avg_1m', '?')}" for f, d in present)
    commits = ", ".join(f"{f} {commit_label(d)}" for f, d in present)
    missing = [f for f, d in docs.items() if d is None]
    note = (f"Measured on {'; '.join(machines)}. 1-minute load average at start: {loads}. Commits: {commits}."
            + (f" Not measured yet: {', '.join(missing)}." if missing else ""))
    return md_table(["what", "figure", "bar", "file"], rows, align="llll") + "\n\n" + note


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def _p50_p99_max(x: dict) -> str:
    return f"{x['p50_ms']:.2g} / {x['p99_ms']:.2g} / {x['max_ms']:.0f} ms"


@register_block("snapshots", "snapshot-replay.json", "snapshot-write-wait.json", "snapshot-upserts.json")
def render_snapshots(docs: dict[str, dict | None]) -> str:
    rows: list[list[Any]] = []
    rep, ww, ups = (docs[f] for f in ("snapshot-replay.json", "snapshot-write-wait.json", "snapshot-upserts.json"))
    if rep:
        for r in rep.get("results", []):
            if r["items"] == r["records"]:
                rows.append([f"replay at start, single-item records ({r['bytes_per_record']:.0f} bytes each)",
                             f"{r['records_per_s']:,} records/s ({r['mb_per_s']:.1f} MiB/s)"])
            else:
                rows.append([f"replay at start, {r['items'] // r['records']:,}-item records",
                             f"{r['items_per_s']:,} items/s ({r['mb_per_s']:.1f} MiB/s)"])
        loads = rep.get("snapshot_loads") or []
        if loads:
            sizes = " / ".join(f"{x['items']:,}" for x in loads)
            rows.append([f"loading a snapshot of {sizes} items",
                         " / ".join(f"{x['snapshot_load_s']:.1f} s" for x in loads)])
        b = rep.get("default_bound") or {}
        worst = max((v for k, v in b.items() if k.startswith("replay_s_at")), default=None)
        if worst is not None:
            rows.append([f"replay that the default bound allows ({b['every_records']:,} records, or "
                         f"{b['every_mb']:g} MiB)", f"at most {worst:.1f} s per restart "
                         f"({2 * worst:.1f} s if writes outpace snapshots)"])
    for r in (ww or {}).get("results", []):
        snaps = r.get("snapshots") or []
        if not snaps:
            continue
        lock = [s["copy_ms"] + s["wal_rewrite_ms"] for s in snaps]
        total = [s["total_s"] for s in snaps]
        if r["kind"] == "faiss-flat":
            rows.append([f"snapshot of {r['items']:,} items (`faiss-flat`): time the lock is held (writes and "
                         "searches wait)", f"{_range([s['copy_ms'] for s in snaps], '{:.0f}')} ms for the copy, "
                         f"plus {_range([s['wal_rewrite_ms'] for s in snaps], '{:.0f}')} ms for the WAL rewrite"])
            rows.append([f"snapshot of {r['items']:,} items: total time", f"{_range(total, '{:.1f}')} s, in the background"])
            for what, key in (("single-item writes", "write_latency"), ("searches (k 10, one thread)", "search_latency")):
                lat = r.get(key) or {}
                d, o = lat.get("during_snapshots"), lat.get("otherwise")
                if d and o:
                    rows.append([f"{what} during / outside a snapshot, p50 / p99 / max",
                                 f"{_p50_p99_max(d)}, and {_p50_p99_max(o)}"])
        else:
            rows.append([f"`{r['kind']}`, {r['items']:,} items: the lock (the graph is copied under it too) / total",
                         f"{_range(lock, '{:.0f}')} ms / {_range(total, '{:.2f}')} s"])
    if ups:
        res, bar = ups.get("results") or {}, (ups.get("bars") or [{}])[0]
        cfg = ups.get("config") or {}
        if bar:
            rows.append([f"{bar.get('acknowledged', '?'):,} single-item Upserts through the server "
                         f"({res.get('upserts_per_s', 0):.0f}/s, {cfg.get('writers', '?')} writers, "
                         f"{res.get('snapshots', '?')} snapshots)",
                         f"`wal.jsonl` peaked at {bar['wal_peak_records']:,} records (bound {bar['wal_bound_records']:,})"])
            rows.append([f"restart after SIGKILL at the end ({(res.get('wal_at_kill') or {}).get('records', 0):,} WAL "
                         f"records) vs the same gallery freshly compacted, spawn to `SERVING`, median of "
                         f"{len(res.get('restart_s') or [])}",
                         f"{bar['restart_s_median']:.2f} s vs {bar['fresh_restart_s_median']:.2f} s "
                         f"({bar['restart_ratio']:.2f}x; bar 2x: **{'met' if bar.get('met') else 'not met'}**), "
                         f"{bar['gallery_size']:,} of {bar['acknowledged']:,} items present"])
        if res.get("open_gallery_s") is not None:
            rows.append(["the same, `open_gallery` alone",
                         f"{res['open_gallery_s']:.2f} s vs {res['fresh_open_gallery_s']:.2f} s"])
    present = [(f, d) for f, d in docs.items() if d]
    if not present:
        return _missing("snapshot-replay.json")
    loads = [(d.get("machine") or {}).get("load_avg_1m") for _, d in present]
    head = (f"Measured on {'; '.join(sorted({describe_machine(d) for _, d in present}))}, commits "
            f"{', '.join(sorted({commit_label(d) for _, d in present}))}, 1-minute load average at start "
            f"{', '.join(str(x) for x in loads)}; `hashret bench snapshot --part replay|write-wait|upserts` writes "
            f"`benchmarks/results/snapshot-*.json`"
            + (f" (not measured yet: {', '.join(f for f, d in docs.items() if d is None)})" if len(present) < 3 else "")
            + ":")
    return head + "\n\n" + md_table(["what", "figure"], rows, align="ll")


# --------------------------------------------------------------------------- rewriting and checking


def _load(results_dir: Path, name: str) -> dict | None:
    try:
        doc = json.loads((results_dir / name).read_text())
    except FileNotFoundError:
        return None
    kind = result_kind(doc)
    return {"benchmark": kind, **doc} if kind else doc


def render_block(block: Block, results_dir: str | os.PathLike = REPO / DEFAULT_RESULTS) -> str:
    docs = {f: _load(Path(results_dir), f) for f in block.files}
    return block.render(docs).strip()


def _span(text: str, block: Block, where: str) -> tuple[int, int] | None:
    """(start, end) of the block's body in text; None when the file has no such block."""
    from hashret.errors import BadInput

    begin, end = block.markers
    nb, ne = text.count(begin), text.count(end)
    if nb == ne == 0:
        return None
    if nb != 1 or ne != 1 or text.index(begin) > text.index(end):
        raise BadInput(f"{where} | needs exactly one {begin} followed by one {end}: fix the markers")
    return text.index(begin) + len(begin), text.index(end)


def rewrite_blocks(text: str, results_dir: str | os.PathLike, where: str = "README.md") -> str:
    """text with every registered block it holds re-rendered from results_dir."""
    for block in BLOCKS.values():
        span = _span(text, block, where)
        if span is not None:
            text = text[:span[0]] + "\n" + render_block(block, results_dir) + "\n" + text[span[1]:]
    return text


def check(readme: str | os.PathLike | None = REPO / DEFAULT_README,
          results_dir: str | os.PathLike = REPO / DEFAULT_RESULTS,
          results_md: str | os.PathLike | None = REPO / DEFAULT_OUT) -> list[str]:
    """Differences between the markdown on disk and what the JSONs give; [] when all match.

    Every registered block must be present in the README, so deleting one is caught too."""
    problems = []
    results_dir = Path(results_dir)
    if readme is not None:
        text = Path(readme).read_text()
        for block in BLOCKS.values():
            span = _span(text, block, str(readme))
            if span is None:
                problems.append(f"{readme}: block {block.name} | markers {block.markers[0]} missing")
                continue
            have, want = text[span[0]:span[1]].strip(), render_block(block, results_dir)
            if have != want:
                problems.append(f"{readme}: block {block.name} | differs from {', '.join(block.files)}:\n"
                                + _diff(have, want))
    if results_md is not None:
        out = Path(results_md)
        want = results_markdown(results_dir, out, results_dir / "plots")
        have = out.read_text() if out.is_file() else ""
        if have != want:
            problems.append(f"{out} | differs from {results_dir}/*.json:\n" + _diff(have, want))
    return problems


def _diff(have: str, want: str, limit: int = 30) -> str:
    lines = list(difflib.unified_diff(have.splitlines(), want.splitlines(), "on disk", "from the JSONs", lineterm="", n=0))
    return "\n".join(lines[:limit] + ([f"... {len(lines) - limit} more lines"] if len(lines) > limit else []))


def write_readme(readme: str | os.PathLike, results_dir: str | os.PathLike) -> bool:
    """Rewrite the README's generated blocks; True when something changed."""
    from hashret.fsutil import atomic_write

    p = Path(readme)
    text = p.read_text()
    new = rewrite_blocks(text, results_dir, str(readme))
    if new != text:
        atomic_write(p, lambda f: f.write(new), mode="w")
    return new != text


# --------------------------------------------------------------------------- CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                   help=f"folder of results JSONs (default: {DEFAULT_RESULTS})")
    add_output_args(p, metavar="FILE.md", default=DEFAULT_OUT, help="markdown file to write", progress=False,
                    title=None)
    p.add_argument("--readme", default=None, metavar="FILE.md",
                   help="markdown file whose generated blocks (<!-- gen:NAME begin --> ... end) are rewritten "
                        f"(default: {DEFAULT_README} when --results is {DEFAULT_RESULTS}, else none, so a trial "
                        "folder never rewrites the README)")
    p.add_argument("--plots", default="", metavar="DIR",
                   help="folder for PNG plots (default: RESULTS/plots)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (default: plots on)")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a generated block or the RESULTS.md differs from the JSONs "
                        "(default: regenerate)")
    p.add_argument("--fail-on-stale", action="store_true",
                   help="also exit 1 when a results file is stale: its benchmark's code changed after the "
                        "commit it records, or the commit is unknown (default: only list them)")


def _readme_for(args) -> str | None:
    if args.readme is not None:
        return args.readme or None
    return DEFAULT_README if Path(args.results) == Path(DEFAULT_RESULTS) and Path(DEFAULT_README).is_file() else None


def run(args) -> int:
    results = _results_dir(args.results)
    readme = _readme_for(args)
    docs, _ = load_results(results)
    head, rows = freshness_table(docs)
    machine.print_table(head, rows)
    stale = [r[0] for r in rows if r[2] == "STALE"]
    if stale:
        print(f"stale: {', '.join(stale)}: re-run them with today's code (benchmarks/rerun_all.sh)")
    if args.check:
        problems = check(readme, results, args.out)
        for x in problems:
            print(f"differs: {x}", file=sys.stderr)
        if problems:
            print("regenerate with `hashret bench report`", file=sys.stderr)
            return 1
        print(f"generated markdown matches {results}/*.json" + (f" ({readme}, {args.out})" if readme else ""))
    else:
        path = generate(results, args.out, args.plots, plots=not args.no_plots)
        print(f"wrote {path}")
        if readme:
            print(f"{'rewrote' if write_readme(readme, results) else 'unchanged:'} generated blocks of {readme}")
    return 1 if stale and args.fail_on_stale else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(standalone_parser("python -m benchmarks.report", __doc__, add_args), run, argv)


if __name__ == "__main__":
    sys.exit(main())

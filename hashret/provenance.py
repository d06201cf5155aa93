"""Which code produced a result: the commit, and whether the checkout differed from it.

`git rev-parse HEAD` alone names the last commit, not the code that ran: a figure measured with
uncommitted edits would be stamped with a commit that cannot reproduce it. So every results file
records `git describe --always --dirty` as well, and, when the tracked files differ from HEAD, the
sha256 of `git diff HEAD`: two dirty runs with the same hash ran the same code. Untracked files
are not counted (as for `git describe --dirty`): results, caches and scratch files live there.

Every field is None outside a git checkout (an installed wheel), where there is nothing to ask.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

#: The checkout hashret runs from (the parent of the package folder).
ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str, root: Path | None = None) -> subprocess.CompletedProcess | None:
    root = ROOT if root is None else root
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out if out.returncode == 0 else None


def git_provenance(root: Path | None = None) -> dict[str, Any]:
    """{git_commit, git_describe, dirty, diff_sha256, dirty_files} of the checkout holding `root`.

    `dirty` is True when a tracked file differs from HEAD (staged or not); `diff_sha256` is the
    sha256 of the bytes of `git diff HEAD --binary` then (None when clean); `dirty_files` lists
    the paths that differ.
    """
    none = {"git_commit": None, "git_describe": None, "dirty": None, "diff_sha256": None, "dirty_files": []}
    head = _git("rev-parse", "HEAD", root=root)
    if head is None:
        return none
    # refresh the index first: a file whose mtime changed but whose content did not is not dirty
    _git("update-index", "-q", "--refresh", root=root)
    desc = _git("describe", "--always", "--dirty", "--abbrev=12", root=root)
    names = _git("diff", "HEAD", "--name-only", "-z", root=root)
    files = [f for f in names.stdout.decode(errors="replace").split("\0") if f] if names else []
    dirty = bool(files)
    diff = _git("diff", "HEAD", "--binary", root=root) if dirty else None
    return {
        "git_commit": head.stdout.decode().strip(),
        "git_describe": desc.stdout.decode().strip() if desc else None,
        "dirty": dirty,
        "diff_sha256": hashlib.sha256(diff.stdout).hexdigest() if diff else None,
        "dirty_files": files,
    }


#: Where the committed figures live; only writes there must come from a clean checkout.
RESULTS_DIR = ROOT / "benchmarks" / "results"
ALLOW_DIRTY_FLAG = "--allow-dirty"
ALLOW_DIRTY_HELP = ("write into benchmarks/results/ even though tracked files differ from the last commit; the "
                    "file then records dirty: true, allow_dirty: true and the sha256 of `git diff HEAD` "
                    "(default: refuse, so a committed figure always names the code that produced it)")


def result_fields(allow_dirty: bool = False) -> dict[str, Any]:
    """The provenance a results JSON carries: git_commit, git_describe, dirty, diff_sha256, allow_dirty."""
    p = git_provenance()
    return {"git_commit": p["git_commit"], "git_describe": p["git_describe"], "dirty": p["dirty"],
            "diff_sha256": p["diff_sha256"], "allow_dirty": bool(allow_dirty)}


def _inside(path: str | Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_results_write(out: str | Path | None, allow_dirty: bool = False) -> None:
    """Refuse to write `out` inside RESULTS_DIR from a checkout with uncommitted tracked edits.

    Outside it (a scratch --out) anything goes; with `allow_dirty` the write goes ahead and the
    file says so. Raises BadInput naming how many files differ and the ways out.
    """
    from hashret.errors import BadInput

    results_dir = RESULTS_DIR
    if out is None or allow_dirty or not _inside(out, results_dir):
        return
    p = git_provenance(results_dir if results_dir.is_dir() else results_dir.parent)
    files = p["dirty_files"]
    if p["dirty"]:
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise BadInput(
            f"{out} | the checkout has uncommitted changes to {len(files)} tracked file(s) ({shown}), so these "
            f"results would not name the code that produced them: commit first, write outside {results_dir}, "
            f"or pass {ALLOW_DIRTY_FLAG} (the file then records it with the sha256 of `git diff HEAD`)"
        )

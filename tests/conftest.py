"""Shared fixtures: the Grocery data (skipped on a fresh clone without it, a failure in CI), and
the skip policy of CI.

A skip is a test that did not run, so a skip caused by a missing dependency or file hides a broken
install as well as a missing data set. Under HASHRET_STRICT=1 (set by .ci/run) every skip fails
unless it names hardware this machine lacks (HARDWARE_SKIP: no CUDA GPU, no TensorRT); faiss,
milvus-lite, openvino, onnxruntime, node and the data are dependencies CI must have.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hashret.datasets import default_data_root

DATA_SKIP = "Grocery data not found: set HASHRET_DATA or place it at ../shared/datasets/grocery"


#: The skip reasons CI accepts, as the tests word them: the machine has no GPU or no TensorRT (or
#: has CUDA, where a test of the CUDA-less path cannot run). Anything else is an install mistake.
HARDWARE_SKIP = re.compile(
    r"(tensorrt (not installed|installed but no CUDA GPU visible|and a GPU are available here|is installed here)"
    r"|no CUDA GPU visible|needs a CUDA GPU|this onnxruntime has CUDA)\b"
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def strict() -> bool:
    """HASHRET_STRICT=1: every skip but a hardware one (HARDWARE_SKIP) is a failure."""
    return _flag("HASHRET_STRICT")


def require_data() -> bool:
    """CI sets HASHRET_REQUIRE_DATA=1 (or HASHRET_STRICT=1) so a data-less skip can never hide a broken path."""
    return _flag("HASHRET_REQUIRE_DATA") or strict()


def skip_reason(longrepr) -> str:
    """The reason of a skip report, without pytest's "Skipped: " prefix."""
    reason = str(longrepr[-1]) if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_failure(reason: str) -> str | None:
    """Why a skip with this reason must fail under the environment's policy, or None when it may stay a skip."""
    if strict() and not HARDWARE_SKIP.match(reason):
        return (f"skipped for a reason other than missing GPU/TensorRT hardware, a failure under HASHRET_STRICT "
                f"(install the dependency or data it names): {reason}")
    if require_data() and ("HASHRET_DATA" in reason or "grocery" in reason.lower()):
        return f"data-dependent test skipped in CI: {reason}"
    return None


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    root = default_data_root()
    if root and (Path(root) / "dataset" / "train.txt").is_file() or root and (Path(root) / "train.txt").is_file():
        return Path(root)
    if require_data():
        pytest.fail(f"{DATA_SKIP} (HASHRET_REQUIRE_DATA or HASHRET_STRICT is set, so this is a failure)")
    pytest.skip(DATA_SKIP)


def _fail_skip(report) -> None:
    # an expected failure (xfail) is reported as skipped too, but it ran: it is not a skip
    if report.skipped and not hasattr(report, "wasxfail"):
        why = skip_failure(skip_reason(report.longrepr))
        if why:
            report.outcome = "failed"
            report.longrepr = why


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips in setup (skipif, a fixture's skip) or in the test body (pytest.skip, importorskip)."""
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped as a whole (pytest.skip(allow_module_level=True), importorskip at import)."""
    outcome = yield
    _fail_skip(outcome.get_result())

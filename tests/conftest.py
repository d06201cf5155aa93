"""Shared fixtures: the Grocery data (skipped on a fresh clone without it, a failure in CI)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hashret.datasets import default_data_root

DATA_SKIP = "Grocery data not found: set HASHRET_DATA or place it at ../shared/datasets/grocery"


def require_data() -> bool:
    """CI sets HASHRET_REQUIRE_DATA=1 so a data-less skip can never hide a broken path."""
    return os.environ.get("HASHRET_REQUIRE_DATA", "") not in ("", "0")


@pytest.fixture(scope="session")
def grocery_root() -> Path:
    root = default_data_root()
    if root and (Path(root) / "dataset" / "train.txt").is_file() or root and (Path(root) / "train.txt").is_file():
        return Path(root)
    if require_data():
        pytest.fail(f"{DATA_SKIP} (HASHRET_REQUIRE_DATA is set, so this is a failure)")
    pytest.skip(DATA_SKIP)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under HASHRET_REQUIRE_DATA, any skip that blames missing data (HASHRET_DATA) fails instead."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and require_data():
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "HASHRET_DATA" in reason or "grocery" in reason.lower():
            report.outcome = "failed"
            report.longrepr = f"data-dependent test skipped in CI: {reason}"

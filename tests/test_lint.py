"""`ruff check .` is clean under the project's rule set (pyproject.toml [tool.ruff]): pyflakes
(unused imports and variables, undefined names, redefinitions) and pycodestyle's error subset."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean():
    pytest.importorskip("ruff", reason="ruff is not installed: pip install -e '.[test]'")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ruff check . found:\n{proc.stdout}{proc.stderr}"

"""CI's skip policy (tests/conftest.py): under HASHRET_STRICT only a missing GPU or TensorRT may skip.

Each case runs a real pytest in a subprocess on a small test file beside a copy of our conftest,
so the hooks are exercised the way .ci/run exercises them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = textwrap.dedent('''
    import pytest

    def test_tensorrt_missing():
        pytest.skip("tensorrt not installed: ImportError: No module named 'tensorrt'")

    def test_no_gpu():
        pytest.skip("no CUDA GPU visible: torch CUDA graphs cannot run here")

    def test_import_missing():
        pytest.importorskip("hashret_no_such_module")

    @pytest.mark.skipif(True, reason="Milvus Lite unavailable: import pymilvus/milvus_lite failed (boom)")
    def test_milvus_mark():
        pass

    def test_data_missing():
        pytest.skip("Grocery data not found: set HASHRET_DATA or place it at ../shared/datasets/grocery")

    def test_cuda_word_inside_an_import_error():
        pytest.skip("could not import 'onnxruntime': libcudart.so: no CUDA GPU visible")

    @pytest.mark.xfail(reason="expected", strict=True)
    def test_expected_failure():
        assert False

    def test_passes():
        pass
''')
MODULE_SKIP = 'import pytest\npytest.importorskip("hashret_no_such_module")\n\ndef test_never():\n    pass\n'


def outcomes(tmp_path: Path, **env: str) -> dict[str, str]:
    """Run pytest on the cases with `env` set; {test or module: outcome} from a JSON the conftest's hooks fed."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    (tmp_path / "record.py").write_text(textwrap.dedent('''
        import json, os
        seen = {}
        def pytest_runtest_logreport(report):
            if report.when == "call" or report.outcome != "passed":
                seen[report.nodeid.split("::")[-1]] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        def pytest_collectreport(report):
            if report.outcome != "passed":
                seen[report.nodeid] = report.outcome
        def pytest_sessionfinish(session):
            with open(os.environ["RECORD_TO"], "w") as f:
                json.dump(seen, f)
    '''))
    record = tmp_path / "seen.json"
    full_env = {k: v for k, v in os.environ.items() if k not in ("HASHRET_STRICT", "HASHRET_REQUIRE_DATA")}
    full_env.update(env, RECORD_TO=str(record), PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "record",
                        "--continue-on-collection-errors", "--rootdir", str(tmp_path), str(tmp_path)],
                       cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=300)
    assert record.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(record.read_text())


def test_without_policy_every_skip_stays_a_skip(tmp_path):
    got = outcomes(tmp_path)
    assert {k: v for k, v in got.items() if v != "skipped"} == {"test_expected_failure": "xfailed",
                                                                 "test_passes": "passed"}, got
    assert got["test_milvus_mark"] == got["test_import_missing"] == got["test_module_skip.py"] == "skipped"


def test_require_data_fails_only_the_data_skip(tmp_path):
    got = outcomes(tmp_path, HASHRET_REQUIRE_DATA="1")
    assert got["test_data_missing"] == "failed"
    assert got["test_milvus_mark"] == got["test_import_missing"] == "skipped", got


def test_strict_leaves_only_gpu_and_tensorrt_skips(tmp_path):
    got = outcomes(tmp_path, HASHRET_STRICT="1")
    assert got == {
        "test_tensorrt_missing": "skipped",
        "test_no_gpu": "skipped",
        "test_import_missing": "failed",
        "test_milvus_mark": "failed",
        "test_data_missing": "failed",
        # the hardware words must open the reason: a broken import that mentions CUDA is not a GPU skip
        "test_cuda_word_inside_an_import_error": "failed",
        "test_expected_failure": "xfailed",
        "test_passes": "passed",
        "test_module_skip.py": "failed",
    }, got


@pytest.mark.parametrize("reason, allowed", [
    ("tensorrt not installed: ImportError: x", True),
    ("tensorrt installed but no CUDA GPU visible", True),
    ("needs a CUDA GPU: torch.cuda.is_available() is False here", True),
    ("this onnxruntime has CUDA", True),
    ("no tests/data/gallery-v1-* folders", False),
    ("node is not on PATH: the Node.js client is not tested here", False),
    ("could not import 'faiss': No module named 'faiss'", False),
])
def test_hardware_skip_reasons(reason, allowed):
    from tests.conftest import HARDWARE_SKIP

    assert bool(HARDWARE_SKIP.match(reason)) is allowed

"""With ``CI=true`` a test skipped for a missing system tool fails the run (conftest's hook); other skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent

SAMPLE = """
import pytest

def test_tool_missing():
    pytest.skip("missing system tool or test dependency: frobnicator (apt-get install frobnicator)")

def test_other_skip():
    pytest.skip("only meaningful on Windows")

def test_ok():
    assert True
"""


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            "-c",
            os.devnull,
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_sample.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("ci", "summary", "code"), [(None, "1 passed, 2 skipped", 0), ("true", "1 failed, 1 passed, 1 skipped", 1)]
)
def test_missing_tool_fails_only_in_ci(tmp_path: Path, ci: str | None, summary: str, code: int) -> None:
    result = _run(tmp_path, ci)
    assert result.returncode == code, result.stdout + result.stderr
    assert summary in result.stdout, result.stdout
    if ci:
        assert "CI=true and a required tool is missing" in result.stdout
        assert "frobnicator" in result.stdout

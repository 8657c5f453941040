"""Integration: `flwr run .` with the app declared in pyproject.toml, on Flower's local simulation SuperLink.

The Flower CLI starts a detached SuperLink; the test finds it by its FLWR_HOME-specific database path and
stops it by PID.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from federation import TINY_RUN_CONFIG, pids_matching, stop_pids, tiny_federation

ROOT = Path(__file__).resolve().parents[1]


def _flwr() -> str:
    exe = Path(sys.executable).with_name("flwr")
    if not exe.exists():
        pytest.fail(f"flwr CLI not found next to {sys.executable}; install the project with `make setup`")
    return str(exe)


def _value(v):
    return f'"{v}"' if isinstance(v, str) else str(v)


def test_flwr_run_dot_trains_and_writes_the_run_folder(tmp_path):
    tiny_federation(tmp_path / "data", sites=2, patients_per_site=6)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    # The FAB is built from the project folder: copy the project without local data, venv or caches.
    app = tmp_path / "app"
    shutil.copytree(
        ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", ".pytest_cache", "*.egg-info")
    )
    run_dir = tmp_path / "run"
    overrides = {
        **TINY_RUN_CONFIG,
        "num-server-rounds": 2,
        "run-dir": str(run_dir),
        "sim-data-root": str(tmp_path / "data"),
        "sim-work-root": str(tmp_path / "sites"),
    }
    command = [
        _flwr(),
        "run",
        str(app),
        "--stream",
        "--run-config",
        " ".join(f"{k}={_value(v)}" for k, v in overrides.items()),
        "--federation-config",
        "num-supernodes=2 client-resources-num-cpus=1",
    ]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-3000:]
        assert "Strategy execution finished" in output or "run finished" in output, output[-3000:]
    finally:
        stop_pids(pids_matching("flower-superlink", str(home)))
    assert not pids_matching("flower-superlink", str(home)), "the detached SuperLink is still running"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["run_config"]["model-name"] == "smallcnn"
    assert (run_dir / "model" / "final" / "model.pt").is_file()

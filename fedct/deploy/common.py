"""What the deployment modules share: their error type, the Flower processes' environment, the Flower CLI home."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Environment every Flower process we start gets: no telemetry, no update check, no package installation.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

#: Name of the SuperLink connection in the CLI's config.toml.
CONNECTION = "consortium"


class DeployError(RuntimeError):
    """A deployment step failed; the message says what to check."""


def write_flwr_home(home: Path, *, address: str, ca_cert: Path | None) -> Path:
    """An isolated Flower CLI home whose config.toml names one SuperLink connection: TLS verified against our CA,
    or ``insecure = true`` when ``ca_cert`` is None (local benchmarks only)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    security = (
        "insecure = true" if ca_cert is None else f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}"
    )
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = {json.dumps(address)}\n{security}\n'
    )
    return home


def flower_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) + :data:`FLOWER_ENV` + ``extra``, with this Python's bin on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    env.update(extra)
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def flower_tool(name: str) -> str:
    """Path of a Flower executable next to this Python (the venv), else the name for a PATH lookup."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def toml_value(value: Any) -> str:
    """A run-config or node-config value as TOML text (bool, number, else a quoted string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))

"""The server's resume state (per-round checkpoints and the model bundle are written with :mod:`models.bundle`)."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedct.files import atomic_write_bytes, json_safe

__all__ = ["RunState", "load_run_state", "save_run_state"]


# --- resume state ---------------------------------------------------------------------------------------------

RUN_STATE_FORMAT = "fedct-run-state/1"


@dataclass(frozen=True)
class RunState:
    """Everything a restarted server needs to continue after ``server_round`` (the last completed round)."""

    server_round: int
    global_arrays: dict[str, np.ndarray]
    strategy_scalars: dict[str, Any]
    strategy_arrays: dict[str, dict[str, np.ndarray]]
    run_log: dict[str, Any]
    run_config: dict[str, Any]
    extra: dict[str, Any]


def save_run_state(state_dir: Path, state: RunState) -> Path:
    """Write ``state`` into ``state_dir``: ``round-NNN.npz`` (arrays), then ``state.json`` naming it with its SHA-256.

    Both are written atomically, and ``state.json`` last, so it always names a complete arrays file; older arrays
    files are removed afterwards.
    """
    state_dir = Path(state_dir)
    arrays: dict[str, np.ndarray] = {f"global::{k}": np.asarray(v) for k, v in state.global_arrays.items()}
    for attr, values in state.strategy_arrays.items():
        arrays.update({f"strategy::{attr}::{k}": np.asarray(v) for k, v in values.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    arrays_name = f"round-{state.server_round:03d}.npz"
    atomic_write_bytes(state_dir / arrays_name, data)
    meta = {
        "format": RUN_STATE_FORMAT,
        "round": state.server_round,
        "arrays_file": arrays_name,
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
        "strategy_scalars": state.strategy_scalars,
        "run_log": state.run_log,
        "run_config": state.run_config,
        "extra": state.extra,
    }
    path = atomic_write_bytes(state_dir / "state.json", json.dumps(json_safe(meta), indent=1, default=str).encode())
    for old in state_dir.glob("round-*.npz"):
        if old.name != arrays_name:
            old.unlink(missing_ok=True)
    return path


def load_run_state(state_dir: Path) -> RunState | None:
    """The state written by :func:`save_run_state`, or None when there is none. Temporary files are never read;
    an arrays file whose checksum differs from ``state.json`` is an error naming it."""
    state_dir = Path(state_dir)
    meta_path = state_dir / "state.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != RUN_STATE_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {RUN_STATE_FORMAT!r}")
    arrays_path = state_dir / str(meta["arrays_file"])
    data = arrays_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["arrays_sha256"]:
        raise ValueError(f"{arrays_path} does not match the checksum recorded in {meta_path}; the state is damaged")
    global_arrays: dict[str, np.ndarray] = {}
    strategy_arrays: dict[str, dict[str, np.ndarray]] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for name in npz.files:
            kind, rest = name.split("::", 1)
            if kind == "global":
                global_arrays[rest] = npz[name]
            else:
                attr, key = rest.split("::", 1)
                strategy_arrays.setdefault(attr, {})[key] = npz[name]
    return RunState(
        server_round=int(meta["round"]),
        global_arrays=global_arrays,
        strategy_arrays=strategy_arrays,
        strategy_scalars=dict(meta["strategy_scalars"]),
        run_log=dict(meta["run_log"]),
        run_config=dict(meta["run_config"]),
        extra=dict(meta.get("extra") or {}),
    )

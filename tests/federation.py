"""Shared helpers of the federation tests: a tiny synthetic federation and process clean-up by PID."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from synthetic.hospitals import default_profiles, write_federation

#: Run settings that keep a federated test round to seconds on 2 CPU cores.
TINY_RUN_CONFIG = {
    "model-name": "smallcnn",
    "input-size": "16,16,16",
    "target-spacing-mm": "16.0,16.0,16.0",
    "batch-size": 4,
    "learning-rate": 0.003,
}


def tiny_federation(root: Path, *, sites: int = 2, patients_per_site: int = 8, seed: int = 0) -> Path:
    """Synthetic hospitals with 32x32 images (12 mm pixels, 10 mm slices): real DICOM, small and fast."""
    profiles = [replace(p, rows=32, pixel_spacing_mm=12.0, slice_thickness_mm=10.0) for p in default_profiles(sites)]
    write_federation(root, sites=sites, patients_per_site=patients_per_site, seed=seed, profiles=profiles)
    return root


def pids_matching(*needles: str) -> list[int]:
    """PIDs of processes whose command line contains every needle (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmdline for n in needles) and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def stop_pids(pids: list[int], *, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition: Callable[[], object], *, timeout: float, what: str, poll: float = 0.5) -> object:
    """Poll ``condition`` until truthy; fail naming ``what`` after ``timeout`` seconds (a liveness bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")

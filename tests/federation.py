"""Shared helpers of the federation tests: a tiny synthetic federation and process clean-up by PID."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from fedct.processes import pids_matching, process_tree, stop_processes
from synthetic.hospitals import default_profiles, write_federation

__all__ = ["TINY_RUN_CONFIG", "pids_matching", "process_tree", "stop_pids", "tiny_federation", "wait_until"]

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


def stop_pids(pids: list[int], *, timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL whatever is left (fedct.processes, the one stop helper)."""
    stop_processes(list(pids), grace_s=timeout)


def wait_until(condition: Callable[[], object], *, timeout: float, what: str, poll: float = 0.5) -> object:
    """Poll ``condition`` until truthy; fail naming ``what`` after ``timeout`` seconds (a liveness bound)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")

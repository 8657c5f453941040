"""The preprocessing settings shared by ingestion, training and inference (no torch or MONAI needed to read them).

:mod:`preprocessing.transforms` turns a :class:`PipelineConfig` into MONAI transforms; this module only holds the
settings and their fingerprint, so that a process that only plans work (ingestion's main process, configuration
readers) does not pay the seconds of importing torch + MONAI.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

#: Bump when the meaning of the transforms changes, so caches and models made before are recognised as stale.
#: 3: the series is read straight onto the Orientationd+Spacingd grid (same values, one pass, no full-size copies).
PIPELINE_VERSION = "3"


@dataclass(frozen=True)
class PipelineConfig:
    """Preprocessing parameters shared by ingestion, training and inference."""

    target_spacing_mm: tuple[float, float, float] = (5.0, 5.0, 5.0)
    input_size: tuple[int, int, int] = (64, 64, 48)
    hu_min: float = -1000.0
    hu_max: float = 400.0
    body_threshold_hu: float = -500.0

    def __post_init__(self) -> None:
        if len(self.target_spacing_mm) != 3 or any(s <= 0 for s in self.target_spacing_mm):
            raise ValueError(f"target_spacing_mm must be three positive numbers, got {self.target_spacing_mm}")
        if len(self.input_size) != 3 or any(int(s) < 8 for s in self.input_size):
            raise ValueError(f"input_size must be three integers >= 8, got {self.input_size}")
        if not self.hu_min < self.hu_max:
            raise ValueError(f"hu_min ({self.hu_min}) must be below hu_max ({self.hu_max})")
        if not self.hu_min <= self.body_threshold_hu <= self.hu_max:
            raise ValueError(f"body_threshold_hu ({self.body_threshold_hu}) must lie in [hu_min, hu_max]")

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form, including the pipeline version."""
        return {**asdict(self), "pipeline_version": PIPELINE_VERSION}

    def fingerprint(self) -> str:
        """Short stable hash of the parameters and pipeline version (names cache folders)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

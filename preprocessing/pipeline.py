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


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (issue #20.3): what a scanner, a protocol and a patient's position vary, drawn per sample.

    Intensities are in HU where a clinician would state them and converted to the model's [0, 1] window with the
    pipeline's ``hu_min``/``hu_max``. Each ``*_prob`` is the chance that a sample gets that transform.
    """

    enabled: bool = True
    hu_shift: float = 30.0  #: HU offset range +/- (calibration drift between scanners)
    intensity_scale: float = 0.1  #: relative contrast change +/- (kernel, kVp)
    noise_std: float = 0.02  #: maximum Gaussian noise std, in window units (dose)
    blur_sigma: tuple[float, float] = (0.25, 1.0)  #: Gaussian blur sigma range in voxels (soft kernel)
    sharpen_alpha: tuple[float, float] = (2.0, 10.0)  #: unsharp-mask strength range (sharp kernel)
    rotate_deg: float = 10.0  #: rotation range +/- about each axis, degrees (positioning)
    scale: float = 0.1  #: zoom range +/- (body size, field of view)
    flip_prob: float = 0.5  #: left-right flip
    low_res_zoom: tuple[float, float] = (
        0.5,
        1.0,
    )  #: resolution simulation: down/up-sampling factor range (slice thickness)
    intensity_prob: float = 0.5
    noise_prob: float = 0.3
    blur_prob: float = 0.2
    sharpen_prob: float = 0.1
    affine_prob: float = 0.5
    low_res_prob: float = 0.25

    def __post_init__(self) -> None:
        for name in ("hu_shift", "intensity_scale", "noise_std", "rotate_deg", "scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value)):
                raise ValueError(f"augment {name} must be a number >= 0, got {value!r}")
        if self.intensity_scale >= 1.0 or self.scale >= 0.5:
            raise ValueError(
                f"augment intensity_scale must be < 1 and scale < 0.5, got {self.intensity_scale} and {self.scale}"
            )
        if self.rotate_deg > 45.0:
            raise ValueError(
                f"augment rotate_deg must be <= 45 (a chest CT is never upside down), got {self.rotate_deg}"
            )
        for name, low_min, high_max in (
            ("blur_sigma", 0.0, 5.0),
            ("sharpen_alpha", 0.0, 50.0),
            ("low_res_zoom", 0.1, 1.0),
        ):
            pair = getattr(self, name)
            if len(pair) != 2 or not low_min < float(pair[0]) <= float(pair[1]) <= high_max:
                raise ValueError(
                    f"augment {name} must be (low, high) with {low_min} < low <= high <= {high_max}, got {pair!r}"
                )
        for name in (
            "flip_prob",
            "intensity_prob",
            "noise_prob",
            "blur_prob",
            "sharpen_prob",
            "affine_prob",
            "low_res_prob",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
                raise ValueError(f"augment {name} must be a probability in [0, 1], got {value!r}")

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form (recorded with a model's provenance)."""
        return asdict(self)

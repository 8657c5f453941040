"""Stage 4: HU volume -> model input, as MONAI transforms.

Deterministic transforms come first so that their output can be cached on disk (``cache.py``); random
augmentation runs after the cache, on every epoch. The same :class:`PipelineConfig` is recorded in every
model's provenance so that inference repeats exactly what training saw.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from monai.transforms import (
    CropForegroundd,
    EnsureTyped,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
)

from preprocessing.volume import LoadResampledCTd

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


class AboveThreshold:
    """Picklable foreground selector for ``CropForegroundd`` (the body: voxels above a HU threshold)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold


def deterministic_transforms(cfg: PipelineConfig, *, key: str = "image", hu_key: str | None = None) -> list:
    """Load the series onto the RAS grid at ``target_spacing_mm``, crop to the body, window HU to [0, 1], fix the size.

    The first step (:class:`preprocessing.volume.LoadResampledCTd`) reads the files straight onto the grid that
    ``Orientationd("RAS")`` + ``Spacingd(target_spacing_mm, "bilinear", "border")`` would give, with their values,
    without building the full-resolution volume; ``hu_key`` also keeps that volume (inference draws overlays on it).
    """
    return [
        LoadResampledCTd(keys=key, pixdim=cfg.target_spacing_mm, antialias=False, hu_key=hu_key),
        CropForegroundd(
            keys=key,
            source_key=key,
            select_fn=AboveThreshold(cfg.body_threshold_hu),
            margin=2,
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        ScaleIntensityRanged(keys=key, a_min=cfg.hu_min, a_max=cfg.hu_max, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(keys=key, spatial_size=cfg.input_size, mode="constant", value=0.0),
        EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
    ]


def random_transforms(cfg: PipelineConfig, *, key: str = "image") -> list:
    """Light augmentation for training: left-right flip, intensity scale, noise."""
    del cfg  # same augmentation for every pipeline for now; kept for a stable signature
    return [
        RandFlipd(keys=key, prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys=key, factors=0.05, prob=0.5),
        RandGaussianNoised(keys=key, prob=0.3, std=0.01),
    ]

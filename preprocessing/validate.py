"""Stage 2: headers of one series -> a :class:`ValidatedSeries` whose geometry is known to be a proper volume.

MONAI's and ITK's readers return wrong volumes without error for a missing slice, two series sharing
one folder or a truncated file. We check the invariants a CT volume needs from the headers first, one
invariant per check, each with its own reason code, and only then decode pixels (``volume.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.pixels import get_decoder

from preprocessing.discover import InstanceHeader, Rejection

#: SOP classes this pipeline reads: single-frame CT Image Storage.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class ValidationConfig:
    """Tolerances of the series checks."""

    min_slices: int = 8
    orientation_tolerance: float = 1e-4
    spacing_tolerance: float = 0.01  # relative deviation of one slice gap from the median gap
    tilt_tolerance: float = 1e-3  # sine of the angle between slice normal and stacking direction

    def __post_init__(self) -> None:
        if self.min_slices < 2:
            raise ValueError(f"min_slices must be >= 2, got {self.min_slices}")
        if not 0 < self.spacing_tolerance < 0.5:
            raise ValueError(f"spacing_tolerance must be in (0, 0.5), got {self.spacing_tolerance}")


@dataclass(frozen=True)
class ValidatedSeries:
    """A series whose slices form one regular volume, slices sorted along the slice normal."""

    SeriesInstanceUID: str
    StudyInstanceUID: str
    PatientID: str
    paths: tuple[str, ...]
    Rows: int
    Columns: int
    PixelSpacing: tuple[float, float]
    ImageOrientationPatient: tuple[float, ...]
    first_position: tuple[float, float, float]
    slice_step_mm: float  # signed distance between consecutive sorted slices along the normal (> 0)
    transfer_syntaxes: tuple[str, ...]
    dropped: tuple[Rejection, ...]  # duplicate files of the same SOP instance that were ignored

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape as (Columns, Rows, slices): the array layout ``volume.py`` produces."""
        return (self.Columns, self.Rows, len(self.paths))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along the array axes (column step, row step, slice step)."""
        return (self.PixelSpacing[1], self.PixelSpacing[0], self.slice_step_mm)


class SeriesInvalid(Exception):
    """A series failed one invariant; ``reason`` is the stable code."""

    def __init__(self, reason: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.path = path


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane from ImageOrientationPatient (row direction x column direction)."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def _dedupe(headers: Sequence[InstanceHeader]) -> tuple[list[InstanceHeader], list[Rejection]]:
    kept: dict[str, InstanceHeader] = {}
    dropped: list[Rejection] = []
    for h in headers:
        if h.SOPInstanceUID in kept:
            dropped.append(
                Rejection(h.path, "duplicate_instance", f"same SOPInstanceUID as {os.path.basename(kept[h.SOPInstanceUID].path)}; copy ignored")
            )
        else:
            kept[h.SOPInstanceUID] = h
    return list(kept.values()), dropped


def _check_modality(headers: Sequence[InstanceHeader]) -> None:
    for h in headers:
        if h.Modality != "CT":
            raise SeriesInvalid("not_ct", f"Modality is {h.Modality!r}, only CT is used", h.path)


def _check_sop_class(headers: Sequence[InstanceHeader]) -> None:
    for h in headers:
        if h.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE or h.NumberOfFrames > 1:
            raise SeriesInvalid(
                "unsupported_sop_class", "multi-frame (Enhanced) CT is not supported yet; export single-frame CT", h.path
            )
        if h.SOPClassUID != CT_IMAGE_STORAGE:
            raise SeriesInvalid("unsupported_sop_class", f"SOPClassUID {h.SOPClassUID} is not CT Image Storage", h.path)


def _check_transfer_syntax(headers: Sequence[InstanceHeader]) -> None:
    for h in headers:
        try:
            available = get_decoder(h.TransferSyntaxUID).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise SeriesInvalid(
                "unsupported_transfer_syntax", f"no installed decoder for TransferSyntaxUID {h.TransferSyntaxUID!r}", h.path
            )


def _check_same(headers: Sequence[InstanceHeader], keyword: str) -> None:
    first = getattr(headers[0], keyword)
    for h in headers[1:]:
        if getattr(h, keyword) != first:
            # UIDs are identifiers: say that they differ, not what they are.
            values = "" if keyword.endswith("UID") else f" {getattr(h, keyword)} vs {first}"
            raise SeriesInvalid("inconsistent_geometry", f"{keyword} differs within the series{values}", h.path)


def _check_orientation(headers: Sequence[InstanceHeader], cfg: ValidationConfig) -> None:
    first = np.asarray(headers[0].ImageOrientationPatient)
    for h in headers[1:]:
        if np.max(np.abs(np.asarray(h.ImageOrientationPatient) - first)) > cfg.orientation_tolerance:
            raise SeriesInvalid("inconsistent_geometry", "ImageOrientationPatient differs between slices", h.path)


def validate_series(headers: Sequence[InstanceHeader], *, config: ValidationConfig | None = None) -> ValidatedSeries:
    """Check the invariants of a CT volume and return the slices sorted along the normal.

    Raises :class:`SeriesInvalid` for the first invariant that fails.
    """
    cfg = config or ValidationConfig()
    if not headers:
        raise SeriesInvalid("too_few_slices", "series has no slices")
    unique, dropped = _dedupe(headers)
    _check_modality(unique)
    _check_sop_class(unique)
    _check_transfer_syntax(unique)
    _check_same(unique, "StudyInstanceUID")
    _check_same(unique, "Rows")
    _check_same(unique, "Columns")
    _check_same(unique, "PixelSpacing")
    _check_orientation(unique, cfg)
    if len(unique) < cfg.min_slices:
        raise SeriesInvalid("too_few_slices", f"{len(unique)} slices; at least {cfg.min_slices} are needed for a volume")

    normal = slice_normal(unique[0].ImageOrientationPatient)
    positions = np.asarray([h.ImagePositionPatient for h in unique], dtype=float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    ordered = [unique[i] for i in order]
    along = along[order]
    positions = positions[order]

    gaps = np.diff(along)
    duplicate = np.flatnonzero(gaps < 1e-3)
    if duplicate.size:
        i = int(duplicate[0])
        raise SeriesInvalid(
            "duplicate_position",
            f"two different instances at the same position {along[i]:.2f} mm "
            f"({ordered[i].path} and {ordered[i + 1].path}): two series share one SeriesInstanceUID?",
            ordered[i + 1].path,
        )

    # Consecutive positions must move along the normal only; a sideways shift means gantry tilt.
    steps = np.diff(positions, axis=0)
    sideways = np.linalg.norm(steps - np.outer(gaps, normal), axis=1) / np.maximum(gaps, 1e-9)
    if np.max(sideways) > cfg.tilt_tolerance:
        i = int(np.argmax(sideways))
        raise SeriesInvalid(
            "gantry_tilt",
            f"slice positions are not stacked along the slice normal (shear {sideways[i]:.3f}); gantry tilt is not supported",
            ordered[i + 1].path,
        )

    median_gap = float(np.median(gaps))
    deviation = np.abs(gaps - median_gap) / median_gap
    if np.max(deviation) > cfg.spacing_tolerance:
        i = int(np.argmax(deviation))
        ratio = gaps[i] / median_gap
        multiple = round(ratio)
        # A gap is "missing slices" only when it is close to a whole multiple of the spacing; past
        # 0.5 / spacing_tolerance steps every gap would pass that test, so such a gap is just non-uniform.
        tolerance = cfg.spacing_tolerance * multiple
        if ratio > 1.5 and tolerance < 0.5 and abs(ratio - multiple) <= tolerance:
            missing = int(multiple) - 1
            raise SeriesInvalid(
                "missing_slices",
                f"{missing} slice(s) missing between {along[i]:.2f} mm and {along[i + 1]:.2f} mm "
                f"(gap {gaps[i]:.2f} mm, regular spacing {median_gap:.2f} mm)",
                ordered[i + 1].path,
            )
        raise SeriesInvalid(
            "non_uniform_spacing",
            f"slice gap {gaps[i]:.2f} mm at {along[i]:.2f} mm differs from the regular {median_gap:.2f} mm",
            ordered[i + 1].path,
        )

    first = ordered[0]
    return ValidatedSeries(
        SeriesInstanceUID=first.SeriesInstanceUID,
        StudyInstanceUID=first.StudyInstanceUID,
        PatientID=first.PatientID,
        paths=tuple(h.path for h in ordered),
        Rows=first.Rows,
        Columns=first.Columns,
        PixelSpacing=first.PixelSpacing,
        ImageOrientationPatient=first.ImageOrientationPatient,
        first_position=first.ImagePositionPatient,
        slice_step_mm=median_gap,
        transfer_syntaxes=tuple(sorted({h.TransferSyntaxUID for h in ordered})),
        dropped=tuple(dropped),
    )

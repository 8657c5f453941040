"""Stage 2: headers of one series -> a :class:`ValidatedSeries` whose geometry is known to be a proper volume.

MONAI's and ITK's readers return wrong volumes without error for a missing slice, two series sharing
one folder or a truncated file. We check the invariants a CT volume needs from the headers first, one
invariant per check, each with its own reason code, and only then decode pixels (``volume.py``).

A series is either N single-frame CT files or the frames of Enhanced CT file(s): discovery gives one
header per frame, so both go through the same checks; :attr:`ValidatedSeries.frames` says which frame
of each file a slice is. Localizer (scout) images mixed into a series are dropped, not refused.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydicom.pixels import get_decoder

from preprocessing.discover import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    MULTI_FRAME_CT_SOP_CLASSES,
    InstanceHeader,
    Rejection,
    file_states_fingerprint,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "LOCALIZER_IMAGE_TYPES",
    "SeriesInvalid",
    "ValidatedSeries",
    "ValidationConfig",
    "as_series",
    "series_by_study",
    "series_to_dict",
    "slice_normal",
    "validate_series",
]

#: ImageType / FrameType values that mark a localizer (scout, topogram, surview) rather than a slice.
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW"})


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
    dropped: tuple[Rejection, ...]  # duplicate copies and localizer images that were left out
    #: For a multi-frame series: the 0-based frame index in ``paths[k]`` of slice k (a path repeats once per
    #: frame). Empty when every path is a single-frame file.
    frames: tuple[int, ...] = ()
    AccessionNumber: str = ""
    #: Read each file's header once: where the header pass found each slice's PixelData (same order as ``paths``),
    #: the pixel format all slices share, and the fingerprint of the files' (path, size, mtime) the headers were read
    #: from. The pixel pass reads the pixel bytes straight from there while the files are unchanged; empty when a
    #: slice does not qualify (compressed, multi-frame, formats differing between slices): then it parses each file.
    pixel_offsets: tuple[int, ...] = ()
    pixel_format: tuple[tuple[str, int | float | str], ...] = ()
    file_states: str = ""

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
    """Keep the first file of each SOP instance (and frame); a copy is dropped, recorded once per file."""
    kept: dict[tuple[str, int | None], InstanceHeader] = {}
    dropped: dict[str, Rejection] = {}
    for h in headers:
        key = (h.SOPInstanceUID, h.frame)
        if key in kept and kept[key].path != h.path:
            if h.path not in dropped:
                dropped[h.path] = Rejection(
                    h.path,
                    "duplicate_instance",
                    f"same SOPInstanceUID as {os.path.basename(kept[key].path)}; copy ignored",
                )
        elif key not in kept:
            kept[key] = h
    unique = [h for h in kept.values() if h.path not in dropped]
    return unique, list(dropped.values())


def _is_localizer_type(h: InstanceHeader) -> bool:
    return any(v.upper() in LOCALIZER_IMAGE_TYPES for v in h.ImageType)


def _says_axial(h: InstanceHeader) -> bool:
    return any(v.upper() == "AXIAL" for v in h.ImageType)


def _image_type(h: InstanceHeader) -> str:
    return "\\".join(h.ImageType) or "(none)"


def _stack_orientation(axial: Sequence[InstanceHeader]) -> np.ndarray:
    """The orientation most of the AXIAL images have (the first one's on a tie)."""
    counts = Counter(tuple(np.round(h.ImageOrientationPatient, 4)) for h in axial)
    return np.asarray(counts.most_common(1)[0][0], dtype=float)


def _drop_localizers(
    headers: Sequence[InstanceHeader], cfg: ValidationConfig
) -> tuple[list[InstanceHeader], list[Rejection]]:
    """Separate localizer (scout) images from the stack.

    A localizer is an image whose ImageType says LOCALIZER (or a vendor's SCOUT/TOPOGRAM/SURVIEW), or one whose
    ImageType does not say AXIAL, while the stack's does, and whose orientation differs from the axial stack's.
    Dropping is safe: what remains is checked like any series (a dropped slice of the stack would leave a gap).
    """
    stack: list[InstanceHeader] = []
    dropped: list[Rejection] = []
    for h in headers:
        if _is_localizer_type(h):
            message = f"{h.where}: ImageType {_image_type(h)} marks a localizer, not a slice of the volume"
            dropped.append(Rejection(h.path, "localizer", message))
        else:
            stack.append(h)
    axial = [h for h in stack if _says_axial(h)]
    if not axial:
        return stack, dropped
    reference = _stack_orientation(axial)
    kept = []
    for h in stack:
        off_axis = np.max(np.abs(np.asarray(h.ImageOrientationPatient) - reference)) > cfg.orientation_tolerance
        if off_axis and not _says_axial(h):
            message = (
                f"{h.where}: orientation differs from the axial stack; ImageType {_image_type(h)} does not say AXIAL"
            )
            dropped.append(Rejection(h.path, "localizer", message))
        else:
            kept.append(h)
    return kept, dropped


def _check_modality(headers: Sequence[InstanceHeader]) -> None:
    for h in headers:
        if h.Modality != "CT":
            raise SeriesInvalid("not_ct", f"Modality is {h.Modality!r}, only CT is used", h.path)


def _check_sop_class(headers: Sequence[InstanceHeader]) -> None:
    for h in headers:
        if h.SOPClassUID in MULTI_FRAME_CT_SOP_CLASSES and h.frame is not None:
            continue  # one frame of an Enhanced CT file, read frame by frame
        if h.SOPClassUID in MULTI_FRAME_CT_SOP_CLASSES:
            message = "Enhanced CT header without a frame index: read it with read_headers"
            raise SeriesInvalid("unsupported_sop_class", message, h.path)
        if h.NumberOfFrames > 1:
            raise SeriesInvalid(
                "unsupported_sop_class",
                f"CT Image Storage instance with NumberOfFrames {h.NumberOfFrames}: only single-frame CT Image Storage "
                "and Enhanced CT are read",
                h.path,
            )
        if h.SOPClassUID != CT_IMAGE_STORAGE:
            raise SeriesInvalid(
                "unsupported_sop_class", f"SOPClassUID {h.SOPClassUID} is not CT Image Storage or Enhanced CT", h.path
            )


def _check_single_or_multi_frame(headers: Sequence[InstanceHeader]) -> None:
    single = [h for h in headers if h.frame is None]
    if single and len(single) != len(headers):
        raise SeriesInvalid(
            "mixed_sop_classes", "series mixes single-frame CT files and frames of Enhanced CT files", single[0].path
        )


def _check_one_stack(headers: Sequence[InstanceHeader]) -> None:
    """Frames of several stacks or time points would interleave into one wrong volume."""
    for keyword in ("StackID", "TemporalPositionIndex"):
        values = {getattr(h, keyword) for h in headers}
        if len(values) > 1:
            other = next(h for h in headers if getattr(h, keyword) != getattr(headers[0], keyword))
            raise SeriesInvalid(
                "multiple_stacks",
                f"frames belong to {len(values)} different {keyword} values (e.g. {other.where}): several stacks or time "
                "points, not one volume",
                other.path,
            )


def _check_rescale_type(headers: Sequence[InstanceHeader]) -> None:
    for h in headers:
        if h.RescaleType and h.RescaleType.upper() != "HU":
            raise SeriesInvalid(
                "not_hu",
                f"{h.where}: RescaleType is {h.RescaleType!r}: rescaled values are not Hounsfield units (a derived map?)",
                h.path,
            )


def _check_transfer_syntax(headers: Sequence[InstanceHeader]) -> None:
    known: dict[str, bool] = {}
    for h in headers:
        if h.TransferSyntaxUID not in known:
            try:
                known[h.TransferSyntaxUID] = get_decoder(h.TransferSyntaxUID).is_available
            except (NotImplementedError, ValueError):
                known[h.TransferSyntaxUID] = False
        if not known[h.TransferSyntaxUID]:
            raise SeriesInvalid(
                "unsupported_transfer_syntax",
                f"no installed decoder for TransferSyntaxUID {h.TransferSyntaxUID!r}",
                h.path,
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


def _describe(h: InstanceHeader) -> str:
    return h.path if h.frame is None else f"{h.path} frame {h.frame + 1}"


def _same_position_hint(a: InstanceHeader, b: InstanceHeader) -> str:
    if a.path == b.path:
        return "one multi-frame file holds several stacks or time points, not one volume"
    return "two series share one SeriesInstanceUID?"


def validate_series(headers: Sequence[InstanceHeader], *, config: ValidationConfig | None = None) -> ValidatedSeries:
    """Check the invariants of a CT volume and return the slices sorted along the normal.

    Raises :class:`SeriesInvalid` for the first invariant that fails.
    """
    cfg = config or ValidationConfig()
    if not headers:
        raise SeriesInvalid("too_few_slices", "series has no slices")
    unique, dropped = _dedupe(headers)
    unique, localizers = _drop_localizers(unique, cfg)
    dropped += localizers
    _check_modality(unique)
    _check_sop_class(unique)
    _check_single_or_multi_frame(unique)
    _check_one_stack(unique)
    _check_transfer_syntax(unique)
    _check_rescale_type(unique)
    _check_same(unique, "StudyInstanceUID")
    _check_same(unique, "Rows")
    _check_same(unique, "Columns")
    _check_same(unique, "PixelSpacing")
    _check_orientation(unique, cfg)
    if len(unique) < cfg.min_slices:
        besides = f" ({len(localizers)} localizer image(s) left out)" if localizers else ""
        message = f"{len(unique)} slices{besides}; at least {cfg.min_slices} are needed for a volume"
        raise SeriesInvalid("too_few_slices", message)

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
            f"two different images at the same position {along[i]:.2f} mm "
            f"({_describe(ordered[i])} and {_describe(ordered[i + 1])}): {_same_position_hint(ordered[i], ordered[i + 1])}",
            ordered[i + 1].path,
        )

    # Consecutive positions must move along the normal only; a sideways shift means gantry tilt.
    steps = np.diff(positions, axis=0)
    sideways = np.linalg.norm(steps - np.outer(gaps, normal), axis=1) / np.maximum(gaps, 1e-9)
    if np.max(sideways) > cfg.tilt_tolerance:
        i = int(np.argmax(sideways))
        raise SeriesInvalid(
            "gantry_tilt",
            f"slice positions are not stacked along the slice normal (shear {sideways[i]:.3f} at {ordered[i + 1].where}); "
            "gantry tilt is not supported",
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
                f"(gap {gaps[i]:.2f} mm before {ordered[i + 1].where}, regular spacing {median_gap:.2f} mm)",
                ordered[i + 1].path,
            )
        raise SeriesInvalid(
            "non_uniform_spacing",
            f"slice gap {gaps[i]:.2f} mm at {along[i]:.2f} mm (before {ordered[i + 1].where}) differs from the regular "
            f"{median_gap:.2f} mm",
            ordered[i + 1].path,
        )

    first = ordered[0]
    pixel_offsets, pixel_format, file_states = _pixel_plan(ordered)
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
        frames=tuple(h.frame for h in ordered) if first.frame is not None else (),  # type: ignore[misc]
        AccessionNumber=first.AccessionNumber,
        pixel_offsets=pixel_offsets,
        pixel_format=pixel_format,
        file_states=file_states,
    )


def _pixel_plan(
    ordered: Sequence[InstanceHeader],
) -> tuple[tuple[int, ...], tuple[tuple[str, int | float | str], ...], str]:
    """What the pixel pass needs to skip parsing the headers again: every slice a single-frame file with a direct-read
    offset and one pixel format for all; else nothing (the pixel pass parses each file)."""
    first = ordered[0]
    if first.pixel_offset < 0 or any(h.pixel_offset < 0 or h.pixel_format != first.pixel_format for h in ordered):
        return (), (), ""
    states = file_states_fingerprint([(h.path, h.file_size, h.file_mtime_ns) for h in ordered])
    return tuple(h.pixel_offset for h in ordered), first.pixel_format, states


def as_series(value: ValidatedSeries | Mapping[str, Any]) -> ValidatedSeries:
    """Accept a :class:`ValidatedSeries` or its ``asdict`` form (what datasets and manifests carry)."""
    if isinstance(value, ValidatedSeries):
        return value
    fields = dict(value)
    fields["dropped"] = ()
    for key in ("paths", "PixelSpacing", "ImageOrientationPatient", "first_position", "transfer_syntaxes"):
        fields[key] = tuple(fields[key])
    fields["frames"] = tuple(int(f) for f in fields.get("frames", ()))
    fields["pixel_offsets"] = tuple(int(o) for o in fields.get("pixel_offsets", ()))
    fields["pixel_format"] = tuple((str(k), v) for k, v in fields.get("pixel_format", ()))
    return ValidatedSeries(**fields)


def series_to_dict(series: ValidatedSeries) -> dict[str, Any]:
    """JSON-friendly form of a :class:`ValidatedSeries` (dropped-file records left out).

    Sequences are lists, as ``manifest.json`` reads them back: the dataset cache key hashes this dict,
    so the form ingestion caches under must equal the form training loads. ``frames`` is written only for
    a multi-frame series, so that single-frame series keep the dict (and cache key) they had before it existed.
    """
    d = asdict(series)
    d["dropped"] = []
    for key in ("frames", "pixel_offsets", "pixel_format", "file_states"):
        if not d[key]:  # absent when empty: the dict (and cache key) of such a series stays what it was
            del d[key]
    if "pixel_format" in d:
        d["pixel_format"] = [list(pair) for pair in d["pixel_format"]]
    return {key: list(value) if isinstance(value, tuple) else value for key, value in d.items()}


def series_by_study(series: Sequence[ValidatedSeries]) -> dict[str, list[ValidatedSeries]]:
    """Group validated series by StudyInstanceUID, each study's series in order of preference.

    The one rule for a study with several series, shared by ingestion and prediction: the series with the most
    slices first (the thinnest reconstruction), ties broken by SeriesInstanceUID so every run picks the same one.
    A caller uses the first series that reads and lists the others as ``additional_series``. Studies come
    sorted by StudyInstanceUID.
    """
    grouped: dict[str, list[ValidatedSeries]] = defaultdict(list)
    for s in series:
        grouped[s.StudyInstanceUID].append(s)
    return {
        study_uid: sorted(grouped[study_uid], key=lambda s: (-len(s.paths), s.SeriesInstanceUID))
        for study_uid in sorted(grouped)
    }

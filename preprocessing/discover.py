"""Stage 1: DICOM folder -> per-instance headers, grouped by SeriesInstanceUID.

Only headers are read here (``stop_before_pixels=True``); pixel data is decoded later, after the
series passed validation. Every file that cannot take part gets a :class:`Rejection` with a stable
reason code; nothing is silently skipped.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

#: Names that are routinely found next to DICOM exports and are not images.
NON_IMAGE_NAMES = frozenset({"DICOMDIR", "LOCKFILE", "VERSION", "labels.csv"})


@dataclass(frozen=True)
class Rejection:
    """A file or series that was not used, with a stable ``reason`` code and a sentence for people."""

    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class InstanceHeader:
    """The header attributes of one single-frame image that the later stages need."""

    path: str
    SOPClassUID: str
    SOPInstanceUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str
    PatientID: str
    Modality: str
    TransferSyntaxUID: str
    Rows: int
    Columns: int
    PixelSpacing: tuple[float, float]
    ImageOrientationPatient: tuple[float, float, float, float, float, float]
    ImagePositionPatient: tuple[float, float, float]
    SliceThickness: float | None
    NumberOfFrames: int
    file_size: int
    file_mtime_ns: int


#: Attributes a slice must have to be placed in a volume (one missing -> ``missing_attribute``).
REQUIRED_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
)


def iter_files(root: Path) -> Iterator[Path]:
    """Yield every regular file under ``root`` in a stable (sorted) order, hidden files excluded."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def read_header(path: Path, *, root: Path) -> InstanceHeader | Rejection:
    """Read one file's header; return its :class:`InstanceHeader` or the :class:`Rejection` saying why not."""
    rel = str(path.relative_to(root))
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return Rejection(rel, "not_dicom", "not a DICOM file (no DICM preamble or File Meta)")
    except Exception as exc:  # pydicom raises many types for damaged files
        return Rejection(rel, "unreadable", f"DICOM header could not be parsed: {type(exc).__name__}: {exc}")
    if "SOPClassUID" not in ds and "Modality" not in ds:
        return Rejection(rel, "not_dicom", "no SOPClassUID or Modality: not a DICOM image")
    missing = [kw for kw in REQUIRED_KEYWORDS if kw not in ds or ds[kw].value in (None, "")]
    if missing:
        return Rejection(rel, "missing_attribute", f"required attribute(s) missing: {', '.join(missing)}")
    try:
        stat = path.stat()
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else ""
        return InstanceHeader(
            path=str(path),
            SOPClassUID=str(ds.SOPClassUID),
            SOPInstanceUID=str(ds.SOPInstanceUID),
            SeriesInstanceUID=str(ds.SeriesInstanceUID),
            StudyInstanceUID=str(ds.StudyInstanceUID),
            PatientID=str(ds.get("PatientID", "")),
            Modality=str(ds.Modality),
            TransferSyntaxUID=transfer_syntax,
            Rows=int(ds.Rows),
            Columns=int(ds.Columns),
            PixelSpacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            ImageOrientationPatient=tuple(float(v) for v in ds.ImageOrientationPatient),  # type: ignore[arg-type]
            ImagePositionPatient=tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
            SliceThickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
            NumberOfFrames=int(ds.get("NumberOfFrames") or 1),
            file_size=stat.st_size,
            file_mtime_ns=stat.st_mtime_ns,
        )
    except (TypeError, ValueError, IndexError) as exc:
        return Rejection(rel, "unreadable", f"malformed geometry attribute: {exc}")


@dataclass(frozen=True)
class Discovery:
    """Result of scanning a folder: headers grouped by series, and every file that was refused."""

    root: str
    series: dict[str, tuple[InstanceHeader, ...]]
    rejected: tuple[Rejection, ...]
    n_files: int


def discover(root: Path, *, progress: bool = False) -> Discovery:
    """Scan ``root`` recursively and group the DICOM headers by SeriesInstanceUID."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM input folder does not exist: {root}")
    files = [p for p in iter_files(root) if p.name not in NON_IMAGE_NAMES]
    grouped: dict[str, list[InstanceHeader]] = defaultdict(list)
    rejected: list[Rejection] = []
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="headers", unit="file", leave=False)
    for path in iterator:
        result = read_header(path, root=root)
        if isinstance(result, Rejection):
            rejected.append(result)
        else:
            grouped[result.SeriesInstanceUID].append(result)
    return Discovery(
        root=str(root),
        series={uid: tuple(headers) for uid, headers in sorted(grouped.items())},
        rejected=tuple(rejected),
        n_files=len(files),
    )

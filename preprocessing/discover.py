"""Stage 1: DICOM folder -> per-instance headers, grouped by SeriesInstanceUID.

Only headers are read here (``stop_before_pixels=True``); pixel data is decoded later, after the
series passed validation. Every file that cannot take part gets a :class:`Rejection` with a stable
reason code; nothing is silently skipped:

- ``not_dicom``: not DICOM at all (no preamble/File Meta, and no SOPClassUID when read anyway);
- ``unreadable``: DICOM whose header cannot be parsed or whose geometry attributes are malformed;
- ``dicomdir``: a DICOMDIR (media directory) under another name than ``DICOMDIR``;
- ``not_ct``: another modality (MR, RT, SR, waveforms, presentation states, SEG...): one rejection per
  series, naming its first file and how many files it has;
- ``not_image``: a CT object that holds no image (raw data, vendor non-image objects), also per series;
- ``missing_attribute``: a CT image without an attribute needed to place it in a volume.

Files without preamble and File Meta (old archives, some PACS exports) are read with ``force=True``;
their transfer syntax is the encoding pydicom detected (implicit VR little endian for almost all).
An Enhanced CT file gives one :class:`InstanceHeader` per frame, with the frame's own geometry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

#: Transfer syntaxes whose pixel data the pixel pass can read straight from the file at the offset the header pass
#: found (native, not deflated: the offset of a deflated file is one in the inflated stream).
DIRECT_READ_SYNTAXES = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian})
#: Attributes of the Image Pixel module and the modality LUT the pixel pass needs, kept from the header pass.
PIXEL_FORMAT_KEYWORDS = (
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "RescaleSlope",
    "RescaleIntercept",
)
#: Optional attributes kept with them when present (padding pixels become air).
PIXEL_PADDING_KEYWORDS = ("PixelPaddingValue", "PixelPaddingRangeLimit")

#: Names that are routinely found next to DICOM exports and are not images (skipped unread).
NON_IMAGE_NAMES = frozenset({"DICOMDIR", "LOCKFILE", "VERSION", "labels.csv"})

#: SOP classes of CT images: single-frame CT Image Storage and the multi-frame Enhanced CT classes.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
MULTI_FRAME_CT_SOP_CLASSES = frozenset({ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE})
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE}) | MULTI_FRAME_CT_SOP_CLASSES
#: SOP class of a DICOMDIR.
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"

#: File-level reasons reported once per series (first file + count) rather than once per file.
PER_SERIES_REASONS = frozenset({"not_ct", "not_image"})


@dataclass(frozen=True)
class Rejection:
    """A file or series that was not used, with a stable ``reason`` code and a sentence for people."""

    path: str
    reason: str
    message: str


@dataclass(frozen=True)
class InstanceHeader:
    """The header attributes of one image (a single-frame file, or one frame of a multi-frame file)."""

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
    ImageType: tuple[str, ...] = ()  # FrameType of the frame for multi-frame files
    RescaleType: str = ""  # "" when absent (HU for CT)
    frame: int | None = None  # 0-based frame index (DICOM frame number - 1) in a multi-frame file; None: single-frame
    StackID: str = ""  # FrameContentSequence of a multi-frame file: which stack ...
    TemporalPositionIndex: int | None = None  # ... and which time point the frame belongs to
    AccessionNumber: str = ""  # links a study to labels.csv when the site keys labels by accession
    #: Byte offset of the PixelData element in the file (as the header pass found it), -1 when the pixel pass must
    #: parse the file again (compressed or deflated data, multi-frame files, a format the direct read does not take).
    pixel_offset: int = -1
    #: ``(keyword, value)`` of :data:`PIXEL_FORMAT_KEYWORDS` (+ padding when present): what the pixel pass needs to
    #: turn the bytes at ``pixel_offset`` into HU without parsing the header again; () when ``pixel_offset`` is -1.
    pixel_format: tuple[tuple[str, int | float | str], ...] = ()

    @property
    def where(self) -> str:
        """The file's name, with the frame number for a frame of a multi-frame file (for messages)."""
        name = os.path.basename(self.path)
        return name if self.frame is None else f"{name} frame {self.frame + 1}"


#: Identity attributes every image needs to be grouped into a series.
_IDENTITY_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "Rows",
    "Columns",
)

#: Attributes a slice must have to be placed in a volume (one missing -> ``missing_attribute``).
REQUIRED_KEYWORDS = _IDENTITY_KEYWORDS + ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient")

#: Top-level attributes a multi-frame CT file must have; its geometry is in the functional groups.
REQUIRED_MULTI_FRAME_KEYWORDS = _IDENTITY_KEYWORDS + ("NumberOfFrames", "PerFrameFunctionalGroupsSequence")

#: (functional group sequence, attribute) of each frame's geometry in a multi-frame file.
FRAME_GEOMETRY = (
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PlanePositionSequence", "ImagePositionPatient"),
)


def iter_files(root: Path) -> Iterator[Path]:
    """Yield every regular file under ``root`` in a stable (sorted) order, hidden files excluded."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _inferred_transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax matching the encoding pydicom parsed the dataset with (implicit VR LE by default)."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is False and little is False:
        return ExplicitVRBigEndian
    if implicit is False:
        return ExplicitVRLittleEndian
    return ImplicitVRLittleEndian


def read_dicom(path: str | Path, *, stop_before_pixels: bool = False) -> Dataset:
    """``pydicom.dcmread``, retried with ``force=True`` for a file without preamble / File Meta.

    A forced read counts as DICOM only when it yields a SOPClassUID; otherwise :class:`InvalidDicomError`
    is raised. When the File Meta has no TransferSyntaxUID (always so without File Meta) it is set to the
    encoding pydicom detected, so that the pixel data can be decoded.
    """
    return read_dicom_header(path)[0] if stop_before_pixels else _read_dicom(path, stop_before_pixels=False)[0]


def read_dicom_header(path: str | Path) -> tuple[Dataset, int]:
    """The header (:func:`read_dicom` with ``stop_before_pixels``) and the byte offset where parsing stopped: the start
    of the PixelData element when the file has one (pydicom rewinds to it), else the end of the file."""
    return _read_dicom(path, stop_before_pixels=True)


def _read_dicom(path: str | Path, *, stop_before_pixels: bool) -> tuple[Dataset, int]:
    with open(path, "rb") as fh:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            fh.seek(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # pydicom warns about every oddity of a non-DICOM file
                    ds = pydicom.dcmread(
                        fh,
                        stop_before_pixels=stop_before_pixels,
                        force=True,
                        defer_size=4096 if stop_before_pixels else None,
                    )
                    sop_class = UID(str(ds["SOPClassUID"].value)) if "SOPClassUID" in ds else None
            except Exception as exc:  # whatever a non-DICOM file makes the parser do
                raise InvalidDicomError(f"not DICOM, even read without File Meta: {type(exc).__name__}") from exc
            if sop_class is None or not sop_class.is_valid:
                raise InvalidDicomError("no DICM preamble or File Meta, and no SOPClassUID when read anyway") from None
        position = fh.tell()
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _inferred_transfer_syntax(ds)
    return ds, position


def _pixel_location(ds: Dataset, position: int) -> tuple[int, tuple[tuple[str, int | float | str], ...]]:
    """``(pixel_offset, pixel_format)`` of a single-frame file whose pixels the pixel pass can read directly,
    else ``(-1, ())``: only native monochrome data of 8/16/32 bits with RescaleSlope/Intercept (no Modality LUT
    Sequence) qualifies; anything else is parsed again by the pixel pass, with all its checks."""
    if str(ds.file_meta.TransferSyntaxUID) not in DIRECT_READ_SYNTAXES or "ModalityLUTSequence" in ds:
        return -1, ()
    try:
        values: dict[str, int | float | str] = {}
        for keyword in PIXEL_FORMAT_KEYWORDS:
            value = ds.get(keyword)
            if value in (None, ""):
                return -1, ()
            if keyword == "PhotometricInterpretation":
                values[keyword] = str(value).strip()
            elif keyword in ("RescaleSlope", "RescaleIntercept"):
                values[keyword] = float(value)
            else:
                values[keyword] = int(value)
        for keyword in PIXEL_PADDING_KEYWORDS:
            if ds.get(keyword) not in (None, ""):
                values[keyword] = int(ds[keyword].value)
    except (TypeError, ValueError):
        return -1, ()
    if (
        values["BitsAllocated"] not in (8, 16, 32)
        or values["SamplesPerPixel"] != 1
        or int(ds.get("NumberOfFrames") or 1) != 1
    ):
        return -1, ()
    if not 1 <= int(values["BitsStored"]) <= int(values["BitsAllocated"]) or values["PixelRepresentation"] not in (
        0,
        1,
    ):
        return -1, ()
    return position, tuple(values.items())


def file_state_fingerprint(paths: Sequence[str]) -> str:
    """Hash of (path, size, mtime) of each file: changes when any file is replaced or edited."""
    return file_states_fingerprint([(path, *_state(path)) for path in paths])


def _state(path: str) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def file_states_fingerprint(states: Sequence[tuple[str, int, int]]) -> str:
    """:func:`file_state_fingerprint` of ``(path, size, mtime_ns)`` already known (e.g. from the header pass)."""
    digest = hashlib.sha256()
    for path, size, mtime_ns in states:
        digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _sop_class_name(uid: str) -> str:
    return UID(uid).name if uid else "no SOPClassUID"


def _functional_item(ds: Dataset, frame_item: Dataset | None, sequence: str) -> Dataset | None:
    """The item of functional group ``sequence`` for one frame: per-frame first, then shared; None if neither."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for source in (frame_item, shared[0] if shared else None):
        if source is not None and source.get(sequence):
            return source[sequence].value[0]
    return None


def frame_functional_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """Item of functional group ``sequence`` (e.g. PlanePositionSequence) of 0-based ``frame``: per-frame, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frame_item = per_frame[frame] if per_frame is not None and frame < len(per_frame) else None
    return _functional_item(ds, frame_item, sequence)


def _classify(ds: Dataset, rel: str) -> Rejection | None:
    """Refuse what is not a CT image before asking for geometry; None for a (would-be) CT image."""
    sop_class = str(ds.get("SOPClassUID") or "")
    media_class = str(ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if MEDIA_STORAGE_DIRECTORY_STORAGE in (sop_class, media_class) or "DirectoryRecordSequence" in ds:
        message = "a DICOMDIR (media directory), not an image; the files it lists are scanned themselves"
        return Rejection(rel, "dicomdir", message)
    modality = str(ds.get("Modality") or "").strip()
    if not sop_class and not modality:
        return Rejection(rel, "not_dicom", "no SOPClassUID or Modality: not a DICOM image")
    if modality and modality != "CT":
        return Rejection(rel, "not_ct", f"Modality is {modality!r} ({_sop_class_name(sop_class)}): only CT is used")
    if not modality and sop_class not in CT_SOP_CLASSES:
        return Rejection(rel, "not_ct", f"no Modality, and {_sop_class_name(sop_class)} is not a CT image class")
    if sop_class and sop_class not in CT_SOP_CLASSES and "Rows" not in ds:
        return Rejection(rel, "not_image", f"{_sop_class_name(sop_class)} object holds no image (Modality CT)")
    return None


def _missing(ds: Dataset, keywords: tuple[str, ...]) -> list[str]:
    return [kw for kw in keywords if kw not in ds or ds[kw].value in (None, "")]


def _common(ds: Dataset, path: Path, transfer_syntax: str) -> dict[str, Any]:
    stat = path.stat()
    return {
        "path": str(path),
        "SOPClassUID": str(ds.SOPClassUID),
        "SOPInstanceUID": str(ds.SOPInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "PatientID": str(ds.get("PatientID", "")),
        "AccessionNumber": str(ds.get("AccessionNumber", "") or ""),
        "Modality": str(ds.Modality),
        "TransferSyntaxUID": transfer_syntax,
        "Rows": int(ds.Rows),
        "Columns": int(ds.Columns),
        "NumberOfFrames": int(ds.get("NumberOfFrames") or 1),
        "file_size": stat.st_size,
        "file_mtime_ns": stat.st_mtime_ns,
    }


def _image_type(value: Any) -> tuple[str, ...]:
    if value in (None, ""):
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in values)


def _thickness(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None


def _frame_headers(ds: Dataset, path: Path, rel: str, transfer_syntax: str) -> tuple[InstanceHeader, ...] | Rejection:
    """One header per frame of an Enhanced CT file, geometry from the (per-frame or shared) functional groups."""
    n_frames = int(ds.NumberOfFrames)
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if n_frames < 1 or len(per_frame) != n_frames:
        message = f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for NumberOfFrames {n_frames}"
        return Rejection(rel, "unreadable", message)
    common = _common(ds, path, transfer_syntax)
    headers = []
    for frame, frame_item in enumerate(per_frame):
        values: dict[str, Any] = {}
        for sequence, keyword in FRAME_GEOMETRY:
            item = _functional_item(ds, frame_item, sequence)
            if item is None or item.get(keyword) in (None, ""):
                message = f"required attribute missing: {keyword} ({sequence}) of frame {frame + 1}"
                return Rejection(rel, "missing_attribute", message)
            values[keyword] = item[keyword].value
        content = _functional_item(ds, frame_item, "FrameContentSequence")
        temporal = content.get("TemporalPositionIndex") if content is not None else None
        measures = _functional_item(ds, frame_item, "PixelMeasuresSequence")
        frame_type = _functional_item(ds, frame_item, "CTImageFrameTypeSequence")
        transformation = _functional_item(ds, frame_item, "PixelValueTransformationSequence")
        headers.append(
            InstanceHeader(
                **common,
                PixelSpacing=(float(values["PixelSpacing"][0]), float(values["PixelSpacing"][1])),
                ImageOrientationPatient=tuple(float(v) for v in values["ImageOrientationPatient"]),  # type: ignore[arg-type]
                ImagePositionPatient=tuple(float(v) for v in values["ImagePositionPatient"]),  # type: ignore[arg-type]
                SliceThickness=_thickness(measures.get("SliceThickness") if measures is not None else None),
                ImageType=_image_type(frame_type.get("FrameType") if frame_type is not None else ds.get("ImageType")),
                RescaleType=str((transformation or ds).get("RescaleType") or "").strip(),
                frame=frame,
                StackID=str(content.get("StackID") or "").strip() if content is not None else "",
                TemporalPositionIndex=int(temporal) if temporal not in (None, "") else None,
            )
        )
    return tuple(headers)


def _read(path: Path, root: Path) -> tuple[tuple[InstanceHeader, ...] | Rejection, str]:
    """Headers of one file, or its rejection, with the SeriesInstanceUID (\"\" if unknown) to group rejections by."""
    rel = str(path.relative_to(root))
    try:
        ds, position = read_dicom_header(path)
    except InvalidDicomError:
        return Rejection(rel, "not_dicom", "not a DICOM file (no DICM preamble or File Meta, and no SOPClassUID)"), ""
    except Exception as exc:  # pydicom raises many types for damaged files
        return Rejection(rel, "unreadable", f"DICOM header could not be parsed: {type(exc).__name__}: {exc}"), ""
    try:
        series = str(ds.get("SeriesInstanceUID") or "")
        rejection = _classify(ds, rel)
        if rejection is not None:
            return rejection, series
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        if str(ds.SOPClassUID) in MULTI_FRAME_CT_SOP_CLASSES:
            missing = _missing(ds, REQUIRED_MULTI_FRAME_KEYWORDS)
            if missing:
                return Rejection(
                    rel, "missing_attribute", f"required attribute(s) missing: {', '.join(missing)}"
                ), series
            return _frame_headers(ds, path, rel, transfer_syntax), series
        missing = _missing(ds, REQUIRED_KEYWORDS)
        if missing:
            return Rejection(rel, "missing_attribute", f"required attribute(s) missing: {', '.join(missing)}"), series
        header = InstanceHeader(
            **_common(ds, path, transfer_syntax),
            PixelSpacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            ImageOrientationPatient=tuple(float(v) for v in ds.ImageOrientationPatient),  # type: ignore[arg-type]
            ImagePositionPatient=tuple(float(v) for v in ds.ImagePositionPatient),  # type: ignore[arg-type]
            SliceThickness=_thickness(ds.get("SliceThickness")),
            ImageType=_image_type(ds.get("ImageType")),
            RescaleType=str(ds.get("RescaleType") or "").strip(),
        )
        offset, pixel_format = _pixel_location(ds, position)
        if offset >= 0:
            header = dataclasses.replace(header, pixel_offset=offset, pixel_format=pixel_format)
        return (header,), series
    except (TypeError, ValueError, IndexError, AttributeError, KeyError) as exc:
        return Rejection(rel, "unreadable", f"malformed attribute: {type(exc).__name__}: {exc}"), ""


def read_headers(path: Path, *, root: Path) -> tuple[InstanceHeader, ...] | Rejection:
    """Read one file's header(s): one :class:`InstanceHeader` per frame of an Enhanced CT file, else one; or the
    :class:`Rejection` saying why not."""
    return _read(Path(path), Path(root))[0]


def read_header(path: Path, *, root: Path) -> InstanceHeader | Rejection:
    """Read one single-frame file's header; return its :class:`InstanceHeader` or the :class:`Rejection` saying why not.

    Raises ``ValueError`` for a multi-frame (Enhanced CT) file: use :func:`read_headers` for those.
    """
    result = read_headers(path, root=root)
    if isinstance(result, Rejection):
        return result
    if len(result) != 1 or result[0].frame is not None:
        raise ValueError(f"{path} is a multi-frame file ({len(result)} frames): use read_headers")
    return result[0]


@dataclass(frozen=True)
class Discovery:
    """Result of scanning a folder: headers grouped by series, and every file that was refused."""

    root: str
    series: dict[str, tuple[InstanceHeader, ...]]
    rejected: tuple[Rejection, ...]
    n_files: int


def _per_series(rejections: list[tuple[Rejection, str]]) -> list[Rejection]:
    """Merge the ``not_ct``/``not_image`` rejections of one series into one naming its first file and the count."""
    groups: dict[tuple[str, str], list[Rejection]] = defaultdict(list)
    for rejection, series in rejections:
        if rejection.reason in PER_SERIES_REASONS and series:
            groups[(rejection.reason, series)].append(rejection)
    merged = []
    for rejection, series in rejections:
        group = groups.get((rejection.reason, series)) if rejection.reason in PER_SERIES_REASONS and series else None
        if group is None:
            merged.append(rejection)
        elif group[0] is rejection:
            extra = f"; {len(group)} files of this series skipped" if len(group) > 1 else ""
            merged.append(Rejection(rejection.path, rejection.reason, rejection.message + extra))
    return merged


def discover(root: Path, *, progress: bool = False) -> Discovery:
    """Scan ``root`` recursively and group the DICOM headers by SeriesInstanceUID."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM input folder does not exist: {root}")
    files = [p for p in iter_files(root) if p.name not in NON_IMAGE_NAMES]
    grouped: dict[str, list[InstanceHeader]] = defaultdict(list)
    rejected: list[tuple[Rejection, str]] = []
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="headers", unit="file", leave=False)
    for path in iterator:
        result, series = _read(path, root)
        if isinstance(result, Rejection):
            rejected.append((result, series))
        else:
            for header in result:
                grouped[header.SeriesInstanceUID].append(header)
    return Discovery(
        root=str(root),
        series={uid: tuple(headers) for uid, headers in sorted(grouped.items())},
        rejected=tuple(_per_series(rejected)),
        n_files=len(files),
    )

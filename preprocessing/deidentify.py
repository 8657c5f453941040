"""De-identify DICOM images for hand-over to a research environment (DICOM PS3.15 Annex E), by allow-list.

**Every attribute that is not explicitly kept is removed** — at every nesting level, whether the attribute is
in the profile table, retired, unknown to the dictionary or private. The kept set (:data:`KEPT_ATTRIBUTES`) is
what the pipeline needs to rebuild the CT volume and a model may use (image pixel module, geometry, rescale,
acquisition and reconstruction parameters, the Enhanced CT functional groups that carry them, equipment make and
model) plus what the two options in use keep:

* **Retain Longitudinal Temporal Information with Modified Dates** (code 113107): the date/time pairs of study,
  series, acquisition, content and instance creation, AcquisitionDateTime and the Enhanced CT frame date-times
  are moved back by one per-patient offset (1..365 days plus 0..86399 seconds, keyed by the site key and the
  original PatientID), so every interval between them is kept exactly; UTC offsets are dropped. A date without
  its time is shifted as if at midnight (it may then differ by one day from a paired one). Every other date and
  time is removed; PatientBirthDate is emptied.
* **Retain Patient Characteristics** (code 113108), restricted to PatientSex (M/F/O only), PatientAge (ages above
  89 years written as ``090Y``), PatientSize (rounded to 1 cm) and PatientWeight (rounded to 1 kg).

Replaced: PatientName and PatientID become the site pseudonym of the original PatientID (the one ``fedct ingest``
uses, with the same fallback to the StudyInstanceUID); every kept instance UID (Study/Series/SOP Instance,
FrameOfReference, references, concatenation, dimension organisation) becomes
``generate_uid(entropy_srcs=[HMAC-SHA256(site_key, uid)])``: consistent across files and re-runs, unrelated for
another key. Standard UIDs (SOP classes) are kept. AccessionNumber, StudyID, ReferringPhysicianName and other
Type 2 attributes are written empty. File Meta Information is rebuilt (MediaStorageSOPInstanceUID replaced,
SourceApplicationEntityTitle dropped), the preamble is zeroed.

Kept text is checked: a kept string attribute (LO, SH, ST, ...) that contains a UID of the original file, any
UID-like text, a URL or e-mail address, or a value of an identifying attribute (PN values, PatientID,
AccessionNumber, any text attribute listed in Table E.1-1) is removed. CS/DS/IS/AS/TM/DA values must match their
VR's form or the attribute goes.

**The profile table is not typed here.** :func:`profile_table` reads DICOM PS3.15 Table E.1-1 (Basic Profile
column, standard edition :data:`PROFILE_TABLE_EDITION`) from the ``dicom-anonymizer`` package, which generates it
from the standard's own tables. It is a second guard: no attribute the table lists may be kept verbatim unless one
of the options above keeps it (checked before the first file is read), so a later edit of the kept set cannot
silently retain a table attribute.

Pixels: Secondary Capture images, images whose ImageType says ``SCREEN SAVE``, CT images whose ImageType starts
``DERIVED\\SECONDARY`` (dose screens, screenshots, annotated reformats; MR derived maps stay allowed),
BurnedInAnnotation = YES and RecognizableVisualFeatures = YES are refused. Bits above BitsStored in native pixel
data (where overlays used to live) are cleared — set to the sign extension for signed data, so readers that ignore
BitsStored see the same values — without changing any stored value (padding values written in the full words are
kept); compressed pixel data with such bits set is refused. Overlay (60xx), curve (50xx) groups and icon images go
with the rest.

What can still leak: text burned into the pixels of an ordinary image that declares nothing (no header rule can see
it); the face and other rare anatomy in the volume itself (a head CT can be rendered into a recognisable face); the
kept acquisition parameters, equipment make and model (a rare scanner narrows down the site); patient age, sex,
size and weight (the option keeps them, coarsened); and private attributes when ``keep_private_tags`` is set.

``DeidResult.files_skipped`` names *input* paths, which may themselves contain identifiers: it is a report for the
site, not something to hand over with the data.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import hashlib
import hmac
import importlib
import io
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version as _package_version
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from fedct.files import atomic_write_bytes
from preprocessing.deid import Pseudonymizer

__all__ = [
    "DEIDENTIFICATION_CODES",
    "KEPT_ATTRIBUTES",
    "PROFILE_TABLE_EDITION",
    "SKIP_REASONS",
    "DeidResult",
    "DeidentificationRefused",
    "ProfileEntry",
    "date_shift_days",
    "deidentify_dataset",
    "deidentify_folder",
    "new_uid",
    "profile_table",
    "time_shift_seconds",
]

#: Version of these rules, written into DeidentificationMethod.
RULES_VERSION = "fedct deidentify v2 (allow-list)"

#: Edition of DICOM PS3.15 whose Table E.1-1 :func:`profile_table` reads, and the module that ships it.
PROFILE_TABLE_EDITION = "2026c"
_PROFILE_TABLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
_PROFILE_TABLE_PACKAGE = "dicom-anonymizer"

#: Largest backwards date shift in days (the shift is 1..MAX_DATE_SHIFT_DAYS days plus 0..86399 s into the past).
MAX_DATE_SHIFT_DAYS = 365

#: Ages above this many years are written as ``090Y``.
MAX_REPORTED_AGE_YEARS = 89

# --- the allow-list -------------------------------------------------------------------------------------------
# How a kept attribute is treated; anything not named in KEPT_ATTRIBUTES is removed.
VERBATIM = "keep"  # kept as it is, after a check of its value's form (and, for text, of what it contains)
SEQUENCE = "sequence"  # kept; its items are filtered by the same allow-list
NEW_UID = "uid"  # instance UID: replaced by the keyed UID
CLASS_UID = "class_uid"  # standard UID kept, any other replaced by the keyed UID
DATE = "date"  # DA of a date/time pair: shifted with its TM
TIME = "time"  # TM of a date/time pair: shifted with its DA, removed without it
DATETIME = "datetime"  # DT: shifted, UTC offset dropped
PATIENT_CHARACTERISTIC = "patient"  # PatientSex / PatientAge / PatientSize / PatientWeight: checked and coarsened

_IMAGE_PIXEL = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "PixelAspectRatio",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "NumberOfFrames",
    "FrameIncrementPointer",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "PresentationLUTShape",
    "BurnedInAnnotation",
    "RecognizableVisualFeatures",
)
_GEOMETRY = (
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "PatientPosition",
    "PatientOrientation",
    "TablePosition",
)
_RESCALE_AND_WINDOW = (
    "RescaleIntercept",
    "RescaleSlope",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
)
_SERIES_AND_IMAGE = (
    "SpecificCharacterSet",
    "ImageType",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "AcquisitionNumber",
    "BodyPartExamined",
    "Laterality",
    "ImageLaterality",
    "ContentQualification",
    "Manufacturer",
    "ManufacturerModelName",
)
_CT_ACQUISITION = (
    "KVP",
    "DataCollectionDiameter",
    "ReconstructionDiameter",
    "DistanceSourceToDetector",
    "DistanceSourceToPatient",
    "GantryDetectorTilt",
    "TableHeight",
    "RotationDirection",
    "ExposureTime",
    "XRayTubeCurrent",
    "Exposure",
    "ExposureInuAs",
    "FilterType",
    "GeneratorPower",
    "FocalSpots",
    "ConvolutionKernel",
    "RevolutionTime",
    "SingleCollimationWidth",
    "TotalCollimationWidth",
    "TableSpeed",
    "TableFeedPerRotation",
    "SpiralPitchFactor",
    "CTDIvol",
    "ScanOptions",
    "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient",
    "AcquisitionType",
    "TubeAngle",
    "ConstantVolumeFlag",
    "FluoroscopyFlag",
    "DistanceSourceToDataCollectionCenter",
    "ReconstructionAlgorithm",
    "ConvolutionKernelGroup",
    "ReconstructionFieldOfView",
    "ReconstructionPixelSpacing",
    "ReconstructionAngle",
    "ImageFilter",
    "ExposureTimeInms",
    "XRayTubeCurrentInmA",
    "ExposureInmAs",
    "ExposureModulationType",
    "FilterMaterial",
)
_MULTI_FRAME = (
    "FrameType",
    "InStackPositionNumber",
    "StackID",
    "TemporalPositionIndex",
    "DimensionIndexValues",
    "FrameAcquisitionNumber",
    "FrameAcquisitionDuration",
    "DimensionIndexPointer",
    "FunctionalGroupPointer",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
    "ConcatenationFrameOffsetNumber",
    "ReferencedFrameNumber",
)
_SEQUENCES = (
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "PixelMeasuresSequence",
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
    "CTImageFrameTypeSequence",
    "FrameContentSequence",
    "CTAcquisitionTypeSequence",
    "CTAcquisitionDetailsSequence",
    "CTGeometrySequence",
    "CTReconstructionSequence",
    "CTExposureSequence",
    "CTXRayDetailsSequence",
    "CTPositionSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "ReferencedImageSequence",
    "SourceImageSequence",
)
_INSTANCE_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "ReferencedSOPInstanceUID",
    "ConcatenationUID",
    "SOPInstanceUIDOfConcatenationSource",
    "DimensionOrganizationUID",
    "SynchronizationFrameOfReferenceUID",
    "IrradiationEventUID",
)
_CLASS_UIDS = ("SOPClassUID", "ReferencedSOPClassUID")

#: Date/time pairs shifted together (Retain Longitudinal Temporal Information with Modified Dates).
DATE_TIME_PAIRS: tuple[tuple[str, str], ...] = (
    ("StudyDate", "StudyTime"),
    ("SeriesDate", "SeriesTime"),
    ("AcquisitionDate", "AcquisitionTime"),
    ("ContentDate", "ContentTime"),
    ("InstanceCreationDate", "InstanceCreationTime"),
)
_DATETIMES = ("AcquisitionDateTime", "FrameAcquisitionDateTime", "FrameReferenceDateTime")
_PATIENT_CHARACTERISTICS = ("PatientSex", "PatientAge", "PatientSize", "PatientWeight")

#: keyword -> how it is kept. Everything else is removed.
KEPT_ATTRIBUTES: dict[str, str] = {
    **{
        kw: VERBATIM
        for kw in (*_IMAGE_PIXEL, *_GEOMETRY, *_RESCALE_AND_WINDOW, *_SERIES_AND_IMAGE, *_CT_ACQUISITION, *_MULTI_FRAME)
    },
    **{kw: SEQUENCE for kw in _SEQUENCES},
    **{kw: NEW_UID for kw in _INSTANCE_UIDS},
    **{kw: CLASS_UID for kw in _CLASS_UIDS},
    **{date: DATE for date, _ in DATE_TIME_PAIRS},
    **{tm: TIME for _, tm in DATE_TIME_PAIRS},
    **{kw: DATETIME for kw in _DATETIMES},
    **{kw: PATIENT_CHARACTERISTIC for kw in _PATIENT_CHARACTERISTICS},
}

#: Type 2 attributes written empty at the top level when the allow-list removed them (or they were absent).
_TYPE2_EMPTY = (
    "PatientBirthDate",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "Manufacturer",
)

#: Codes written into DeidentificationMethodCodeSequence (scheme DCM, PS3.16 CID 7050).
DEIDENTIFICATION_CODES: tuple[tuple[str, str], ...] = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

#: Reason codes in ``DeidResult.files_skipped``.
SKIP_REASONS = (
    "not_dicom",  # no DICOM file preamble / meta information
    "unreadable",  # DICOM, but the file could not be parsed or ends early (truncated pixel data)
    "dicomdir",  # a media directory: it indexes the original, identifying folder
    "not_an_image",  # no pixel data (SR, presentation state, ...): content not reviewed for this profile
    "burned_in_annotation",  # BurnedInAnnotation = YES: the pixels themselves identify the patient
    "secondary_capture",  # Secondary Capture image: burned-in text (dose screens, scans) is the norm
    "secondary_image",  # ImageType SCREEN SAVE, or DERIVED\\SECONDARY on a CT: screenshots, dose screens, burned-in text likely
    "recognizable_features",  # RecognizableVisualFeatures = YES (e.g. a face rendering)
    "pixel_high_bits",  # compressed pixel data with bits above BitsStored set (overlay in the pixels)
    "missing_uid",  # no Study/Series/SOP Instance UID to build the output path from
    "duplicate_sop_instance",  # a second file with a SOP Instance UID already written in this run
    "deid_error",  # an attribute or the pixel data could not be decoded or rewritten
)

#: Secondary Capture Image Storage and the four Multi-frame Secondary Capture classes.
_SECONDARY_CAPTURE_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.7", *(f"1.2.840.10008.5.1.4.1.1.7.{i}" for i in range(1, 5))}
)
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# CT Image, Enhanced CT Image, Legacy Converted Enhanced CT Image Storage
_CT_CLASS_PREFIXES = ("1.2.840.10008.5.1.4.1.1.2",)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "UR", "AE", "PN"})
_NUMBER_TEXT = {"DS": re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?"), "IS": re.compile(r"[+-]?\d{1,12}")}
_CS = re.compile(r"[A-Za-z0-9 _.+\-]{0,16}")  # DICOM allows A-Z 0-9 space _; lower case and .+- seen in the field
_AGE = re.compile(r"(\d{3})([DWMY])")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?")
_DT = re.compile(r"(\d{8})(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?")
# five or more numeric components: a DICOM UID or OID inside text (version strings such as 1.2.3 stay)
_UID_IN_TEXT = re.compile(r"(?<![\d.])[0-2](\.\d+){4,}")
_URL_OR_MAIL = re.compile(r"(://|www\.|@[\w-]+\.)", re.IGNORECASE)
_MIN_SECRET_LENGTH = 4


@dataclass(frozen=True)
class ProfileEntry:
    """One row of Table E.1-1: ``tag`` (after ``mask``, for repeating groups such as 60xx) and the Basic Profile action."""

    tag: int
    mask: int
    action: str

    def matches(self, tag: int) -> bool:
        return (int(tag) & self.mask) == self.tag

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) if self.mask == 0xFFFFFFFF else ""


_TABLE_CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}


@functools.cache
def profile_table() -> tuple[ProfileEntry, ...]:
    """DICOM PS3.15 Table E.1-1 (edition :data:`PROFILE_TABLE_EDITION`), Basic Profile column, as shipped by dicom-anonymizer."""
    module = importlib.import_module(_PROFILE_TABLE_MODULE)
    entries: list[ProfileEntry] = []
    for name, action in _TABLE_CATEGORIES.items():
        for row in getattr(module, name):
            if len(row) == 2:
                mask = 0xFFFFFFFF
            elif len(row) == 4:
                mask = (row[2] << 16) | row[3]
            else:  # pragma: no cover - a format change of the package
                raise ValueError(f"{_PROFILE_TABLE_MODULE}.{name}: unexpected row {row!r}")
            entries.append(ProfileEntry(((row[0] << 16) | row[1]) & mask, mask, action))
    if len(entries) < 500:  # pragma: no cover - the 2026c table has 650+ rows
        raise ValueError(f"{_PROFILE_TABLE_MODULE} holds only {len(entries)} rows of Table E.1-1")
    return tuple(entries)


def profile_table_source() -> str:
    """Where :func:`profile_table` comes from, e.g. ``dicom-anonymizer 2.1.0 (PS3.15 2026c Table E.1-1)``."""
    return f"{_PROFILE_TABLE_PACKAGE} {_package_version(_PROFILE_TABLE_PACKAGE)} (PS3.15 {PROFILE_TABLE_EDITION} Table E.1-1)"


@functools.cache
def _profile_actions_by_tag() -> dict[int, str]:
    return {e.tag: e.action for e in profile_table() if e.mask == 0xFFFFFFFF}


def _resolve(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"KEPT_ATTRIBUTES names an unknown DICOM keyword: {keyword!r}")
    return Tag(tag)


@functools.cache
def _rules_by_tag() -> dict[int, str]:
    """KEPT_ATTRIBUTES by tag; refuses a verbatim keep of an attribute that Table E.1-1 lists."""
    table = _profile_actions_by_tag()
    rules: dict[int, str] = {}
    for keyword, rule in KEPT_ATTRIBUTES.items():
        tag = int(_resolve(keyword))
        if rule == VERBATIM and tag in table:
            raise ValueError(f"{keyword} is in Table E.1-1 ({table[tag]}) and may not be kept verbatim")
        rules[tag] = rule
    return rules


class DeidentificationRefused(ValueError):
    """The dataset cannot be de-identified by these rules; ``reason`` is a SKIP_REASONS code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DeidResult:
    """What :func:`deidentify_folder` did. ``files_skipped`` holds (input path relative to the input
    folder, reason code); those paths may contain identifiers and stay at the site."""

    files_written: int
    files_skipped: tuple[tuple[str, str], ...]
    studies: int
    seconds: float


# ---------------------------------------------------------------------------------------------------
# Keyed, deterministic replacements
# ---------------------------------------------------------------------------------------------------


def _check_key(site_key: bytes) -> bytes:
    Pseudonymizer(site_key)  # raises ValueError for keys shorter than 32 bytes
    return bytes(site_key)


def _derive_uid(site_key: bytes, uid: str) -> str:
    digest = hmac.new(site_key, f"uid:{uid}".encode(), hashlib.sha256).hexdigest()
    return str(generate_uid(entropy_srcs=[digest]))


def new_uid(site_key: bytes, uid: str) -> str:
    """The replacement for ``uid``: the same for the same key and UID, unrelated for another key."""
    return _derive_uid(_check_key(site_key), str(uid).strip(" \0"))


def date_shift_days(site_key: bytes, patient_id: str) -> int:
    """Whole days (negative, -1..-365) of the shift of every date/time of the patient with original ``patient_id``."""
    digest = hmac.new(_check_key(site_key), f"date-shift:{patient_id}".encode(), hashlib.sha256).digest()
    return -(1 + int.from_bytes(digest[:8], "big") % MAX_DATE_SHIFT_DAYS)


def time_shift_seconds(site_key: bytes, patient_id: str) -> int:
    """Seconds (negative, 0..-86399) added to :func:`date_shift_days` for the patient's date/time shift."""
    digest = hmac.new(_check_key(site_key), f"time-shift:{patient_id}".encode(), hashlib.sha256).digest()
    return -(int.from_bytes(digest[:8], "big") % 86400)


def _parse_date(value: str) -> _dt.date | None:
    text = value.strip().replace(".", "")  # old YYYY.MM.DD accepted
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return _dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _parse_time(value: str) -> tuple[_dt.time, str] | None:
    """TM -> (time, fraction text incl. the dot, or '')."""
    match = _TM.fullmatch(value.strip())
    if not match:
        return None
    hh, mm, ss, frac = match.group(1), match.group(2) or "00", match.group(3) or "00", match.group(4) or ""
    try:
        return _dt.time(int(hh), int(mm), min(int(ss), 59)), frac
    except ValueError:
        return None


def _shift(moment: _dt.datetime, offset: _dt.timedelta) -> _dt.datetime | None:
    try:
        return moment + offset
    except OverflowError:
        return None


def _shift_datetime(value: str, offset: _dt.timedelta) -> str:
    """Shift a DT value; the UTC offset suffix is dropped; '' when it cannot be parsed."""
    match = _DT.fullmatch(value.strip())
    if not match:
        return ""
    day = _parse_date(match.group(1))
    if day is None:
        return ""
    if match.group(2) is None:  # date only
        moved = _shift(_dt.datetime.combine(day, _dt.time()), offset)
        return moved.strftime("%Y%m%d") if moved else ""
    try:
        clock = _dt.time(int(match.group(2)), int(match.group(3) or 0), min(int(match.group(4) or 0), 59))
    except ValueError:
        return ""
    moved = _shift(_dt.datetime.combine(day, clock), offset)
    return moved.strftime("%Y%m%d%H%M%S") + (match.group(5) or "") if moved else ""


def _cap_age(value: str) -> str:
    match = _AGE.fullmatch(value.strip())
    if match is None:
        return ""
    if match.group(2) == "Y" and int(match.group(1)) > MAX_REPORTED_AGE_YEARS:
        return f"{MAX_REPORTED_AGE_YEARS + 1:03d}Y"
    return value.strip()


def _is_standard_uid(value: str) -> bool:
    """True for UIDs the DICOM standard itself defines (SOP classes, transfer syntaxes, ...)."""
    return UID(value).name != value


# ---------------------------------------------------------------------------------------------------
# Dataset rules
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    key: bytes
    pseudonymizer: Pseudonymizer
    patient_pseudonym: str
    offset: _dt.timedelta
    keep_private: bool
    secrets: frozenset[str]  # upper-cased identifying values of the original file; kept text must not contain them


def _values(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _walk(ds: Dataset) -> Iterator:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _walk(item)


def _collect_secrets(ds: Dataset) -> frozenset[str]:
    """Values that identify: non-standard UIDs, person names, and text of any attribute Table E.1-1 lists."""
    table = _profile_actions_by_tag()
    found: set[str] = set()
    elements = list(_walk(ds))
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        elements += list(meta)
    for elem in elements:
        try:
            vr = elem.VR
            values = _values(elem.value) if vr != "SQ" else []
        except Exception:  # an undecodable value: nothing to collect from it
            continue
        for value in values:
            if vr == "UI":
                text = str(value).strip(" \0")
                if text and not _is_standard_uid(text):
                    found.add(text)
            elif vr == "PN":
                found.update(p for p in re.split(r"[\^=]", str(value)) if p.strip())
            elif vr in _TEXT_VRS and int(elem.tag) in table:
                found.add(str(value))
    return frozenset(s.strip().upper() for s in found if len(s.strip()) >= _MIN_SECRET_LENGTH)


def _text_is_clean(text: str, ctx: _Context) -> bool:
    upper = text.upper()
    if _UID_IN_TEXT.search(text) or _URL_OR_MAIL.search(text):
        return False
    return not any(secret in upper for secret in ctx.secrets)


def _value_is_well_formed(vr: str, value: object, ctx: _Context) -> bool:
    if value is None or value == "":
        return True
    if vr == "CS":
        return _CS.fullmatch(str(value)) is not None
    if vr in _NUMBER_TEXT:
        return _NUMBER_TEXT[vr].fullmatch(str(value).strip()) is not None
    if vr in _TEXT_VRS:
        return _text_is_clean(str(value), ctx)
    if vr in ("UN", "DA", "TM", "DT", "AS", "UI"):
        return False  # never kept verbatim: undecoded bytes, or handled by their own rule
    return True  # binary numbers, AT, OB/OW pixel data


def _keep_verbatim(ds: Dataset, tag: BaseTag, ctx: _Context) -> None:
    elem = ds[tag]
    if elem.VR == "SQ":
        del ds[tag]
        return
    if elem.VR in ("OB", "OW", "OF", "OD", "OL", "OV") or tag in _PIXEL_TAGS:
        return
    if not all(_value_is_well_formed(elem.VR, v, ctx) for v in _values(elem.value)):
        del ds[tag]


def _replace_uids(ds: Dataset, tag: BaseTag, ctx: _Context, *, keep_standard: bool) -> None:
    elem = ds[tag]
    if elem.VR != "UI":
        del ds[tag]
        return

    def replace(value: object) -> str:
        text = str(value).strip(" \0")
        if not text or (keep_standard and _is_standard_uid(text)):
            return text
        return _derive_uid(ctx.key, text)

    values = [replace(v) for v in _values(elem.value)]
    elem.value = values if len(values) > 1 else (values[0] if values else "")


def _patient_characteristic(ds: Dataset, tag: BaseTag, ctx: _Context) -> None:
    keyword = keyword_for_tag(tag)
    raw = str(ds[tag].value or "").strip()
    if keyword == "PatientSex":
        ds[tag].value = raw if raw in ("M", "F", "O") else ""
        return
    if keyword == "PatientAge":
        value = _cap_age(raw)
    else:  # PatientSize in m, PatientWeight in kg: plausible and coarsened, else removed
        try:
            number = float(raw)
        except ValueError:
            number = float("nan")
        if keyword == "PatientSize":
            value = f"{round(number, 2):.2f}" if 0.2 <= number <= 2.8 else ""
        else:
            value = str(max(1, round(number))) if 0.2 <= number <= 500 else ""
    if value:
        ds[tag].value = value
    else:
        del ds[tag]


def _shift_pairs(ds: Dataset, ctx: _Context) -> None:
    """Shift each kept DA (with its TM) by the patient's offset; a TM without its DA is removed."""
    for date_kw, time_kw in DATE_TIME_PAIRS:
        date_elem = ds[date_kw] if date_kw in ds else None
        time_elem = ds[time_kw] if time_kw in ds else None
        day = _parse_date(str(date_elem.value or "")) if date_elem is not None and date_elem.VR == "DA" else None
        clock = _parse_time(str(time_elem.value or "")) if time_elem is not None and time_elem.VR == "TM" else None
        if day is None:
            for kw in (date_kw, time_kw):
                if kw in ds:
                    del ds[kw]
            continue
        moved = _shift(_dt.datetime.combine(day, clock[0] if clock else _dt.time()), ctx.offset)
        if moved is None:
            del ds[date_kw]
            if time_kw in ds:
                del ds[time_kw]
            continue
        ds[date_kw].value = moved.strftime("%Y%m%d")
        if clock is not None:
            ds[time_kw].value = moved.strftime("%H%M%S") + clock[1]
        elif time_kw in ds:
            del ds[time_kw]


def _clean_private(ds: Dataset, tag: BaseTag, ctx: _Context, depth: int) -> None:
    elem = ds[tag]
    if elem.VR == "SQ":
        for item in elem.value or ():
            _clean(item, ctx, depth + 1)
    elif elem.VR in _TEXT_VRS and not all(_text_is_clean(str(v), ctx) for v in _values(elem.value)):
        del ds[tag]


def _clean(ds: Dataset, ctx: _Context, depth: int = 0) -> None:
    """Remove every attribute the allow-list does not keep; apply the keep rules (recursively)."""
    rules = _rules_by_tag()
    for tag in list(ds.keys()):
        tag = Tag(tag)
        if tag.is_private:
            if ctx.keep_private and tag in ds:
                _clean_private(ds, tag, ctx, depth)
            elif tag in ds:
                del ds[tag]
            continue
        rule = rules.get(int(tag))
        if rule is None or tag.element == 0:
            del ds[tag]
        elif rule == VERBATIM:
            _keep_verbatim(ds, tag, ctx)
        elif rule == SEQUENCE:
            if ds[tag].VR != "SQ":
                del ds[tag]
                continue
            for item in ds[tag].value or ():
                _clean(item, ctx, depth + 1)
        elif rule == NEW_UID:
            _replace_uids(ds, tag, ctx, keep_standard=False)
        elif rule == CLASS_UID:
            _replace_uids(ds, tag, ctx, keep_standard=True)
        elif rule == DATETIME:
            if ds[tag].VR != "DT":
                del ds[tag]
                continue
            values = [_shift_datetime(str(v), ctx.offset) for v in _values(ds[tag].value)]
            if all(values):
                ds[tag].value = values if len(values) > 1 else values[0]
            else:
                del ds[tag]
        elif rule == PATIENT_CHARACTERISTIC:
            if depth == 0:
                _patient_characteristic(ds, tag, ctx)
            else:
                del ds[tag]
        # DATE and TIME: shifted in pairs below
    _shift_pairs(ds, ctx)


def _image_types(ds: Dataset) -> Iterator[list[str]]:
    for elem in _walk(ds):
        if elem.keyword in ("ImageType", "FrameType"):
            yield [str(v).strip().upper() for v in _values(elem.value)]


def _check_releasable(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None) or Dataset()
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "")
    if sop_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise DeidentificationRefused("dicomdir", "a DICOMDIR indexes the original folder and is not copied")
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise DeidentificationRefused("not_an_image", "no pixel data: only image objects are de-identified")
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        raise DeidentificationRefused(
            "burned_in_annotation", "BurnedInAnnotation is YES: the pixels identify the patient"
        )
    if sop_class in _SECONDARY_CAPTURE_CLASSES:
        raise DeidentificationRefused("secondary_capture", "Secondary Capture images often carry burned-in text")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    is_ct = modality == "CT" if modality else sop_class.startswith(_CT_CLASS_PREFIXES)
    for values in _image_types(ds):
        screen_save = any("SCREEN" in v and "SAVE" in v for v in values)
        if screen_save or (is_ct and values[:2] == ["DERIVED", "SECONDARY"]):
            shown = "\\".join(values)
            raise DeidentificationRefused(
                "secondary_image", f"ImageType {shown}: a secondary/screen-save image may carry burned-in text"
            )
    if str(ds.get("RecognizableVisualFeatures", "")).strip().upper() == "YES":
        raise DeidentificationRefused(
            "recognizable_features", "RecognizableVisualFeatures is YES: the image shows a face"
        )


# ---------------------------------------------------------------------------------------------------
# Pixel bits above BitsStored
# ---------------------------------------------------------------------------------------------------


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _cleaned_words(words: np.ndarray, ds: Dataset) -> np.ndarray:
    """``words`` (unsigned integers of BitsAllocated) with every bit outside BitsStored/HighBit cleared, or
    set to the sign extension of the stored value for signed data; padding words outside the stored range kept."""
    bits_allocated = words.dtype.itemsize * 8
    bits_stored = int(ds.BitsStored)
    high_bit = _int_or_none(ds, "HighBit")
    high_bit = bits_stored - 1 if high_bit is None else high_bit
    shift = high_bit + 1 - bits_stored
    if shift < 0 or high_bit >= bits_allocated:
        raise DeidentificationRefused("deid_error", f"HighBit {high_bit} does not fit BitsStored {bits_stored}")
    all_ones = (1 << bits_allocated) - 1
    mask = words.dtype.type(((1 << bits_stored) - 1) << shift)
    cleaned = words & mask
    signed = _int_or_none(ds, "PixelRepresentation") == 1
    if signed and shift == 0:
        negative = (cleaned >> words.dtype.type(bits_stored - 1)) & words.dtype.type(1)
        cleaned = cleaned | (negative * words.dtype.type(all_ones & ~int(mask)))
    padding = [
        v for v in (_int_or_none(ds, "PixelPaddingValue"), _int_or_none(ds, "PixelPaddingRangeLimit")) if v is not None
    ]
    if padding:
        stored_min, stored_max = (
            (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
        )
        lo, hi = min(padding), max(padding)
        if lo < stored_min or hi > stored_max:  # padding written in the full words: keep those words as they are
            view = (words.view(words.dtype.str.replace("u", "i")) if signed else words).astype(np.int64)
            keep = (view >= lo) & (view <= hi)
            cleaned = np.where(keep, words, cleaned)
    return cleaned


def _clear_unused_pixel_bits(ds: Dataset) -> None:
    """Clear bits above BitsStored in native pixel data; refuse compressed data that has them set."""
    if "PixelData" not in ds:
        return
    bits_allocated, bits_stored = _int_or_none(ds, "BitsAllocated"), _int_or_none(ds, "BitsStored")
    if bits_allocated not in (8, 16, 32) or bits_stored is None or not 0 < bits_stored < bits_allocated:
        return
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if syntax.is_encapsulated:
        from pydicom.pixels import pixel_array

        try:
            decoded = pixel_array(ds, correct_unused_bits=False)
        except Exception as exc:
            raise DeidentificationRefused(
                "deid_error", f"compressed pixel data could not be decoded to check its unused bits: {exc}"
            ) from exc
        words = np.ascontiguousarray(decoded).view(f"u{bits_allocated // 8}")
        if not np.array_equal(_cleaned_words(words, ds), words):
            raise DeidentificationRefused(
                "pixel_high_bits", f"compressed pixel data has bits above BitsStored ({bits_stored}) set"
            )
        return
    big = syntax == ExplicitVRBigEndian
    data = bytes(ds.PixelData)
    item = bits_allocated // 8
    count = len(data) // item
    words = np.frombuffer(data, dtype=f"{'>' if big else '<'}u{item}", count=count)
    cleaned = _cleaned_words(words, ds)
    if not np.array_equal(cleaned, words):
        ds.PixelData = cleaned.astype(words.dtype).tobytes() + data[count * item :]


# ---------------------------------------------------------------------------------------------------
# The whole dataset
# ---------------------------------------------------------------------------------------------------


def _method_text(keep_private_tags: bool) -> list[str]:
    return [
        "DICOM PS3.15 Basic Application Confidentiality Profile",
        f"Table E.1-1 of PS3.15 {PROFILE_TABLE_EDITION}; allow-list of technical attributes",
        "Retain Longitudinal Temporal Info Modified Dates",
        "Retain Patient Characteristics (sex, age, size, weight)",
        "Private attributes retained (not profile conformant)" if keep_private_tags else "Private attributes removed",
        RULES_VERSION,
    ]


def _mark(ds: Dataset, keep_private_tags: bool) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    ds.DeidentificationMethod = _method_text(keep_private_tags)
    items = []
    for value, meaning in DEIDENTIFICATION_CODES:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)


def _rebuild_file_meta(ds: Dataset, original: FileMetaDataset | None) -> None:
    transfer_syntax = None
    if original is not None and "TransferSyntaxUID" in original:
        transfer_syntax = original.TransferSyntaxUID
    if transfer_syntax is None:
        implicit, little = getattr(ds, "original_encoding", (False, True))
        if implicit is None:
            implicit, little = False, True
        transfer_syntax = (
            ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or (original or Dataset()).get("MediaStorageSOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta  # pydicom adds its own Implementation Class UID / Version Name when writing


def _deidentify_in_place(ds: Dataset, *, site_key: bytes, keep_private_tags: bool) -> Dataset:
    key = _check_key(site_key)
    _check_releasable(ds)
    if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
        _rebuild_file_meta(ds, getattr(ds, "file_meta", None))
    pseudonymizer = Pseudonymizer(key)
    # as in ingest: a file without PatientID is its study's own patient, not one shared "unknown" patient
    patient_id = str(ds.get("PatientID", "") or "").strip() or str(ds.get("StudyInstanceUID", "") or "")
    ctx = _Context(
        key=key,
        pseudonymizer=pseudonymizer,
        patient_pseudonym=pseudonymizer("patient", patient_id),
        offset=_dt.timedelta(days=date_shift_days(key, patient_id), seconds=time_shift_seconds(key, patient_id)),
        keep_private=keep_private_tags,
        secrets=_collect_secrets(ds),
    )
    original_meta = getattr(ds, "file_meta", None)
    _clear_unused_pixel_bits(ds)
    _clean(ds, ctx)
    for keyword in _TYPE2_EMPTY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "FrameOfReferenceUID" in ds:
        ds.PositionReferenceIndicator = ""
    ds.PatientName = ctx.patient_pseudonym
    ds.PatientID = ctx.patient_pseudonym
    _mark(ds, keep_private_tags)
    _rebuild_file_meta(ds, original_meta)
    if hasattr(ds, "preamble"):
        ds.preamble = b"\x00" * 128
    return ds


def deidentify_dataset(ds: Dataset, *, site_key: bytes, keep_private_tags: bool = False) -> Dataset:
    """Return a de-identified copy of ``ds`` (``ds`` itself is not modified).

    Raises :class:`DeidentificationRefused` (a ValueError, with ``.reason``) for objects that these rules cannot
    make safe: BurnedInAnnotation = YES, Secondary Capture or secondary/screen-save images, recognisable features,
    compressed pixel data with bits above BitsStored, no pixel data, DICOMDIR.
    Raises ValueError for a site key shorter than 32 bytes.
    """
    return _deidentify_in_place(copy.deepcopy(ds), site_key=site_key, keep_private_tags=keep_private_tags)


_PIXEL_TAGS = frozenset(Tag(tag_for_keyword(kw)) for kw in _PIXEL_KEYWORDS)


# ---------------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------------


def _iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` (hidden ones included: they are reported, not silently lost)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_file():
                yield path


def _is_truncated(ds: Dataset) -> bool:
    """True when the file ended early: pydicom then returns what it read without complaint."""
    if len(ds) == 0:
        return True
    meta = getattr(ds, "file_meta", None) or Dataset()
    syntax = meta.get("TransferSyntaxUID")
    if "PixelData" not in ds or syntax is None or UID(syntax).is_compressed:
        return False
    try:
        return len(ds.PixelData) < get_expected_length(ds, unit="bytes")
    except Exception:  # attributes needed for the length missing or malformed
        return True


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def deidentify_folder(
    input_dir: Path,
    out_dir: Path,
    *,
    site_key: bytes,
    keep_private_tags: bool = False,
    progress: bool = False,
) -> DeidResult:
    """De-identify every DICOM image under ``input_dir`` into ``out_dir``; the input is only read.

    Output files are named only by pseudonyms:
    ``out_dir/<patient pseudonym>/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm``.
    Files are visited in sorted order, so a re-run with the same key writes identical files to identical
    paths (existing files there are replaced). Files that are not DICOM, cannot be read or are refused
    are listed in ``files_skipped`` with a reason code from :data:`SKIP_REASONS`.

    Raises FileNotFoundError when ``input_dir`` is not a folder, ValueError when ``out_dir`` is
    ``input_dir`` or inside it, or when the key is shorter than 32 bytes.
    """
    started = time.perf_counter()
    input_dir = Path(input_dir)
    out_dir = Path(out_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"DICOM input folder does not exist: {input_dir}")
    if _is_within(out_dir.resolve(), input_dir.resolve()):
        raise ValueError(f"output folder {out_dir} must not be the input folder or inside it ({input_dir})")
    key = _check_key(site_key)
    _rules_by_tag()  # the allow-list and the profile table load (and agree) before any file is read

    files = list(_iter_files(input_dir))
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="de-identify", unit="file", leave=False)

    written = 0
    skipped: list[tuple[str, str]] = []
    studies: set[str] = set()
    seen_sops: set[str] = set()
    for path in iterator:
        rel = path.relative_to(input_dir).as_posix()
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            skipped.append((rel, "not_dicom"))
            continue
        except Exception:  # pydicom raises many types for damaged files
            skipped.append((rel, "unreadable"))
            continue
        try:
            if _is_truncated(ds):
                skipped.append((rel, "unreadable"))
                continue
            if any(
                not str(ds.get(kw, "") or "").strip()
                for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            ):
                _check_releasable(ds)  # a more telling reason first (e.g. DICOMDIR has no SOP Instance UID)
                skipped.append((rel, "missing_uid"))
                continue
            _deidentify_in_place(ds, site_key=key, keep_private_tags=keep_private_tags)
        except DeidentificationRefused as exc:
            skipped.append((rel, exc.reason))
            continue
        except Exception:
            skipped.append((rel, "deid_error"))
            continue
        sop = str(ds.SOPInstanceUID)
        if sop in seen_sops:
            skipped.append((rel, "duplicate_sop_instance"))
            continue
        target = out_dir / str(ds.PatientID) / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / f"{sop}.dcm"
        try:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            atomic_write_bytes(target, buffer.getvalue())
        except Exception:
            skipped.append((rel, "deid_error"))
            continue
        seen_sops.add(sop)
        studies.add(str(ds.StudyInstanceUID))
        written += 1
    return DeidResult(
        files_written=written,
        files_skipped=tuple(skipped),
        studies=len(studies),
        seconds=time.perf_counter() - started,
    )

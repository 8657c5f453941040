"""Write a Hounsfield-unit volume as a series of single-frame CT Image Storage DICOM files.

The writer is deliberately general: besides the synthetic hospitals it is used by tests that build
broken series on purpose (their own UIDs, odd rescale parameters, files deleted afterwards), so it
checks only what it needs to produce a well-formed file and leaves series-level sanity to the reader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

#: SOP Class UID of CT Image Storage.
from preprocessing.discover import CT_IMAGE_STORAGE  # the SOP class ingestion reads

#: Lung window written as the default VOI window (centre, width) in HU.
LUNG_WINDOW_HU = (-600.0, 1500.0)


@dataclass(frozen=True)
class PatientIdentity:
    """Fake protected health information, present so that privacy handling downstream is exercised."""

    PatientName: str
    PatientID: str
    PatientBirthDate: str  # YYYYMMDD
    PatientSex: str  # "M" / "F"
    PatientAge: str  # e.g. "063Y"


def _ds(value: float) -> str:
    """Format a number as a valid DICOM DS string (at most 16 characters)."""
    if not math.isfinite(value):
        raise ValueError(f"cannot write non-finite number {value!r} as DS")
    value = round(float(value), 6) + 0.0  # drop float noise such as 1.2000000000000002 and -0.0
    text = repr(value)
    if text.endswith(".0"):
        text = text[:-2]
    if len(text) <= 16 and "e" not in text:
        return text
    return format_number_as_ds(value)


def _stored_range(pixel_representation: int) -> tuple[int, int]:
    return (0, 65535) if pixel_representation == 0 else (-32768, 32767)


def hu_to_stored(
    hu: np.ndarray, *, rescale_intercept: float, rescale_slope: float, pixel_representation: int
) -> np.ndarray:
    """Convert HU to stored pixel values: ``round((HU - intercept) / slope)``, clipped to uint16 or int16."""
    if pixel_representation not in (0, 1):
        raise ValueError(f"pixel_representation must be 0 (unsigned) or 1 (signed), got {pixel_representation!r}")
    if rescale_slope == 0 or not math.isfinite(rescale_slope):
        raise ValueError(f"rescale_slope must be finite and non-zero, got {rescale_slope!r}")
    lo, hi = _stored_range(pixel_representation)
    stored = np.rint((np.asarray(hu, dtype=np.float64) - rescale_intercept) / rescale_slope)
    stored = np.clip(stored, lo, hi)
    return stored.astype("<u2" if pixel_representation == 0 else "<i2")


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    *,
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    slice_thickness_mm: float | None = None,
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    study_instance_uid: str,
    series_instance_uid: str,
    patient: PatientIdentity,
    study_date: str = "20240101",
    accession_number: str = "",
    manufacturer: str = "fedct-synthetic",
    manufacturer_model_name: str = "",
    institution_name: str = "",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    pixel_representation: int = 0,
    series_number: int = 1,
    file_prefix: str = "IM",
    uid_entropy: Sequence[object] | None = None,
    modality: str = "CT",
    study_time: str = "120000",
    series_description: str = "CT CHEST AXIAL",
    study_id: str = "1",
    kvp: float = 120.0,
    convolution_kernel: str = "STANDARD",
    reverse_instance_order: bool = False,
) -> list[Path]:
    """Write ``hu`` (slices, Rows, Columns; HU) as one CT Image Storage file per slice; return the paths.

    Slice ``k`` lies at ``z = origin_z + k * slice_spacing_mm`` (LPS, axial, orientation [1,0,0,0,1,0]).
    Files are named ``{file_prefix}{n:04d}.dcm`` with ``n`` the InstanceNumber; instances are numbered
    with increasing z, or head-to-feet (decreasing z) when ``reverse_instance_order`` is true.
    SOPInstanceUIDs are derived from ``uid_entropy`` plus the slice index when given, else random;
    the FrameOfReferenceUID is derived from the SeriesInstanceUID.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D array (slices, rows, columns), got shape {hu.shape}")
    if min(hu.shape) < 1:
        raise ValueError(f"hu must not be empty, got shape {hu.shape}")
    if not np.issubdtype(hu.dtype, np.number) or np.issubdtype(hu.dtype, np.complexfloating):
        raise ValueError(f"hu must hold real numbers, got dtype {hu.dtype}")
    if not np.all(np.isfinite(hu)):
        raise ValueError("hu contains non-finite values (NaN or inf)")
    if len(pixel_spacing_mm) != 2 or not all(math.isfinite(s) and s > 0 for s in pixel_spacing_mm):
        raise ValueError(f"pixel_spacing_mm must be two positive numbers (row, column), got {pixel_spacing_mm!r}")
    if not (math.isfinite(slice_spacing_mm) and slice_spacing_mm > 0):
        raise ValueError(f"slice_spacing_mm must be positive, got {slice_spacing_mm!r}")
    thickness = slice_spacing_mm if slice_thickness_mm is None else slice_thickness_mm
    if not (math.isfinite(thickness) and thickness > 0):
        raise ValueError(f"slice_thickness_mm must be positive, got {slice_thickness_mm!r}")
    if len(origin_mm) != 3 or not all(math.isfinite(v) for v in origin_mm):
        raise ValueError(f"origin_mm must be three finite numbers (x, y, z), got {origin_mm!r}")
    if pixel_representation not in (0, 1):
        raise ValueError(f"pixel_representation must be 0 (unsigned) or 1 (signed), got {pixel_representation!r}")
    if not math.isfinite(rescale_slope) or rescale_slope == 0:
        raise ValueError(f"rescale_slope must be finite and non-zero, got {rescale_slope!r}")
    if not math.isfinite(rescale_intercept):
        raise ValueError(f"rescale_intercept must be finite, got {rescale_intercept!r}")
    n_slices, rows, cols = hu.shape
    if rows > 65535 or cols > 65535:
        raise ValueError(f"image too large for DICOM Rows/Columns: {rows}x{cols}")
    if n_slices > 9999:
        raise ValueError(f"too many slices for 4-digit file names: {n_slices}")

    stored = hu_to_stored(
        hu, rescale_intercept=rescale_intercept, rescale_slope=rescale_slope, pixel_representation=pixel_representation
    )
    if pixel_representation == 0 and int(stored.max()) < 4096:
        bits_stored = 12  # what most unsigned CT exports declare
    else:
        bits_stored = 16

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame_of_reference_uid = generate_uid(entropy_srcs=[str(series_instance_uid), "frame-of-reference"])

    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = file_meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.ContentTime = study_time
    ds.AccessionNumber = accession_number
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    ds.InstitutionName = institution_name
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = manufacturer_model_name
    ds.PatientName = patient.PatientName
    ds.PatientID = patient.PatientID
    ds.PatientBirthDate = patient.PatientBirthDate
    ds.PatientSex = patient.PatientSex
    ds.PatientAge = patient.PatientAge
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(thickness)
    ds.KVP = _ds(kvp)
    ds.SpacingBetweenSlices = _ds(slice_spacing_mm)
    ds.ConvolutionKernel = convolution_kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = study_id
    ds.SeriesNumber = int(series_number)
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(pixel_spacing_mm[0]), _ds(pixel_spacing_mm[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.WindowCenter = _ds(LUNG_WINDOW_HU[0])
    ds.WindowWidth = _ds(LUNG_WINDOW_HU[1])
    ds.RescaleIntercept = _ds(rescale_intercept)
    ds.RescaleSlope = _ds(rescale_slope)
    ds.RescaleType = "HU"

    entropy = None if uid_entropy is None else [str(e) for e in uid_entropy]
    x0, y0, z0 = (float(v) for v in origin_mm)
    paths: list[Path] = []
    for k in range(n_slices):
        number = n_slices - k if reverse_instance_order else k + 1
        z = z0 + k * slice_spacing_mm
        sop_uid = generate_uid() if entropy is None else generate_uid(entropy_srcs=[*entropy, "slice", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.add_new(0x7FE00010, "OW", stored[k].tobytes())
        path = out_dir / f"{file_prefix}{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

"""Lesion masks of synthetic studies as NIfTI, on the exact grid MONAI reports for the DICOM series.

MONAI's ``PydicomReader`` (what ``LoadImage`` uses for a DICOM folder) stacks the slices by
InstanceNumber, puts the array axes in (column, row, slice) order and builds the affine from the
first instance's ImagePositionPatient, the PixelSpacing and the mean step to the last instance, then
converts LPS to RAS. :func:`series_ras_affine` reproduces that from what :func:`write_ct_series`
writes (the same rounded DS strings), so loading the mask and the series with MONAI gives the same
shape and affine, voxel for voxel.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import nibabel as nib
import numpy as np

from fedct.files import atomic_write_bytes
from synthetic.dicom_writer import _ds

#: Folder (under a site folder) that holds one ``<StudyInstanceUID>.nii.gz`` mask per study.
LESION_MASK_DIR = "lesion-masks"


def _check_geometry(
    origin_mm: tuple[float, float, float],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    n_slices: int,
) -> None:
    if len(origin_mm) != 3 or not all(math.isfinite(float(v)) for v in origin_mm):
        raise ValueError(f"origin_mm must be three finite numbers (x, y, z), got {origin_mm!r}")
    if len(pixel_spacing_mm) != 2 or not all(math.isfinite(float(s)) and s > 0 for s in pixel_spacing_mm):
        raise ValueError(f"pixel_spacing_mm must be two positive numbers (row, column), got {pixel_spacing_mm!r}")
    if not (math.isfinite(slice_spacing_mm) and slice_spacing_mm > 0):
        raise ValueError(f"slice_spacing_mm must be positive, got {slice_spacing_mm!r}")
    if isinstance(n_slices, bool) or not isinstance(n_slices, (int, np.integer)) or n_slices < 1:
        raise ValueError(f"n_slices must be a positive integer, got {n_slices!r}")


def series_ras_affine(
    *,
    origin_mm: tuple[float, float, float],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    n_slices: int,
    reverse_instance_order: bool,
) -> np.ndarray:
    """RAS affine (4x4 float64) of an axial series written by ``write_ct_series``, as MONAI reports it.

    Array axes are (column, row, instance order); with ``reverse_instance_order`` the first instance is
    the most superior slice and the slice axis points to the feet.
    """
    _check_geometry(origin_mm, pixel_spacing_mm, slice_spacing_mm, n_slices)
    x0, y0, z0 = (float(_ds(float(v))) for v in origin_mm)
    z_top = float(_ds(float(origin_mm[2]) + (int(n_slices) - 1) * float(slice_spacing_mm)))
    first, last = (z_top, z0) if reverse_instance_order else (z0, z_top)
    row_mm, col_mm = (float(_ds(float(s))) for s in pixel_spacing_mm)
    step = (last - first) / (n_slices - 1) if n_slices > 1 else 1.0
    lps = np.array(
        [[col_mm, 0.0, 0.0, x0], [0.0, row_mm, 0.0, y0], [0.0, 0.0, step, first], [0.0, 0.0, 0.0, 1.0]],
        dtype=np.float64,
    )
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_lesion_mask(
    path: Path,
    lesion_mask: np.ndarray,
    *,
    origin_mm: tuple[float, float, float],
    pixel_spacing_mm: tuple[float, float],
    slice_spacing_mm: float,
    reverse_instance_order: bool,
) -> Path:
    """Write ``lesion_mask`` (bool, (slices, rows, cols), slice 0 most inferior) as uint8 0/1 gzipped NIfTI.

    The grid is the one :func:`series_ras_affine` describes; the file is byte-identical for equal input
    (gzip timestamp 0) and written atomically.
    """
    mask = np.asarray(lesion_mask)
    if mask.ndim != 3 or min(mask.shape) < 1:
        raise ValueError(f"lesion_mask must be a non-empty 3-D array (slices, rows, cols), got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"lesion_mask must be boolean, got dtype {mask.dtype}")
    affine = series_ras_affine(
        origin_mm=origin_mm,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_spacing_mm=slice_spacing_mm,
        n_slices=mask.shape[0],
        reverse_instance_order=reverse_instance_order,
    )
    data = mask.transpose(2, 1, 0)  # (cols, rows, slices)
    if reverse_instance_order:
        data = data[:, :, ::-1]
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)  # scanner coordinates
    image.set_qform(affine, code=1)
    return atomic_write_bytes(Path(path), gzip.compress(image.to_bytes(), mtime=0))

"""Stage 3: a validated series -> an HU volume with its RAS affine (a MONAI MetaTensor).

Every slice is decoded and checked against the geometry that validation established, so a file that
changed since validation or whose pixel data is truncated raises instead of producing a wrong volume.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.utils import MetaKeys, SpaceKeys
from monai.transforms import MapTransform
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UncompressedTransferSyntaxes

from preprocessing.validate import SeriesInvalid, ValidatedSeries, slice_normal

#: LPS (DICOM patient space) -> RAS (MONAI's default world space).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_affine(series: ValidatedSeries) -> np.ndarray:
    """4x4 voxel->RAS affine for the array layout (column index, row index, slice index)."""
    orientation = np.asarray(series.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_spacing, col_spacing = series.PixelSpacing
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_spacing  # moving along a row = next column
    affine[:3, 1] = col_dir * row_spacing
    affine[:3, 2] = slice_normal(orientation) * series.slice_step_mm
    affine[:3, 3] = series.first_position
    return LPS_TO_RAS @ affine


def _pixel_data_shortfall(ds: pydicom.Dataset) -> tuple[int, int] | None:
    """``(bytes present, bytes needed)`` when uncompressed pixel data is absent or shorter than the image; else None."""
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in UncompressedTransferSyntaxes:
        return None  # encapsulated data: a truncated stream fails in its decoder
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated) // 8
    have = len(ds.PixelData) if "PixelData" in ds else 0
    return (have, expected) if have < expected else None


def read_hu_volume(series: ValidatedSeries) -> tuple[np.ndarray, np.ndarray]:
    """Decode all slices, apply the modality LUT (RescaleSlope/Intercept) and stack them.

    Returns ``(volume, affine)``: float32 HU of shape (Columns, Rows, slices) and the voxel->RAS affine.
    Raises :class:`SeriesInvalid` naming the file when one slice cannot be used.
    """
    volume = np.empty(series.shape, dtype=np.float32)
    normal = slice_normal(series.ImageOrientationPatient)
    origin_along = float(np.dot(series.first_position, normal))
    for k, path in enumerate(series.paths):
        try:
            ds = pydicom.dcmread(path)
            shortfall = _pixel_data_shortfall(ds)
            pixels = None if shortfall else ds.pixel_array
        except Exception as exc:  # decoders raise many types; any of them means this slice is unusable
            reason = "truncated_pixel_data" if "PixelData" in str(exc) or "length" in str(exc).lower() else "unreadable"
            raise SeriesInvalid(reason, f"pixel data could not be decoded: {type(exc).__name__}: {exc}", path) from exc
        if shortfall:
            have, needed = shortfall
            raise SeriesInvalid(
                "truncated_pixel_data", f"PixelData holds {have} of the {needed} bytes Rows x Columns need: file truncated?", path
            )
        if pixels.shape != (series.Rows, series.Columns):
            raise SeriesInvalid(
                "inconsistent_geometry", f"decoded slice has shape {pixels.shape}, header says {(series.Rows, series.Columns)}", path
            )
        along = float(np.dot([float(v) for v in ds.ImagePositionPatient], normal))
        expected = origin_along + k * series.slice_step_mm
        if abs(along - expected) > 0.05 * series.slice_step_mm:
            raise SeriesInvalid("inconsistent_geometry", f"slice at {along:.2f} mm, expected {expected:.2f} mm", path)
        missing = [kw for kw in ("RescaleIntercept", "RescaleSlope") if ds.get(kw) in (None, "")]
        if missing:  # apply_modality_lut would return the stored values unchanged, silently not HU
            raise SeriesInvalid("missing_attribute", f"{', '.join(missing)} missing: stored values cannot be converted to HU", path)
        volume[:, :, k] = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32).T
    return volume, series_affine(series)


class LoadCTSeriesd(MapTransform):
    """MONAI dictionary transform: replace ``data[key]`` (a :class:`ValidatedSeries` as a dict) by its HU volume.

    The output is a channel-first :class:`monai.data.MetaTensor` carrying the RAS affine, ready for
    ``Orientationd``/``Spacingd``.
    """

    def __init__(self, keys: str | list[str], *, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            series = as_series(d[key])
            volume, affine = read_hu_volume(series)
            d[key] = MetaTensor(
                torch.from_numpy(volume[None]),
                affine=torch.as_tensor(affine, dtype=torch.float64),
                meta={MetaKeys.SPACE: SpaceKeys.RAS},
            )
        return d


def as_series(value: ValidatedSeries | Mapping[str, Any]) -> ValidatedSeries:
    """Accept a :class:`ValidatedSeries` or its ``asdict`` form (what datasets and manifests carry)."""
    if isinstance(value, ValidatedSeries):
        return value
    fields = dict(value)
    fields["dropped"] = ()
    for key in ("paths", "PixelSpacing", "ImageOrientationPatient", "first_position", "transfer_syntaxes"):
        fields[key] = tuple(fields[key])
    return ValidatedSeries(**fields)


def series_to_dict(series: ValidatedSeries) -> dict[str, Any]:
    """JSON-friendly form of a :class:`ValidatedSeries` (dropped-file records left out).

    Sequences are lists, as ``manifest.json`` reads them back: the dataset cache key hashes this dict,
    so the form ingestion caches under must equal the form training loads.
    """
    d = asdict(series)
    d["dropped"] = []
    return {key: list(value) if isinstance(value, tuple) else value for key, value in d.items()}

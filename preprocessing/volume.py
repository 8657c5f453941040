"""Stage 3: a validated series -> an HU volume with its RAS affine, or straight onto the model's grid.

Every slice is decoded and checked against the geometry that validation established, so a file that
changed since validation or whose pixel data is truncated raises instead of producing a wrong volume.
Any transfer syntax pydicom has a decoder for is read (native, deflated, RLE, JPEG lossless, JPEG-LS,
JPEG 2000); a multi-frame (Enhanced CT) file is decoded once and its frames taken with their own
position and rescale. Padding pixels (PixelPaddingValue / PixelPaddingRangeLimit) become air, -1000 HU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, UncompressedTransferSyntaxes
from threadpoolctl import threadpool_limits

from preprocessing.discover import file_state_fingerprint, frame_functional_item, read_dicom
from preprocessing.validate import SeriesInvalid, ValidatedSeries, as_series, series_to_dict, slice_normal  # noqa: F401

#: LPS (DICOM patient space) -> RAS (MONAI's default world space).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: HU given to padding pixels (outside the reconstructed field of view).
AIR_HU = -1000.0


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
    frames = int(ds.get("NumberOfFrames") or 1)
    expected = (
        frames * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated) // 8
    )
    have = len(ds.PixelData) if "PixelData" in ds else 0
    return (have, expected) if have < expected else None


def _encapsulated_but_native(ds: pydicom.Dataset) -> bool:
    """Compressed (encapsulated) PixelData under an uncompressed transfer syntax, e.g. a file without File Meta."""
    native = str(ds.file_meta.get("TransferSyntaxUID", "")) in UncompressedTransferSyntaxes
    return native and "PixelData" in ds and ds["PixelData"].is_undefined_length


@dataclass(frozen=True)
class _Decoded:
    """One decoded file: the dataset and its stored values, shape (frames, Rows, Columns)."""

    ds: Dataset
    pixels: np.ndarray


def _decode(path: str, series: ValidatedSeries) -> _Decoded:
    """Read and decode one file, raising :class:`SeriesInvalid` naming it when it cannot be used."""
    try:
        ds = read_dicom(path)
        shortfall = _pixel_data_shortfall(ds)
        if _encapsulated_but_native(ds):
            raise SeriesInvalid(
                "unsupported_transfer_syntax",
                f"PixelData is compressed but the transfer syntax {ds.file_meta.TransferSyntaxUID.name} is not "
                "(no File Meta?): the codec is unknown",
                path,
            )
        pixels = None if shortfall else ds.pixel_array
    except SeriesInvalid:
        raise
    except Exception as exc:  # decoders raise many types; any of them means this slice is unusable
        reason = "truncated_pixel_data" if "PixelData" in str(exc) or "length" in str(exc).lower() else "unreadable"
        raise SeriesInvalid(reason, f"pixel data could not be decoded: {type(exc).__name__}: {exc}", path) from exc
    if shortfall:
        have, needed = shortfall
        raise SeriesInvalid(
            "truncated_pixel_data",
            f"PixelData holds {have} of the {needed} bytes Rows x Columns need: file truncated?",
            path,
        )
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[1:] != (series.Rows, series.Columns):
        raise SeriesInvalid(
            "inconsistent_geometry",
            f"decoded slice has shape {pixels.shape[1:]}, header says {(series.Rows, series.Columns)}",
            path,
        )
    return _Decoded(ds, pixels)


def _direct_reader(series: ValidatedSeries) -> Dataset | None:
    """For a series whose headers were read once (``pixel_offsets``) and whose files are unchanged since: a small
    dataset holding the shared pixel format (what :func:`_decode_direct` and the HU steps read); else None."""
    if not series.pixel_offsets or series.frames or len(series.pixel_offsets) != len(series.paths):
        return None
    try:
        if file_state_fingerprint(series.paths) != series.file_states:
            return None  # a file changed since validation: parse each again, with every check
    except OSError:
        return None  # a file vanished: the full read names it
    syntaxes = set(series.transfer_syntaxes)
    if len(syntaxes) != 1:
        return None
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntaxes.pop()
    ds.Rows, ds.Columns = series.Rows, series.Columns
    for keyword, value in series.pixel_format:
        setattr(ds, keyword, value)
    return ds


def _decode_direct(path: str, offset: int, fmt: Dataset) -> _Decoded | None:
    """The stored values of a single-frame native file read at the PixelData ``offset`` the header pass found,
    without parsing the header again (the same values pydicom's ``pixel_array`` gives: reduced to BitsStored,
    sign-extended). None when the bytes there are not what was expected (the caller then parses the file, which
    names the problem: truncation, encapsulated data...)."""
    syntax = str(fmt.file_meta.TransferSyntaxUID)
    endian = ">" if syntax == ExplicitVRBigEndian else "<"
    bits, stored = int(fmt.BitsAllocated), int(fmt.BitsStored)
    needed = int(fmt.Rows) * int(fmt.Columns) * bits // 8
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            head = fh.read(12)
            if len(head) < 8:
                return None
            group, element = np.frombuffer(head[:4], dtype=f"{endian}u2")
            if (int(group), int(element)) != (0x7FE0, 0x0010):
                return None
            if syntax == ImplicitVRLittleEndian:
                length, skip = int(np.frombuffer(head[4:8], dtype="<u4")[0]), 8
            elif head[4:6] in (b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"UN"):
                if len(head) < 12:
                    return None
                length, skip = int(np.frombuffer(head[8:12], dtype=f"{endian}u4")[0]), 12
            else:
                return None
            if length == 0xFFFFFFFF or length < needed:
                return None
            fh.seek(offset + skip)
            raw = fh.read(needed)
    except OSError:
        return None
    if len(raw) < needed:
        return None
    signed = int(fmt.PixelRepresentation) == 1
    dtype = np.dtype(f"{endian}{'i' if signed else 'u'}{bits // 8}")
    pixels = np.frombuffer(raw, dtype=dtype).reshape(1, int(fmt.Rows), int(fmt.Columns)).astype(dtype.newbyteorder("="))
    if stored < bits:
        shift = bits - stored
        if signed:  # sign-extend from BitsStored, as pydicom does
            pixels <<= shift
            pixels >>= shift
        else:
            pixels &= (1 << stored) - 1
    fmt.PixelData = raw  # the raw words, for a padding value outside BitsStored (see _padding_mask)
    return _Decoded(fmt, pixels)


def _frame_source(decoded: _Decoded, frame: int | None, path: str, what: str, sequence: str) -> Dataset:
    """The dataset holding ``what`` for a frame: the file itself, or the frame's functional group item."""
    if frame is None:
        return decoded.ds
    item = frame_functional_item(decoded.ds, frame, sequence)
    if item is None:
        raise SeriesInvalid("missing_attribute", f"{what} ({sequence}) of frame {frame + 1} missing", path)
    return item


def _rescale_source(decoded: _Decoded, frame: int | None, path: str) -> Dataset:
    """Where a frame's RescaleIntercept/Slope are: its PixelValueTransformationSequence, else the file's top level."""
    if frame is None:
        return decoded.ds
    item = frame_functional_item(decoded.ds, frame, "PixelValueTransformationSequence")
    if item is None and all(decoded.ds.get(kw) not in (None, "") for kw in ("RescaleIntercept", "RescaleSlope")):
        return decoded.ds
    return _frame_source(decoded, frame, path, "RescaleIntercept/RescaleSlope", "PixelValueTransformationSequence")


def _stored_value(value: object, ds: Dataset, path: str, keyword: str) -> int:
    """A padding attribute as a stored pixel value of this file's PixelRepresentation (US/SS written either way)."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise SeriesInvalid("unreadable", f"{keyword} {value!r} is not one integer", path) from exc
    bits = int(ds.BitsAllocated)
    if int(ds.PixelRepresentation) == 1 and number >= 2 ** (bits - 1):
        number -= 2**bits  # SS value read as US
    elif int(ds.PixelRepresentation) == 0 and number < 0:
        number += 2**bits  # US value read as SS
    return number


def _padding_mask(decoded: _Decoded, frame_index: int, path: str) -> np.ndarray | None:
    """Pixels of one frame that are padding: stored value == PixelPaddingValue, or within the PixelPaddingRangeLimit range.

    pydicom returns stored values reduced to BitsStored; a padding value outside that range is compared with the
    raw words of native pixel data. For compressed data such a value cannot be told from a real one: refused.
    """
    ds = decoded.ds
    if ds.get("PixelPaddingValue") in (None, ""):
        return None
    lo = hi = _stored_value(ds.PixelPaddingValue, ds, path, "PixelPaddingValue")
    if ds.get("PixelPaddingRangeLimit") not in (None, ""):
        limit = _stored_value(ds.PixelPaddingRangeLimit, ds, path, "PixelPaddingRangeLimit")
        lo, hi = min(lo, limit), max(hi, limit)
    pixels = decoded.pixels[frame_index]
    bits_stored = int(ds.BitsStored)
    signed = int(ds.PixelRepresentation) == 1
    stored_min, stored_max = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    )
    if stored_min <= lo and hi <= stored_max:
        return (pixels >= lo) & (pixels <= hi)
    if str(ds.file_meta.TransferSyntaxUID) in UncompressedTransferSyntaxes and int(ds.BitsAllocated) in (8, 16, 32):
        endian = ">" if str(ds.file_meta.TransferSyntaxUID) == pydicom.uid.ExplicitVRBigEndian else "<"
        dtype = np.dtype(f"{endian}{'i' if signed else 'u'}{int(ds.BitsAllocated) // 8}")
        count = decoded.pixels.size
        raw = np.frombuffer(ds.PixelData, dtype=dtype, count=count).reshape(decoded.pixels.shape)[frame_index]
        return (raw >= lo) & (raw <= hi)
    raise SeriesInvalid(
        "ambiguous_padding",
        f"PixelPaddingValue range {lo}..{hi} lies outside the {bits_stored}-bit stored values of compressed pixel data: "
        "padding cannot be told from tissue",
        path,
    )


def _hu_slices(
    series: ValidatedSeries, rows: np.ndarray | None = None, columns: np.ndarray | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, hu)`` for every slice in order: float32 HU of shape (Rows, Columns), one file decoded at a time;
    with ``rows``/``columns`` (index arrays) only that block of each slice is converted and returned.

    Every check of :func:`read_hu_volume` happens here (decodability, shape, position against the validated
    geometry, rescale present, padding); a multi-frame file is decoded once and its frames taken in turn.
    """
    if series.frames and len(series.frames) != len(series.paths):
        raise ValueError(f"series has {len(series.paths)} paths but {len(series.frames)} frame indices")
    normal = slice_normal(series.ImageOrientationPatient)
    origin_along = float(np.dot(series.first_position, normal))
    frames: tuple[int | None, ...] = series.frames or (None,) * len(series.paths)
    multi_frame: dict[str, _Decoded] = {}
    direct = _direct_reader(series)
    block = None if rows is None or columns is None else np.ix_(rows, columns)
    for k, (path, frame) in enumerate(zip(series.paths, frames)):
        fast = _decode_direct(path, series.pixel_offsets[k], direct) if direct is not None else None
        if fast is not None:
            # The header this slice was validated with is the file's current one (same size and mtime): its position
            # and rescale were checked then; only the pixels are new.
            stored = fast.pixels[0] if block is None else fast.pixels[0][block]
            hu = _modality_lut(stored, fast.ds)
            padding = _padding_mask(fast, 0, path)
            if padding is not None:
                hu[padding if block is None else padding[block]] = AIR_HU
            yield k, hu
            continue
        if frame is None:
            multi_frame.clear()
            decoded = _decode(path, series)
            if decoded.pixels.shape[0] != 1:
                message = f"{decoded.pixels.shape[0]} frames in a file read as single-frame"
                raise SeriesInvalid("unsupported_sop_class", message, path)
            index = 0
        else:
            if path not in multi_frame:
                multi_frame.clear()  # one decoded file held at a time
                multi_frame[path] = _decode(path, series)
            decoded, index = multi_frame[path], frame
            if index >= decoded.pixels.shape[0]:
                message = f"file has {decoded.pixels.shape[0]} frames, frame {index + 1} expected"
                raise SeriesInvalid("inconsistent_geometry", message, path)
        where = "" if frame is None else f"frame {frame + 1}: "
        position = _frame_source(decoded, frame, path, "ImagePositionPatient", "PlanePositionSequence")
        along = float(np.dot([float(v) for v in position.ImagePositionPatient], normal))
        expected = origin_along + k * series.slice_step_mm
        if abs(along - expected) > 0.05 * series.slice_step_mm:
            raise SeriesInvalid(
                "inconsistent_geometry", f"{where}slice at {along:.2f} mm, expected {expected:.2f} mm", path
            )
        rescale = _rescale_source(decoded, frame, path)
        missing = [kw for kw in ("RescaleIntercept", "RescaleSlope") if rescale.get(kw) in (None, "")]
        if missing:  # apply_modality_lut would return the stored values unchanged, silently not HU
            raise SeriesInvalid(
                "missing_attribute",
                f"{where}{', '.join(missing)} missing: stored values cannot be converted to HU",
                path,
            )
        stored = decoded.pixels[index] if block is None else decoded.pixels[index][block]
        hu = _modality_lut(stored, rescale)
        padding = _padding_mask(decoded, index, path)
        if padding is not None:
            hu[padding if block is None else padding[block]] = AIR_HU
        yield k, hu


def _modality_lut(stored: np.ndarray, rescale: Dataset) -> np.ndarray:
    """Stored values -> HU in float32 (a new array): RescaleSlope/Intercept in one float32 pass; pydicom's
    ``apply_modality_lut`` when the file has a Modality LUT Sequence instead."""
    if "ModalityLUTSequence" in rescale:
        return np.asarray(apply_modality_lut(stored, rescale), dtype=np.float32)
    slope, intercept = float(rescale.RescaleSlope), float(rescale.RescaleIntercept)
    hu = stored.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def read_hu_volume(series: ValidatedSeries) -> tuple[np.ndarray, np.ndarray]:
    """Decode all slices, apply the modality LUT (RescaleSlope/Intercept) and stack them.

    Returns ``(volume, affine)``: float32 HU of shape (Columns, Rows, slices) and the voxel->RAS affine.
    Padding pixels are set to -1000 HU. A multi-frame file is decoded once; each frame uses the position and
    rescale of its functional groups. Raises :class:`SeriesInvalid` naming the file when one slice cannot be used.
    The volume is laid out column-major (Fortran order), so that each slice is written as one contiguous block.
    """
    volume = np.empty(series.shape, dtype=np.float32, order="F")
    for k, hu in _hu_slices(series):
        volume[:, :, k] = hu.T
    return volume, series_affine(series)


# --- straight to the model grid ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGrid:
    """The grid ``Orientationd("RAS")`` + ``Spacingd(pixdim)`` would put a series on: shape and voxel->RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray


#: Tolerance under which ``Spacing`` keeps a series' own spacing instead of the target (MONAI's ``AFFINE_TOL``).
_SPACING_TOL = 1e-3


def _io_orientation(affine: np.ndarray) -> np.ndarray:
    """Per input axis: (closest world axis, +1 or -1), as ``nibabel.io_orientation`` computes it (polar decomposition,
    strongest axes first)."""
    rzs = affine[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1
    p, s, qs = np.linalg.svd(rzs / zooms, full_matrices=False)
    keep = s > s.max() * 3 * np.finfo(s.dtype).eps
    r = np.dot(p[:, keep], qs[keep])
    ornt = np.full((3, 2), np.nan)
    for in_ax in np.argsort(np.min(-(r**2), axis=0), kind="stable"):
        col = r[:, in_ax]
        if not np.allclose(col, 0):
            out_ax = int(np.argmax(np.abs(col)))
            ornt[in_ax] = (out_ax, -1.0 if col[out_ax] < 0 else 1.0)
            r[out_ax, :] = 0
    if np.isnan(ornt).any():
        raise ValueError(f"affine has no orientation: {affine.tolist()}")
    return ornt


def _orientation_xform(ornt: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``nibabel.orientations.inv_ornt_aff``: output voxel -> input voxel of the flip + transpose ``ornt`` makes."""
    undo_reorder = np.eye(4)[[int(v) for v in ornt[:, 0]] + [3], :]
    undo_flip = np.diag([*ornt[:, 1], 1.0])
    centre = -(np.array(shape, dtype=float) - 1) / 2.0
    undo_flip[:3, 3] = ornt[:, 1] * centre - centre
    return np.dot(undo_flip, undo_reorder)


def _zoom_affine(affine: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """``monai.data.utils.zoom_affine(affine, spacing, diagonal=False)``: the rotation of ``affine``, scaled to ``spacing``."""
    rzs = affine[:-1, :-1]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(4)
    new[:-1, :-1] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(spacing))
    return new


def _shape_offset(shape: np.ndarray, in_affine: np.ndarray, out_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``monai.data.utils.compute_shape_offset(shape, in_affine, out_affine, scale_extent=False)``."""
    corners = np.asarray(np.meshgrid(*[(0.0, dim - 1.0) for dim in shape], indexing="ij")).reshape((3, -1))
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(out_affine, in_affine) @ corners
    corners = in_affine @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    for i in range(corners.shape[1]):
        if np.allclose(np.min(all_dist - all_dist[:, i : i + 1], 1), 0.0, rtol=_SPACING_TOL):
            return out_shape.astype(int), corners[:-1, i]
    offset = in_affine[:-1, :-1] @ (shape / 2.0) + in_affine[:-1, -1] - out_affine[:-1, :-1] @ (out_shape / 2.0)
    return out_shape.astype(int), offset


def model_grid(series: ValidatedSeries, pixdim: tuple[float, float, float]) -> ModelGrid:
    """Output geometry of MONAI's ``Orientationd(axcodes="RAS")`` + ``Spacingd(pixdim)`` for this series.

    The steps of MONAI's lazy ``Orientation`` and ``Spacing`` (nibabel's orientation of the affine, then
    ``zoom_affine`` and ``compute_shape_offset``, each pending affine composed onto the last) in numpy: no pixel is
    read and neither torch nor MONAI is imported, and the grid is MONAI's (shape, corner alignment, affine:
    ``tests/test_volume.py`` checks it bit for bit), so caches and models stay comparable.
    """
    source = series_affine(series)
    ornt = _io_orientation(source)
    oriented = source @ _orientation_xform(ornt, series.shape)
    shape = np.array(series.shape, dtype=float)[np.argsort(ornt[:, 0])]
    target = np.array([float(p) for p in pixdim], dtype=np.float64)
    own = np.sqrt(np.sum(oriented[:3, :3] * oriented[:3, :3], axis=0))
    # Spacing keeps the series' own spacing where it is within MONAI's tolerance of the target.
    spacing = np.where((target - _SPACING_TOL <= own) & (own <= target + _SPACING_TOL), own, target)
    zoomed = _zoom_affine(oriented, spacing)
    out_shape, offset = _shape_offset(shape, oriented, zoomed)
    zoomed[:3, -1] = offset
    affine = oriented @ np.linalg.solve(oriented, zoomed)
    return ModelGrid(shape=tuple(int(n) for n in out_shape), affine=affine)  # type: ignore[arg-type]


def axis_weights(n_in: int, n_out: int, step: float, start: float, *, antialias: bool) -> np.ndarray:
    """Interpolation matrix (n_out, n_in), float32: output sample ``o`` lies at input index ``start + o * step``.

    Linear interpolation with the border value beyond the edges (as ``grid_sample`` with ``padding_mode="border"``).
    With ``antialias`` and ``|step| > 1`` (downsampling) the tent kernel is widened to ``|step|`` input voxels, so
    each output averages the input it covers instead of point-sampling it (no aliasing of noise and thin structures).
    Rows sum to 1, so an affine intensity map (the modality LUT) commutes with it.
    """
    width = max(1.0, abs(step)) if antialias else 1.0
    centres = start + step * np.arange(n_out, dtype=np.float64)
    reach = int(np.ceil(width))
    taps = np.floor(centres)[:, None] + np.arange(-reach + 1, reach + 1)[None, :]
    weights = np.clip(1.0 - np.abs(taps - centres[:, None]) / width, 0.0, None)
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.broadcast_to(np.arange(n_out)[:, None], taps.shape)
    np.add.at(matrix, (rows, np.clip(taps, 0, n_in - 1).astype(np.int64)), weights)
    matrix /= matrix.sum(axis=1, keepdims=True)
    return matrix.astype(np.float32)


@dataclass(frozen=True)
class ResampledVolume:
    """A series on its model grid (HU, float32, RAS-oriented axes), with the full-resolution HU volume when asked."""

    volume: np.ndarray
    affine: np.ndarray
    hu: np.ndarray | None = None
    hu_affine: np.ndarray | None = None


def _axis_map(source_affine: np.ndarray, grid: ModelGrid) -> list[tuple[int, float, float]] | None:
    """For each output axis: (input axis, index step, index start), when the grid's axes are the input's axes
    permuted and scaled (always so for orientation + spacing); None otherwise."""
    m = np.linalg.solve(source_affine, grid.affine)
    mapping = []
    for j in range(3):
        column = m[:3, j]
        i = int(np.argmax(np.abs(column)))
        if np.max(np.abs(np.delete(column, i))) > 1e-6 * abs(column[i]):
            return None
        mapping.append((i, float(column[i]), float(m[i, 3])))
    if sorted(i for i, _, _ in mapping) != [0, 1, 2]:
        return None
    return mapping


def read_resampled_volume(
    series: ValidatedSeries, pixdim: tuple[float, float, float], *, antialias: bool = False, keep_hu: bool = False
) -> ResampledVolume:
    """Decode the series straight onto its model grid (:func:`model_grid`) in one pass over the files.

    Each slice goes stored values -> float32 HU -> in-plane resampling (two small matrix products) and is added,
    weighted, into the output planes it contributes to: the full-resolution volume is never built (unless
    ``keep_hu``), so memory stays at one decoded file plus the small output. Orientation, spacing and any resize are
    one separable linear resampling from the series' affine to the grid; its geometry is exactly MONAI's.
    With ``antialias=False`` the values equal ``Orientationd`` + ``Spacingd(mode="bilinear", padding_mode="border")``
    on :func:`read_hu_volume`'s output (to float32 rounding).
    """
    source_affine = series_affine(series)
    grid = model_grid(series, pixdim)
    mapping = _axis_map(source_affine, grid)
    hu_full = np.empty(series.shape, dtype=np.float32, order="F") if keep_hu or mapping is None else None
    if mapping is None:  # not reachable with orientation + spacing; kept so that an odd grid is still exact
        return _resampled_by_monai(series, pixdim, hu_full, keep_hu=keep_hu)
    n_in = series.shape
    weights = {}
    out_axis_of = {}
    for j, (i, step, start) in enumerate(mapping):
        weights[i] = axis_weights(n_in[i], grid.shape[j], step, start, antialias=antialias)
        out_axis_of[i] = j
    w_col, w_row, w_slice = weights[0], weights[1], weights[2]  # input axes: column index, row index, slice
    planes = np.zeros((w_slice.shape[0], w_row.shape[0], w_col.shape[0]), dtype=np.float32)  # (slice', row', col')
    # Only the rows/columns the interpolation touches are converted to HU and multiplied (all of them when keep_hu).
    rows = np.arange(series.Rows) if keep_hu else np.flatnonzero(w_row.any(axis=0))
    columns = np.arange(series.Columns) if keep_hu else np.flatnonzero(w_col.any(axis=0))
    w_row_used = np.ascontiguousarray(w_row[:, rows])
    w_col_used_t = np.ascontiguousarray(w_col[:, columns].T)
    # The products are small: OpenBLAS's threads would spin for them (measured: 6x the CPU time, 6x slower).
    with threadpool_limits(limits=1, user_api="blas"):
        for k, hu in _hu_slices(series, None if keep_hu else rows, None if keep_hu else columns):
            if hu_full is not None:
                hu_full[:, :, k] = hu.T
            contributes = np.flatnonzero(w_slice[:, k])
            if contributes.size == 0:
                continue
            plane = w_row_used @ hu @ w_col_used_t  # (row', col')
            for o in contributes:
                planes[o] += w_slice[o, k] * plane
    # planes axes are the input axes (2, 1, 0); put them in the grid's axis order.
    volume = np.ascontiguousarray(planes.transpose([2 - i for i in (mapping[0][0], mapping[1][0], mapping[2][0])]))
    return ResampledVolume(volume, grid.affine, hu_full if keep_hu else None, source_affine if keep_hu else None)


def _resampled_by_monai(
    series: ValidatedSeries, pixdim: tuple[float, float, float], hu_full: np.ndarray, *, keep_hu: bool
) -> ResampledVolume:
    """Fallback: the full HU volume through MONAI's ``Orientation`` + ``Spacing`` (imports torch and MONAI)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing
    from monai.utils import MetaKeys, SpaceKeys

    for k, hu in _hu_slices(series):
        hu_full[:, :, k] = hu.T
    affine = series_affine(series)
    image = MetaTensor(
        torch.from_numpy(hu_full)[None], affine=torch.as_tensor(affine), meta={MetaKeys.SPACE: SpaceKeys.RAS}
    )
    image = Orientation(axcodes="RAS", labels=None)(image)
    image = Spacing(pixdim=pixdim, mode="bilinear", padding_mode="border")(image)
    volume = image.as_tensor()[0].numpy().astype(np.float32)
    return ResampledVolume(
        volume, image.affine.numpy().astype(np.float64), hu_full if keep_hu else None, affine if keep_hu else None
    )


def __getattr__(name: str) -> Any:
    """The MONAI transforms that wrap these readers live in :mod:`preprocessing.transforms` (this module imports
    neither torch nor MONAI, so that ingestion's workers start in a fraction of a second); old imports still work."""
    if name in ("LoadCTSeriesd", "LoadResampledCTd"):
        from preprocessing import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Stage 3: a validated series -> an HU volume with its RAS affine (a MONAI MetaTensor).

Every slice is decoded and checked against the geometry that validation established, so a file that
changed since validation or whose pixel data is truncated raises instead of producing a wrong volume.
Any transfer syntax pydicom has a decoder for is read (native, deflated, RLE, JPEG lossless, JPEG-LS,
JPEG 2000); a multi-frame (Enhanced CT) file is decoded once and its frames taken with their own
position and rescale. Padding pixels (PixelPaddingValue / PixelPaddingRangeLimit) become air, -1000 HU.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import MetaKeys, SpaceKeys, TraceKeys
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


def model_grid(series: ValidatedSeries, pixdim: tuple[float, float, float]) -> ModelGrid:
    """Output geometry of MONAI's ``Orientationd(axcodes="RAS")`` + ``Spacingd(pixdim)`` for this series.

    Computed by MONAI itself in lazy mode on a stride-0 stand-in of the volume: no pixel is read or allocated, and
    the grid is MONAI's to the last bit (shape rounding, corner alignment), so caches and models stay comparable.
    """
    from monai.transforms import Orientation, Spacing

    stand_in = MetaTensor(
        torch.zeros(1, 1, 1, 1).expand(1, *series.shape),
        affine=torch.as_tensor(series_affine(series), dtype=torch.float64),
        meta={MetaKeys.SPACE: SpaceKeys.RAS},
    )
    oriented = Orientation(axcodes="RAS", labels=None, lazy=True)(stand_in)
    spaced = Spacing(pixdim=tuple(float(p) for p in pixdim), mode="bilinear", padding_mode="border", lazy=True)(
        oriented
    )
    shape = tuple(int(n) for n in spaced.peek_pending_shape())
    affine = np.asarray(spaced.peek_pending_affine(), dtype=np.float64)
    return ModelGrid(shape=shape, affine=affine)  # type: ignore[arg-type]


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
    """Fallback: the full HU volume through MONAI's ``Orientation`` + ``Spacing``."""
    from monai.transforms import Orientation, Spacing

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


class LoadResampledCTd(MapTransform, InvertibleTransform):
    """MONAI dictionary transform: ``data[key]`` (a :class:`ValidatedSeries`, or its dict) -> HU on the model grid.

    Does in one pass over the files what ``LoadCTSeriesd`` + ``Orientationd("RAS")`` + ``Spacingd(pixdim)`` do
    (see :func:`read_resampled_volume`): a channel-first :class:`monai.data.MetaTensor` with MONAI's grid affine.
    With ``hu_key`` the full-resolution HU volume (:func:`read_hu_volume`'s layout) and its affine are also put in
    ``data[hu_key]`` (a MetaTensor), for overlays at inference. The inverse resamples back onto the series' own grid.
    """

    def __init__(
        self,
        keys: str | list[str],
        *,
        pixdim: tuple[float, float, float],
        antialias: bool = False,
        hu_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(pixdim) != 3 or any(not float(p) > 0 for p in pixdim):
            raise ValueError(f"pixdim must be three positive numbers, got {pixdim!r}")
        self.pixdim = tuple(float(p) for p in pixdim)
        self.antialias = bool(antialias)
        self.hu_key = hu_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], Mapping) and "nifti" in d[key]:  # a validated NIfTI volume (preprocessing/nifti.py)
                from preprocessing.nifti import read_resampled_nifti, source_geometry

                out = read_resampled_nifti(d[key], self.pixdim, keep_hu=self.hu_key is not None)
                orig_size, orig_affine = source_geometry(d[key])
            else:
                series = as_series(d[key])
                out = read_resampled_volume(
                    series, self.pixdim, antialias=self.antialias, keep_hu=self.hu_key is not None
                )
                orig_size, orig_affine = series.shape, series_affine(series)
            image = MetaTensor(
                torch.from_numpy(out.volume[None]),
                affine=torch.as_tensor(out.affine, dtype=torch.float64),
                meta={MetaKeys.SPACE: SpaceKeys.RAS},
            )
            self.push_transform(image, orig_size=orig_size, extra_info={"affine": orig_affine})
            d[key] = image
            if self.hu_key is not None and out.hu is not None:
                d[self.hu_key] = MetaTensor(
                    torch.from_numpy(out.hu[None]),
                    affine=torch.as_tensor(out.hu_affine, dtype=torch.float64),
                    meta={MetaKeys.SPACE: SpaceKeys.RAS},
                )
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample ``data[key]`` (on the model grid) back onto the series' grid: (Columns, Rows, slices), its affine."""
        from monai.transforms import SpatialResample

        d = dict(data)
        for key in self.key_iterator(d):
            transform = self.pop_transform(d[key])
            resample = SpatialResample(mode="bilinear", padding_mode="border")
            with resample.trace_transform(False):
                d[key] = resample(
                    d[key],
                    dst_affine=torch.as_tensor(
                        np.asarray(transform[TraceKeys.EXTRA_INFO]["affine"]), dtype=torch.float64
                    ),
                    spatial_size=[int(n) for n in transform[TraceKeys.ORIG_SIZE]],
                )
        return d

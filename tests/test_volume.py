"""Stage 3: decoding a validated series to HU with its voxel -> RAS affine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from preprocessing.discover import discover
from preprocessing.validate import SeriesInvalid, ValidationConfig, validate_series
from preprocessing.volume import LPS_TO_RAS, LoadCTSeriesd, as_series, read_hu_volume, series_affine, series_to_dict


def _validated(root: Path, config: ValidationConfig | None = None):
    found = discover(root)
    [headers] = found.series.values()
    return validate_series(headers, config=config)


def _load(root: Path, config: ValidationConfig | None = None):
    return read_hu_volume(_validated(root, config))


def _ras(lps) -> np.ndarray:
    x, y, z = (float(v) for v in lps)
    return np.array([-x, -y, z])


def _hu_at_world(volume: np.ndarray, affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """Values of ``volume`` at RAS points ``world`` (N, 3), which must fall on voxel centres."""
    index = np.linalg.inv(affine) @ np.c_[world, np.ones(len(world))].T
    rounded = np.rint(index[:3]).astype(int)
    np.testing.assert_allclose(index[:3], rounded, atol=1e-4)
    assert np.all(rounded >= 0) and np.all(rounded.T < volume.shape)
    return volume[tuple(rounded)]


def _all_voxel_centres(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    return (affine @ np.c_[grid, np.ones(len(grid))].T)[:3].T


# --- HU values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixel_representation", "intercept", "lo", "hi"),
    [(0, -1024.0, -1024, 3071), (1, 0.0, -2048, 3071)],
)
def test_hu_round_trip(make_series, dicom_root, pixel_representation, intercept, lo, hi):
    hu = np.random.default_rng(7).integers(lo, hi + 1, size=(10, 16, 20))
    hu[0, 0, 0], hu[-1, -1, -1] = lo, hi
    make_series("a", hu=hu, rescale_intercept=intercept, pixel_representation=pixel_representation)

    volume, _ = _load(dicom_root)

    assert volume.dtype == np.float32
    assert volume.shape == (20, 16, 10)  # (Columns, Rows, slices)
    np.testing.assert_allclose(volume, hu.transpose(2, 1, 0), atol=1.0)
    assert volume.min() == pytest.approx(lo, abs=1) and volume.max() == pytest.approx(hi, abs=1)


def test_rescale_slope_is_applied(make_series, dicom_root):
    hu = np.random.default_rng(3).uniform(-1000, 1000, size=(10, 16, 16))
    make_series("a", hu=hu, rescale_intercept=-1000.0, rescale_slope=0.5)

    volume, _ = _load(dicom_root)

    np.testing.assert_allclose(volume, hu.transpose(2, 1, 0), atol=0.25 + 1e-6)


# --- geometry --------------------------------------------------------------------------------------------------


def test_affine_maps_voxels_to_the_slice_positions_in_ras(make_series, dicom_root):
    s = make_series("a", n_slices=10, rows=16, cols=20, pixel_spacing_mm=(1.5, 2.0), slice_spacing_mm=3.0)

    series = _validated(dicom_root)
    volume, affine = read_hu_volume(series)

    np.testing.assert_allclose(affine, series_affine(series))
    first = pydicom.dcmread(s.paths[0])
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*_ras(first.ImagePositionPatient), 1.0], atol=1e-6)
    # Voxel spacing along (column index, row index, slice index) = (PixelSpacing[1], PixelSpacing[0], slice step).
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [2.0, 1.5, 3.0], atol=1e-6)
    for k, path in enumerate(s.paths):
        ipp = pydicom.dcmread(path).ImagePositionPatient
        np.testing.assert_allclose((affine @ [0, 0, k, 1])[:3], _ras(ipp), atol=1e-4)
    # Column index c moves along +x (LPS) by c * column spacing, row index r along +y by r * row spacing.
    x, y, z = s.origin_mm
    np.testing.assert_allclose((affine @ [19, 15, 9, 1])[:3], _ras((x + 19 * 2.0, y + 15 * 1.5, z + 9 * 3.0)), atol=1e-4)
    np.testing.assert_allclose(affine[3], [0, 0, 0, 1])


def test_affine_of_real_ct_series(tmp_path, copy_testdata):
    folder = copy_testdata("dicomdirtests/98892001/CT5N", tmp_path / "CT5N")

    series = _validated(folder, ValidationConfig(min_slices=2))
    volume, affine = read_hu_volume(series)

    lowest = pydicom.dcmread(folder / "3353")  # the slice with the smallest z
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*_ras(lowest.ImagePositionPatient), 1.0], atol=1e-5)
    spacing = [float(v) for v in lowest.PixelSpacing]
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [spacing[1], spacing[0], 2.5], atol=1e-5)
    assert volume.shape == (16, 16, 5)
    reference = pydicom.pixels.apply_modality_lut(lowest.pixel_array, lowest)
    np.testing.assert_allclose(volume[:, :, 0], reference.T)


def test_lps_to_ras_negates_x_and_y():
    np.testing.assert_allclose(LPS_TO_RAS @ [1, 2, 3, 1], [-1, -2, 3, 1])


def test_shuffled_file_names_give_the_same_volume(make_series, dicom_root):
    s = make_series("a", n_slices=12)
    reference, reference_affine = _load(dicom_root)

    order = np.random.default_rng(11).permutation(len(s.paths))
    for k, i in enumerate(order):
        s.paths[i].rename(s.folder / f"tmp{k}")
    for k in range(len(order)):
        (s.folder / f"tmp{k}").rename(s.folder / f"{(k * 7919) % 1000:03d}_{k}.dcm")
    assert {p.name for p in s.folder.iterdir()}.isdisjoint({p.name for p in s.paths})

    volume, affine = _load(dicom_root)

    np.testing.assert_array_equal(volume, reference)
    np.testing.assert_allclose(affine, reference_affine)


def test_slices_written_in_reverse_z_order_give_the_same_ras_volume(make_series, tmp_path, edit_dicom):
    a = make_series("a", n_slices=12, slice_spacing_mm=2.5)
    # Same object, but file k holds the k-th slice from the top: IM0001 is the highest z.
    n = len(a.paths)
    b = make_series("b", hu=a.hu[::-1], slice_spacing_mm=2.5, origin_mm=a.origin_mm)
    for k, path in enumerate(b.paths):
        z = a.origin_mm[2] + (n - 1 - k) * 2.5

        def change(ds, z=z):
            ds.ImagePositionPatient = [str(a.origin_mm[0]), str(a.origin_mm[1]), f"{z:.4f}"]
            ds.SliceLocation = f"{z:.4f}"

        edit_dicom(path, change)

    vol_a, aff_a = _load(a.folder)
    vol_b, aff_b = _load(b.folder)

    world = _all_voxel_centres(vol_a, aff_a)
    np.testing.assert_array_equal(_hu_at_world(vol_b, aff_b, world), _hu_at_world(vol_a, aff_a, world))
    np.testing.assert_array_equal(vol_b, vol_a)
    np.testing.assert_allclose(aff_b, aff_a)


def test_flipped_row_direction_gives_the_same_hu_at_each_ras_position(make_series, edit_dicom):
    rows, dy = 16, 2.0
    a = make_series("a", n_slices=10, rows=rows, cols=16, pixel_spacing_mm=(dy, 2.0), slice_spacing_mm=2.5)
    x0, y0, z0 = a.origin_mm
    # Columns point towards -y (anterior): row r lies at y0 + (rows-1-r)*dy, the slice normal is -z,
    # so the volume is stored upside down and head first, and only the affine says so.
    b = make_series("b", hu=a.hu[:, ::-1, :], pixel_spacing_mm=(dy, 2.0), slice_spacing_mm=2.5, origin_mm=a.origin_mm)

    for k, path in enumerate(b.paths):

        def change(ds, k=k):
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "-1", "0"]
            ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0 + (rows - 1) * dy:.4f}", f"{z0 + k * 2.5:.4f}"]

        edit_dicom(path, change)

    vol_a, aff_a = _load(a.folder)
    series_b = _validated(b.folder)
    vol_b, aff_b = read_hu_volume(series_b)

    assert series_b.paths[0] == str(b.paths[-1])  # sorted along the normal: highest z first
    assert not np.array_equal(vol_a, vol_b)
    world = _all_voxel_centres(vol_a, aff_a)
    np.testing.assert_array_equal(_hu_at_world(vol_b, aff_b, world), _hu_at_world(vol_a, aff_a, world))


# --- refusals while decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 100, 512, 600])
def test_truncated_pixel_data_is_refused_naming_the_file(make_series, dicom_root, cut):
    s = make_series("a", n_slices=12)
    bad = s.paths[5]
    size = bad.stat().st_size
    bad.write_bytes(bad.read_bytes()[:-cut])

    series = _validated(dicom_root)  # the headers are intact
    assert len(series.paths) == 12
    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)

    assert info.value.reason == "truncated_pixel_data"
    assert info.value.path == str(bad)
    assert bad.stat().st_size == size - cut


def test_slice_moved_after_validation_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)
    series = _validated(dicom_root)

    def move(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [str(x), str(y), f"{z + 1.0:.4f}"]

    edit_dicom(s.paths[4], move)

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert (info.value.reason, info.value.path) == ("inconsistent_geometry", str(s.paths[4]))


def test_slice_replaced_by_another_size_after_validation_is_refused(make_series, dicom_root, series_writer):
    s = make_series("a", n_slices=12, rows=16, cols=16)
    series = _validated(dicom_root)
    other = series_writer(dicom_root.parent / "other", n_slices=1, rows=20, cols=16, origin_mm=s.origin_mm)
    s.paths[0].write_bytes(other.paths[0].read_bytes())

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert (info.value.reason, info.value.path) == ("inconsistent_geometry", str(s.paths[0]))


@pytest.mark.parametrize("keyword", ["RescaleIntercept", "RescaleSlope"])
def test_slice_without_rescale_is_refused_not_read_as_raw_values(make_series, dicom_root, edit_dicom, keyword):
    # Without the modality LUT the stored values (HU + 1024 here) would silently pass for HU.
    s = make_series("a", n_slices=12, rescale_intercept=-1024.0)
    edit_dicom(s.paths[6], lambda ds: delattr(ds, keyword))
    series = _validated(dicom_root)

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert (info.value.reason, info.value.path) == ("missing_attribute", str(s.paths[6]))
    assert keyword in info.value.message


def test_file_deleted_after_validation_is_unreadable(make_series, dicom_root):
    s = make_series("a", n_slices=12)
    series = _validated(dicom_root)
    s.paths[3].unlink()

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert (info.value.reason, info.value.path) == ("unreadable", str(s.paths[3]))


# --- MONAI transform and dict form ----------------------------------------------------------------------------


def test_load_transform_gives_a_channel_first_meta_tensor(make_series, dicom_root):
    s = make_series("a", n_slices=10, rows=16, cols=20)
    series = _validated(dicom_root)

    out = LoadCTSeriesd(keys="image")({"image": series_to_dict(series), "label": 2})

    image = out["image"]
    assert isinstance(image, MetaTensor)
    assert tuple(image.shape) == (1, 20, 16, 10)
    np.testing.assert_allclose(image.affine.numpy(), series_affine(series))
    np.testing.assert_allclose(image[0].numpy(), s.hu.transpose(2, 1, 0), atol=1.0)
    assert image.dtype == torch.float32
    assert out["label"] == 2


def test_series_dict_round_trip(make_series, dicom_root):
    make_series("a", n_slices=10)
    series = _validated(dicom_root)

    d = series_to_dict(series)
    back = as_series(d)

    assert d["dropped"] == []
    assert json.loads(json.dumps(d)) == d  # what manifest.json gives back is the same dict (the cache key hashes it)
    assert back == series
    assert as_series(series) is series

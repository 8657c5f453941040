"""Stage 3: decoding a validated series to HU with its voxel -> RAS affine."""

from __future__ import annotations

import dataclasses
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
    np.testing.assert_allclose(
        (affine @ [19, 15, 9, 1])[:3], _ras((x + 19 * 2.0, y + 15 * 1.5, z + 9 * 3.0)), atol=1e-4
    )
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


# --- regression: slice order -------------------------------------------------------------------------------------


def test_volume_is_the_modality_lut_of_each_slice_in_position_order_for_shuffled_names(make_series, dicom_root):
    s = make_series("a", n_slices=12, rescale_intercept=-1024.0, rescale_slope=1.0)
    order = np.random.default_rng(5).permutation(len(s.paths))
    for k, i in enumerate(order):
        s.paths[i].rename(s.folder / f"x{(k * 7) % 12:02d}_{k}.dcm")

    volume, _ = _load(dicom_root)

    datasets = [pydicom.dcmread(p) for p in s.folder.iterdir()]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 13))
    for k, ds in enumerate(datasets):
        expected = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        np.testing.assert_array_equal(volume[:, :, k], expected.T)


# --- files without File Meta ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("implicit_vr", "little_endian"), [(True, True), (False, True), (False, False)])
def test_series_without_file_meta_decodes_to_the_same_volume(
    make_series, dicom_root, without_file_meta, implicit_vr, little_endian
):
    s = make_series("a", n_slices=10, pixel_representation=1, rescale_intercept=0.0)
    reference, reference_affine = _load(dicom_root)
    for path in s.paths:
        without_file_meta(path, implicit_vr=implicit_vr, little_endian=little_endian)

    volume, affine = _load(dicom_root)

    np.testing.assert_array_equal(volume, reference)
    np.testing.assert_array_equal(volume, s.hu.transpose(2, 1, 0))
    np.testing.assert_allclose(affine, reference_affine)


def test_compressed_pixel_data_without_file_meta_is_refused(make_series, dicom_root, without_file_meta):
    s = make_series("a", n_slices=10)
    ds = pydicom.dcmread(s.paths[4])
    ds.compress(pydicom.uid.RLELossless)
    ds.save_as(s.paths[4])
    without_file_meta(s.paths[4], implicit_vr=False)  # encapsulated data is always explicit VR
    series = _validated(dicom_root)

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)

    assert (info.value.reason, info.value.path) == ("unsupported_transfer_syntax", str(s.paths[4]))


# --- padding ---------------------------------------------------------------------------------------------------


def _padded_hu(seed: int, pad_hu: float, n_slices: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Random tissue (-900..1500 HU) with padding value ``pad_hu`` in a band of rows and columns."""
    hu = np.random.default_rng(seed).integers(-900, 1500, size=(n_slices, 16, 16))
    pad = np.zeros(hu.shape, dtype=bool)
    pad[:, :3, :] = True  # outside the reconstruction circle
    pad[:, :, -2:] = True
    hu[pad] = pad_hu
    return hu, pad


def _set_padding(paths, vr: str, value: int, limit: int | None = None) -> None:
    """Write PixelPaddingValue (and PixelPaddingRangeLimit) with an explicit VR: US or SS, as the data is."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, vr, value)
        if limit is not None:
            ds.add_new(0x00280121, vr, limit)
        ds.save_as(path)


@pytest.mark.parametrize(
    ("vr", "value"),
    [("SS", -2000), ("US", 63536)],  # the same 16 bits, written as signed or as unsigned
)
def test_pixel_padding_value_becomes_air(make_series, dicom_root, vr, value):
    hu, pad = _padded_hu(1, -2000)
    s = make_series("a", hu=hu, pixel_representation=1, rescale_intercept=0.0)
    _set_padding(s.paths, vr, value)

    volume, _ = _load(dicom_root)

    expected = np.where(pad, -1000, hu).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume, expected)


def test_without_pixel_padding_value_padding_stays_what_the_rescale_makes(make_series, dicom_root):
    hu, _ = _padded_hu(1, -2000)
    make_series("a", hu=hu, pixel_representation=1, rescale_intercept=0.0)

    volume, _ = _load(dicom_root)

    np.testing.assert_array_equal(volume, hu.transpose(2, 1, 0))


def test_pixel_padding_range_limit_makes_the_whole_range_air(make_series, dicom_root):
    hu, pad = _padded_hu(2, -1024)  # stored 0 with intercept -1024
    hu[:, 3, 0] = -1010  # stored 14: inside the padding range 0..30
    hu[:, 3, 1] = -993  # stored 31: outside, real tissue (air) value kept
    s = make_series("a", hu=hu, rescale_intercept=-1024.0)
    _set_padding(s.paths, "US", 30, limit=0)  # either order

    volume, _ = _load(dicom_root)

    expected = hu.astype(np.float32)
    expected[pad] = -1000
    expected[:, 3, 0] = -1000
    np.testing.assert_array_equal(volume, expected.transpose(2, 1, 0))
    assert np.all(volume[1, 3, :] == -993)


def test_padding_value_outside_bits_stored_is_found_in_the_raw_words(make_series, dicom_root, edit_dicom):
    # Unsigned 12-bit data, padding written as 0xF830 (-2000 as 16 bits): pydicom returns such a word reduced to
    # 12 bits (2096, i.e. 1072 HU of "bone"). Real bone at stored 2096 must stay bone.
    hu, pad = _padded_hu(3, 0)
    hu = np.clip(hu, -1024, 1000)
    hu[:, 8, 8] = 2096 - 1024
    s = make_series("a", hu=hu, rescale_intercept=-1024.0)
    assert pydicom.dcmread(s.paths[0]).BitsStored == 12

    def pad_words(ds):
        stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(16, 16).copy()
        stored[pad[0]] = 0xF830
        ds.PixelData = stored.tobytes()
        ds.add_new(0x00280120, "US", 0xF830)

    for path in s.paths:
        edit_dicom(path, pad_words)
    assert pydicom.dcmread(s.paths[0]).pixel_array[0, 0] == 2096

    volume, _ = _load(dicom_root)

    expected = np.where(pad, -1000, hu).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume, expected)
    assert np.all(volume[8, 8, :] == 1072)


def test_padding_value_outside_bits_stored_of_compressed_data_is_refused(make_series, dicom_root):
    s = make_series("a", n_slices=10, rescale_intercept=-1024.0)
    for path in s.paths:
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "US", 0xF830)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(path)
    series = _validated(dicom_root)

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)

    assert info.value.reason == "ambiguous_padding"
    assert info.value.path == series.paths[0]


def test_real_ct_padding_becomes_air(tmp_path, copy_testdata, stack_real):
    src = copy_testdata("693_UNCR.dcm", tmp_path / "src")  # pydicom-data; PixelPaddingValue -2000
    folder = tmp_path / "in"
    stack_real(src, folder, 2)
    ds = pydicom.dcmread(src)
    assert ds.PixelPaddingValue == -2000

    volume, _ = _load(folder, ValidationConfig(min_slices=2))

    stored = ds.pixel_array
    padded = stored == -2000
    assert padded.sum() > 50_000  # the corners outside the field of view
    expected = pydicom.pixels.apply_modality_lut(stored, ds)
    expected[padded] = -1000
    for k in range(2):
        np.testing.assert_array_equal(volume[:, :, k], expected.T.astype(np.float32))
    assert volume.min() >= -1024


# --- Enhanced CT -----------------------------------------------------------------------------------------------


def test_enhanced_ct_gives_the_same_volume_and_affine_as_single_frame_slices(make_series, tmp_path, enhanced_ct_writer):
    geometry = {"pixel_spacing_mm": (1.5, 2.0), "slice_spacing_mm": 3.0, "rescale_intercept": 0.0}
    s = make_series("single", n_slices=10, rows=16, cols=20, pixel_representation=1, **geometry)
    order = [3, 8, 1, 0, 9, 4, 7, 2, 6, 5]
    enhanced_ct_writer(tmp_path / "enhanced" / "enh.dcm", s.hu, origin_mm=s.origin_mm, frame_order=order, **geometry)

    single, single_affine = _load(s.folder)
    series = _validated(tmp_path / "enhanced")
    volume, affine = read_hu_volume(series)

    assert series.frames != tuple(range(10))
    np.testing.assert_array_equal(volume, single)
    np.testing.assert_array_equal(volume, s.hu.transpose(2, 1, 0))
    np.testing.assert_allclose(affine, single_affine)


def test_enhanced_ct_per_frame_rescale_is_applied(dicom_root, enhanced_ct_writer):
    hu = np.random.default_rng(4).integers(-1000, 2000, size=(8, 12, 12))
    intercepts = [-1024.0, -1000.0, 0.0, -2048.0, -1024.0, -512.0, 0.0, -1024.0]
    enhanced_ct_writer(dicom_root / "enh.dcm", hu, rescale_intercept=intercepts, frame_order=[7, 6, 5, 4, 3, 2, 1, 0])

    volume, _ = _load(dicom_root)

    np.testing.assert_array_equal(volume, hu.transpose(2, 1, 0))


def test_enhanced_ct_padding_becomes_air(dicom_root, enhanced_ct_writer, edit_dicom):
    hu, pad = _padded_hu(5, -2000, n_slices=8)
    path = enhanced_ct_writer(dicom_root / "enh.dcm", hu, rescale_intercept=0.0)
    edit_dicom(path, lambda ds: ds.add_new(0x00280120, "SS", -2000))

    volume, _ = _load(dicom_root)

    np.testing.assert_array_equal(volume, np.where(pad, -1000, hu).transpose(2, 1, 0))


def test_enhanced_ct_frame_moved_after_validation_is_refused(dicom_root, enhanced_ct_writer, edit_dicom):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((8, 8, 8)))
    series = _validated(dicom_root)

    def move(ds):
        ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient = ["-15", "-20", "106.5"]

    edit_dicom(path, move)

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert (info.value.reason, info.value.path) == ("inconsistent_geometry", str(path))
    assert "frame 3" in info.value.message


def test_enhanced_ct_without_rescale_is_refused(dicom_root, enhanced_ct_writer, edit_dicom):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((8, 8, 8)))
    edit_dicom(path, lambda ds: delattr(ds.SharedFunctionalGroupsSequence[0], "PixelValueTransformationSequence"))
    series = _validated(dicom_root)

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert (info.value.reason, info.value.path) == ("missing_attribute", str(path))
    assert "frame 1" in info.value.message


def test_enhanced_ct_with_fewer_frames_than_validated_is_refused(dicom_root, enhanced_ct_writer, tmp_path):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((8, 8, 8)))
    series = _validated(dicom_root)
    path.write_bytes(enhanced_ct_writer(tmp_path / "other.dcm", np.zeros((4, 8, 8))).read_bytes())

    with pytest.raises(SeriesInvalid) as info:
        read_hu_volume(series)
    assert info.value.path == str(path)
    assert info.value.reason == "inconsistent_geometry"


def _rescale_type_hu(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleType = "HU"  # it says US: RCBF map


def test_real_enhanced_ct_volume_and_affine(tmp_path, copy_testdata, edit_dicom):
    path = copy_testdata("eCT_Supplemental.dcm", tmp_path / "in")
    edit_dicom(path, _rescale_type_hu)
    ds = pydicom.dcmread(path)

    volume, affine = _load(tmp_path / "in", ValidationConfig(min_slices=2))

    assert volume.shape == (512, 512, 2)
    frames = ds.pixel_array.astype(np.float32) - 1024.0
    np.testing.assert_array_equal(volume[:, :, 0], frames[1].T)  # frame 2 is first along the normal (-z)
    np.testing.assert_array_equal(volume[:, :, 1], frames[0].T)
    for k, frame in enumerate((1, 0)):
        ipp = ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose((affine @ [0, 0, k, 1])[:3], _ras(ipp), atol=1e-4)
    # Rows run along -x (LPS), i.e. +x in RAS; the slice step is 10 mm along -z.
    np.testing.assert_allclose(affine[:3, 0], [0.388672, 0, 0], atol=1e-6)
    np.testing.assert_allclose(affine[:3, 2], [0, 0, -10.0], atol=1e-6)


def test_enhanced_series_dict_round_trip_and_transform(dicom_root, enhanced_ct_writer):
    hu = np.random.default_rng(6).integers(-1000, 1000, size=(8, 12, 10))
    enhanced_ct_writer(dicom_root / "enh.dcm", hu, frame_order=[1, 0, 3, 2, 5, 4, 7, 6])
    series = _validated(dicom_root)

    d = series_to_dict(series)
    back = as_series(json.loads(json.dumps(d)))
    out = LoadCTSeriesd(keys="image")({"image": json.loads(json.dumps(d))})

    assert d["frames"] == [1, 0, 3, 2, 5, 4, 7, 6]
    assert back == series
    np.testing.assert_array_equal(out["image"][0].numpy(), hu.transpose(2, 1, 0))
    np.testing.assert_allclose(out["image"].affine.numpy(), series_affine(series))


def test_single_frame_series_dict_has_no_frames_key(make_series, dicom_root):
    # Keeps the dict, and so the cache key, of single-frame series what it was before multi-frame support.
    make_series("a", n_slices=10)
    series = _validated(dicom_root)

    d = series_to_dict(series)

    assert "frames" not in d
    assert as_series(d).frames == ()


# --- straight to the model grid (LoadResampledCTd) against today's MONAI chain ------------------------------------

from monai.transforms import (  # noqa: E402 - kept next to the tests that use the reference chain
    Compose,
    CropForegroundd,
    EnsureTyped,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from preprocessing.transforms import AboveThreshold, PipelineConfig, deterministic_transforms  # noqa: E402
from preprocessing.volume import LoadResampledCTd, axis_weights, model_grid, read_resampled_volume  # noqa: E402

#: Tolerance of "same answer" on the [0, 1] window (measured 1.2e-7 on a 512x512x150 phantom: float32 rounding).
SAME_MAX_ABS = 1e-4
SAME_MIN_CORRELATION = 0.99999


def todays_chain(cfg: PipelineConfig, key: str = "image") -> list:
    """The deterministic pipeline as it was up to pipeline version 2 (the reference for the fast loader)."""
    return [
        LoadCTSeriesd(keys=key),
        Orientationd(keys=key, axcodes="RAS", labels=None),
        Spacingd(keys=key, pixdim=cfg.target_spacing_mm, mode="bilinear", padding_mode="border"),
        CropForegroundd(
            keys=key,
            source_key=key,
            select_fn=AboveThreshold(cfg.body_threshold_hu),
            margin=2,
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        ScaleIntensityRanged(keys=key, a_min=cfg.hu_min, a_max=cfg.hu_max, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(keys=key, spatial_size=cfg.input_size, mode="constant", value=0.0),
        EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
    ]


#: Two affines of the same grid agree to this (mm): far below any voxel, far above float64 rounding.
AFFINE_ATOL_MM = 1e-9


def assert_same_answer(series, cfg: PipelineConfig) -> None:
    """New loader vs today's chain: same grid (affine to 1e-9 mm, shape) and the same model input."""
    item = {"image": series_to_dict(series)}
    old = todays_chain(cfg)
    new = deterministic_transforms(cfg)
    old_grid = Compose(old[:3])(dict(item))["image"]
    new_grid = Compose(new[:1])(dict(item))["image"]
    assert new_grid.shape == old_grid.shape
    # World geometry exact up to floating-point rounding: the two chains compute the affine in another order, and an
    # oblique series differed in its last bit (7e-15 mm) with numpy 2.4.6 / torch 2.13 where older builds agreed.
    assert np.allclose(new_grid.affine.numpy(), old_grid.affine.numpy(), rtol=0.0, atol=AFFINE_ATOL_MM)
    old_cropped = Compose(old[:6])(dict(item))["image"]
    new_cropped = Compose(new[:4])(dict(item))["image"]
    assert new_cropped.shape == old_cropped.shape
    assert np.allclose(new_cropped.affine.numpy(), old_cropped.affine.numpy(), rtol=0.0, atol=AFFINE_ATOL_MM)
    a = Compose(old)(dict(item))["image"].numpy()
    b = Compose(new)(dict(item))["image"].numpy()
    assert a.shape == b.shape == (1, *cfg.input_size)
    assert float(np.abs(a - b).max()) <= SAME_MAX_ABS
    if a.std() > 0:
        assert float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) >= SAME_MIN_CORRELATION


@pytest.fixture(scope="module")
def small_federation(tmp_path_factory):
    """The synthetic federation's four site profiles (signed/unsigned, intercepts, 1.25-5 mm slices), 128x128."""
    from synthetic.hospitals import default_profiles, write_federation

    out = tmp_path_factory.mktemp("federation")
    write_federation(out, sites=4, patients_per_site=1, seed=3, profiles=default_profiles(4))
    return out


def test_same_answer_as_todays_chain_on_the_synthetic_federation(small_federation):
    cfg = PipelineConfig()
    checked = 0
    for site in sorted(p for p in small_federation.iterdir() if p.is_dir()):
        found = discover(site / "dicom")
        for headers in list(found.series.values())[:2]:
            assert_same_answer(validate_series(headers), cfg)
            checked += 1
    assert checked == 8


@pytest.mark.parametrize(
    "orientation",
    [
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0],  # mirrored
        [0.0, 1.0, 0.0, 1.0, 0.0, 0.0],  # transposed, normal to the feet
        [1.0, 0.0, 0.0, 0.0, 0.0, -1.0],  # coronal
        [0.0, 1.0, 0.0, 0.0, 0.0, -1.0],  # sagittal
        [0.9848078, 0.1736482, 0.0, -0.1736482, 0.9848078, 0.0],  # oblique: 10 degrees in plane
    ],
)
def test_same_answer_in_every_orientation(tmp_path, series_writer, edit_dicom, orientation):
    rng = np.random.default_rng(5)
    hu = rng.normal(-300.0, 400.0, size=(20, 40, 36)).round().astype(np.int32)
    series = series_writer(tmp_path / "in" / "s", hu=hu, pixel_spacing_mm=(1.3, 0.9), slice_spacing_mm=2.0)
    normal = np.cross(orientation[:3], orientation[3:])
    for k, path in enumerate(series.paths):  # slices stacked along the new normal

        def reorient(ds: pydicom.Dataset, k: int = k) -> None:
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = [f"{v:.4f}" for v in np.array([10.0, -20.0, 30.0]) + 2.0 * k * normal]

        edit_dicom(path, reorient)
    assert_same_answer(
        _validated(tmp_path / "in"), PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(3.0, 2.5, 4.0))
    )


def test_same_answer_on_real_ct5n(tmp_path, copy_testdata):
    copy_testdata("dicomdirtests/98892001/CT5N", tmp_path / "in" / "CT5N")
    series = _validated(tmp_path / "in", ValidationConfig(min_slices=5))
    assert_same_answer(series, PipelineConfig(input_size=(8, 8, 8), target_spacing_mm=(1.0, 1.0, 1.0)))


def test_same_answer_on_real_ct_small_stack(tmp_path, stack_real):
    from pydicom.data import get_testdata_file

    stack_real(get_testdata_file("CT_small.dcm", download=False), tmp_path / "in" / "s", 12, step_mm=1.5)
    assert_same_answer(
        _validated(tmp_path / "in"), PipelineConfig(input_size=(16, 16, 8), target_spacing_mm=(2.0, 2.0, 2.0))
    )


def test_same_answer_on_real_enhanced_ct(tmp_path, copy_testdata, edit_dicom):
    path = copy_testdata("eCT_Supplemental.dcm", tmp_path / "in")

    def hounsfield(ds: pydicom.Dataset) -> None:  # the file says US (a perfusion map): relabel so it validates
        for element in ds.iterall():
            if element.keyword == "RescaleType":
                element.value = "HU"

    edit_dicom(path, hounsfield)
    series = _validated(tmp_path / "in", ValidationConfig(min_slices=2))
    assert sorted(series.frames) == [0, 1]
    assert_same_answer(series, PipelineConfig(input_size=(32, 32, 8), target_spacing_mm=(5.0, 5.0, 5.0)))


def test_model_grid_matches_monai(dicom_root, make_series):
    make_series("s", n_slices=10, rows=24, cols=20, pixel_spacing_mm=(0.7, 0.8), slice_spacing_mm=1.25)
    series = _validated(dicom_root)
    grid = model_grid(series, (5.0, 5.0, 5.0))
    reference = Compose(todays_chain(PipelineConfig())[:3])({"image": series_to_dict(series)})["image"]
    assert grid.shape == tuple(reference.shape[1:])
    assert np.array_equal(grid.affine, reference.affine.numpy())


def test_antialias_averages_what_point_sampling_aliases(tmp_path, series_writer):
    """Stripes one pixel wide, resampled 4x coarser: bilinear point sampling sees only one phase of them;
    the anti-aliased (tent of the step's width) resampling gives their mean everywhere."""
    hu = np.zeros((12, 64, 64), dtype=np.int32)
    hu[:, :, ::2] = 400  # columns alternate 0 / 400 HU
    series_writer(tmp_path / "in" / "s", hu=hu, pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=4.0)
    series = _validated(tmp_path / "in")
    point = read_resampled_volume(series, (4.0, 4.0, 4.0)).volume
    smooth = read_resampled_volume(series, (4.0, 4.0, 4.0), antialias=True).volume
    inner = (slice(1, -1), slice(1, -1), slice(None))
    assert np.abs(point[inner] - 200.0).min() >= 150.0  # point samples land on one stripe phase: 0 or 400
    np.testing.assert_allclose(smooth[inner], 200.0, atol=1.0)


def test_axis_weights_rows_sum_to_one_and_clamp_at_the_border():
    w = axis_weights(10, 4, 3.0, -1.0, antialias=False)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    assert w[0, 0] == pytest.approx(1.0)  # index -1 is outside: the border value
    np.testing.assert_allclose(axis_weights(10, 4, 3.0, 0.5, antialias=True).sum(axis=1), 1.0, rtol=1e-6)


def test_resampled_loader_refuses_a_truncated_slice_naming_it(dicom_root, make_series):
    files = make_series("s", n_slices=10)
    victim = files.paths[4]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[: len(data) - 100])
    series = _validated(dicom_root)
    with pytest.raises(SeriesInvalid) as info:
        read_resampled_volume(series, (4.0, 4.0, 4.0))
    assert info.value.reason == "truncated_pixel_data"
    assert Path(info.value.path).name == Path(victim).name


def test_resampled_loader_rejects_bad_pixdim():
    with pytest.raises(ValueError, match=r"-1\.0"):
        LoadResampledCTd(keys="image", pixdim=(5.0, -1.0, 5.0))


def test_resampled_loader_inverse_returns_to_the_series_grid(dicom_root, make_series):
    make_series("s", n_slices=12, rows=20, cols=18)
    series = _validated(dicom_root)
    loader = LoadResampledCTd(keys="image", pixdim=(4.0, 4.0, 4.0))
    out = loader({"image": series_to_dict(series)})
    back = loader.inverse(out)["image"]
    assert tuple(back.shape[1:]) == series.shape
    np.testing.assert_allclose(back.affine.numpy(), series_affine(series), atol=1e-9)


def test_resampled_loader_keeps_the_full_hu_volume_when_asked(dicom_root, make_series):
    make_series("s", n_slices=10)
    series = _validated(dicom_root)
    out = LoadResampledCTd(keys="image", pixdim=(4.0, 4.0, 4.0), hu_key="hu")({"image": series_to_dict(series)})
    volume, affine = read_hu_volume(series)
    np.testing.assert_array_equal(out["hu"].numpy()[0], volume)
    np.testing.assert_array_equal(out["hu"].affine.numpy(), affine)


def test_grid_that_is_not_a_scaled_permutation_falls_back_to_monai(dicom_root, make_series, monkeypatch):
    """Orientation + spacing always give a permuted, scaled grid; should one not, MONAI resamples the full volume."""
    import preprocessing.volume as volume

    make_series("s", n_slices=10, rows=20, cols=18)
    series = _validated(dicom_root)
    fast = read_resampled_volume(series, (4.0, 4.0, 4.0))
    monkeypatch.setattr(volume, "_axis_map", lambda *args: None)
    slow = read_resampled_volume(series, (4.0, 4.0, 4.0), keep_hu=True)
    np.testing.assert_array_equal(slow.affine, fast.affine)
    np.testing.assert_allclose(slow.volume, fast.volume, atol=1e-3)
    np.testing.assert_array_equal(slow.hu, read_hu_volume(series)[0])


# --- each header read once -------------------------------------------------------------------------------------


def _parsed_paths(monkeypatch) -> list[str]:
    """Record every file pydicom parses (a path or an open file's name) from now on."""
    parsed: list[str] = []
    real = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        parsed.append(str(getattr(fp, "name", fp)))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    return parsed


def test_each_header_is_parsed_once_from_discovery_to_the_model_grid(make_series, dicom_root, monkeypatch):
    s = make_series("a", n_slices=12, rescale_intercept=-1024.0)
    parsed = _parsed_paths(monkeypatch)

    series = _validated(dicom_root)
    assert sorted(parsed) == sorted(str(p) for p in s.paths)  # the header pass: each file once
    parsed.clear()
    volume, _ = read_hu_volume(series)
    resampled = read_resampled_volume(series, (4.0, 4.0, 5.0))

    assert parsed == []  # the pixel pass reads the pixel bytes where the header pass found them
    assert len(series.pixel_offsets) == 12 and series.file_states
    np.testing.assert_array_equal(volume, s.hu.transpose(2, 1, 0).astype(np.float32))
    assert resampled.volume.size > 0


def _without_direct_read(series):
    return dataclasses.replace(series, pixel_offsets=(), pixel_format=(), file_states="")


@pytest.mark.parametrize(("pixel_representation", "intercept"), [(0, -1024.0), (1, 0.0)])
def test_direct_read_equals_parsing_each_file_with_words_beyond_bits_stored(
    make_series, dicom_root, edit_dicom, pixel_representation, intercept
):
    # Stored words with bits set above BitsStored (12): pydicom masks (unsigned) or sign-extends (signed) them.
    s = make_series("a", n_slices=10, rescale_intercept=intercept, pixel_representation=pixel_representation)
    dtype = "<i2" if pixel_representation else "<u2"

    def dirty(ds):
        words = np.frombuffer(ds.PixelData, dtype="<u2").copy()
        words[::7] |= 0xF000
        ds.PixelData = words.astype("<u2").view(dtype).tobytes()

    for path in s.paths:
        edit_dicom(path, dirty)
    series = _validated(dicom_root)
    assert series.pixel_offsets

    direct, _ = read_hu_volume(series)
    parsed, _ = read_hu_volume(_without_direct_read(series))

    np.testing.assert_array_equal(direct, parsed)


@pytest.mark.parametrize(("implicit_vr", "little_endian"), [(True, True), (False, True), (False, False)])
def test_direct_read_of_files_without_file_meta_in_every_native_encoding(
    make_series, dicom_root, without_file_meta, implicit_vr, little_endian
):
    s = make_series("a", n_slices=10, pixel_representation=1, rescale_intercept=0.0)
    for path in s.paths:
        without_file_meta(path, implicit_vr=implicit_vr, little_endian=little_endian)
    series = _validated(dicom_root)

    assert len(series.pixel_offsets) == 10
    direct, _ = read_hu_volume(series)
    np.testing.assert_array_equal(direct, read_hu_volume(_without_direct_read(series))[0])
    np.testing.assert_array_equal(direct, s.hu.transpose(2, 1, 0))


def test_compressed_and_multi_frame_series_are_parsed_again_not_read_directly(
    dicom_root, make_series, enhanced_ct_writer
):
    s = make_series("a", n_slices=10)
    for path in s.paths:
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(path)
    assert _validated(dicom_root).pixel_offsets == ()

    root = dicom_root.parent / "enhanced"
    root.mkdir()
    enhanced_ct_writer(root / "enh.dcm", np.zeros((8, 12, 12)))
    assert _validated(root).pixel_offsets == ()


def test_nothing_is_read_that_validation_refused(make_series, dicom_root, monkeypatch):
    # A copy of one slice (same SOPInstanceUID) is dropped by validation; its pixel data is garbage.
    s = make_series("a", n_slices=12)
    copy = s.folder / "copy-of-slice-3.dcm"
    data = s.paths[3].read_bytes()
    copy.write_bytes(data[:-100])  # header intact, pixels truncated
    series = _validated(dicom_root)
    assert [d.reason for d in series.dropped] == ["duplicate_instance"] and str(copy) in {
        d.path for d in series.dropped
    }

    opened: list[str] = []
    real_open = open

    def recording(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording)
    volume, _ = read_hu_volume(series)
    read_resampled_volume(series, (4.0, 4.0, 5.0))

    inputs = {path for path in opened if path.startswith(str(dicom_root))}  # (threadpoolctl reads /proc/self/maps)
    assert str(copy) not in inputs
    assert inputs == set(series.paths)
    np.testing.assert_array_equal(volume, s.hu.transpose(2, 1, 0).astype(np.float32))


def test_file_changed_after_validation_is_parsed_again_with_every_check(
    make_series, dicom_root, edit_dicom, monkeypatch
):
    s = make_series("a", n_slices=12)
    series = _validated(dicom_root)
    before, _ = read_hu_volume(series)
    old = float(pydicom.dcmread(s.paths[2]).RescaleIntercept)
    edit_dicom(s.paths[2], lambda ds: setattr(ds, "RescaleIntercept", str(old + 100)))  # new header, new mtime
    parsed = _parsed_paths(monkeypatch)

    volume, _ = read_hu_volume(series)

    assert str(s.paths[2]) in parsed  # the direct read is only used while every file is as validated
    np.testing.assert_array_equal(volume[:, :, 2], before[:, :, 2] + 100)
    np.testing.assert_array_equal(volume[:, :, 3], before[:, :, 3])

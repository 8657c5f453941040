"""Stage 2: the invariants a set of slices must meet to be one regular CT volume, each with its reason code."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from preprocessing.discover import discover
from preprocessing.validate import SeriesInvalid, ValidatedSeries, ValidationConfig, series_by_study, validate_series


def _only_series(root: Path):
    found = discover(root)
    assert found.rejected == ()
    [headers] = found.series.values()
    return headers


def _validate(root: Path, config: ValidationConfig | None = None) -> ValidatedSeries:
    return validate_series(_only_series(root), config=config)


def _refusal(root: Path, config: ValidationConfig | None = None) -> SeriesInvalid:
    with pytest.raises(SeriesInvalid) as info:
        _validate(root, config)
    assert info.value.message and str(info.value) == info.value.message
    return info.value


def _shift_position(dx: float = 0.0, dy: float = 0.0, dz: float = 0.0):
    def change(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x + dx:.4f}", f"{y + dy:.4f}", f"{z + dz:.4f}"]

    return change


# --- accepted series -------------------------------------------------------------------------------------------


def test_regular_series_is_accepted_with_its_geometry(make_series, dicom_root, fake_patient):
    s = make_series("a", n_slices=12, rows=16, cols=20, pixel_spacing_mm=(1.5, 2.0), slice_spacing_mm=3.0)

    v = _validate(dicom_root)

    assert v.SeriesInstanceUID == s.series_uid
    assert v.StudyInstanceUID == s.study_uid
    assert v.PatientID == fake_patient.PatientID
    assert v.paths == tuple(str(p) for p in s.paths)
    assert v.shape == (20, 16, 12)
    assert v.spacing_mm == pytest.approx((2.0, 1.5, 3.0))
    assert v.slice_step_mm == pytest.approx(3.0)
    assert v.first_position == pytest.approx(s.origin_mm)
    assert v.dropped == ()
    assert v.transfer_syntaxes == ("1.2.840.10008.1.2.1",)


def test_slices_are_sorted_by_position_not_by_file_name(make_series, dicom_root):
    # Instances numbered head to feet: IM0001 is the highest slice.
    s = make_series("a", n_slices=12, reverse_instance_order=True)
    assert s.paths[0].name == "IM0012.dcm"

    v = _validate(dicom_root)

    assert v.paths == tuple(str(p) for p in s.paths)
    assert v.first_position == pytest.approx(s.origin_mm)


def test_exact_duplicate_file_is_dropped_and_series_accepted(make_series, dicom_root):
    s = make_series("a", n_slices=12)
    copy = shutil.copy(s.paths[3], s.folder / "copy_of_IM0004.dcm")

    v = _validate(dicom_root)

    assert len(v.paths) == 12
    assert set(v.paths) == {str(p) for p in s.paths}
    [dropped] = v.dropped
    assert dropped.reason == "duplicate_instance"
    assert dropped.path == str(copy)
    assert s.paths[3].name in dropped.message
    assert str(s.paths[3].parent) not in dropped.message  # no absolute paths in report messages


# --- refused series --------------------------------------------------------------------------------------------


def test_missing_slice_is_refused_naming_the_file_after_the_gap(make_series, dicom_root):
    s = make_series("a", n_slices=12)
    s.paths[5].unlink()

    err = _refusal(dicom_root)

    assert err.reason == "missing_slices"
    assert err.path == str(s.paths[6])
    assert "1 slice(s) missing" in err.message


def test_two_missing_slices_are_counted(make_series, dicom_root):
    s = make_series("a", n_slices=14)
    s.paths[5].unlink()
    s.paths[6].unlink()

    err = _refusal(dicom_root)

    assert err.reason == "missing_slices"
    assert err.path == str(s.paths[7])
    assert "2 slice(s) missing" in err.message


def test_non_uniform_spacing_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12, slice_spacing_mm=2.5)
    edit_dicom(s.paths[5], _shift_position(dz=1.0))  # gaps 3.5 then 1.5 instead of 2.5

    err = _refusal(dicom_root)

    assert err.reason == "non_uniform_spacing"
    assert err.path == str(s.paths[5])


def test_one_far_away_slice_is_non_uniform_spacing_not_a_hundred_missing_slices(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12, slice_spacing_mm=2.5)
    edit_dicom(s.paths[-1], _shift_position(dz=300.0))  # a stray slice 300 mm away: 121 x the spacing

    err = _refusal(dicom_root)

    assert err.reason == "non_uniform_spacing"
    assert err.path == str(s.paths[-1])


def test_two_series_sharing_one_uid_are_refused_as_duplicate_positions(make_series, dicom_root):
    a = make_series("a", n_slices=12, seed=1)
    b = make_series("b", n_slices=12, seed=2, study_uid=a.study_uid, series_uid=a.series_uid)
    assert {p.name for p in a.paths} == {p.name for p in b.paths}

    headers = discover(dicom_root).series[a.series_uid]
    assert len(headers) == 24 and len({h.SOPInstanceUID for h in headers}) == 24
    with pytest.raises(SeriesInvalid) as info:
        validate_series(headers)

    assert info.value.reason == "duplicate_position"
    assert Path(info.value.path).name in {p.name for p in a.paths}


def test_non_ct_modality_is_refused(make_series, dicom_root):
    # Discovery refuses other modalities already; validation still checks headers it is given.
    s = make_series("a", n_slices=12)
    headers = list(_only_series(dicom_root))
    headers[4] = dataclasses.replace(headers[4], Modality="MR")

    with pytest.raises(SeriesInvalid) as info:
        validate_series(headers)

    assert (info.value.reason, info.value.path) == ("not_ct", headers[4].path)
    assert "'MR'" in info.value.message
    assert headers[4].path in {str(p) for p in s.paths}


def test_one_slice_with_other_rows_is_inconsistent_geometry(make_series, dicom_root, series_writer):
    s = make_series("a", n_slices=12, rows=16, cols=16)
    s.paths[5].unlink()
    x, y, z = s.origin_mm
    odd = series_writer(
        s.folder,
        n_slices=1,
        rows=20,
        cols=16,
        origin_mm=(x, y, z + 5 * s.slice_spacing_mm),
        study_uid=s.study_uid,
        series_uid=s.series_uid,
        file_prefix="ODD",
        uid_entropy=["odd slice"],
    )

    err = _refusal(dicom_root)

    assert err.reason == "inconsistent_geometry"
    assert "Rows" in err.message
    assert err.path == str(odd.paths[0])


def test_pixel_spacing_change_within_series_is_inconsistent_geometry(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)

    def change(ds):
        ds.PixelSpacing = ["2.5", "2.5"]

    edit_dicom(s.paths[7], change)

    err = _refusal(dicom_root)
    assert (err.reason, err.path) == ("inconsistent_geometry", str(s.paths[7]))
    assert "PixelSpacing" in err.message


def test_orientation_change_within_series_is_inconsistent_geometry(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)

    def change(ds):
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0.9", "0.435889894"]

    edit_dicom(s.paths[2], change)

    err = _refusal(dicom_root)
    assert (err.reason, err.path) == ("inconsistent_geometry", str(s.paths[2]))


def test_study_uid_change_within_series_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)

    def change(ds):
        ds.StudyInstanceUID = "1.2.3.4.5"

    edit_dicom(s.paths[4], change)

    err = _refusal(dicom_root)
    assert err.path == str(s.paths[4])
    assert "StudyInstanceUID" in err.message


def test_gantry_tilt_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12, slice_spacing_mm=2.5)
    for k, path in enumerate(s.paths):
        edit_dicom(path, _shift_position(dx=k * 1.0))

    err = _refusal(dicom_root)

    assert err.reason == "gantry_tilt"
    assert err.path in {str(p) for p in s.paths[1:]}


def test_unsupported_transfer_syntax_is_refused_naming_the_file(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)

    def change(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.3.4"

    edit_dicom(s.paths[8], change)

    err = _refusal(dicom_root)

    assert err.reason == "unsupported_transfer_syntax"
    assert err.path == str(s.paths[8])
    assert "1.2.3.4" in err.message


def test_multi_frame_instance_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)

    def change(ds):
        ds.NumberOfFrames = 2

    edit_dicom(s.paths[0], change)

    err = _refusal(dicom_root)
    assert (err.reason, err.path) == ("unsupported_sop_class", str(s.paths[0]))


def test_non_ct_sop_class_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)

    def change(ds):
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture

    edit_dicom(s.paths[1], change)

    err = _refusal(dicom_root)
    assert (err.reason, err.path) == ("unsupported_sop_class", str(s.paths[1]))


def test_too_few_slices_is_refused(make_series, dicom_root):
    make_series("a", n_slices=7)

    err = _refusal(dicom_root)

    assert err.reason == "too_few_slices"
    assert "7 slices" in err.message


def test_no_headers_is_too_few_slices():
    with pytest.raises(SeriesInvalid) as info:
        validate_series([])
    assert info.value.reason == "too_few_slices"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"min_slices": 1}, "min_slices"),
        ({"spacing_tolerance": 0.0}, "spacing_tolerance"),
        ({"spacing_tolerance": 0.5}, "spacing_tolerance"),
    ],
)
def test_bad_validation_config_names_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ValidationConfig(**kwargs)


# --- pydicom's real CT and MR files ----------------------------------------------------------------------------


def test_real_five_slice_ct_validates_with_min_slices_two(tmp_path, copy_testdata):
    folder = copy_testdata("dicomdirtests/98892001/CT5N", tmp_path / "CT5N")

    v = _validate(folder, ValidationConfig(min_slices=2))

    assert len(v.paths) == 5
    assert v.slice_step_mm == pytest.approx(2.5)
    assert v.shape == (16, 16, 5)
    # Sorted by increasing z (the files are numbered the other way round).
    assert [Path(p).name for p in v.paths] == ["3353", "3023", "2693", "2392", "2062"]
    assert v.first_position[2] == pytest.approx(-1.2375)


def test_real_five_slice_ct_is_too_few_slices_by_default(tmp_path, copy_testdata):
    folder = copy_testdata("dicomdirtests/98892001/CT5N", tmp_path / "CT5N")

    err = _refusal(folder)

    assert err.reason == "too_few_slices"
    assert "5 slices" in err.message


def test_real_ct_with_non_uniform_spacing_is_refused(tmp_path, copy_testdata):
    folder = copy_testdata("dicomdirtests/77654033/CT2", tmp_path / "CT2")

    err = _refusal(folder, ValidationConfig(min_slices=2))

    # Slices at -99.48, 103.02, 104.27, 105.52 mm: one slice 200 mm away from three regular ones.
    assert err.reason == "non_uniform_spacing"
    assert Path(err.path).name == "17136"


def test_real_single_ct_slice_is_too_few_slices(tmp_path, copy_testdata):
    copy_testdata("CT_small.dcm", tmp_path / "in")

    err = _refusal(tmp_path / "in", ValidationConfig(min_slices=2))

    assert err.reason == "too_few_slices"


def test_real_mr_file_is_not_ct(tmp_path, copy_testdata):
    copy_testdata("MR_small.dcm", tmp_path / "in")

    found = discover(tmp_path / "in")

    assert found.series == {}
    assert [(r.path, r.reason) for r in found.rejected] == [("MR_small.dcm", "not_ct")]


# --- localizers ------------------------------------------------------------------------------------------------


def _add_localizer(
    series, series_writer, edit_dicom, *, image_type, orientation=("0", "1", "0", "0", "0", "-1"), rows=20
):
    """A scout image in the series' folder: same series UID, other size, sagittal unless told otherwise."""
    scout = series_writer(
        series.folder,
        n_slices=1,
        rows=rows,
        cols=24,
        pixel_spacing_mm=(3.0, 3.0),
        study_uid=series.study_uid,
        series_uid=series.series_uid,
        file_prefix="SCOUT",
        uid_entropy=["scout", str(image_type)],
    ).paths[0]

    def change(ds):
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = ["0", "-150", "250"]

    edit_dicom(scout, change)
    return scout


@pytest.mark.parametrize(
    "image_type",
    [
        ("ORIGINAL", "PRIMARY", "LOCALIZER"),
        ("ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"),
        ("ORIGINAL", "PRIMARY", "TOPOGRAM"),
        ("ORIGINAL", "PRIMARY", "OTHER"),  # no localizer term, but not AXIAL and another orientation
        ("ORIGINAL", "PRIMARY"),
    ],
)
def test_localizer_in_the_series_is_dropped_and_the_axial_slices_kept(
    make_series, dicom_root, series_writer, edit_dicom, image_type
):
    s = make_series("a", n_slices=12)
    scout = _add_localizer(s, series_writer, edit_dicom, image_type=image_type)

    v = _validate(dicom_root)

    assert v.paths == tuple(str(p) for p in s.paths)
    [dropped] = v.dropped
    assert (dropped.path, dropped.reason) == (str(scout), "localizer")
    assert scout.name in dropped.message and str(scout.parent) not in dropped.message


def test_localizer_with_the_stack_orientation_is_dropped_by_its_image_type(
    make_series, dicom_root, series_writer, edit_dicom
):
    s = make_series("a", n_slices=12)
    axial = ("1", "0", "0", "0", "1", "0")
    scout = _add_localizer(
        s, series_writer, edit_dicom, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=axial
    )

    v = _validate(dicom_root)

    assert len(v.paths) == 12
    assert [(d.path, d.reason) for d in v.dropped] == [(str(scout), "localizer")]


def test_slice_saying_axial_with_another_orientation_is_not_dropped(make_series, dicom_root, series_writer, edit_dicom):
    s = make_series("a", n_slices=12)
    odd = _add_localizer(s, series_writer, edit_dicom, image_type=("ORIGINAL", "PRIMARY", "AXIAL"), rows=16)

    err = _refusal(dicom_root)

    assert err.reason == "inconsistent_geometry"
    assert err.path == str(odd)


def test_dropping_a_localizer_does_not_hide_a_missing_slice(make_series, dicom_root, series_writer, edit_dicom):
    s = make_series("a", n_slices=12)
    _add_localizer(s, series_writer, edit_dicom, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    s.paths[5].unlink()

    err = _refusal(dicom_root)

    assert (err.reason, err.path) == ("missing_slices", str(s.paths[6]))


def test_series_of_localizers_only_is_too_few_slices(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=9)
    for path in s.paths[:3]:
        edit_dicom(path, lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))

    err = _refusal(dicom_root)

    assert err.reason == "too_few_slices"
    assert "6 slices (3 localizer image(s) left out)" in err.message


def test_real_ct_series_with_a_localizer_copy(tmp_path, copy_testdata, edit_dicom):
    folder = copy_testdata("dicomdirtests/98892001/CT5N", tmp_path / "CT5N")
    scout = folder / "scout"
    scout.write_bytes((folder / "2062").read_bytes())

    def change(ds):
        ds.SOPInstanceUID = "1.2.3.4.5.6"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]

    edit_dicom(scout, change)

    v = _validate(folder, ValidationConfig(min_slices=2))

    assert len(v.paths) == 5 and str(scout) not in v.paths
    assert [(d.path, d.reason) for d in v.dropped] == [(str(scout), "localizer")]


# --- rescale type, SOP classes ---------------------------------------------------------------------------------


def test_rescale_type_other_than_hu_is_refused(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)
    edit_dicom(s.paths[3], lambda ds: setattr(ds, "RescaleType", "US"))

    err = _refusal(dicom_root)

    assert (err.reason, err.path) == ("not_hu", str(s.paths[3]))
    assert "'US'" in err.message


def test_missing_rescale_type_is_hu(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=12)
    for path in s.paths:
        edit_dicom(path, lambda ds: delattr(ds, "RescaleType"))

    assert len(_validate(dicom_root).paths) == 12


def test_series_mixing_single_frame_and_enhanced_ct_is_refused(make_series, dicom_root, enhanced_ct_writer):
    s = make_series("a", n_slices=8)
    x, y, z = s.origin_mm
    enhanced_ct_writer(
        s.folder / "enh.dcm",
        np.zeros((4, 16, 16)),
        origin_mm=(x, y, z + 8 * 2.5),
        study_uid=s.study_uid,
        series_uid=s.series_uid,
    )

    err = _refusal(dicom_root)

    assert err.reason == "mixed_sop_classes"


# --- Enhanced CT -----------------------------------------------------------------------------------------------


def test_enhanced_ct_frames_are_sorted_along_the_normal(dicom_root, enhanced_ct_writer):
    order = [4, 7, 0, 9, 2, 5, 1, 8, 3, 6]
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((10, 16, 20)), slice_spacing_mm=3.0, frame_order=order)

    v = _validate(dicom_root)

    assert v.paths == (str(path),) * 10
    assert v.frames == tuple(order.index(k) for k in range(10))  # frame holding slice k, for k in position order
    assert v.shape == (20, 16, 10)
    assert v.slice_step_mm == pytest.approx(3.0)
    assert v.first_position == pytest.approx((-15.0, -20.0, 100.0))
    assert v.transfer_syntaxes == ("1.2.840.10008.1.2.1",)


def test_single_frame_series_has_no_frames(make_series, dicom_root):
    make_series("a", n_slices=10)
    assert _validate(dicom_root).frames == ()


def _positions(n: int, step: float = 2.5, **override):
    positions = [[-15.0, -20.0, 100.0 + k * step] for k in range(n)]
    for k, position in override.items():
        positions[int(k[1:])] = position
    return positions


@pytest.mark.parametrize(
    ("positions", "reason", "frame"),
    [
        ([p for k, p in enumerate(_positions(12)) if k != 5], "missing_slices", 6),
        (_positions(10, f5=[-15.0, -20.0, 113.5]), "non_uniform_spacing", 6),
        ([[-15.0 + k, -20.0, 100.0 + 2.5 * k] for k in range(10)], "gantry_tilt", None),
        (
            _positions(10, f5=[-15.0, -20.0, 107.5]),
            "duplicate_position",
            6,
        ),  # frames 4 and 6 at one position: two stacks?
    ],
)
def test_enhanced_ct_frames_meet_the_series_invariants(dicom_root, enhanced_ct_writer, positions, reason, frame):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((len(positions), 8, 8)), positions=positions)

    err = _refusal(dicom_root)

    assert (err.reason, err.path) == (reason, str(path))
    if frame is not None:
        assert f"frame {frame}" in err.message
    if reason == "duplicate_position":
        assert "multi-frame" in err.message


def test_enhanced_ct_localizer_frame_is_dropped(dicom_root, enhanced_ct_writer):
    axial = ("ORIGINAL", "PRIMARY", "AXIAL", "NONE")
    types = [axial] * 10
    types[0] = ("ORIGINAL", "PRIMARY", "LOCALIZER", "NONE")
    positions = _positions(10, f0=[0.0, -150.0, 250.0])

    enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((10, 8, 8)), positions=positions, frame_types=types)
    v = _validate(dicom_root)

    assert v.frames == tuple(range(1, 10))
    [dropped] = v.dropped
    assert dropped.reason == "localizer" and "enh.dcm frame 1" in dropped.message


def test_copy_of_an_enhanced_ct_file_is_dropped_once(dicom_root, enhanced_ct_writer):
    path = enhanced_ct_writer(dicom_root / "a" / "enh.dcm", np.zeros((10, 8, 8)))
    copy = Path(shutil.copy(path, dicom_root / "b.dcm"))

    v = _validate(dicom_root)

    assert set(v.paths) in ({str(path)}, {str(copy)})
    assert len(v.dropped) == 1 and v.dropped[0].reason == "duplicate_instance"


def test_real_enhanced_ct_perfusion_map_is_not_hu(tmp_path, copy_testdata):
    path = copy_testdata("eCT_Supplemental.dcm", tmp_path / "in")

    err = _refusal(tmp_path / "in", ValidationConfig(min_slices=2))

    # DERIVED\PRIMARY\PERFUSION\RCBF frames, RescaleType US: blood flow, not Hounsfield units.
    assert (err.reason, err.path) == ("not_hu", str(path))


def _rescale_type_hu(ds):
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleType = "HU"


def test_real_enhanced_ct_is_validated_frame_by_frame(tmp_path, copy_testdata, edit_dicom):
    path = copy_testdata("eCT_Supplemental.dcm", tmp_path / "in")
    edit_dicom(path, _rescale_type_hu)

    v = _validate(tmp_path / "in", ValidationConfig(min_slices=2))

    # Orientation [-1,0,0, 0,1,0]: the normal is -z, so frame 2 (z = -149) comes first.
    assert v.frames == (1, 0)
    assert v.paths == (str(path), str(path))
    assert v.slice_step_mm == pytest.approx(10.0)
    assert v.first_position == pytest.approx((99.5, -301.5, -149.0))
    assert v.shape == (512, 512, 2)
    assert pydicom.dcmread(path).NumberOfFrames == 2


def test_enhanced_ct_with_two_time_points_is_refused_even_when_positions_interleave(dicom_root, enhanced_ct_writer):
    # Phase 1 at 100, 105, ... and phase 2 at 102.5, 107.5, ...: regular 2.5 mm gaps, but two volumes in one.
    phases = [1 + k % 2 for k in range(10)]
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((10, 8, 8)), temporal_positions=phases)

    err = _refusal(dicom_root)

    assert (err.reason, err.path) == ("multiple_stacks", str(path))
    assert "TemporalPositionIndex" in err.message


def test_enhanced_ct_with_two_stacks_is_refused(dicom_root, enhanced_ct_writer, edit_dicom):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((10, 8, 8)))
    edit_dicom(path, lambda ds: setattr(ds.PerFrameFunctionalGroupsSequence[7].FrameContentSequence[0], "StackID", "2"))

    err = _refusal(dicom_root)

    assert (err.reason, err.path) == ("multiple_stacks", str(path))
    assert "enh.dcm frame 8" in err.message


def test_series_by_study_prefers_most_slices_then_series_uid(make_series, dicom_root):
    a = make_series("a", n_slices=10, seed=0)
    make_series("b", n_slices=12, seed=1, study_uid=a.study_uid)
    make_series("c", n_slices=10, seed=2, study_uid=a.study_uid)
    make_series("other", n_slices=9, seed=3)
    by_uid = {s.SeriesInstanceUID: s for s in (validate_series(h) for h in discover(dicom_root).series.values())}
    b, c, other = (
        next(s for s in by_uid.values() if s.paths[0].startswith(str(dicom_root / n))) for n in ("b", "c", "other")
    )
    a = by_uid[a.series_uid]

    grouped = series_by_study([a, other, c, b])

    assert list(grouped) == sorted([a.StudyInstanceUID, other.StudyInstanceUID])
    assert [s.SeriesInstanceUID for s in grouped[a.StudyInstanceUID]] == [b.SeriesInstanceUID] + sorted(
        [a.SeriesInstanceUID, c.SeriesInstanceUID]
    )
    assert grouped[other.StudyInstanceUID] == [other]


def test_series_by_study_of_nothing_is_empty():
    assert series_by_study([]) == {}

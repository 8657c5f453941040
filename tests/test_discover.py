"""Stage 1: scanning a folder, reading headers, grouping by SeriesInstanceUID, refusing what is not an image."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from preprocessing.discover import (
    Discovery,
    InstanceHeader,
    Rejection,
    discover,
    iter_files,
    read_dicom,
    read_header,
    read_headers,
)


def _rejections_by_path(found: Discovery) -> dict[str, Rejection]:
    return {r.path: r for r in found.rejected}


def test_one_series_is_found_with_all_its_headers(make_series, dicom_root, fake_patient):
    s = make_series("a", n_slices=10, rows=16, cols=20, pixel_spacing_mm=(1.5, 2.0), slice_spacing_mm=3.0)

    found = discover(dicom_root)

    assert found.rejected == ()
    assert found.n_files == 10
    assert list(found.series) == [s.series_uid]
    headers = found.series[s.series_uid]
    assert sorted(h.path for h in headers) == sorted(str(p) for p in s.paths)
    first = next(h for h in headers if h.path == str(s.paths[0]))
    assert first.StudyInstanceUID == s.study_uid
    assert first.PatientID == fake_patient.PatientID
    assert first.Modality == "CT"
    assert (first.Rows, first.Columns) == (16, 20)
    assert first.PixelSpacing == (1.5, 2.0)
    assert first.ImageOrientationPatient == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert first.ImagePositionPatient == pytest.approx(s.origin_mm)
    assert first.SliceThickness == pytest.approx(3.0)
    assert first.NumberOfFrames == 1
    assert first.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.ImageType == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert first.RescaleType == "HU"
    assert first.frame is None
    assert first.file_size == s.paths[0].stat().st_size
    assert first.file_mtime_ns == s.paths[0].stat().st_mtime_ns


def test_two_series_in_one_folder_are_found_separately(make_series, dicom_root):
    a = make_series("mixed", n_slices=10, file_prefix="A", seed=1)
    b = make_series(
        "mixed",
        n_slices=12,
        file_prefix="B",
        series_uid=generate_uid(entropy_srcs=["second series"]),
        study_uid=a.study_uid,
        seed=2,
    )
    assert a.folder == b.folder

    found = discover(dicom_root)

    assert set(found.series) == {a.series_uid, b.series_uid}
    assert sorted(h.path for h in found.series[a.series_uid]) == sorted(map(str, a.paths))
    assert sorted(h.path for h in found.series[b.series_uid]) == sorted(map(str, b.paths))
    assert found.n_files == 22


def test_series_in_nested_folders_are_found(make_series, dicom_root):
    a = make_series("site/patient1/study1/series1", n_slices=10)
    b = make_series("site/patient2/series1", n_slices=11)

    found = discover(dicom_root)

    assert {uid: len(h) for uid, h in found.series.items()} == {a.series_uid: 10, b.series_uid: 11}


def test_non_dicom_file_is_rejected_and_the_rest_goes_on(make_series, dicom_root):
    s = make_series("a", n_slices=10)
    (s.folder / "README.txt").write_text("exported by PACS, do not edit\n")

    found = discover(dicom_root)

    assert len(found.series[s.series_uid]) == 10
    assert [(r.path, r.reason) for r in found.rejected] == [("a/README.txt", "not_dicom")]
    assert found.rejected[0].message
    assert found.n_files == 11


def test_header_truncated_file_is_rejected_at_discovery(make_series, dicom_root):
    s = make_series("a", n_slices=10)
    cut = s.paths[4]
    cut.write_bytes(cut.read_bytes()[:200])

    found = discover(dicom_root)

    rejected = _rejections_by_path(found)
    assert list(rejected) == ["a/" + cut.name]
    assert rejected["a/" + cut.name].reason in {"not_dicom", "unreadable", "missing_attribute"}
    assert sorted(h.path for h in found.series[s.series_uid]) == sorted(str(p) for p in s.paths if p != cut)


def test_empty_file_is_rejected(make_series, dicom_root):
    s = make_series("a", n_slices=10)
    (s.folder / "empty.dcm").write_bytes(b"")

    found = discover(dicom_root)

    assert [r.path for r in found.rejected] == ["a/empty.dcm"]
    assert len(found.series[s.series_uid]) == 10


def test_missing_geometry_attribute_is_named(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=10)
    edit_dicom(s.paths[3], lambda ds: delattr(ds, "ImagePositionPatient"))

    found = discover(dicom_root)

    [rejection] = found.rejected
    assert rejection.path == "a/" + s.paths[3].name
    assert rejection.reason == "missing_attribute"
    assert "ImagePositionPatient" in rejection.message
    assert len(found.series[s.series_uid]) == 9


def test_empty_required_attribute_counts_as_missing(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=10)

    def blank(ds):
        ds.SeriesInstanceUID = ""

    edit_dicom(s.paths[0], blank)

    [rejection] = discover(dicom_root).rejected
    assert rejection.reason == "missing_attribute"
    assert "SeriesInstanceUID" in rejection.message


def test_hidden_files_and_export_side_files_are_not_scanned(make_series, dicom_root):
    s = make_series("a", n_slices=10)
    (dicom_root / ".DS_Store").write_bytes(b"\0\1junk")
    hidden = dicom_root / ".trash"
    hidden.mkdir()
    shutil.copy(s.paths[0], hidden / "copy.dcm")
    (dicom_root / "DICOMDIR").write_bytes(b"not really a DICOMDIR")
    (dicom_root / "labels.csv").write_text("StudyInstanceUID,diagnosis\n")

    found = discover(dicom_root)

    assert found.rejected == ()
    assert found.n_files == 10
    assert len(found.series[s.series_uid]) == 10


def test_iter_files_is_sorted_and_stable(tmp_path):
    for rel in ["b/2", "b/1", "a/z", "a/sub/y", "c", ".hidden", "a/.x"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rel)

    listed = [str(p.relative_to(tmp_path)) for p in iter_files(tmp_path)]

    assert listed == ["c", "a/z", "a/sub/y", "b/1", "b/2"]
    assert listed == [str(p.relative_to(tmp_path)) for p in iter_files(tmp_path)]


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        discover(tmp_path / "does-not-exist")


def test_file_instead_of_folder_raises(make_series):
    s = make_series("a", n_slices=10)
    with pytest.raises(FileNotFoundError):
        discover(s.paths[0])


def test_real_ct_file_header_matches_pydicom(tmp_path, copy_testdata):
    path = copy_testdata("CT_small.dcm", tmp_path / "in")
    ds = pydicom.dcmread(path)

    header = read_header(path, root=tmp_path / "in")

    assert isinstance(header, InstanceHeader)
    assert header.path == str(path)
    assert header.Modality == "CT"
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    assert header.SeriesInstanceUID == ds.SeriesInstanceUID
    assert (header.Rows, header.Columns) == (ds.Rows, ds.Columns)
    assert header.PixelSpacing == tuple(float(v) for v in ds.PixelSpacing)
    assert header.ImagePositionPatient == tuple(float(v) for v in ds.ImagePositionPatient)


def test_real_mr_file_is_refused_as_not_ct_at_discovery(tmp_path, copy_testdata):
    root = tmp_path / "in"
    copy_testdata("MR_small.dcm", root)

    found = discover(root)

    assert found.series == {}
    [rejection] = found.rejected
    assert (rejection.path, rejection.reason) == ("MR_small.dcm", "not_ct")
    assert "'MR'" in rejection.message and "MR Image Storage" in rejection.message


def test_real_ct_series_from_pydicom_is_one_group(tmp_path, copy_testdata):
    root = tmp_path / "in"
    folder = copy_testdata("dicomdirtests/98892001/CT5N", root / "CT5N")

    found = discover(root)

    assert found.rejected == ()
    assert found.n_files == 5
    [headers] = found.series.values()
    assert sorted(Path(h.path).name for h in headers) == sorted(p.name for p in folder.iterdir())


def test_discovery_does_not_modify_the_input(make_series, dicom_root, snapshot):
    make_series("a", n_slices=10)
    (dicom_root / "README.txt").write_text("hello")
    before = snapshot(dicom_root)

    discover(dicom_root)

    assert snapshot(dicom_root) == before


# --- files without preamble / File Meta --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("implicit_vr", "little_endian", "expected"),
    [
        (True, True, pydicom.uid.ImplicitVRLittleEndian),
        (False, True, pydicom.uid.ExplicitVRLittleEndian),
        (False, False, pydicom.uid.ExplicitVRBigEndian),
    ],
)
def test_files_without_file_meta_are_read_with_the_encoding_found(
    make_series, dicom_root, without_file_meta, implicit_vr, little_endian, expected
):
    s = make_series("a", n_slices=10)
    for path in s.paths:
        without_file_meta(path, implicit_vr=implicit_vr, little_endian=little_endian)
    assert s.paths[0].read_bytes()[128:132] != b"DICM"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(s.paths[0])

    found = discover(dicom_root)

    assert found.rejected == ()
    headers = found.series[s.series_uid]
    assert len(headers) == 10
    assert {h.TransferSyntaxUID for h in headers} == {expected}
    first = next(h for h in headers if h.path == str(s.paths[0]))
    assert first.ImagePositionPatient == pytest.approx(s.origin_mm)
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"


def test_read_dicom_sets_the_transfer_syntax_of_a_file_without_file_meta(make_series, without_file_meta):
    s = make_series("a", n_slices=1)
    reference = pydicom.dcmread(s.paths[0]).pixel_array
    without_file_meta(s.paths[0])

    ds = read_dicom(s.paths[0])

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, reference)


def test_real_file_without_file_meta_is_classified_not_refused_as_not_dicom(tmp_path, copy_testdata):
    root = tmp_path / "in"
    copy_testdata("ExplVR_LitEndNoMeta.dcm", root)  # an RT Plan, explicit VR, no preamble

    [rejection] = discover(root).rejected

    assert rejection.reason == "not_ct"
    assert "RTPLAN" in rejection.message


@pytest.mark.parametrize(
    "content",
    [
        b"exported by PACS, do not edit\n",
        bytes(range(256)) * 40,  # binary junk
        b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100",  # looks like the start of a DICOM data set, but no SOPClassUID
    ],
)
def test_non_dicom_content_without_file_meta_stays_not_dicom(dicom_root, content):
    (dicom_root / "file.dcm").write_bytes(content)

    found = discover(dicom_root)

    assert [(r.path, r.reason) for r in found.rejected] == [("file.dcm", "not_dicom")]


def test_real_fragment_without_sop_class_is_not_dicom(tmp_path, copy_testdata):
    root = tmp_path / "in"
    copy_testdata("no_meta.dcm", root)

    assert [r.reason for r in discover(root).rejected] == ["not_dicom"]


# --- non-CT objects, DICOMDIR ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "modality"),
    [
        ("rtstruct.dcm", "RTSTRUCT"),
        ("rtplan.dcm", "RTPLAN"),
        ("rtdose.dcm", "RTDOSE"),  # has ImagePositionPatient: still not CT
        ("test-SR.dcm", "SR"),
        ("reportsi.dcm", "SR"),
        ("waveform_ecg.dcm", "ECG"),
        ("examples_jpeg2k.dcm", "US"),
        ("emri_small.dcm", "MR"),  # Enhanced MR (pydicom-data)
        ("liver.dcm", "SEG"),  # Segmentation (pydicom-data)
    ],
)
def test_real_non_ct_objects_are_not_ct_before_the_geometry_check(tmp_path, copy_testdata, name, modality):
    root = tmp_path / "in"
    copy_testdata(name, root)

    found = discover(root)

    assert found.series == {}
    [rejection] = found.rejected
    assert (rejection.path, rejection.reason) == (name, "not_ct")
    assert f"'{modality}'" in rejection.message


def _non_image(path: Path, sop_class: str, modality: str | None) -> None:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if modality is not None:
        ds.Modality = modality
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize(
    ("sop_class", "modality", "reason"),
    [
        (pydicom.uid.GrayscaleSoftcopyPresentationStateStorage, "PR", "not_ct"),
        (pydicom.uid.KeyObjectSelectionDocumentStorage, "KO", "not_ct"),
        (pydicom.uid.XRayRadiationDoseSRStorage, "SR", "not_ct"),
        (pydicom.uid.GrayscaleSoftcopyPresentationStateStorage, None, "not_ct"),  # no Modality: the SOP class says it
        ("1.3.12.2.1107.5.9.1", "CT", "not_image"),  # a vendor's non-image object inside a CT series
        (pydicom.uid.RawDataStorage, "CT", "not_image"),
    ],
)
def test_non_image_objects_are_classified_not_missing_attributes(dicom_root, sop_class, modality, reason):
    _non_image(dicom_root / "obj.dcm", sop_class, modality)

    [rejection] = discover(dicom_root).rejected

    assert (rejection.path, rejection.reason) == ("obj.dcm", reason)
    assert "missing" not in rejection.message


def test_a_non_ct_series_is_one_rejection_naming_its_first_file_and_count(make_series, dicom_root):
    ct = make_series("ct", n_slices=10)
    make_series("mr", n_slices=12, modality="MR")

    found = discover(dicom_root)

    assert list(found.series) == [ct.series_uid]
    [rejection] = found.rejected
    assert (rejection.path, rejection.reason) == ("mr/IM0001.dcm", "not_ct")
    assert "12 files" in rejection.message


def test_ct_image_without_geometry_is_still_missing_attribute(make_series, dicom_root, edit_dicom):
    s = make_series("a", n_slices=10)
    edit_dicom(s.paths[0], lambda ds: delattr(ds, "ImageOrientationPatient"))

    [rejection] = discover(dicom_root).rejected

    assert rejection.reason == "missing_attribute"
    assert "ImageOrientationPatient" in rejection.message


def test_dicomdir_under_other_names_is_recorded_as_dicomdir(tmp_path, copy_testdata):
    root = tmp_path / "in"
    copy_testdata("dicomdirtests", root)

    found = discover(root)

    by_path = _rejections_by_path(found)
    assert "DICOMDIR" not in by_path and "TINY_ALPHA/DICOMDIR" not in by_path  # the usual name: skipped unread
    dicomdirs = sorted(path for path, r in by_path.items() if r.reason == "dicomdir")
    assert dicomdirs == [
        "DICOMDIR-bigEnd",
        "DICOMDIR-empty.dcm",
        "DICOMDIR-implicit",
        "DICOMDIR-nooffset",
        "DICOMDIR-nopatient",
        "DICOMDIR-reordered",
    ]
    # The images of the tree: CT series found, MR and CR series refused as not CT, one rejection per series.
    assert sorted(len(h) for h in found.series.values()) == [2, 4, 5]
    not_ct = [r for r in found.rejected if r.reason == "not_ct"]
    assert {p.split("/")[1] for p in (r.path for r in not_ct)} == {"CR1", "CR2", "CR3", "MR1", "MR2", "MR700"}
    assert any("7 files of this series" in r.message for r in not_ct if "/MR700/" in r.path)


# --- Enhanced CT -----------------------------------------------------------------------------------------------


def test_enhanced_ct_gives_one_header_per_frame(dicom_root, enhanced_ct_writer):
    hu = np.zeros((6, 16, 20))
    path = enhanced_ct_writer(
        dicom_root / "enh.dcm", hu, pixel_spacing_mm=(1.5, 2.0), slice_spacing_mm=3.0, frame_order=[5, 4, 3, 2, 1, 0]
    )

    found = discover(dicom_root)

    assert found.rejected == ()
    [headers] = found.series.values()
    assert [h.frame for h in headers] == [0, 1, 2, 3, 4, 5]
    assert {h.path for h in headers} == {str(path)}
    assert [h.ImagePositionPatient[2] for h in headers] == pytest.approx([115.0, 112.0, 109.0, 106.0, 103.0, 100.0])
    first = headers[0]
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1"
    assert (first.Rows, first.Columns, first.NumberOfFrames) == (16, 20, 6)
    assert first.PixelSpacing == (1.5, 2.0)
    assert first.ImageOrientationPatient == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert first.SliceThickness == pytest.approx(3.0)
    assert first.ImageType == ("ORIGINAL", "PRIMARY", "AXIAL", "NONE")
    assert first.RescaleType == "HU"
    assert first.where == "enh.dcm frame 1"
    assert read_headers(path, root=dicom_root) == headers
    with pytest.raises(ValueError, match="read_headers"):
        read_header(path, root=dicom_root)


def test_enhanced_ct_frame_without_position_is_missing_attribute(dicom_root, enhanced_ct_writer, edit_dicom):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((4, 8, 8)))

    def drop(ds):
        del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence

    edit_dicom(path, drop)

    [rejection] = discover(dicom_root).rejected
    assert rejection.reason == "missing_attribute"
    assert "ImagePositionPatient" in rejection.message and "frame 3" in rejection.message


def test_enhanced_ct_with_too_few_per_frame_items_is_unreadable(dicom_root, enhanced_ct_writer, edit_dicom):
    path = enhanced_ct_writer(dicom_root / "enh.dcm", np.zeros((4, 8, 8)))

    def drop(ds):
        del ds.PerFrameFunctionalGroupsSequence[3]

    edit_dicom(path, drop)

    [rejection] = discover(dicom_root).rejected
    assert rejection.reason == "unreadable"
    assert "NumberOfFrames 4" in rejection.message


def test_real_enhanced_ct_frames_have_their_own_positions(tmp_path, copy_testdata):
    root = tmp_path / "in"
    path = copy_testdata("eCT_Supplemental.dcm", root)
    ds = pydicom.dcmread(path)

    [headers] = discover(root).series.values()

    assert [h.frame for h in headers] == [0, 1]
    for h, item in zip(headers, ds.PerFrameFunctionalGroupsSequence):
        assert h.ImagePositionPatient == tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
    assert headers[0].ImageOrientationPatient == (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert headers[0].PixelSpacing == pytest.approx((0.388672, 0.388672))
    assert headers[0].ImageType == ("DERIVED", "PRIMARY", "PERFUSION", "RCBF")
    assert headers[0].RescaleType == "US"

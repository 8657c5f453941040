"""Stage 1: scanning a folder, reading headers, grouping by SeriesInstanceUID, refusing what is not an image."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from preprocessing.discover import Discovery, InstanceHeader, Rejection, discover, iter_files, read_header


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
    assert first.file_size == s.paths[0].stat().st_size
    assert first.file_mtime_ns == s.paths[0].stat().st_mtime_ns


def test_two_series_in_one_folder_are_found_separately(make_series, dicom_root):
    a = make_series("mixed", n_slices=10, file_prefix="A", seed=1)
    b = make_series("mixed", n_slices=12, file_prefix="B", series_uid=generate_uid(entropy_srcs=["second series"]), study_uid=a.study_uid, seed=2)
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


def test_real_mr_file_is_discovered_not_refused_at_header_stage(tmp_path, copy_testdata):
    root = tmp_path / "in"
    path = copy_testdata("MR_small.dcm", root)

    found = discover(root)

    assert found.rejected == ()
    [(uid, [header])] = [(uid, list(h)) for uid, h in found.series.items()]
    assert header.path == str(path)
    assert header.Modality == "MR"


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

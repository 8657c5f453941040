"""synthetic.dicom_writer: real CT files, read back with pydicom."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from synthetic.dicom_writer import CT_IMAGE_STORAGE, PatientIdentity, write_ct_series

PATIENT = PatientIdentity(
    PatientName="SYNTH^PATIENT0001",
    PatientID="S00-1234567-0001",
    PatientBirthDate="19610305",
    PatientSex="F",
    PatientAge="063Y",
)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.2"


def _volume(seed: int = 0, shape: tuple[int, int, int] = (5, 12, 16)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000.0, 1500.0, shape).astype(np.float32)


def _write(out: Path, hu: np.ndarray, **overrides: object) -> list[Path]:
    kwargs: dict[str, object] = dict(
        pixel_spacing_mm=(0.8, 0.6),
        slice_spacing_mm=2.5,
        study_instance_uid=STUDY_UID,
        series_instance_uid=SERIES_UID,
        patient=PATIENT,
        uid_entropy=["test", 1],
    )
    kwargs.update(overrides)
    return write_ct_series(out, hu, **kwargs)  # type: ignore[arg-type]


def _read_sorted(paths: list[Path]) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: int(ds.InstanceNumber))


def test_geometry_and_core_attributes(tmp_path: Path) -> None:
    hu = _volume()
    paths = _write(tmp_path / "series", hu, slice_thickness_mm=3.0, origin_mm=(-10.0, 5.5, -100.0))
    assert [p.name for p in paths] == [f"IM{k:04d}.dcm" for k in range(1, 6)]
    assert sorted(p.name for p in (tmp_path / "series").iterdir()) == [p.name for p in paths]
    datasets = _read_sorted(paths)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(positions[:, 0], -10.0)
    np.testing.assert_allclose(positions[:, 1], 5.5)
    np.testing.assert_allclose(np.diff(positions[:, 2]), 2.5)
    assert positions[0, 2] == pytest.approx(-100.0)
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.Modality == "CT"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.6]
        assert (ds.Rows, ds.Columns) == (12, 16)
        assert float(ds.SliceThickness) == 3.0
        assert float(ds.SpacingBetweenSlices) == 2.5
        assert float(ds.SliceLocation) == pytest.approx(positions[k, 2])
        assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
        assert ds.RescaleType == "HU"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.pixel_array.shape == (12, 16)
        # slice k of the input is the k-th slice by z
        stored = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(stored - hu[k]).max() <= 0.5
    with open(paths[0], "rb") as fh:
        assert fh.read(132)[128:] == b"DICM"


def test_patient_and_study_attributes(tmp_path: Path) -> None:
    paths = _write(
        tmp_path,
        _volume(shape=(2, 8, 8)),
        accession_number="A123",
        study_date="20200401",
        manufacturer="SIEMENS",
        manufacturer_model_name="SOMATOM",
        institution_name="Synth Hospital",
        series_number=3,
    )
    ds = pydicom.dcmread(paths[0])
    assert str(ds.PatientName) == PATIENT.PatientName
    assert ds.PatientID == PATIENT.PatientID
    assert ds.PatientBirthDate == PATIENT.PatientBirthDate
    assert (ds.PatientSex, ds.PatientAge) == ("F", "063Y")
    assert ds.AccessionNumber == "A123"
    assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == "20200401"
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.InstitutionName) == ("SIEMENS", "SOMATOM", "Synth Hospital")
    assert ds.SeriesNumber == 3
    assert ds.BodyPartExamined == "CHEST" and ds.PatientPosition == "HFS"
    assert ds.StudyDescription == "CT CHEST"
    for keyword in (
        "KVP",
        "ConvolutionKernel",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "SeriesDescription",
        "WindowCenter",
        "WindowWidth",
        "FrameOfReferenceUID",
    ):
        assert keyword in ds, keyword


@pytest.mark.parametrize(
    ("intercept", "representation", "slope"),
    [(-1024.0, 0, 1.0), (0.0, 1, 1.0), (-1000.0, 1, 1.0), (-1024.0, 0, 0.5)],
)
def test_hu_round_trip(tmp_path: Path, intercept: float, representation: int, slope: float) -> None:
    hu = _volume(seed=3)
    hu[0, 0, 0], hu[0, 0, 1] = -1000.0, 1500.0
    datasets = _read_sorted(
        _write(tmp_path, hu, rescale_intercept=intercept, pixel_representation=representation, rescale_slope=slope)
    )
    back = np.stack(
        [ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )
    assert np.abs(back - hu).max() <= max(0.5, slope / 2) + 1e-6
    assert datasets[0].PixelRepresentation == representation
    assert datasets[0].pixel_array.dtype == (np.uint16 if representation == 0 else np.int16)
    assert float(datasets[0].RescaleIntercept) == intercept


def test_bits_stored_and_clipping(tmp_path: Path) -> None:
    hu = np.full((1, 4, 4), -1000.0)
    hu[0, 0, 0] = 2000.0
    unsigned = pydicom.dcmread(_write(tmp_path / "u", hu, rescale_intercept=-1024.0, pixel_representation=0)[0])
    assert unsigned.BitsStored == 12 and unsigned.HighBit == 11
    signed = pydicom.dcmread(_write(tmp_path / "s", hu, rescale_intercept=0.0, pixel_representation=1)[0])
    assert signed.BitsStored == 16 and signed.pixel_array.min() == -1000
    # unsigned storage with intercept 0 cannot hold negative HU: clipped to stored value 0
    clipped = pydicom.dcmread(_write(tmp_path / "c", hu, rescale_intercept=0.0, pixel_representation=0)[0])
    assert clipped.pixel_array.min() == 0 and clipped.pixel_array.max() == 2000


def test_uids_consistent_and_deterministic(tmp_path: Path) -> None:
    hu = _volume()
    first = _read_sorted(_write(tmp_path / "a", hu))
    assert {ds.SeriesInstanceUID for ds in first} == {SERIES_UID}
    assert {ds.StudyInstanceUID for ds in first} == {STUDY_UID}
    assert len({ds.FrameOfReferenceUID for ds in first}) == 1
    assert len({ds.SOPInstanceUID for ds in first}) == len(first)
    again = _write(tmp_path / "b", hu)
    assert [p.read_bytes() for p in sorted((tmp_path / "a").iterdir())] == [p.read_bytes() for p in again]
    other_entropy = _read_sorted(_write(tmp_path / "c", hu, uid_entropy=["test", 2]))
    assert not {ds.SOPInstanceUID for ds in first} & {ds.SOPInstanceUID for ds in other_entropy}
    random_1 = _read_sorted(_write(tmp_path / "d", hu, uid_entropy=None))
    random_2 = _read_sorted(_write(tmp_path / "e", hu, uid_entropy=None))
    assert not {ds.SOPInstanceUID for ds in random_1} & {ds.SOPInstanceUID for ds in random_2}


def test_caller_can_build_broken_series(tmp_path: Path) -> None:
    """Two series written with the same SeriesInstanceUID and one file deleted: the writer allows it."""
    hu = _volume(shape=(4, 8, 8))
    a = _write(tmp_path / "x", hu, uid_entropy=["x"])
    b = _write(tmp_path / "y", hu, uid_entropy=["y"], file_prefix="CT", series_number=9)
    a[1].unlink()
    remaining = [pydicom.dcmread(p) for p in (*a[:1], *a[2:], *b)]
    assert {ds.SeriesInstanceUID for ds in remaining} == {SERIES_UID}
    assert b[0].name == "CT0001.dcm"
    assert len({ds.SOPInstanceUID for ds in remaining}) == len(remaining) == 7


def test_reverse_instance_order(tmp_path: Path) -> None:
    paths = _write(tmp_path, _volume(), reverse_instance_order=True, origin_mm=(0.0, 0.0, 10.0))
    first = pydicom.dcmread(tmp_path / "IM0001.dcm")
    last = pydicom.dcmread(tmp_path / "IM0005.dcm")
    assert float(first.ImagePositionPatient[2]) == pytest.approx(20.0)
    assert float(last.ImagePositionPatient[2]) == pytest.approx(10.0)
    assert paths[0].name == "IM0005.dcm"  # paths are returned in slice (z) order


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"hu": np.zeros((4, 4))}, "(4, 4)"),
        ({"pixel_spacing_mm": (0.0, 1.0)}, "(0.0, 1.0)"),
        ({"slice_spacing_mm": -1.0}, "-1.0"),
        ({"slice_thickness_mm": 0.0}, "0.0"),
        ({"pixel_representation": 2}, "2"),
        ({"rescale_slope": 0.0}, "0.0"),
        ({"hu": np.full((1, 2, 2), np.nan)}, "non-finite"),
    ],
)
def test_bad_arguments(tmp_path: Path, overrides: dict[str, object], named: str) -> None:
    hu = overrides.pop("hu", _volume(shape=(2, 4, 4)))
    with pytest.raises(ValueError, match=re.escape(named)):
        _write(tmp_path, hu, **overrides)  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.dcm"))

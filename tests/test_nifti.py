"""NIfTI CT volume source: checks with their reason codes, same model input as DICOM, ingest of a nifti/ site."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from preprocessing.cache import make_dataset
from preprocessing.discover import discover
from preprocessing.ingest import MANIFEST_NAME, REPORT_NAME, ingest_site, input_fingerprint, load_manifest, prepare_site
from preprocessing.labels import DIAGNOSES
from preprocessing.nifti import NiftiConfig, nifti_folder, read_nifti_hu, study_key, validate_nifti
from preprocessing.split import SplitConfig
from preprocessing.transforms import PipelineConfig, deterministic_transforms
from preprocessing.validate import SeriesInvalid, validate_series
from preprocessing.volume import LoadResampledCTd, read_hu_volume, series_to_dict
from synthetic.dicom_writer import PatientIdentity, write_ct_series

SMALL = PipelineConfig(input_size=(16, 16, 16), target_spacing_mm=(4.0, 4.0, 4.0))


def _chest(shape: tuple[int, int, int] = (16, 40, 48), seed: int = 0) -> np.ndarray:
    """A small chest-like HU volume (slices, rows, columns): air around a body with lungs and a lesion."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    s, r, c = shape
    hu[:, r // 5 : 4 * r // 5, c // 6 : 5 * c // 6] = 40.0
    hu[:, 3 * r // 10 : 7 * r // 10, c // 4 : c // 2 - 1] = -850.0
    hu[:, 3 * r // 10 : 7 * r // 10, c // 2 + 1 : 3 * c // 4] = -850.0
    hu[s // 3 : s // 2, r // 2 - 3 : r // 2 + 1, c // 3 : c // 3 + 4] = -300.0
    return hu + rng.normal(0, 5, shape).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` (x, y, z voxel order) as NIfTI with a RAS affine (default: 0.8 x 0.8 x 2.5 mm)."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0]) if affine is None else affine
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def _volume(seed: int = 0) -> np.ndarray:
    return np.ascontiguousarray(_chest(seed=seed).transpose(2, 1, 0))  # (x, y, z)


def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(SeriesInvalid) as info:
        validate_nifti(path, **kwargs)  # type: ignore[arg-type]
    assert path.name in info.value.message
    return info.value.reason


# --- validation: good cases ----------------------------------------------------------------------------------------------


def test_hu_volume_is_accepted_with_its_geometry(tmp_path: Path) -> None:
    path = _save(tmp_path / "study_0001.nii.gz", _volume())
    v = validate_nifti(path)
    assert v.convention == "HU" and v.intensity_offset_hu == 0.0
    assert v.shape == (48, 40, 16)
    assert v.spacing_mm == pytest.approx((0.8, 0.8, 2.5))
    assert v.to_dict()["nifti"] == str(path)
    assert study_key(path) == "study_0001" and study_key(tmp_path / "x.txt") is None


def test_hu_plus_1024_convention_is_detected_and_loads_as_hu(tmp_path: Path) -> None:
    data = _volume()
    hu = validate_nifti(_save(tmp_path / "a.nii.gz", data))
    shifted = validate_nifti(_save(tmp_path / "b.nii.gz", np.rint(data + 1024.0).clip(0, None).astype(np.int16)))
    assert shifted.convention == "HU+1024" and shifted.intensity_offset_hu == -1024.0
    a, b = read_nifti_hu(hu.to_dict()), read_nifti_hu(shifted.to_dict())
    assert float((a - b).abs().max()) <= 0.51  # the int16 file rounds to whole HU


def test_single_volume_4d_file_and_padding_below_air(tmp_path: Path) -> None:
    data = _volume()
    data[:4] = -3024.0  # outside the field of view, as scanners pad
    v = validate_nifti(_save(tmp_path / "four.nii", data[..., None]))
    assert v.shape == (48, 40, 16)
    assert float(read_nifti_hu(v.to_dict()).min()) == -1024.0  # padding set to air, as the DICOM path does


def test_same_model_input_as_the_dicom_path(tmp_path: Path) -> None:
    """The HU volume of a DICOM series, saved as NIfTI with its RAS affine, gives the DICOM series' model input."""
    hu = _chest()
    patient = PatientIdentity("Test^Nifti", "PID1", "19700101", "F", "050Y")
    write_ct_series(
        tmp_path / "dcm",
        hu,
        pixel_spacing_mm=(0.8, 0.7),
        slice_spacing_mm=2.5,
        origin_mm=(-10.0, 20.0, -30.0),
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        patient=patient,
    )
    ((_, headers),) = discover(tmp_path / "dcm").series.items()
    series = validate_series(headers)
    volume, affine = read_hu_volume(series)
    nifti = validate_nifti(_save(tmp_path / "same.nii.gz", volume, affine))
    pipeline = Compose(deterministic_transforms(PipelineConfig()))
    from_dicom = pipeline({"image": series_to_dict(series)})["image"]
    from_nifti = pipeline({"image": nifti.to_dict()})["image"]
    assert from_dicom.shape == from_nifti.shape == (1, 64, 64, 48)
    assert float(from_dicom.max()) > 0.5  # the body is in the image
    assert torch.allclose(from_dicom, from_nifti, atol=1e-4)


def test_loader_inverse_goes_back_to_the_nifti_grid(tmp_path: Path) -> None:
    v = validate_nifti(_save(tmp_path / "inv.nii.gz", _volume()))
    load = LoadResampledCTd(keys="image", pixdim=(4.0, 4.0, 4.0), hu_key="hu")
    out = load({"image": v.to_dict()})
    assert out["hu"].shape == (1, 48, 40, 16)
    back = load.inverse({"image": out["image"]})["image"]
    assert tuple(back.shape[1:]) == (48, 40, 16)
    assert np.allclose(back.affine.numpy(), np.asarray(v.affine), atol=1e-5)


# --- validation: bad cases, one reason each ----------------------------------------------------------------------------


def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(b"this is not a NIfTI volume at all" * 20)
    assert _reason(path) == "nifti_unreadable"


def test_truncated_file_is_refused_when_its_data_is_read(tmp_path: Path) -> None:
    good = _save(tmp_path / "good.nii", _volume())
    raw = good.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    validate_nifti(path, read_data=False)  # the header alone is fine
    assert _reason(path) == "nifti_unreadable"


def test_2d_and_multi_volume_files_are_refused(tmp_path: Path) -> None:
    assert _reason(_save(tmp_path / "flat.nii.gz", _volume()[:, :, 0])) == "nifti_not_3d"
    assert _reason(_save(tmp_path / "two.nii.gz", np.stack([_volume(), _volume()], axis=-1))) == "nifti_not_3d"


def test_non_finite_values_are_refused(tmp_path: Path) -> None:
    data = _volume()
    data[3, 3, 3] = np.nan
    assert _reason(_save(tmp_path / "nan.nii.gz", data)) == "nifti_not_finite"


def test_degenerate_affine_and_implausible_spacing_are_refused(tmp_path: Path) -> None:
    collinear = np.array([[0.8, 0.8, 0, 0], [0, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]], dtype=float)
    assert _reason(_save(tmp_path / "degenerate.nii.gz", _volume(), collinear)) == "nifti_bad_affine"
    assert _reason(_save(tmp_path / "coarse.nii.gz", _volume(), np.diag([0.8, 0.8, 50.0, 1.0]))) == "nifti_bad_spacing"


def test_unknown_intensity_convention_is_refused(tmp_path: Path) -> None:
    data = _volume()
    normalised = (data - data.min()) / (data.max() - data.min())  # a 0..1 export: not HU
    assert _reason(_save(tmp_path / "normalised.nii.gz", normalised)) == "nifti_intensity_unknown"
    assert (
        _reason(_save(tmp_path / "nobody.nii.gz", np.full((32, 32, 16), 40.0, np.float32))) == "nifti_intensity_unknown"
    )


def test_too_small_and_misnamed_files_are_refused(tmp_path: Path) -> None:
    assert _reason(_save(tmp_path / "thin.nii.gz", _volume()[:, :, :4])) == "nifti_too_small"
    wrong = tmp_path / "volume.img"
    wrong.write_bytes(b"")
    assert _reason(wrong) == "nifti_name"


def test_config_checks_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="min_voxels_per_axis"):
        NiftiConfig(min_voxels_per_axis=1)
    with pytest.raises(ValueError, match="max_spacing_mm"):
        NiftiConfig(min_spacing_mm=5.0, max_spacing_mm=2.0)
    with pytest.raises(ValueError, match="min_air_fraction"):
        NiftiConfig(min_air_fraction=0.0)


# --- the site folder --------------------------------------------------------------------------------------------------


def test_nifti_folder_is_recognised_in_the_site_layouts(tmp_path: Path) -> None:
    site = tmp_path / "site-0"
    (site / "nifti").mkdir(parents=True)
    assert nifti_folder(site / "nifti") is None  # empty: nothing says NIfTI
    (site / "nifti" / "IM0001.dcm").write_bytes(b"")
    assert nifti_folder(site / "nifti") is None and nifti_folder(site) is None  # a DICOM folder called nifti
    _save(site / "nifti" / "study_0001.nii.gz", _volume())
    assert nifti_folder(site / "nifti") == site / "nifti"
    assert nifti_folder(site) == site / "nifti"
    assert nifti_folder(site / "dicom") == site / "nifti"  # what the simulation and bench quality pass
    (site / "dicom").mkdir()
    assert nifti_folder(site) is None and nifti_folder(site / "dicom") is None  # a DICOM site stays a DICOM site


def test_ingest_of_a_nifti_site_accepts_good_volumes_and_reports_the_rest(tmp_path: Path) -> None:
    site = tmp_path / "site-0"
    for i in range(6):
        _save(site / "nifti" / f"study_{i:04d}.nii.gz", _volume(seed=i))
    (site / "nifti" / "study_0098.nii.gz").write_bytes(b"broken")
    _save(site / "nifti" / "study_0099.nii.gz", _volume()[:, :, 0])
    _save(site / "nifti" / "unlabelled.nii.gz", _volume())
    (site / "nifti" / "notes.txt").write_text("not a volume")
    rows = [f"study_{i:04d},{'covid' if i % 2 else 'normal'}" for i in range(6)] + [
        "study_0098,covid",
        "study_0099,normal",
    ]
    (site / "labels.csv").write_text("StudyInstanceUID,diagnosis\n" + "\n".join(rows) + "\n")
    work = tmp_path / "work"
    split = SplitConfig(val_fraction=0.0, test_fraction=0.0)
    manifest = ingest_site(site / "nifti", work, labels_csv=site / "labels.csv", pipeline=SMALL, split=split, workers=1)
    assert len(manifest.studies) == 6
    assert sorted(DIAGNOSES[s.diagnosis] for s in manifest.studies) == ["covid"] * 3 + ["normal"] * 3
    report = json.loads((work / REPORT_NAME).read_text())
    assert report["counts"]["by_reason"] == {"nifti_unreadable": 1, "nifti_not_3d": 1, "no_label": 1, "not_nifti": 1}
    assert {r["path"] for r in report["rejected"]} == {
        "study_0098.nii.gz",
        "study_0099.nii.gz",
        "unlabelled.nii.gz",
        "notes.txt",
    }
    text = (work / MANIFEST_NAME).read_text()
    assert "study_0001" not in json.dumps([s.id for s in manifest.studies])  # ids are keyed pseudonyms
    assert "nifti" in text
    # Training reads the manifest's items through the cached pipeline: model inputs of the configured size.
    loaded = load_manifest(work, SMALL)
    dataset = make_dataset([s.item() for s in loaded.split("train")], SMALL, work, augment=False)
    assert len(dataset) == 6 and tuple(dataset[0]["image"].shape) == (1, 16, 16, 16)
    # The simulation passes SITE/dicom; the fingerprint follows the NIfTI files, so an unchanged site is reused.
    assert input_fingerprint(site / "dicom", site / "labels.csv", SMALL, split) == loaded.input_fingerprint
    before = (work / MANIFEST_NAME).stat().st_mtime_ns
    again = prepare_site(site / "dicom", work, labels_csv=site / "labels.csv", pipeline=SMALL, split=split, workers=1)
    assert len(again.studies) == 6 and (work / MANIFEST_NAME).stat().st_mtime_ns == before

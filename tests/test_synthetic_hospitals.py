"""synthetic.hospitals: a small federation written to disk and read back with pydicom."""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import replace
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest

from preprocessing.profile import read_site_profile
from synthetic.hospitals import (
    FOLLOW_UP_DAYS,
    FOV_FACTOR_RANGE,
    FederationSummary,
    SiteProfile,
    _draw_case,
    default_profiles,
    noisy_label,
    study_geometry,
    write_federation,
    write_site,
)
from synthetic.phantom import DIAGNOSES, SLICE_THICKNESSES_MM

N_SITES = 2
PATIENTS = 4


def _small_profiles(n: int = N_SITES) -> list[SiteProfile]:
    """The default profiles with domain randomisation on (off by default) and 48x48 images of 7 mm pixels (whole chest in view, fast to
    write) and no label noise (so that labels.csv and the lesion masks must agree)."""
    return [replace(p, rows=48, pixel_spacing_mm=7.0, domain_randomisation=True) for p in default_profiles(n)]


def _slices(series_dir: Path) -> list[pydicom.Dataset]:
    """A series' headers, inferior to superior."""
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.glob("*.dcm"))]
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _write(out: Path, seed: int, **kwargs: object) -> FederationSummary:
    return write_federation(
        out, sites=N_SITES, patients_per_site=PATIENTS, seed=seed, profiles=_small_profiles(), **kwargs
    )  # type: ignore[arg-type]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederationSummary, list[str]]:
    messages: list[str] = []
    summary = _write(tmp_path_factory.mktemp("fed") / "federation", seed=7, progress=messages.append)
    return summary, messages


def test_summary_and_layout(federation: tuple[FederationSummary, list[str]]) -> None:
    summary, messages = federation
    profiles = _small_profiles()
    assert [s.name for s in summary.sites] == ["site-0", "site-1"]
    for site, profile in zip(summary.sites, profiles):
        site_dir = summary.root / site.name
        assert site.n_patients == max(4, round(PATIENTS * profile.patient_factor))
        assert sum(site.class_counts.values()) == site.n_patients
        assert set(site.class_counts) == set(DIAGNOSES)
        files = sorted((site_dir / "dicom").rglob("*.dcm"))
        assert len(files) == site.n_files
        low, high = profile.scan_range_mm  # each study's scan range is drawn (domain randomisation)
        assert site.n_patients * low / profile.slice_thickness_mm - site.n_patients <= len(files)
        assert len(files) <= site.n_patients * high / profile.slice_thickness_mm + site.n_patients
        studies = sorted(p.name for p in (site_dir / "dicom").iterdir())
        assert studies == [f"study-{k:04d}" for k in range(1, site.n_patients + 1)]
        assert site.seconds >= 0
        with (site_dir / "labels.csv").open() as fh:
            assert fh.readline().strip() == "StudyInstanceUID,diagnosis,severe,time_days,age,sex"
        profile_table = read_site_profile(site_dir)  # the clinical profile export, read as a site would (#24)
        assert set(profile_table.keys) == {row["StudyInstanceUID"] for row in _labels(site_dir)}
        assert not profile_table.errors
    assert len(messages) == sum(s.n_patients for s in summary.sites)


def test_labels_match_studies_and_are_valid(federation: tuple[FederationSummary, list[str]]) -> None:
    summary, _ = federation
    for site in summary.sites:
        site_dir = summary.root / site.name
        labels = _labels(site_dir)
        study_uids = {
            pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
            for p in (site_dir / "dicom").rglob("IM0001.dcm")
        }
        assert {row["StudyInstanceUID"] for row in labels} == study_uids
        assert len(labels) == site.n_patients
        counts = {d: sum(row["diagnosis"] == d for row in labels) for d in DIAGNOSES}
        assert counts == site.class_counts
        for row in labels:
            assert row["diagnosis"] in DIAGNOSES
            assert row["severe"] in ("0", "1")
            assert 1 <= int(row["time_days"]) <= FOLLOW_UP_DAYS
            if row["severe"] == "0":
                assert int(row["time_days"]) >= 3  # censored, at the earliest on day 3
            assert 25 <= int(row["age"]) <= 90
            assert row["sex"] in ("M", "F")


def test_series_uids_geometry_and_phi(federation: tuple[FederationSummary, list[str]]) -> None:
    summary, _ = federation
    profiles = {p.name: p for p in _small_profiles()}
    labels = {row["StudyInstanceUID"]: row for s in summary.sites for row in _labels(summary.root / s.name)}
    all_sop: set[str] = set()
    for site in summary.sites:
        profile = profiles[site.name]
        for series_dir in sorted((summary.root / site.name / "dicom").glob("study-*/*")):
            datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.glob("*.dcm"))]
            assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
            assert len({ds.StudyInstanceUID for ds in datasets}) == 1
            sops = {ds.SOPInstanceUID for ds in datasets}
            assert len(sops) == len(datasets) and not sops & all_sop
            all_sop |= sops
            by_z = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
            z = np.array([float(ds.ImagePositionPatient[2]) for ds in by_z])
            np.testing.assert_allclose(np.diff(z), profile.slice_thickness_mm, atol=1e-4)
            numbers = [int(ds.InstanceNumber) for ds in by_z]
            expected = list(range(len(by_z), 0, -1)) if profile.reverse_slice_order else list(range(1, len(by_z) + 1))
            assert numbers == expected
            first = datasets[0]
            row_mm, col_mm = (float(v) for v in first.PixelSpacing)  # the field of view varies per study
            assert row_mm == col_mm and 7.0 * FOV_FACTOR_RANGE[0] - 1e-3 <= row_mm <= 7.0 * FOV_FACTOR_RANGE[1] + 1e-3
            assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (first.Rows, first.Columns) == (48, 48)
            assert float(first.SliceThickness) in SLICE_THICKNESSES_MM  # reconstructed thickness, drawn per study
            assert float(first.SpacingBetweenSlices) == profile.slice_thickness_mm
            assert 200.0 - profile.slice_thickness_mm <= len(datasets) * profile.slice_thickness_mm <= 350.0 + 5.0
            # fake PHI is present, consistent with labels.csv, and absent from folder and file names
            name, pid = str(first.PatientName), str(first.PatientID)
            assert name.startswith("SYNTH^PATIENT") and pid
            row = labels[first.StudyInstanceUID]
            assert first.PatientSex == row["sex"] and first.PatientAge == f"{int(row['age']):03d}Y"
            birth = dt.datetime.strptime(first.PatientBirthDate, "%Y%m%d").date()
            study = dt.datetime.strptime(first.StudyDate, "%Y%m%d").date()
            age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
            assert age == int(row["age"])
            assert first.AccessionNumber
            rel = str(series_dir.relative_to(summary.root))
            for secret in (
                name,
                name.split("^")[-1],
                pid,
                first.PatientBirthDate,
                first.AccessionNumber,
                first.StudyDate,
            ):
                assert secret not in rel
                assert all(secret not in p.name for p in series_dir.iterdir())


def test_sites_differ(federation: tuple[FederationSummary, list[str]]) -> None:
    summary, _ = federation
    headers = [pydicom.dcmread(next((summary.root / s.name / "dicom").rglob("IM0001.dcm"))) for s in summary.sites]
    a, b = headers
    assert a.Manufacturer != b.Manufacturer
    assert float(a.SpacingBetweenSlices) != float(b.SpacingBetweenSlices)
    assert float(a.RescaleIntercept) != float(b.RescaleIntercept)
    assert a.PixelRepresentation != b.PixelRepresentation
    assert a.InstitutionName != b.InstitutionName


def test_hu_read_back_per_site(federation: tuple[FederationSummary, list[str]]) -> None:
    """Whatever a site's storage convention, rescaled pixels give air near -1000 and lungs near -850."""
    summary, _ = federation
    for site in summary.sites:
        series_dir = next((summary.root / site.name / "dicom").glob("study-*/*"))
        datasets = [pydicom.dcmread(p) for p in sorted(series_dir.glob("*.dcm"))]
        hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
        assert float(np.median(hu[:, :2, :2])) == pytest.approx(-1000.0, abs=25.0)
        lung_like = hu[(hu > -950) & (hu < -700)]
        assert lung_like.size > 0.03 * hu.size
        assert -930.0 < float(np.median(lung_like)) < -760.0  # lung density and gradient are drawn per study


def test_same_seed_identical_bytes_other_seed_different(
    federation: tuple[FederationSummary, list[str]], tmp_path: Path
) -> None:
    summary, _ = federation
    again = _write(tmp_path / "again", seed=7)
    original = _files(summary.root)
    assert _files(again.root) == original
    other = _write(tmp_path / "other", seed=8)
    other_files = _files(other.root)
    assert other_files["site-0/labels.csv"] != original["site-0/labels.csv"]
    common = set(original) & set(other_files)
    assert common and all(original[k] != other_files[k] for k in common if k.endswith(".dcm"))


def test_default_profiles() -> None:
    three = default_profiles(3)
    assert default_profiles(3) == three
    assert [p.name for p in three] == ["site-0", "site-1", "site-2"]
    for attribute in ("manufacturer", "slice_thickness_mm", "rescale_intercept", "class_prevalence", "noise_hu"):
        assert len({getattr(p, attribute) for p in three}) == 3, attribute
    many = default_profiles(9)
    assert len(set(many)) == 9
    for p in many:
        assert 1.0 <= p.slice_thickness_mm <= 5.0
        assert 2.5 <= p.pixel_spacing_mm <= 3.2
        assert 8.0 <= p.noise_hu <= 35.0
        assert p.rows == 128
        assert math.isclose(sum(p.class_prevalence), 1.0)
        assert (p.rescale_intercept == -1024.0) == (p.pixel_representation == 0)
    assert any(p.reverse_slice_order for p in three) and not all(p.reverse_slice_order for p in three)


def test_prognosis_hazard_increases_with_burden_age_and_disease() -> None:
    def severe_rate(diagnosis: str, *, old: bool | None = None) -> float:
        cases = [_draw_case(np.random.default_rng([99, k]), k, diagnosis) for k in range(2000)]
        if old is not None:
            cases = [c for c in cases if (c.age >= 65) == old]
        return float(np.mean([c.severe for c in cases]))

    covid, pneumonia, normal = severe_rate("covid"), severe_rate("other_pneumonia"), severe_rate("normal")
    assert covid > pneumonia > normal
    assert severe_rate("covid", old=True) > severe_rate("covid", old=False)
    cases = [_draw_case(np.random.default_rng([5, k]), k, "covid") for k in range(2000)]
    burdens = np.array([c.burden for c in cases])
    severe = np.array([c.severe for c in cases])
    assert 0.05 <= burdens.min() and burdens.max() <= 0.6
    assert severe[burdens > np.median(burdens)].mean() > severe[burdens <= np.median(burdens)].mean() + 0.1
    assert any(c.severe == 0 and c.time_days < FOLLOW_UP_DAYS for c in cases)  # some censored early


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "fed"
    profiles = [replace(p, rows=16, pixel_spacing_mm=22.0, slice_thickness_mm=20.0) for p in default_profiles(1)]
    write_federation(out, sites=1, patients_per_site=1, seed=0, profiles=profiles)
    (out / "site-0" / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="site-0"):
        write_federation(out, sites=1, patients_per_site=1, seed=0, profiles=profiles)
    summary = write_federation(out, sites=1, patients_per_site=1, seed=0, profiles=profiles, overwrite=True)
    assert not (out / "site-0" / "stale.txt").exists()
    assert summary.sites[0].n_patients == 4  # at least four patients per site


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"sites": 0}, "0"),
        ({"patients_per_site": -3}, "-3"),
        ({"seed": -1}, "-1"),
        ({"profiles": default_profiles(1)}, "sites=2"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], named: str) -> None:
    arguments: dict[str, object] = {"sites": 2, "patients_per_site": 4, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=named):
        write_federation(tmp_path / "fed", **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("slice_thickness_mm", 0.0), ("label_noise", 0.6), ("label_noise", -0.01), ("scan_range_mm", (300.0, 200.0))],
)
def test_bad_profile_value_is_named(tmp_path: Path, field: str, value: object) -> None:
    profiles = [replace(default_profiles(1)[0], **{field: value})]
    with pytest.raises(ValueError, match=field):
        write_federation(tmp_path / "fed", sites=1, patients_per_site=4, seed=0, profiles=profiles)


def test_lesion_masks_share_the_series_grid_in_monai(federation: tuple[FederationSummary, list[str]]) -> None:
    """Each study has SITE_DIR/lesion-masks/<StudyInstanceUID>.nii.gz; MONAI loads mask and DICOM series onto the
    same grid (shape and RAS affine), for both instance orders; the mask covers dense lung for diseased studies
    and is empty for normal ones."""
    from monai.transforms import LoadImage

    summary, _ = federation
    load = LoadImage(image_only=True)
    profiles = {p.name: p for p in _small_profiles()}
    orders = set()
    for site in summary.sites:
        site_dir = summary.root / site.name
        labels = {row["StudyInstanceUID"]: row["diagnosis"] for row in _labels(site_dir)}
        masks = sorted((site_dir / "lesion-masks").glob("*.nii.gz"))
        assert {p.name[: -len(".nii.gz")] for p in masks} == set(labels)
        orders.add(profiles[site.name].reverse_slice_order)
        for series_dir in sorted((site_dir / "dicom").glob("study-*/*")):
            uid = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
            image = load(str(series_dir))
            mask = load(str(site_dir / "lesion-masks" / f"{uid}.nii.gz"))
            assert tuple(mask.shape) == tuple(image.shape)
            np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(image.affine), atol=1e-4)
            m = np.asarray(mask)
            assert set(np.unique(m).tolist()) <= {0, 1}
            hu = np.asarray(image, dtype=np.float32)
            if labels[uid] == "normal":
                assert not m.any()
                continue
            assert m.sum() > 0
            lesion = m > 0
            # lesions (from faint ground glass to consolidation) are denser than the aerated lung around them
            aerated = (hu > -950) & (hu < -700) & ~lesion
            assert float(np.median(hu[lesion])) > float(np.median(hu[aerated])) + 40.0
    assert orders == {False, True}  # both instance orders were checked


def test_study_geometry_ranges_and_canonical() -> None:
    """Randomised studies draw scan range, field of view and slice thickness within their ranges (all of them used);
    without domain randomisation every study is the site's fixed 160 mm grid."""
    profile = replace(default_profiles(1)[0], slice_thickness_mm=2.5, pixel_spacing_mm=3.0, domain_randomisation=True)
    rng = np.random.default_rng(0)
    drawn = [study_geometry(rng, profile) for _ in range(400)]
    ranges = [g.n_slices * g.slice_spacing_mm for g in drawn]
    assert 200.0 - 2.5 <= min(ranges) < 215.0 and 335.0 < max(ranges) <= 350.0 + 2.5
    assert all(g.slice_spacing_mm == 2.5 for g in drawn)
    pixels = [g.pixel_spacing_mm for g in drawn]
    assert 3.0 * FOV_FACTOR_RANGE[0] - 1e-3 <= min(pixels) < 2.7 and 3.5 < max(pixels) <= 3.0 * FOV_FACTOR_RANGE[1]
    assert {g.slice_thickness_mm for g in drawn} == set(SLICE_THICKNESSES_MM)
    assert min(SLICE_THICKNESSES_MM) == 0.625 and max(SLICE_THICKNESSES_MM) == 7.0
    fixed = replace(profile, domain_randomisation=False)
    assert {study_geometry(rng, fixed) for _ in range(5)} == {study_geometry(rng, fixed)}
    assert study_geometry(rng, fixed).n_slices == 64 and study_geometry(rng, fixed).slice_thickness_mm == 2.5


def test_study_geometry_at_a_weaker_randomisation_strength() -> None:
    """Strength 0.5: scan ranges between 160 mm and the middle of scan_range_mm, field of view within half the
    range, the site's own thickness in about half the studies; a strength outside [0, 1] is refused by name."""
    profile = replace(default_profiles(1)[0], slice_thickness_mm=2.5, pixel_spacing_mm=3.0, domain_randomisation=0.5)
    rng = np.random.default_rng(0)
    drawn = [study_geometry(rng, profile) for _ in range(400)]
    ranges = [g.n_slices * g.slice_spacing_mm for g in drawn]
    assert 180.0 - 2.5 <= min(ranges) and max(ranges) <= 255.0 + 2.5
    pixels = [g.pixel_spacing_mm for g in drawn]
    assert 3.0 * (1 - 0.5 * 0.15) - 1e-3 <= min(pixels) and max(pixels) <= 3.0 * (1 + 0.5 * 0.2) + 1e-3
    own = np.mean([g.slice_thickness_mm == 2.5 for g in drawn])
    assert 0.4 < own < 0.65
    with pytest.raises(ValueError, match="domain_randomisation must be a bool or a strength"):
        write_site(
            Path("/nonexistent"), replace(profile, domain_randomisation=1.5), site_index=0, patients_per_site=4, seed=0
        )


def test_label_noise_rate() -> None:
    """noisy_label flips about ``rate`` of the labels, to each other class about equally; never at rate 0."""
    rng = np.random.default_rng(1)
    n = 20000
    for diagnosis in DIAGNOSES:
        labels = [noisy_label(rng, diagnosis, 0.03) for _ in range(n)]
        flipped = [x for x in labels if x != diagnosis]
        assert abs(len(flipped) / n - 0.03) < 0.006
        others = {d: flipped.count(d) for d in DIAGNOSES if d != diagnosis}
        assert set(flipped) == set(others) and min(others.values()) > 0.35 * len(flipped)
        assert all(noisy_label(rng, diagnosis, 0.0) == diagnosis for _ in range(500))


def test_label_noise_and_randomisation_in_written_sites(tmp_path: Path) -> None:
    """With label noise, some labels.csv diagnoses disagree with what was rendered (the mask follows the image:
    present iff the rendered diagnosis has lesions); without label noise all agree; without domain
    randomisation every study has the site's fixed geometry."""
    base = replace(
        default_profiles(1)[0], rows=24, pixel_spacing_mm=14.0, slice_thickness_mm=10.0, domain_randomisation=True
    )

    def disagreements(profile: SiteProfile, folder: str) -> tuple[int, int, set[int]]:
        summary = write_federation(tmp_path / folder, sites=1, patients_per_site=20, seed=3, profiles=[profile])
        site_dir = summary.root / profile.name
        wrong, total, counts = 0, 0, set()
        for series_dir in sorted((site_dir / "dicom").glob("study-*/*")):
            headers = _slices(series_dir)
            counts.add(len(headers))
            uid = headers[0].StudyInstanceUID
            label = {row["StudyInstanceUID"]: row["diagnosis"] for row in _labels(site_dir)}[uid]
            has_lesion = bool(np.asarray(nibabel.load(site_dir / "lesion-masks" / f"{uid}.nii.gz").dataobj).any())
            wrong += int(has_lesion != (label != "normal"))
            total += 1
        return wrong, total, counts

    noisy = replace(base, name="noisy", label_noise=0.5)
    wrong, total, counts = disagreements(noisy, "noisy")
    assert total == 24 and wrong >= 3  # about a third of flips swap normal and diseased
    assert len(counts) > 3 and all(20 <= c <= 35 for c in counts)
    clean, total, _ = disagreements(replace(base, name="clean", label_noise=0.0), "clean")
    assert clean == 0
    fixed = replace(base, name="fixed", domain_randomisation=False, label_noise=0.0)
    wrong, _, counts = disagreements(fixed, "fixed")
    assert wrong == 0 and counts == {16}

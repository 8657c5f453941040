"""A federation of synthetic, non-IID hospitals, each writing real CT DICOM plus a labels.csv.

Sites differ the way real ones do: scanner vendor and header conventions (rescale intercept,
signed/unsigned storage, slice export order), slice spacing, pixel spacing, noise, size, and the
mix of diagnoses. With ``SiteProfile.domain_randomisation`` (issue #20.1; off by default, on in ``fedct bench
quality``) every study of a site is domain-randomised: its scan range (200-350 mm: apices and upper abdomen come and go),
field of view (pixel spacing), reconstructed slice thickness (0.625-7 mm) and, in synthetic.phantom, its
anatomy, contrast phase, kernel, artefacts and lesion pattern; and with ``SiteProfile.label_noise`` a share of labels
is wrong (0 by default, 0.03 in the quality benchmark). Everything is derived from the seed, so writing the same seed twice gives
byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pydicom.uid import generate_uid

from synthetic.dicom_writer import PatientIdentity, write_ct_series
from synthetic.masks import LESION_MASK_DIR, write_lesion_mask
from synthetic.phantom import CHEST_LENGTH_MM, DIAGNOSES, SLICE_THICKNESSES_MM, randomisation_strength, render_chest
from synthetic.profiles import write_site_profile

LABEL_COLUMNS = ("StudyInstanceUID", "diagnosis", "severe", "time_days", "age", "sex")
#: Follow-up window of the prognosis task (days); patients without an event are censored here.
FOLLOW_UP_DAYS = 28
#: Baseline daily hazard of a severe outcome, by diagnosis (same order as DIAGNOSES).
_BASE_HAZARD = MappingProxyType({"covid": 0.006, "other_pneumonia": 0.0035, "normal": 0.0008})
_UID_NAMESPACE = "fedct-synthetic-v1"
#: A randomised study's pixel spacing is the site's times a factor in this range (its field of view varies).
FOV_FACTOR_RANGE = (0.85, 1.2)


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition and population characteristics of one synthetic hospital.

    ``domain_randomisation``: each study draws its scan range (``scan_range_mm``), field of view, slice thickness
    and, in the phantom, anatomy, acquisition and lesion pattern (synthetic.phantom); off, every study covers
    160 mm of chest with the canonical phantom at the site's fixed geometry; a number in (0, 1] is the strength of
    those draws (synthetic.phantom.draw_variation: 1 = True, smaller = nearer the canonical study). ``label_noise``: the share of
    studies whose labels.csv diagnosis is another class than the one rendered (the lesion mask follows the image).
    """

    name: str
    manufacturer: str
    manufacturer_model_name: str
    institution_name: str
    slice_thickness_mm: float  # slice spacing equals thickness
    pixel_spacing_mm: float
    rows: int
    noise_hu: float
    rescale_intercept: float
    pixel_representation: int
    patient_factor: float
    class_prevalence: tuple[float, float, float]  # covid, other_pneumonia, normal
    reverse_slice_order: bool  # instances numbered head-to-feet
    convolution_kernel: str = "STANDARD"
    kvp: float = 120.0
    domain_randomisation: bool | float = False
    label_noise: float = 0.0
    scan_range_mm: tuple[float, float] = (200.0, 350.0)


@dataclass(frozen=True)
class SiteSummary:
    """What was written for one site."""

    name: str
    n_patients: int
    n_files: int
    class_counts: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class FederationSummary:
    """What :func:`write_federation` wrote: the root folder and one summary per site."""

    root: Path
    sites: tuple[SiteSummary, ...]


@dataclass(frozen=True)
class _PatientCase:
    index: int
    diagnosis: str
    burden: float
    age: int
    sex: str
    severe: int
    time_days: int


_VENDORS = (
    SiteProfile(
        name="",
        manufacturer="SIEMENS",
        manufacturer_model_name="SOMATOM Definition AS",
        institution_name="Synthetic University Hospital",
        slice_thickness_mm=5.0,
        pixel_spacing_mm=2.8,
        rows=128,
        noise_hu=12.0,
        rescale_intercept=-1024.0,
        pixel_representation=0,
        patient_factor=1.2,
        class_prevalence=(0.50, 0.20, 0.30),
        reverse_slice_order=False,
        convolution_kernel="B31f",
        kvp=120.0,
    ),
    SiteProfile(
        name="",
        manufacturer="GE MEDICAL SYSTEMS",
        manufacturer_model_name="LightSpeed VCT",
        institution_name="Synthetic Regional Medical Center",
        slice_thickness_mm=2.5,
        pixel_spacing_mm=3.0,
        rows=128,
        noise_hu=28.0,
        rescale_intercept=0.0,
        pixel_representation=1,
        patient_factor=1.0,
        class_prevalence=(0.25, 0.40, 0.35),
        reverse_slice_order=True,
        convolution_kernel="STANDARD",
        kvp=120.0,
    ),
    SiteProfile(
        name="",
        manufacturer="Philips",
        manufacturer_model_name="Ingenuity CT",
        institution_name="Synthetic Community Hospital",
        slice_thickness_mm=1.25,
        pixel_spacing_mm=2.6,
        rows=128,
        noise_hu=20.0,
        rescale_intercept=-1000.0,
        pixel_representation=1,
        patient_factor=0.7,
        class_prevalence=(0.35, 0.15, 0.50),
        reverse_slice_order=False,
        convolution_kernel="B",
        kvp=100.0,
    ),
    SiteProfile(
        name="",
        manufacturer="CANON_MEC",
        manufacturer_model_name="Aquilion ONE",
        institution_name="Synthetic Teaching Hospital",
        slice_thickness_mm=3.0,
        pixel_spacing_mm=3.2,
        rows=128,
        noise_hu=35.0,
        rescale_intercept=-1024.0,
        pixel_representation=0,
        patient_factor=0.9,
        class_prevalence=(0.20, 0.30, 0.50),
        reverse_slice_order=True,
        convolution_kernel="FC13",
        kvp=120.0,
    ),
)


def default_profiles(n_sites: int) -> list[SiteProfile]:
    """Deterministic profiles for ``n_sites`` sites, cycling through four vendor styles.

    Sites 0-3 are Siemens-, GE-, Philips- and Canon-like (5.0, 2.5, 1.25, 3.0 mm slices; intercepts
    -1024/unsigned, 0/signed, -1000/signed, -1024/unsigned). Later cycles vary noise, spacing, size and
    class mix a little so that no two sites are identical.
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be a positive integer, got {n_sites!r}")
    profiles = []
    for i in range(n_sites):
        base = _VENDORS[i % len(_VENDORS)]
        cycle = i // len(_VENDORS)
        prevalence = base.class_prevalence
        if cycle:
            shift = cycle % 3
            prevalence = prevalence[shift:] + prevalence[:shift]
        profiles.append(
            replace(
                base,
                name=f"site-{i}",
                institution_name=base.institution_name if cycle == 0 else f"{base.institution_name} {cycle + 1}",
                noise_hu=round(min(35.0, max(8.0, base.noise_hu * (1.0 + 0.15 * ((-1) ** cycle) * min(cycle, 2)))), 2),
                pixel_spacing_mm=round(min(3.2, max(2.5, base.pixel_spacing_mm - 0.1 * (cycle % 3))), 3),
                patient_factor=round(base.patient_factor * (1.0 + 0.1 * (cycle % 3)), 3),
                class_prevalence=prevalence,
            )
        )
    return profiles


def _allocate_diagnoses(rng: np.random.Generator, n: int, prevalence: tuple[float, float, float]) -> list[str]:
    """Class labels for ``n`` patients: counts by largest remainder from ``prevalence``, then shuffled."""
    p = np.asarray(prevalence, dtype=float)
    if p.shape != (len(DIAGNOSES),) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"class_prevalence must be {len(DIAGNOSES)} non-negative numbers, got {prevalence!r}")
    p = p / p.sum()
    exact = p * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - int(counts.sum())]:
        counts[k] += 1
    labels = [d for d, c in zip(DIAGNOSES, counts) for _ in range(int(c))]
    return [labels[i] for i in rng.permutation(n)]


def _draw_case(rng: np.random.Generator, index: int, diagnosis: str) -> _PatientCase:
    """Burden, demographics and a prognosis whose hazard grows with burden, age and disease."""
    burden = 0.0 if diagnosis == "normal" else float(0.05 + 0.55 * rng.beta(2.0, 3.0))
    age = int(np.clip(round(rng.normal(62.0 if diagnosis != "normal" else 55.0, 14.0)), 25, 90))
    sex = "M" if rng.random() < 0.5 else "F"
    hazard = _BASE_HAZARD[diagnosis] * math.exp(4.0 * burden + 0.35 * (age - 60) / 10.0)
    event_day = max(1, math.ceil(rng.exponential(1.0 / hazard)))
    censor_day = int(rng.integers(3, FOLLOW_UP_DAYS)) if rng.random() < 0.12 else FOLLOW_UP_DAYS
    severe = int(event_day <= censor_day)
    return _PatientCase(index, diagnosis, round(burden, 4), age, sex, severe, event_day if severe else censor_day)


def noisy_label(rng: np.random.Generator, diagnosis: str, rate: float) -> str:
    """``diagnosis``, or with probability ``rate`` one of the other classes (uniformly): the label a site records."""
    if rng.random() >= rate:
        return diagnosis
    others = [d for d in DIAGNOSES if d != diagnosis]
    return others[int(rng.integers(len(others)))]


@dataclass(frozen=True)
class StudyGeometry:
    """The grid one study is written on: slices, slice spacing and thickness, pixel spacing (mm)."""

    n_slices: int
    slice_spacing_mm: float
    slice_thickness_mm: float
    pixel_spacing_mm: float


def study_geometry(rng: np.random.Generator, profile: SiteProfile) -> StudyGeometry:
    """A study's grid: the site's fixed 160 mm of chest, or (``domain_randomisation``) a scan range drawn from
    ``scan_range_mm``, a pixel spacing of the site's times :data:`FOV_FACTOR_RANGE` and a slice thickness drawn
    from synthetic.phantom.SLICE_THICKNESSES_MM (the slice spacing stays the site's)."""
    spacing = float(profile.slice_thickness_mm)
    if not profile.domain_randomisation:
        n = max(1, round(CHEST_LENGTH_MM / spacing))
        return StudyGeometry(n, spacing, spacing, float(profile.pixel_spacing_mm))
    strength = randomisation_strength(profile.domain_randomisation)
    scan = CHEST_LENGTH_MM + strength * (float(rng.uniform(*profile.scan_range_mm)) - CHEST_LENGTH_MM)
    pixel = round(float(profile.pixel_spacing_mm) * (1.0 + strength * (float(rng.uniform(*FOV_FACTOR_RANGE)) - 1.0)), 3)
    thickness = float(SLICE_THICKNESSES_MM[int(rng.integers(len(SLICE_THICKNESSES_MM)))])
    if strength < 1.0 and rng.random() >= strength:  # s < 1: the site's own thickness in 1 - s of the studies
        thickness = spacing
    return StudyGeometry(max(1, round(scan / spacing)), spacing, thickness, pixel)


def _age_on(birth: dt.date, day: dt.date) -> int:
    """Completed years between ``birth`` and ``day``."""
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def _identity(rng: np.random.Generator, site_index: int, case: _PatientCase) -> tuple[PatientIdentity, str, str, str]:
    """Fake PHI (identity, study date, study time, accession number) consistent with the case's age."""
    study_day = dt.date(2020, 3, 1) + dt.timedelta(days=int(rng.integers(0, 640)))
    birthday_offset = int(rng.integers(0, 365))
    try:
        anniversary = study_day.replace(year=study_day.year - case.age)
    except ValueError:  # 29 February
        anniversary = study_day.replace(year=study_day.year - case.age, day=28)
    birth = anniversary - dt.timedelta(days=birthday_offset)
    if _age_on(birth, study_day) != case.age:  # leap-year edge: fall back to the exact anniversary
        birth = anniversary
    patient_number = case.index + 1
    identity = PatientIdentity(
        PatientName=f"SYNTH^PATIENT{patient_number:04d}",
        PatientID=f"S{site_index:02d}-{int(rng.integers(10**6, 10**7))}-{patient_number:04d}",
        PatientBirthDate=birth.strftime("%Y%m%d"),
        PatientSex=case.sex,
        PatientAge=f"{case.age:03d}Y",
    )
    study_time = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
    accession = f"A{site_index:02d}{patient_number:05d}{int(rng.integers(100, 1000))}"
    return identity, study_day.strftime("%Y%m%d"), study_time, accession


def _uid(seed: int, site_name: str, patient_index: int, kind: str) -> str:
    return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, str(seed), site_name, str(patient_index), kind]))


def _check_profile(profile: SiteProfile) -> None:
    """Raise ValueError naming the first unusable value of ``profile``."""
    positive = {
        "slice_thickness_mm": profile.slice_thickness_mm,
        "pixel_spacing_mm": profile.pixel_spacing_mm,
        "patient_factor": profile.patient_factor,
    }
    for field, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{profile.name}: {field} must be positive, got {value!r}")
    if not isinstance(profile.rows, int) or profile.rows < 1:
        raise ValueError(f"{profile.name}: rows must be a positive integer, got {profile.rows!r}")
    if not (math.isfinite(profile.noise_hu) and profile.noise_hu >= 0):
        raise ValueError(f"{profile.name}: noise_hu must be >= 0, got {profile.noise_hu!r}")
    if profile.pixel_representation not in (0, 1):
        raise ValueError(f"{profile.name}: pixel_representation must be 0 or 1, got {profile.pixel_representation!r}")
    try:
        randomisation_strength(profile.domain_randomisation)
    except ValueError:
        raise ValueError(
            f"{profile.name}: domain_randomisation must be a bool or a strength in [0, 1], "
            f"got {profile.domain_randomisation!r}"
        ) from None
    if not (math.isfinite(profile.label_noise) and 0.0 <= profile.label_noise <= 0.5):
        raise ValueError(f"{profile.name}: label_noise must be in [0, 0.5], got {profile.label_noise!r}")
    low, high = profile.scan_range_mm
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f"{profile.name}: scan_range_mm must be (low, high) with 0 < low <= high, got {(low, high)!r}")


def write_site(
    site_dir: Path,
    profile: SiteProfile,
    *,
    site_index: int,
    patients_per_site: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
) -> SiteSummary:
    """Write one site's DICOM studies under ``site_dir/dicom``, its ``labels.csv``, one lesion mask per study
    (``site_dir/lesion-masks/<StudyInstanceUID>.nii.gz``, on the series' grid; see synthetic.masks) and its clinical
    profile export (``profile.csv`` in the site's own units and spelling, with ``profile-mapping.toml``; see
    synthetic.profiles); return a summary."""
    _check_profile(profile)
    start = time.perf_counter()
    n_patients = max(4, round(patients_per_site * profile.patient_factor))
    site_rng = np.random.default_rng([seed, site_index])
    diagnoses = _allocate_diagnoses(site_rng, n_patients, profile.class_prevalence)
    rows = cols = int(profile.rows)
    rows_written: list[dict[str, object]] = []
    n_files = 0
    dicom_dir = site_dir / "dicom"
    for j, diagnosis in enumerate(diagnoses):
        rng = np.random.default_rng([seed, site_index, j])
        case = _draw_case(rng, j, diagnosis)
        identity, study_date, study_time, accession = _identity(rng, site_index, case)
        study_rng = np.random.default_rng([seed, site_index, j, 1])  # geometry and label noise: their own stream
        geometry = study_geometry(study_rng, profile)
        label = noisy_label(study_rng, case.diagnosis, profile.label_noise)
        spacing, thickness = geometry.pixel_spacing_mm, geometry.slice_spacing_mm
        study = render_chest(
            shape=(geometry.n_slices, rows, cols),
            pixel_spacing_mm=(spacing, spacing),
            slice_spacing_mm=thickness,
            diagnosis=case.diagnosis,
            burden=case.burden,
            noise_hu=profile.noise_hu,
            rng=rng,
            randomise=profile.domain_randomisation,
            slice_thickness_mm=geometry.slice_thickness_mm,
        )
        table_z = round(float(rng.uniform(-260.0, -140.0)), 2)
        origin = (-(cols - 1) / 2.0 * spacing, -(rows - 1) / 2.0 * spacing, table_z)
        study_uid = _uid(seed, profile.name, j, "study")
        series_uid = _uid(seed, profile.name, j, "series")
        study_folder = f"study-{j + 1:04d}"
        series_number = 2 if profile.manufacturer.startswith("GE") else 1
        paths = write_ct_series(
            dicom_dir / study_folder / f"series-{series_number:03d}",
            study.hu,
            pixel_spacing_mm=(spacing, spacing),
            slice_spacing_mm=thickness,
            slice_thickness_mm=geometry.slice_thickness_mm,
            origin_mm=origin,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            patient=identity,
            study_date=study_date,
            study_time=study_time,
            accession_number=accession,
            manufacturer=profile.manufacturer,
            manufacturer_model_name=profile.manufacturer_model_name,
            institution_name=profile.institution_name,
            rescale_intercept=profile.rescale_intercept,
            rescale_slope=1.0,
            pixel_representation=profile.pixel_representation,
            series_number=series_number,
            uid_entropy=[_UID_NAMESPACE, seed, profile.name, j, "sop"],
            study_id=f"{j + 1}",
            series_description=f"CHEST {geometry.slice_thickness_mm:g}mm",
            kvp=profile.kvp,
            convolution_kernel=profile.convolution_kernel,
            reverse_instance_order=profile.reverse_slice_order,
        )
        n_files += len(paths)
        write_lesion_mask(
            site_dir / LESION_MASK_DIR / f"{study_uid}.nii.gz",
            study.lesion_mask,
            origin_mm=origin,
            pixel_spacing_mm=(spacing, spacing),
            slice_spacing_mm=thickness,
            reverse_instance_order=profile.reverse_slice_order,
        )
        rows_written.append(
            {
                "StudyInstanceUID": study_uid,
                "diagnosis": label,
                "severe": case.severe,
                "time_days": case.time_days,
                "age": case.age,
                "sex": case.sex,
            }
        )
        if progress is not None:
            progress(f"{profile.name}: wrote {study_folder} ({j + 1}/{n_patients}, {len(paths)} slices)")
    with (site_dir / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows_written)
    write_site_profile(site_dir, site_index=site_index, seed=seed)  # profile.csv + profile-mapping.toml (#24)
    written = [str(r["diagnosis"]) for r in rows_written]
    counts = {d: written.count(d) for d in DIAGNOSES}  # as labels.csv says (label noise included)
    return SiteSummary(profile.name, n_patients, n_files, counts, round(time.perf_counter() - start, 3))


def write_federation(
    out: Path,
    *,
    sites: int,
    patients_per_site: int,
    seed: int,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    profiles: Sequence[SiteProfile] | None = None,
) -> FederationSummary:
    """Write ``sites`` synthetic hospitals under ``out/<site-name>/`` (``dicom/`` + ``labels.csv``).

    ``profiles`` defaults to ``default_profiles(sites)``; when given it must hold ``sites`` profiles
    with distinct names (tests use it for smaller images). Raises FileExistsError if a site folder
    already exists and is not empty, unless ``overwrite`` is true, in which case those site folders
    (only) are deleted first. ``progress`` is called once per written study.
    """
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise ValueError(f"sites must be a positive integer, got {sites!r}")
    if isinstance(patients_per_site, bool) or not isinstance(patients_per_site, int) or patients_per_site < 1:
        raise ValueError(f"patients_per_site must be a positive integer, got {patients_per_site!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    if profiles is None:
        profiles = default_profiles(sites)
    elif len(profiles) != sites:
        raise ValueError(f"profiles holds {len(profiles)} site profiles but sites={sites}")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names) or not all(n and "/" not in n and n not in (".", "..") for n in names):
        raise ValueError(f"site profile names must be distinct, non-empty folder names, got {names!r}")
    for profile in profiles:
        _check_profile(profile)
    for profile in profiles:
        site_dir = out / profile.name
        if site_dir.exists() and any(site_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"site folder is not empty: {site_dir} (pass overwrite=True to replace it)")
            shutil.rmtree(site_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for i, profile in enumerate(profiles):
        site_dir = out / profile.name
        site_dir.mkdir(parents=True, exist_ok=True)
        summaries.append(
            write_site(
                site_dir, profile, site_index=i, patients_per_site=patients_per_site, seed=seed, progress=progress
            )
        )
    return FederationSummary(root=out, sites=tuple(summaries))

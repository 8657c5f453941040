"""synthetic/profiles.py: site profiles with signal, site-specific exports that map back to the same distributions."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedct.cli import main as fedct_main
from preprocessing.labels import DIAGNOSES, LabelsError, read_labels
from preprocessing.profile import read_mapping, read_schema, read_site_profile
from synthetic.hospitals import LABEL_COLUMNS, default_profiles, write_federation
from synthetic.profiles import style_for, write_site_profile

N = 360  # studies per test site: enough for stable medians, still milliseconds to write


def _labels(site: Path, site_index: int, n: int = N) -> Path:
    """A labels.csv with hospitals.py's columns: diagnoses in turn, outcomes more often severe with disease and age."""
    rng = np.random.default_rng([7, site_index])
    site.mkdir(parents=True, exist_ok=True)
    with (site / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for j in range(n):
            diagnosis = DIAGNOSES[j % 3]
            age = int(rng.integers(25, 90))
            severe = int(
                rng.random() < {"covid": 0.35, "other_pneumonia": 0.25, "normal": 0.04}[diagnosis] + (age - 60) / 200
            )
            writer.writerow(
                [
                    f"1.2.826.0.1.3680043.8.498.{site_index}.{j + 1}",
                    diagnosis,
                    severe,
                    int(rng.integers(1, 28)) if severe else 28,
                    age,
                    "FM"[int(rng.integers(2))],
                ]
            )
    return site


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("profiles")
    sites = []
    for i in range(3):
        site = _labels(root / f"site-{i}", i)
        write_site_profile(site, site_index=i, seed=0)
        sites.append(site)
    return sites


def _outcomes(site: Path, keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    labels = read_labels(site / "labels.csv")
    return np.array([labels[k].diagnosis for k in keys]), np.array([labels[k].severe for k in keys])


def test_every_site_reads_back_clean_with_all_studies(federation: list[Path]) -> None:
    for site in federation:
        table = read_site_profile(site)
        assert table.errors == () and len(table.keys) == N
        assert set(table.keys) == set(read_labels(site / "labels.csv"))


def test_sites_export_different_columns_units_and_formats(federation: list[Path]) -> None:
    schema = read_schema()
    mappings = [read_mapping(site / "profile-mapping.toml", schema) for site in federation]
    assert [style_for(i) for i in range(4)] == ["continental", "us", "lis", "continental"]
    assert len({m.key_column for m in mappings}) == 3
    assert [m.column_for("crp").unit for m in mappings] == ["mg/dL", "mg/L", "mg/L"]  # type: ignore[union-attr]
    assert [m.column_for("lymphocytes").unit for m in mappings] == ["10*9/L", "10*3/uL", "/uL"]  # type: ignore[union-attr]
    assert (mappings[0].delimiter, mappings[0].decimal) == (";", ",")
    assert mappings[1].column_for("il6") is None  # the site that never measures IL-6
    # the raw exports really differ: site-0's CRP column is mg/dL with a decimal comma
    raw = {}
    for site, mapping in zip(federation[:2], mappings[:2]):
        with (site / "profile.csv").open(newline="") as fh:
            column = mapping.column_for("crp").column  # type: ignore[union-attr]
            cells = [
                r[column] for r in csv.DictReader(fh, delimiter=mapping.delimiter) if r[column] not in mapping.missing
            ]
        raw[site.name] = np.median([float(c.replace(",", ".")) for c in cells])
    assert raw["site-1"] / raw["site-0"] == pytest.approx(10.0, rel=0.35)


def test_after_mapping_distributions_agree_across_sites(federation: list[Path]) -> None:
    medians = {}
    for site in federation:
        table = read_site_profile(site)
        diagnosis, _ = _outcomes(site, table.keys)
        for name in ("crp", "lymphocytes", "d_dimer", "ldh", "spo2"):
            for k, dx in enumerate(DIAGNOSES):
                medians.setdefault((name, dx), []).append(float(np.nanmedian(table.column(name)[diagnosis == k])))
    for (name, dx), values in medians.items():
        assert max(values) / min(values) < 1.5, f"{name} ({dx}) medians differ across sites after mapping: {values}"


def test_profiles_carry_diagnostic_and_prognostic_signal(federation: list[Path]) -> None:
    table = read_site_profile(federation[0])
    diagnosis, severe = _outcomes(federation[0], table.keys)
    covid, other, normal = (diagnosis == k for k in range(3))

    def median(name: str, rows: np.ndarray) -> float:
        return float(np.nanmedian(table.column(name)[rows]))

    assert median("crp", other) > median("crp", covid) > 5 * median("crp", normal)
    assert median("lymphocytes", covid) < median("lymphocytes", normal)
    assert median("procalcitonin", other) > 4 * median("procalcitonin", covid)  # bacterial vs viral
    assert median("ifi27_expression", covid) > median("ifi27_expression", other) + 1.5
    ct = table.column("ct_value")
    assert np.isnan(ct[~covid]).all() and (~np.isnan(ct[covid])).mean() > 0.5
    # prognosis within COVID-19 (the image-independent part): CRP up and lymphocytes down in severe cases
    for name, sign in (("crp", 1), ("lymphocytes", -1), ("spo2", -1)):
        values = table.column(name)
        rows = covid & ~np.isnan(values)
        assert roc_auc_score(severe[rows], sign * values[rows]) > 0.7, name


def test_missingness_is_masked_at_site_specific_rates(federation: list[Path]) -> None:
    rates = []
    for site in federation:
        table = read_site_profile(site)
        j = table.schema.names.index("crp")
        rates.append(table.missing[:, j].mean())
        assert not table.missing[:, table.schema.names.index("age")].any()
    assert rates[0] < rates[1] < rates[2] and 0.03 < rates[0] and rates[2] < 0.4
    table = read_site_profile(federation[1])
    assert table.missing[:, table.schema.names.index("il6")].all() and table.unmapped == ("il6",)


def test_censored_values_at_the_lis_site(federation: list[Path]) -> None:
    text = (federation[2] / "profile.csv").read_text()
    assert ",<0.5," in text
    crp = read_site_profile(federation[2]).column("crp")
    assert np.nanmin(crp) == pytest.approx(0.5)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a, b, c = (_labels(tmp_path / name, 1, n=30) for name in ("a", "b", "c"))
    write_site_profile(a, site_index=1, seed=3)
    write_site_profile(b, site_index=1, seed=3)
    write_site_profile(c, site_index=1, seed=4)
    assert (a / "profile.csv").read_bytes() == (b / "profile.csv").read_bytes()
    assert (a / "profile-mapping.toml").read_bytes() == (b / "profile-mapping.toml").read_bytes()
    assert (a / "profile.csv").read_bytes() != (c / "profile.csv").read_bytes()


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="labels file not found"):
        write_site_profile(tmp_path, site_index=0, seed=0)
    site = _labels(tmp_path / "s", 0, n=5)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="site_index"):
            write_site_profile(site, site_index=bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        write_site_profile(site, site_index=0, seed=-2)


def test_labels_of_a_real_synthetic_hospital(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profiles = [replace(p, rows=16, pixel_spacing_mm=22.0, slice_thickness_mm=20.0) for p in default_profiles(1)]
    write_federation(tmp_path, sites=1, patients_per_site=5, seed=0, profiles=profiles)
    site = tmp_path / profiles[0].name
    summary = write_site_profile(site, site_index=0, seed=0)
    table = read_site_profile(site)
    assert summary.n_rows == len(table.keys) == len(read_labels(site / "labels.csv"))
    assert fedct_main(["profile", "check", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert "no bad rows" in out and "CRP_mg_dl" in out

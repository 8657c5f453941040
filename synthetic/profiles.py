"""Synthetic clinical and molecular profiles that carry signal, exported the way different hospitals export them.

:func:`write_site_profile` reads a synthetic site's ``labels.csv`` (diagnosis, severe, time_days, age, sex) and
writes ``profile.csv`` + ``profile-mapping.toml`` next to it, in one of three export styles (column names, units,
delimiter, decimal mark, spellings of categories and missing values) chosen by the site index:

- style 0 "continental": ``;`` and decimal comma, CRP in mg/dL, lymphocytes in 10*9/L, LDH in ukat/L, D-dimer in
  mg/L FEU, German column names and ``ja``/``nein``; missing written ``n.b.``.
- style 1 "us": CRP in mg/L, lymphocytes in 10*3/uL, D-dimer in ng/mL FEU, SpO2 as a fraction (unit ``1``),
  ``Female``/``Male``, ``Y``/``N``, missing ``NA``; this site never measures IL-6 (no column at all).
- style 2 "lis": upper-case codes, lymphocytes per uL, procalcitonin in ug/L, CRP below 0.5 mg/L written ``<0.5``
  (censored; the mapping declares ``censored = "limit"``).

The values follow a per-patient latent severity. hospitals.py has already drawn the outcome (from lesion burden,
age and diagnosis); the latent severity here is drawn *given* that outcome (severe, and how early the event came),
the patient's age and diagnosis, plus independent noise, never from the lesion burden. So the labs carry prognostic
information that the image does not (what fusion can add), diagnostic information that tells viral from bacterial
pneumonia (IFI27 up, procalcitonin down in COVID-19; a Ct value only in COVID-19), and missingness is MCAR per
variable with site-specific rates plus the structural gaps above. Everything derives from ``seed`` and the site
index, so writing the same site twice gives byte-identical files.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from preprocessing.labels import DIAGNOSES, read_labels
from preprocessing.profile import MAPPING_NAME, PROFILE_NAME, conversion_factor, read_schema

FOLLOW_UP_DAYS = 28
#: Median of each lab at latent severity 0, by diagnosis (schema units), and its log-scale sensitivity to severity.
_LAB_MEDIANS: Mapping[str, tuple[Mapping[str, float], float]] = MappingProxyType(
    {
        "crp": (MappingProxyType({"covid": 45.0, "other_pneumonia": 95.0, "normal": 3.0}), 0.55),
        "lymphocytes": (MappingProxyType({"covid": 0.85, "other_pneumonia": 1.3, "normal": 1.9}), -0.30),
        "d_dimer": (MappingProxyType({"covid": 0.95, "other_pneumonia": 0.7, "normal": 0.35}), 0.45),
        "ferritin": (MappingProxyType({"covid": 550.0, "other_pneumonia": 300.0, "normal": 120.0}), 0.40),
        "ldh": (MappingProxyType({"covid": 320.0, "other_pneumonia": 260.0, "normal": 180.0}), 0.25),
        "il6": (MappingProxyType({"covid": 25.0, "other_pneumonia": 30.0, "normal": 3.0}), 0.60),
        "procalcitonin": (MappingProxyType({"covid": 0.12, "other_pneumonia": 1.2, "normal": 0.05}), 0.40),
    }
)
_LAB_SPREAD = 0.45  # log-normal spread of a lab around its median


@dataclass(frozen=True)
class _Column:
    variable: str
    column: str
    unit: str | None = None  # site unit of a number
    values: Mapping[object, str] = field(
        default_factory=lambda: MappingProxyType({})
    )  # schema value -> site spelling (bool/category)
    censor_below: float | None = None  # site-unit detection limit written as "<limit"
    decimals: int = 2


@dataclass(frozen=True)
class _Style:
    name: str
    key_column: str
    delimiter: str
    decimal: str
    missing: str
    columns: tuple[_Column, ...]
    mcar: float  # probability that a lab value is missing completely at random


def _yes_no(yes: str, no: str) -> Mapping[object, str]:
    return MappingProxyType({True: yes, False: no})


_STYLES = (
    _Style(
        "continental",
        "StudienUID",
        ";",
        ",",
        "n.b.",
        (
            _Column("age", "Alter", "a", decimals=0),
            _Column("sex", "Geschlecht", values=MappingProxyType({"F": "w", "M": "m"})),
            _Column("diabetes", "Diabetes", values=_yes_no("ja", "nein")),
            _Column("hypertension", "Hypertonie", values=_yes_no("ja", "nein")),
            _Column("copd", "COPD", values=_yes_no("ja", "nein")),
            _Column("crp", "CRP_mg_dl", "mg/dL", decimals=3),
            _Column("lymphocytes", "Lympho_G_l", "10*9/L"),
            _Column("d_dimer", "D_Dimer_FEU", "mg/L{FEU}"),
            _Column("ferritin", "Ferritin", "ug/L", decimals=0),
            _Column("ldh", "LDH_ukat", "ukat/L", decimals=3),
            _Column("il6", "IL6", "pg/mL", decimals=1),
            _Column("procalcitonin", "PCT", "ng/mL", decimals=3),
            _Column("spo2", "SpO2", "%", decimals=0),
            _Column("ct_value", "SARS2_Ct", "{Ct_value}", decimals=1),
            _Column("ifi27_expression", "IFI27_log2", "1"),
            _Column("oas1_rs10774671_g", "OAS1_G_Traeger", values=_yes_no("ja", "nein")),
        ),
        mcar=0.10,
    ),
    _Style(
        "us",
        "study_instance_uid",
        ",",
        ".",
        "NA",
        (
            _Column("age", "age_years", "a", decimals=0),
            _Column("sex", "sex", values=MappingProxyType({"F": "Female", "M": "Male"})),
            _Column("diabetes", "dm", values=_yes_no("Y", "N")),
            _Column("hypertension", "htn", values=_yes_no("Y", "N")),
            _Column("copd", "copd", values=_yes_no("Y", "N")),
            _Column("crp", "crp_mg_l", "mg/L", decimals=1),
            _Column("lymphocytes", "lymph_abs", "10*3/uL"),
            _Column("d_dimer", "ddimer_ng_ml_feu", "ng/mL{FEU}", decimals=0),
            _Column("ferritin", "ferritin_ng_ml", "ng/mL", decimals=0),
            _Column("ldh", "ldh_u_l", "U/L", decimals=0),
            _Column("procalcitonin", "procalcitonin", "ng/mL", decimals=2),
            _Column("spo2", "spo2_fraction", "1", decimals=3),
            _Column("ct_value", "sars2_ct", "{Ct}", decimals=1),
            _Column("ifi27_expression", "ifi27_log2", "1"),
            _Column("oas1_rs10774671_g", "oas1_rs10774671_carrier", values=_yes_no("Y", "N")),
        ),
        mcar=0.18,
    ),
    _Style(
        "lis",
        "UID",
        ",",
        ".",
        "",
        (
            _Column("age", "AGE", "a", decimals=0),
            _Column("sex", "SEX", values=MappingProxyType({"F": "F", "M": "M"})),
            _Column("diabetes", "DM", values=_yes_no("yes", "no")),
            _Column("hypertension", "HTN", values=_yes_no("yes", "no")),
            _Column("copd", "COPD", values=_yes_no("yes", "no")),
            _Column("crp", "CRP", "mg/L", censor_below=0.5, decimals=1),
            _Column("lymphocytes", "LYM", "/uL", decimals=0),
            _Column("d_dimer", "DDIM", "ug/mL{FEU}"),
            _Column("ferritin", "FERR", "ng/mL", decimals=0),
            _Column("ldh", "LDH", "U/L", decimals=0),
            _Column("il6", "IL_6", "pg/mL", decimals=1),
            _Column("procalcitonin", "PCT", "ug/L", decimals=2),
            _Column("spo2", "SPO2", "%", decimals=0),
            _Column("ct_value", "CT", "{Ct_value}", decimals=1),
            _Column("ifi27_expression", "IFI27", "1"),
            _Column("oas1_rs10774671_g", "OAS1", values=_yes_no("true", "false")),
        ),
        mcar=0.25,
    ),
)


@dataclass(frozen=True)
class ProfileSummary:
    """What :func:`write_site_profile` wrote."""

    style: str
    n_rows: int
    profile_path: Path
    mapping_path: Path


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _patient_values(
    rng: np.random.Generator,
    diagnosis: str,
    severe: int | None,
    time_days: float | None,
    age: float | None,
    sex: str | None,
) -> dict[str, object]:
    """One patient's profile in schema units (None = not measured by design, e.g. no Ct without COVID-19)."""
    age_c = ((age if age is not None else 60.0) - 60.0) / 14.0
    early = 0.0
    if severe:
        early = 1.0 - min(float(time_days or FOLLOW_UP_DAYS), FOLLOW_UP_DAYS) / FOLLOW_UP_DAYS
    severity = 1.0 * (severe or 0) + 0.8 * early + 0.25 * age_c + float(rng.normal(0.0, 0.6))
    if diagnosis == "normal":
        severity -= 0.5
    out: dict[str, object] = {"age": age, "sex": sex if sex in ("F", "M") else None}
    out["diabetes"] = bool(rng.random() < _sigmoid(-1.8 + 0.5 * age_c + 0.5 * (severe or 0)))
    out["hypertension"] = bool(rng.random() < _sigmoid(-0.8 + 0.7 * age_c + 0.3 * (severe or 0)))
    out["copd"] = bool(rng.random() < _sigmoid(-2.4 + 0.5 * age_c + 0.5 * (severe or 0)))
    for name, (medians, slope) in _LAB_MEDIANS.items():
        out[name] = medians[diagnosis] * math.exp(slope * severity + float(rng.normal(0.0, _LAB_SPREAD)))
    out["spo2"] = float(
        np.clip(
            97.5
            - {"covid": 4.0, "other_pneumonia": 3.0, "normal": 0.0}[diagnosis]
            - 2.5 * severity
            + rng.normal(0.0, 1.2),
            60.0,
            100.0,
        )
    )
    out["ct_value"] = (
        float(np.clip(rng.normal(26.0 - 2.0 * severity, 4.0), 12.0, 40.0)) if diagnosis == "covid" else None
    )
    out["ifi27_expression"] = float(
        {"covid": 3.0, "other_pneumonia": 0.8, "normal": 0.0}[diagnosis] + rng.normal(0.0, 1.0)
    )
    out["oas1_rs10774671_g"] = bool(rng.random() < 0.65 - 0.15 * (severe or 0))
    return out


def _format_number(value: float, column: _Column, style: _Style) -> str:
    text = f"{value:.{column.decimals}f}"
    return text.replace(".", ",") if style.decimal == "," else text


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mapping_text(style: _Style) -> str:
    lines = [
        f"# Profile mapping of a synthetic site (export style {style.name!r}); see configs/profile-mapping.example.toml",
        "",
        "[file]",
        f"path = {_toml_string(PROFILE_NAME)}",
        f"delimiter = {_toml_string(style.delimiter)}",
        f"decimal = {_toml_string(style.decimal)}",
        f"missing = [{_toml_string(style.missing)}]",
        "",
        "[key]",
        'kind = "StudyInstanceUID"',
        f"column = {_toml_string(style.key_column)}",
    ]
    for c in style.columns:
        lines += ["", f"[variables.{c.variable}]", f"column = {_toml_string(c.column)}"]
        if c.unit is not None:
            lines.append(f"unit = {_toml_string(c.unit)}")
        if c.censor_below is not None:
            lines.append('censored = "limit"')
        if c.values:
            schema_of = {True: "true", False: "false"}
            pairs = ", ".join(
                f"{_toml_string(site)} = {schema_of.get(v, _toml_string(str(v)))}"  # type: ignore[call-overload]
                for v, site in c.values.items()
            )
            lines.append(f"values = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def style_for(site_index: int) -> str:
    """Name of the export style site ``site_index`` uses (cycles through the three)."""
    return _STYLES[site_index % len(_STYLES)].name


def write_site_profile(site_dir: Path, *, site_index: int, seed: int, labels_csv: Path | None = None) -> ProfileSummary:
    """Write ``site_dir/profile.csv`` and ``site_dir/profile-mapping.toml`` for the studies in the site's labels.csv.

    ``labels_csv`` defaults to ``site_dir/labels.csv``. Raises :class:`preprocessing.labels.LabelsError` for an
    unreadable labels file and ValueError for a bad ``site_index``/``seed``.
    """
    for name, value in (("site_index", site_index), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    site_dir = Path(site_dir)
    labels = read_labels(labels_csv if labels_csv is not None else site_dir / "labels.csv")
    if labels.key != "StudyInstanceUID":
        raise ValueError(f"synthetic profiles are keyed by StudyInstanceUID; the labels file uses {labels.key}")
    style = _STYLES[site_index % len(_STYLES)]
    schema = read_schema()
    rng = np.random.default_rng([seed, site_index, 24])
    factors = {
        c.variable: conversion_factor(schema.variable(c.variable).unit or "1", c.unit)  # type: ignore[arg-type]
        for c in style.columns
        if c.unit is not None
    }
    rows = []
    for key, label in labels.items():
        diagnosis = DIAGNOSES[label.diagnosis] if label.diagnosis is not None else "normal"
        values = _patient_values(rng, diagnosis, label.severe, label.time_days, label.age, label.sex)
        drop = rng.random(len(style.columns))  # drawn for every column so the stream does not depend on the values
        row = {style.key_column: key}
        for c, u in zip(style.columns, drop):
            value = values.get(c.variable)
            is_lab = c.variable in _LAB_MEDIANS or c.variable in ("spo2", "ct_value")
            host = c.variable in ("ifi27_expression", "oas1_rs10774671_g")
            if value is None or (is_lab and u < style.mcar) or (host and u < 0.4):
                row[c.column] = style.missing
            elif c.values:
                row[c.column] = c.values[value]
            else:
                low, high = schema.variable(c.variable).range  # type: ignore[misc]
                site_value = float(np.clip(float(value), low, high * 0.999)) * factors[c.variable]
                if c.censor_below is not None and site_value < c.censor_below:
                    row[c.column] = f"<{_format_number(c.censor_below, c, style)}"
                else:
                    row[c.column] = _format_number(site_value, c, style)
        rows.append(row)
    site_dir.mkdir(parents=True, exist_ok=True)
    profile_path = site_dir / PROFILE_NAME
    with profile_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(
            fh,
            fieldnames=[style.key_column] + [c.column for c in style.columns],
            delimiter=style.delimiter,
            lineterminator="\n",
        )
        writer.writeheader()
        writer.writerows(rows)
    mapping_path = site_dir / MAPPING_NAME
    mapping_path.write_text(_mapping_text(style), encoding="utf-8")
    return ProfileSummary(style=style.name, n_rows=len(rows), profile_path=profile_path, mapping_path=mapping_path)

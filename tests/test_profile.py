"""preprocessing/profile.py: schema, site mapping, unit conversion, row errors, aggregate statistics, `fedct profile check`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedct.cli import main as fedct_main
from preprocessing.profile import (
    DEFAULT_SCHEMA,
    ProfileError,
    aggregate_statistics,
    conversion_factor,
    histogram_edges,
    parse_unit,
    pooled_moments,
    read_mapping,
    read_profile,
    read_schema,
    read_site_profile,
)

UID = "1.2.826.0.1.3680043.8.498.{}"

MAPPING = """
[file]
path = "profile.csv"

[key]
kind = "StudyInstanceUID"
column = "uid"

[variables.age]
column = "age_y"
unit = "a"

[variables.sex]
column = "gender"
values = { female = "F", male = "M", unknown = "" }

[variables.diabetes]
column = "dm"
values = { Y = true, N = false }

[variables.crp]
column = "crp_mgdl"
unit = "mg/dL"
{crp_extra}

[variables.lymphocytes]
column = "lymph"
unit = "10*9/L"

[variables.d_dimer]
column = "ddimer"
unit = "{ddimer_unit}"
{ddimer_extra}
"""

HEADER = "uid,age_y,gender,dm,crp_mgdl,lymph,ddimer,comment"


def _site(
    tmp_path: Path,
    rows: list[str],
    *,
    crp_extra: str = "",
    ddimer_unit: str = "mg/L{{FEU}}",
    ddimer_extra: str = "",
    header: str = HEADER,
) -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    text = MAPPING.replace("{crp_extra}", crp_extra).replace(
        "{ddimer_unit}", ddimer_unit.replace("{{", "{").replace("}}", "}")
    )
    (site / "profile-mapping.toml").write_text(text.replace("{ddimer_extra}", ddimer_extra), encoding="utf-8")
    (site / "profile.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return site


def _read(site: Path):
    schema = read_schema()
    mapping = read_mapping(site / "profile-mapping.toml", schema)
    return read_profile(site / "profile.csv", schema, mapping)


GOOD = [
    f"{UID.format(1)},71,male,Y,5.2,0.8,1.9,",
    f"{UID.format(2)},45,female,N,0.3,2.1,0.4,free text here",
    f"{UID.format(3)},,unknown,,NA,,,",
]


# --- units ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("site", "schema", "factor"),
    [
        ("mg/dL", "mg/L", 10.0),
        ("g/L", "mg/L", 1000.0),
        ("mg/L", "mg/L", 1.0),
        ("10*9/L", "10*3/uL", 1.0),
        ("/uL", "10*3/uL", 0.001),
        ("{cells}/uL", "10*3/uL", 0.001),
        ("ukat/L", "U/L", 60.0),
        ("ug/L", "ng/mL", 1.0),
        ("1", "%", 100.0),
        ("mo", "a", 1 / 12),
        ("mg/L{FEU}", "ug/mL{FEU}", 1.0),
        ("ng/mL{FEU}", "ug/mL{FEU}", 0.001),
        ("{Ct}", "{Ct_value}", 1.0),
    ],
)
def test_known_units_convert(site: str, schema: str, factor: float) -> None:
    assert conversion_factor(site, schema) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize(
    ("site", "schema", "message"),
    [
        ("ng/mL{DDU}", "ug/mL{FEU}", "different quantity"),  # the D-dimer trap: DDU is not FEU
        ("mg/dL", "mmol/L", "not the same kind"),
        ("mcg/mL", "ng/mL", "unknown unit 'mcg/mL'"),
        ("x10^9/L", "10*3/uL", "unknown unit"),
        ("mg/dL", "U/L", "not the same kind"),
    ],
)
def test_bad_unit_pairs_are_refused(site: str, schema: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        conversion_factor(site, schema)


def test_parse_unit_rejects_empty_and_unbalanced() -> None:
    for bad in ("", "  ", "mg/L{FEU", "mg /L"):
        with pytest.raises(ValueError):
            parse_unit(bad)


# --- schema --------------------------------------------------------------------------------------------------------


def test_shipped_schema_has_coded_variables() -> None:
    schema = read_schema(DEFAULT_SCHEMA)
    crp, lymph, ddimer = schema.variable("crp"), schema.variable("lymphocytes"), schema.variable("d_dimer")
    assert (crp.system, crp.code, crp.unit) == ("LOINC", "1988-5", "mg/L")
    assert (lymph.code, lymph.unit) == ("731-0", "10*3/uL")
    assert (ddimer.code, ddimer.unit) == ("48065-7", "ug/mL{FEU}")
    assert schema.variable("ifi27_expression").system == "HGNC"
    assert {v.level for v in schema.variables} == {"study", "patient"}
    assert all(v.code for v in schema.variables)
    with pytest.raises(KeyError, match="not a schema variable"):
        schema.variable("weight")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[variables.x]\ntype = "float"\nlevel = "study"\nrange = [0, 1]\n', "needs a UCUM `unit`"),
        ('[variables.x]\ntype = "float"\nlevel = "study"\nunit = "furlong"\nrange = [0, 1]\n', "unknown unit"),
        ('[variables.x]\ntype = "float"\nlevel = "study"\nunit = "mg/L"\nrange = [5, 1]\n', "low < high"),
        ('[variables.x]\ntype = "text"\nlevel = "study"\n', "type must be one of"),
        ('[variables.x]\ntype = "bool"\nlevel = "visit"\n', "level must be one of"),
        ('[variables.x]\ntype = "category"\nlevel = "patient"\ncategories = ["a", "a"]\n', "distinct"),
        ('[variables.X]\ntype = "bool"\nlevel = "patient"\n', "lower-case"),
        ('[variables.x]\ntype = "bool"\nlevel = "patient"\ncolour = "red"\n', "unknown key"),
        ('[schema]\nname = "s"\n', "no \\[variables"),
        ("not toml = = 1", "not valid TOML"),
    ],
)
def test_bad_schema_is_refused(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "schema.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ProfileError, match=message):
        read_schema(path)


# --- reading a site table ------------------------------------------------------------------------------------------


def test_good_rows_convert_units_and_mask_missing(tmp_path: Path) -> None:
    table = _read(_site(tmp_path, GOOD))
    assert table.keys == (UID.format(1), UID.format(2), UID.format(3))
    assert table.errors == () and table.rows_read == 3 and table.rows_dropped == 0
    assert table.column("crp")[:2].tolist() == pytest.approx([52.0, 3.0])  # mg/dL -> mg/L
    assert table.column("lymphocytes")[:2].tolist() == pytest.approx([0.8, 2.1])
    assert table.column("sex")[:2].tolist() == [1.0, 0.0]  # index into ["F", "M"]
    assert table.column("diabetes")[:2].tolist() == [1.0, 0.0]
    # missing stays missing: NaN plus the mask, never imputed
    assert table.missing[2].all() and np.isnan(table.values[2]).all()
    assert set(table.unmapped) >= {"il6", "ferritin", "ct_value"}
    assert table.missing[:, table.schema.names.index("il6")].all()
    with pytest.raises(ValueError):
        table.values[0, 0] = 1.0  # read-only


def test_select_aligns_to_label_keys(tmp_path: Path) -> None:
    table = _read(_site(tmp_path, GOOD))
    values, missing = table.select([UID.format(2), "1.2.3.not-profiled"])
    assert values[0, table.schema.names.index("age")] == 45.0
    assert missing[1].all() and np.isnan(values[1]).all()


def test_bad_rows_are_all_reported_with_line_and_column_and_dropped(tmp_path: Path) -> None:
    rows = [
        f"{UID.format(1)},71,male,Y,5.2,0.8,1.9,",  # line 2 good
        f"{UID.format(2)},45,femme,N,0.3,2.1,0.4,",  # line 3 bad category
        f"{UID.format(3)},50,male,maybe,0.3,2.1,0.4,",  # line 4 bad bool
        f"{UID.format(4)},50,male,N,abc,2.1,0.4,",  # line 5 not a number
        f"{UID.format(5)},50,male,N,150,2.1,0.4,",  # line 6 CRP 1500 mg/L out of range
        f"{UID.format(6)},250,male,N,1,2.1,0.4,",  # line 7 age out of range
        f"{UID.format(7)},50,male,N,1,2.1",  # line 8 short row
        ",50,male,N,1,2.1,0.4,",  # line 9 empty key
        f"{UID.format(8)},60,female,N,1,1.1,0.4,",  # line 10 good
        f"{UID.format(9)},60,female,N,<0.5,1.1,0.4,",  # line 11 censored, no policy
    ]
    table = _read(_site(tmp_path, rows))
    assert table.keys == (UID.format(1), UID.format(8))
    assert table.rows_read == 10 and table.rows_dropped == 8
    by_line = {e.line: e for e in table.errors}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 11]
    assert (
        by_line[3].column == "gender"
        and "is not in the mapping's values ('female', 'male', 'unknown')" in by_line[3].reason
    )
    assert by_line[4].column == "dm"
    assert by_line[5].column == "crp_mgdl" and "not a number" in by_line[5].reason
    assert (
        by_line[6].column == "crp_mgdl"
        and "150 mg/dL = 1500 mg/L is outside the allowed range [0, 1000] mg/L" in by_line[6].reason
    )
    assert by_line[7].column == "age_y" and "250" in by_line[7].reason
    assert "cells" in by_line[8].reason and "empty StudyInstanceUID" in by_line[9].reason
    assert "censored" in by_line[11].reason
    assert str(by_line[6]).startswith("line 6: crp_mgdl: ")


def test_errors_never_repeat_keys_or_identifier_like_text(tmp_path: Path) -> None:
    rows = [
        f"{UID.format(1)},71,SMITH^JOHN 19570312,Y,5.2,0.8,1.9,",
        f"{UID.format(2)},71,male,Y,12345678,0.8,1.9,",
        f"{UID.format(2)},71,male,Y,1,0.8,1.9,",
    ]
    table = _read(_site(tmp_path, rows))
    text = "\n".join(str(e) for e in table.errors)
    assert "SMITH" not in text and "19570312" not in text and UID.format(2) not in text and UID.format(1) not in text
    assert "character value" in text


def test_a_systematic_spelling_is_shown_a_single_entry_is_not(tmp_path: Path) -> None:
    rows = [f"{UID.format(i)},50,femme,N,1,1,1," for i in range(5)] + [f"{UID.format(9)},50,Mueller,N,1,1,1,"]
    table = _read(_site(tmp_path, rows))
    reasons = [e.reason for e in table.errors]
    assert len(reasons) == 6 and all("'femme' is not in the mapping's values" in r for r in reasons[:5])
    assert "Mueller" not in reasons[5] and "7-character value (not shown" in reasons[5]


def test_duplicate_keys_drop_every_copy(tmp_path: Path) -> None:
    rows = [
        f"{UID.format(1)},71,male,Y,5.2,0.8,1.9,",
        f"{UID.format(2)},45,female,N,0.3,2.1,0.4,",
        f"{UID.format(1)},72,male,Y,5.0,0.8,1.9,",
    ]
    table = _read(_site(tmp_path, rows))
    assert table.keys == (UID.format(2),)
    assert [(e.line, e.column) for e in table.errors] == [(2, "uid"), (4, "uid")]
    assert "line(s) 4" in table.errors[0].reason and "all 2 rows dropped" in table.errors[0].reason


def test_missing_mapped_column_is_fatal(tmp_path: Path) -> None:
    site = _site(tmp_path, GOOD, header="uid,age_y,gender,dm,crp_mgdl,lymph,dd,comment")
    with pytest.raises(ProfileError, match=r"line 1: mapped column\(s\) ddimer not in the file"):
        _read(site)


def test_unknown_unit_in_mapping_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path, GOOD, ddimer_unit="mcg/mL")
    with pytest.raises(ProfileError, match=r"\[variables.d_dimer\]: column 'ddimer': unknown unit 'mcg/mL'"):
        _read(site)


def test_ddimer_ddu_needs_an_explicit_factor(tmp_path: Path) -> None:
    site = _site(tmp_path, GOOD, ddimer_unit="ng/mL{{DDU}}")
    with pytest.raises(ProfileError, match="measures a different quantity"):
        _read(site)
    # the laboratory's own factor (ng/mL DDU -> ug/mL FEU) makes it explicit, and is applied
    site = _site(
        tmp_path, [f"{UID.format(1)},71,male,Y,5.2,0.8,500,"], ddimer_unit="ng/mL{{DDU}}", ddimer_extra="factor = 0.002"
    )
    table = _read(site)
    assert table.column("d_dimer").tolist() == pytest.approx([1.0])


def test_factor_that_contradicts_a_known_unit_is_refused(tmp_path: Path) -> None:
    site = _site(tmp_path, GOOD, crp_extra="factor = 1.0")
    with pytest.raises(ProfileError, match="contradicts the unit"):
        _read(site)


def test_censored_values_follow_the_mapping(tmp_path: Path) -> None:
    rows = [f"{UID.format(1)},71,male,Y,<0.5,0.8,1.9,"]
    assert _read(_site(tmp_path, rows, crp_extra='censored = "limit"')).column("crp").tolist() == [5.0]
    table = _read(_site(tmp_path, rows, crp_extra='censored = "missing"'))
    assert table.missing[0, table.schema.names.index("crp")] and not table.errors


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("[variables.crp]", "[variables.weight]"), "not a schema variable"),
        (('unit = "mg/dL"', ""), "give the unit of column 'crp_mgdl'"),
        (('male = "M"', 'male = "X"'), "is not one of F, M"),
        (("Y = true", 'Y = "yes"'), "must be true or false"),
        (('kind = "StudyInstanceUID"', 'kind = "PatientID"'), r"\[key\] needs kind"),
        (('column = "lymph"', 'column = "crp_mgdl"'), "mapped more than once"),
        (('path = "profile.csv"', 'path = "../other.csv"'), "inside the site folder"),
        (('unit = "10*9/L"', 'unit = "10*9/L"\nvalues = { a = 1 }'), "takes no value map"),
    ],
)
def test_bad_mapping_is_refused(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    site = _site(tmp_path, GOOD)
    path = site / "profile-mapping.toml"
    path.write_text(path.read_text().replace(*edit, 1), encoding="utf-8")
    with pytest.raises(ProfileError, match=message):
        read_mapping(path, read_schema())


def test_semicolon_and_decimal_comma_exports(tmp_path: Path) -> None:
    site = _site(tmp_path, [])
    mapping = site / "profile-mapping.toml"
    mapping.write_text(
        mapping.read_text().replace('path = "profile.csv"', 'path = "profile.csv"\ndelimiter = ";"\ndecimal = ","')
    )
    (site / "profile.csv").write_text(
        "\ufeff" + HEADER.replace(",", ";") + f"\n{UID.format(1)};71;male;Y;5,2;0,8;1,9;\n\n"
    )
    table = read_site_profile(site)
    assert table.column("crp").tolist() == pytest.approx([52.0]) and table.rows_read == 1


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    site = _site(tmp_path, GOOD)
    (site / "profile.parquet").write_bytes(b"PAR1not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    schema = read_schema()
    with pytest.raises(ProfileError, match="needs the pyarrow package"):
        read_profile(site / "profile.parquet", schema, read_mapping(site / "profile-mapping.toml", schema))


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="profile mapping not found"):
        read_site_profile(tmp_path)
    site = _site(tmp_path, GOOD)
    (site / "profile.csv").unlink()
    with pytest.raises(ProfileError, match="profile table not found"):
        read_site_profile(site)


# --- aggregate statistics --------------------------------------------------------------------------------------------


def _many(tmp_path: Path, n: int, name: str = "site") -> Path:
    rng = np.random.default_rng(n)
    rows = [
        f"{UID.format(i)},{rng.integers(30, 90)},{'male' if i % 2 else 'female'},N,{rng.uniform(0.1, 20):.2f},"
        f"{rng.uniform(0.3, 3):.2f},{'' if i % 3 else '0.5'},"
        for i in range(n)
    ]
    base = tmp_path / name
    base.mkdir()
    return _site(base, rows)


def test_aggregate_statistics_sums_and_floor(tmp_path: Path) -> None:
    table = read_site_profile(_many(tmp_path, 12))
    stats = aggregate_statistics(table, min_count=5)
    crp = table.column("crp")
    assert stats.variables["crp"].count == 12
    assert stats.variables["crp"].sum == pytest.approx(float(crp.sum()))
    assert stats.variables["crp"].sum_squares == pytest.approx(float((crp**2).sum()))
    assert "d_dimer" in stats.withheld and "il6" in stats.withheld  # 4 < 5 measured; never measured
    hist = stats.variables["crp"].histogram
    assert hist is not None and sum(hist) == 12 and all(h == 0 or h >= 5 for h in hist)
    assert len(hist) == len(histogram_edges(table.schema.variable("crp"))) - 1
    text = repr(stats)
    assert UID.format(1)[:-2] not in text and "crp_mgdl" not in text  # no keys, no site column names
    with pytest.raises(ValueError, match="privacy floor"):
        aggregate_statistics(table, min_count=2)
    (tmp_path / "few").mkdir()
    small = aggregate_statistics(read_site_profile(_site(tmp_path / "few", GOOD)))  # 3 studies < floor: nothing
    assert small.variables == {} and small.n_rows == 0


def test_pooled_moments_equal_the_pooled_data(tmp_path: Path) -> None:
    a = read_site_profile(_many(tmp_path, 15, "a"))
    b = read_site_profile(_many(tmp_path, 9, "b"))
    mean, sd, n = pooled_moments([aggregate_statistics(a), aggregate_statistics(b)])["crp"]
    both = np.concatenate([a.column("crp"), b.column("crp")])
    assert n == 24 and mean == pytest.approx(both.mean()) and sd == pytest.approx(both.std())
    assert math.isfinite(sd)


# --- fedct profile check ---------------------------------------------------------------------------------------------


def test_cli_check_reports_counts_and_bad_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path, [*GOOD, f"{UID.format(9)},71,male,Y,500,0.8,1.9,"])
    assert fedct_main(["profile", "check", "--site", str(site)]) == 1
    out = capsys.readouterr().out
    assert "4 row(s) read, 3 usable, 1 dropped" in out
    assert "crp_mgdl" in out and "mg/dL->mg/L" in out and "(not exported)" in out
    assert "line 5: crp_mgdl: 500 mg/dL = 5000 mg/L is outside" in out
    assert UID.format(9) not in out


def test_cli_check_clean_and_fatal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path, GOOD)
    assert fedct_main(["profile", "check", "--site", str(site), "--schema", str(DEFAULT_SCHEMA)]) == 0
    assert "no bad rows" in capsys.readouterr().out
    (site / "profile-mapping.toml").write_text("[key]\nkind = 'x'\n")
    assert fedct_main(["profile", "check", "--site", str(site)]) == 2
    assert "[key] needs kind" in capsys.readouterr().err

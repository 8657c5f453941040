"""Clinical and molecular profiles: the consortium's shared schema, each site's mapping, and the checked site table.

- :func:`read_schema` reads ``configs/profile-schema.toml`` (shared by every site): each variable's type, UCUM unit,
  allowed range, standard code (LOINC, SNOMED CT, HGNC) and level (study or patient).
- :func:`read_mapping` reads ``SITE_DIR/profile-mapping.toml``: which site column holds which schema variable, in which
  unit, and how the site writes categories, booleans and missing values.
- :func:`read_profile` reads the site's CSV (or Parquet, where pyarrow is installed) into a :class:`ProfileTable`:
  values as floats in schema units plus a missingness mask (never imputed), keyed by the study key of ``labels.csv``.
  Bad rows get line-numbered errors and are dropped; reading goes on so that all of them are reported at once.
- :func:`aggregate_statistics` gives per-variable count / sum / sum of squares / coarse histogram, only for variables
  measured in at least ``min_count`` studies (the metrics privacy floor), for federated normalisation.

Units are converted by a small UCUM parser (prefixes p n u m c d k, atoms g L mol U kat % and time units, ``10*n``
factors, ``/`` and ``.``): a site unit converts when it has the schema unit's dimension and the same annotation.
An unknown unit is refused; an annotated quantity such as ``{FEU}`` never converts to a different one (``{DDU}``)
unless the mapping gives an explicit ``factor``. Error texts name line, column and reason; they never repeat a
study key and repeat a cell's text only when it is short and cannot be an identifier.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

#: Variable types a schema may declare.
TYPES = ("float", "int", "bool", "category")
#: Levels a schema may declare: measured for the imaging study, or a property of the patient.
LEVELS = ("study", "patient")
#: Columns that link a profile row to a study (the same two as labels.csv).
KEY_KINDS = ("StudyInstanceUID", "AccessionNumber")
#: Default file names in a site folder.
MAPPING_NAME = "profile-mapping.toml"
PROFILE_NAME = "profile.csv"
#: Default schema shipped with fedct.
DEFAULT_SCHEMA = Path(__file__).resolve().parents[1] / "configs" / "profile-schema.toml"
#: Cells read as missing unless the mapping lists its own tokens.
DEFAULT_MISSING = ("", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "-")
#: Bool spellings accepted without a value map (case-insensitive).
_BOOL_DEFAULT = MappingProxyType({"1": True, "0": False, "true": True, "false": False})
#: Annotations that are only labels ({cells}/uL is /uL); every other annotation is part of the quantity.
_COSMETIC_ANNOTATIONS = frozenset({"cells", "cell", "count", "#"})
_ANNOTATION_ALIASES = MappingProxyType({"ct": "ct_value", "ct_value": "ct_value"})
#: Default number of histogram bins of :func:`aggregate_statistics`.
HISTOGRAM_BINS = 20


class ProfileError(ValueError):
    """A schema, mapping or profile file cannot be used at all; the message names the file and the reason."""


# --- UCUM units ---------------------------------------------------------------------------------------------------

_PREFIXES = MappingProxyType({"p": 1e-12, "n": 1e-9, "u": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1, "k": 1e3})
# atom -> (factor to base, dimension exponents over (g, m, mol, s, [IU], [arb'U]), accepts a prefix)
_DIMS = ("g", "m", "mol", "s", "[IU]", "[arb'U]")


def _dim(**exps: int) -> tuple[int, ...]:
    return tuple(exps.get(d.replace("[", "").replace("]", "").replace("'", ""), 0) for d in _DIMS)


_ATOMS: Mapping[str, tuple[float, tuple[int, ...], bool]] = MappingProxyType(
    {
        "g": (1.0, _dim(g=1), True),
        "L": (1e-3, _dim(m=3), True),
        "l": (1e-3, _dim(m=3), True),
        "m": (1.0, _dim(m=1), True),
        "mol": (1.0, _dim(mol=1), True),
        "kat": (1.0, _dim(mol=1, s=-1), True),
        "U": (1e-6 / 60.0, _dim(mol=1, s=-1), True),  # enzyme unit = umol/min
        "s": (1.0, _dim(s=1), True),
        "min": (60.0, _dim(s=1), False),
        "h": (3600.0, _dim(s=1), False),
        "d": (86400.0, _dim(s=1), False),
        "wk": (604800.0, _dim(s=1), False),
        "mo": (31557600.0 / 12.0, _dim(s=1), False),
        "a": (31557600.0, _dim(s=1), False),
        "%": (0.01, _dim(), False),
        "[IU]": (1.0, _dim(IU=1), True),
        "[arb'U]": (1.0, _dim(arbU=1), False),
    }
)
_TERM = re.compile(r"^(?P<atom>.+?)(?P<exp>-?\d+)?$")


@dataclass(frozen=True)
class Unit:
    """A parsed UCUM unit: ``factor`` times base units of dimension ``dims``, with its quantity annotations."""

    code: str
    factor: float
    dims: tuple[int, ...]
    annotations: frozenset[str]


def _term(text: str, code: str) -> tuple[float, tuple[int, ...]]:
    if text in ("", "1"):
        return 1.0, _dim()
    number = re.fullmatch(r"10[*^](-?\d+)", text)
    if number:
        return 10.0 ** int(number.group(1)), _dim()
    if re.fullmatch(r"\d+", text):
        return float(text), _dim()
    if text in _ATOMS:  # whole atom first: "mol", "min", "mo", "kat", "d" (day)
        factor, dims, _ = _ATOMS[text]
        return factor, dims
    match = _TERM.match(text)
    atom, exp = (match.group("atom"), int(match.group("exp"))) if match and match.group("exp") else (text, 1)
    if atom in _ATOMS:
        factor, dims, _ = _ATOMS[atom]
        return factor**exp, tuple(d * exp for d in dims)
    if atom[:1] in _PREFIXES and atom[1:] in _ATOMS and _ATOMS[atom[1:]][2]:
        factor, dims, _ = _ATOMS[atom[1:]]
        return (_PREFIXES[atom[0]] * factor) ** exp, tuple(d * exp for d in dims)
    raise ValueError(f"unknown unit {code!r} (the part {text!r} is not a UCUM unit fedct knows)")


def parse_unit(code: str) -> Unit:
    """Parse a UCUM unit code (the subset used for laboratory values); ValueError naming the unknown part."""
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"unit must be a non-empty UCUM code, got {code!r}")
    text = code.strip()
    annotations = set()
    for note in re.findall(r"\{([^{}]*)\}", text):
        name = note.strip().lower()
        if name not in _COSMETIC_ANNOTATIONS:
            annotations.add(_ANNOTATION_ALIASES.get(name, name))
    bare = re.sub(r"\{[^{}]*\}", "", text)
    if "{" in bare or "}" in bare or " " in bare:
        raise ValueError(f"unknown unit {code!r} (unbalanced braces or spaces)")
    factor, dims = 1.0, [0] * len(_DIMS)
    parts = re.split(r"([./])", bare)
    op = "."
    for i, part in enumerate(parts):
        if i % 2:
            op = part
            continue
        if part == "" and i == 0 and len(parts) > 1:
            continue  # a leading "/" as in "/uL"
        f, d = _term(part, code)
        if op == "/":
            factor /= f
            dims = [a - b for a, b in zip(dims, d)]
        else:
            factor *= f
            dims = [a + b for a, b in zip(dims, d)]
    return Unit(code=text, factor=factor, dims=tuple(dims), annotations=frozenset(annotations))


def conversion_factor(site_unit: str, schema_unit: str) -> float:
    """Multiplier from ``site_unit`` to ``schema_unit``; ValueError when they are not the same quantity."""
    site, target = parse_unit(site_unit), parse_unit(schema_unit)
    if site.dims != target.dims:
        raise ValueError(f"unit {site_unit!r} is not the same kind of quantity as {schema_unit!r}")
    if site.annotations != target.annotations:
        raise ValueError(
            f"unit {site_unit!r} measures a different quantity than {schema_unit!r} "
            f"({', '.join(sorted(site.annotations)) or 'no annotation'} vs {', '.join(sorted(target.annotations)) or 'no annotation'}); "
            f"export {schema_unit!r} or give the laboratory's own conversion as `factor`"
        )
    return float(f"{site.factor / target.factor:.12g}")  # 10*9/L -> 10*3/uL is 1, not 1.0000000000000002


# --- schema ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """One schema variable. ``unit``/``range`` for numbers, ``categories`` for categories (their index is the value)."""

    name: str
    type: str
    level: str
    label: str = ""
    unit: str | None = None
    range: tuple[float, float] | None = None
    categories: tuple[str, ...] = ()
    system: str | None = None
    code: str | None = None
    code_status: str = "unverified"


@dataclass(frozen=True)
class ProfileSchema:
    """The consortium's variables, in model order."""

    name: str
    version: int
    variables: tuple[Variable, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def variable(self, name: str) -> Variable:
        """The variable called ``name`` (KeyError naming the known ones otherwise)."""
        for v in self.variables:
            if v.name == name:
                return v
        raise KeyError(f"{name!r} is not a schema variable; known: {', '.join(self.names)}")


def _load_toml(path: Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{what} not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from exc


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _schema_variable(path: Path, name: str, spec: Any) -> Variable:
    where = f"{path}: [variables.{name}]"
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ProfileError(f"{where}: variable names are lower-case letters, digits and _ (got {name!r})")
    if not isinstance(spec, dict):
        raise ProfileError(f"{where}: must be a table")
    known = {
        "label",
        "type",
        "unit",
        "range",
        "categories",
        "system",
        "code",
        "code_status",
        "level",
        "note",
        "symbol",
        "variant",
    }
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    vtype = spec.get("type")
    if vtype not in TYPES:
        raise ProfileError(f"{where}: type must be one of {', '.join(TYPES)}, got {vtype!r}")
    level = spec.get("level")
    if level not in LEVELS:
        raise ProfileError(f"{where}: level must be one of {', '.join(LEVELS)}, got {level!r}")
    unit = spec.get("unit")
    value_range = spec.get("range")
    categories = spec.get("categories", [])
    if vtype in ("float", "int"):
        if not isinstance(unit, str):
            raise ProfileError(f'{where}: a {vtype} variable needs a UCUM `unit` ("1" when dimensionless)')
        try:
            parse_unit(unit)
        except ValueError as exc:
            raise ProfileError(f"{where}: {exc}") from exc
        if not (
            isinstance(value_range, list)
            and len(value_range) == 2
            and all(_number(x) for x in value_range)
            and value_range[0] < value_range[1]
        ):
            raise ProfileError(f"{where}: range must be [low, high] with low < high, got {value_range!r}")
        value_range = (float(value_range[0]), float(value_range[1]))
    elif unit is not None or value_range is not None:
        raise ProfileError(f"{where}: a {vtype} variable has no unit or range")
    if vtype == "category":
        if not (
            isinstance(categories, list)
            and categories
            and all(isinstance(c, str) and c for c in categories)
            and len(set(categories)) == len(categories)
        ):
            raise ProfileError(f"{where}: categories must be a list of distinct non-empty strings, got {categories!r}")
    elif categories:
        raise ProfileError(f"{where}: only a category variable has categories")
    status = spec.get("code_status", "unverified")
    if status not in ("verified", "unverified"):
        raise ProfileError(f"{where}: code_status must be verified or unverified, got {status!r}")
    return Variable(
        name=name,
        type=vtype,
        level=level,
        label=str(spec.get("label", "")),
        unit=unit,
        range=value_range,
        categories=tuple(categories),
        system=spec.get("system"),
        code=spec.get("code"),
        code_status=status,
    )


def read_schema(path: Path = DEFAULT_SCHEMA) -> ProfileSchema:
    """Read and check the shared schema file; :class:`ProfileError` naming the file, variable and key."""
    path = Path(path)
    data = _load_toml(path, "profile schema")
    head = data.get("schema", {})
    variables = data.get("variables")
    if not isinstance(variables, dict) or not variables:
        raise ProfileError(f"{path}: no [variables.<name>] tables")
    unknown = sorted(set(data) - {"schema", "variables"})
    if unknown:
        raise ProfileError(f"{path}: unknown table(s) {', '.join(unknown)}")
    version = head.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ProfileError(f"{path}: [schema] version must be a positive integer, got {version!r}")
    return ProfileSchema(
        name=str(head.get("name", path.stem)),
        version=version,
        variables=tuple(_schema_variable(path, n, s) for n, s in variables.items()),
    )


# --- site mapping ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnMapping:
    """How one site column becomes one schema variable."""

    variable: str
    column: str
    unit: str | None = None
    factor: float = 1.0
    values: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    censored: str | None = None  # None: "<5" is a bad value; "limit": use 5; "missing": mask it


@dataclass(frozen=True)
class SiteMapping:
    """A site's ``profile-mapping.toml``: file format, key column and one :class:`ColumnMapping` per mapped variable."""

    path: str
    key_kind: str
    key_column: str
    columns: tuple[ColumnMapping, ...]
    delimiter: str = ","
    decimal: str = "."
    missing: tuple[str, ...] = DEFAULT_MISSING

    def column_for(self, variable: str) -> ColumnMapping | None:
        """The mapping of ``variable``, or None when the site does not export it (all missing)."""
        for c in self.columns:
            if c.variable == variable:
                return c
        return None


def _mapping_column(path: Path, schema: ProfileSchema, name: str, spec: Any) -> ColumnMapping:
    where = f"{path}: [variables.{name}]"
    try:
        variable = schema.variable(name)
    except KeyError as exc:
        raise ProfileError(f"{where}: {exc.args[0]}") from None
    if not isinstance(spec, dict):
        raise ProfileError(f"{where}: must be a table")
    unknown = sorted(set(spec) - {"column", "unit", "factor", "values", "censored"})
    if unknown:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: censored, column, factor, unit, values"
        )
    column = spec.get("column")
    if not isinstance(column, str) or not column.strip():
        raise ProfileError(f"{where}: `column` (the site's column name) is required")
    unit, factor = spec.get("unit"), spec.get("factor")
    if factor is not None and not (_number(factor) and factor > 0):
        raise ProfileError(f"{where}: factor must be a positive number, got {factor!r}")
    censored = spec.get("censored")
    if censored not in (None, "limit", "missing"):
        raise ProfileError(f'{where}: censored must be "limit" or "missing", got {censored!r}')
    values = spec.get("values", {})
    if not isinstance(values, dict):
        raise ProfileError(f"{where}: values must be a table {{site value = schema value}}")
    if variable.type in ("float", "int"):
        if values:
            raise ProfileError(f"{where}: a {variable.type} variable takes no value map")
        if not isinstance(unit, str):
            raise ProfileError(
                f"{where}: give the unit of column {column!r} (UCUM, e.g. {variable.unit!r}); fedct never guesses units"
            )
        try:
            site = parse_unit(unit)
        except ValueError as exc:
            raise ProfileError(f"{where}: column {column!r}: {exc}") from None
        try:
            known = conversion_factor(unit, variable.unit or "1")
        except ValueError as exc:
            if factor is None:
                raise ProfileError(f"{where}: column {column!r}: {exc}") from None
            known = None
        if factor is not None and known is not None and not math.isclose(factor, known, rel_tol=1e-6):
            raise ProfileError(
                f"{where}: factor {factor} contradicts the unit: {unit!r} -> {variable.unit!r} is x{known:g}"
            )
        if factor is not None and site.dims != parse_unit(variable.unit or "1").dims:
            raise ProfileError(
                f"{where}: {unit!r} and {variable.unit!r} are different kinds of quantity; no factor can join them"
            )
        factor = float(factor if factor is not None else known)  # type: ignore[arg-type]
    else:
        if unit is not None or spec.get("factor") is not None or censored is not None:
            raise ProfileError(f"{where}: a {variable.type} variable takes no unit, factor or censored")
        for site_value, schema_value in values.items():
            if variable.type == "bool" and not isinstance(schema_value, bool):
                raise ProfileError(f"{where}: values[{site_value!r}] must be true or false, got {schema_value!r}")
            if variable.type == "category" and schema_value not in variable.categories and schema_value != "":
                raise ProfileError(
                    f'{where}: values[{site_value!r}] = {schema_value!r} is not one of {", ".join(variable.categories)} (or "" for missing)'
                )
        factor = 1.0
    return ColumnMapping(
        variable=name,
        column=column.strip(),
        unit=unit,
        factor=factor,
        values=MappingProxyType(dict(values)),
        censored=censored,
    )


def read_mapping(path: Path, schema: ProfileSchema) -> SiteMapping:
    """Read and check a site's mapping against ``schema``; :class:`ProfileError` naming the file, variable and reason."""
    path = Path(path)
    data = _load_toml(path, "profile mapping")
    unknown = sorted(set(data) - {"file", "key", "variables"})
    if unknown:
        raise ProfileError(f"{path}: unknown table(s) {', '.join(unknown)}; known: file, key, variables")
    file = data.get("file", {})
    key = data.get("key")
    if not isinstance(key, dict) or key.get("kind") not in KEY_KINDS or not isinstance(key.get("column"), str):
        raise ProfileError(
            f"{path}: [key] needs kind = {' or '.join(map(repr, KEY_KINDS))} and column = the site's column name"
        )
    delimiter, decimal = file.get("delimiter", ","), file.get("decimal", ".")
    if delimiter not in (",", ";", "\t", "|"):
        raise ProfileError(f"{path}: [file] delimiter must be one of , ; | or a tab, got {delimiter!r}")
    if decimal not in (".", ","):
        raise ProfileError(f'{path}: [file] decimal must be "." or ",", got {decimal!r}')
    if decimal == delimiter:
        raise ProfileError(f"{path}: [file] decimal and delimiter cannot both be {decimal!r}")
    missing = file.get("missing", list(DEFAULT_MISSING))
    if not (isinstance(missing, list) and all(isinstance(m, str) for m in missing)):
        raise ProfileError(f"{path}: [file] missing must be a list of strings, got {missing!r}")
    name = file.get("path", PROFILE_NAME)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ProfileError(f"{path}: [file] path must be a file name inside the site folder, got {name!r}")
    variables = data.get("variables", {})
    if not isinstance(variables, dict):
        raise ProfileError(f"{path}: [variables.<name>] must be tables")
    columns = tuple(_mapping_column(path, schema, n, s) for n, s in variables.items())
    used = [key["column"]] + [c.column for c in columns]
    duplicated = sorted({c for c in used if used.count(c) > 1})
    if duplicated:
        raise ProfileError(f"{path}: column(s) {', '.join(duplicated)} mapped more than once")
    return SiteMapping(
        path=name,
        key_kind=key["kind"],
        key_column=key["column"].strip(),
        columns=columns,
        delimiter=delimiter,
        decimal=decimal,
        missing=tuple(m.strip() for m in missing),
    )


# --- the site table ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowError:
    """One problem with one row (``line`` is the file line, 1 = header; Parquet rows count from 2 likewise)."""

    line: int
    column: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.column}: {self.reason}"


@dataclass(frozen=True, eq=False)
class ProfileTable:
    """A site's profile in schema units: ``values[i, j]`` is variable j of study ``keys[i]`` (NaN where ``missing``).

    Categories are stored as their index in the schema's ``categories``, booleans as 0/1. ``errors`` lists every bad
    row (dropped), ``unmapped`` the schema variables the site does not export (missing for every study).
    """

    schema: ProfileSchema
    key_kind: str
    keys: tuple[str, ...]
    values: np.ndarray
    missing: np.ndarray
    errors: tuple[RowError, ...] = ()
    rows_read: int = 0
    unmapped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n, v = len(self.keys), len(self.schema.variables)
        if self.values.shape != (n, v) or self.missing.shape != (n, v):
            raise ValueError(
                f"values and missing must have shape ({n}, {v}), got {self.values.shape} and {self.missing.shape}"
            )
        self.values.flags.writeable = False
        self.missing.flags.writeable = False

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - len(self.keys)

    def column(self, name: str) -> np.ndarray:
        """Values of variable ``name`` (NaN where missing)."""
        return self.values[:, self.schema.names.index(self.schema.variable(name).name)]

    def select(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(values, missing)`` for ``keys`` in that order; a key without a profile row is missing throughout."""
        index = {k: i for i, k in enumerate(self.keys)}
        values = np.full((len(keys), len(self.schema.variables)), np.nan)
        missing = np.ones_like(values, dtype=bool)
        for row, key in enumerate(keys):
            i = index.get(key)
            if i is not None:
                values[row], missing[row] = self.values[i], self.missing[i]
        return values, missing


#: A cell's text appears in an error message only when this many rows of its column hold it (a systematic spelling
#: such as "femme", not one patient's entry) or when it is a short number-like token; never a digit run or a date.
ECHO_MIN_ROWS = 5


def _safe_text(text: str, frequent: frozenset[str] = frozenset()) -> str:
    """``'text'`` when it cannot single out a patient, else a description (a cell could hold a name, a date or an ID)."""
    identifying = re.search(r"\d{5,}|\d{1,4}[./-]\d{1,2}[./-]\d{2,4}", text)
    number_like = re.fullmatch(r"[<>=]{0,2}\s?[-+]?[\d.,eE+-]{1,10}", text)
    if not identifying and len(text) <= 24 and (text in frequent or number_like):
        return repr(text)
    return f"a {len(text)}-character value (not shown: fewer than {ECHO_MIN_ROWS} rows hold it)"


def _parse_number(
    text: str, mapping: SiteMapping, column: ColumnMapping, frequent: frozenset[str]
) -> tuple[float | None, str | None]:
    """(number in site units or None for missing, error) of one cell."""
    raw = text.strip()
    if mapping.decimal == ",":
        raw = raw.replace(",", ".")
    censored = re.fullmatch(r"(<=|>=|<|>)\s*(.+)", raw)
    if censored:
        if column.censored is None:
            return None, (
                f'{_safe_text(text, frequent)} is censored (below/above the assay\'s limit); set censored = "limit" '
                f'or "missing" for this column in the mapping'
            )
        if column.censored == "missing":
            return None, None
        raw = censored.group(2)
    try:
        number = float(raw)
    except ValueError:
        return None, f"{_safe_text(text, frequent)} is not a number"
    if not math.isfinite(number):
        return None, f"{_safe_text(text, frequent)} is not a finite number"
    return number, None


def _cell_value(
    text: str, variable: Variable, column: ColumnMapping, mapping: SiteMapping, frequent: frozenset[str] = frozenset()
) -> tuple[float, str | None]:
    """(value in schema units, NaN for missing; error or None)."""
    stripped = text.strip()
    if stripped in mapping.missing:
        return math.nan, None
    if variable.type in ("float", "int"):
        number, error = _parse_number(stripped, mapping, column, frequent)
        if error or number is None:
            return math.nan, error
        value = number * column.factor
        low, high = variable.range  # type: ignore[misc]
        if not low <= value <= high:
            shown = f"{number:g} {column.unit}" + (f" = {value:g} {variable.unit}" if column.factor != 1.0 else "")
            return math.nan, f"{shown} is outside the allowed range [{low:g}, {high:g}] {variable.unit}"
        if variable.type == "int" and not math.isclose(value, round(value), abs_tol=1e-9):
            return math.nan, f"{value:g} {variable.unit} is not a whole number"
        return value, None
    if column.values:
        if stripped not in column.values:
            known = ", ".join(repr(k) for k in column.values)
            return math.nan, f"{_safe_text(stripped, frequent)} is not in the mapping's values ({known})"
        mapped = column.values[stripped]
        if variable.type == "bool":
            return float(bool(mapped)), None
        return (math.nan, None) if mapped == "" else (float(variable.categories.index(mapped)), None)
    if variable.type == "bool":
        if stripped.lower() not in _BOOL_DEFAULT:
            return (
                math.nan,
                f"{_safe_text(stripped, frequent)} is not a boolean (1/0/true/false, or map it under values)",
            )
        return float(_BOOL_DEFAULT[stripped.lower()]), None
    if stripped not in variable.categories:
        return (
            math.nan,
            f"{_safe_text(stripped, frequent)} is not one of {', '.join(variable.categories)} (map it under values)",
        )
    return float(variable.categories.index(stripped)), None


def _rows_from_csv(path: Path, mapping: SiteMapping) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from exc
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=mapping.delimiter)
    try:
        header = [c.strip() for c in next(reader)]
    except StopIteration:
        raise ProfileError(f"{path}: empty file (no header line)") from None
    except csv.Error as exc:
        raise ProfileError(f"{path}: line 1: {exc}") from exc
    rows = []
    line = 2
    try:
        for record in reader:
            rows.append((line, record))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise ProfileError(f"{path}: line {line}: {exc}") from exc
    return header, rows


def _rows_from_parquet(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    try:
        import pyarrow.parquet as pq  # optional: fedct does not depend on pyarrow
    except ImportError:
        raise ProfileError(
            f"{path}: reading Parquet needs the pyarrow package, which is not installed here; "
            f"export the table as CSV (UTF-8) instead"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for damaged files
        raise ProfileError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from exc
    header = [str(c).strip() for c in table.column_names]
    columns = table.to_pydict()

    def text(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    n = table.num_rows
    return header, [(i + 2, [text(columns[c][i]) for c in table.column_names]) for i in range(n)]


def read_profile(path: Path, schema: ProfileSchema, mapping: SiteMapping) -> ProfileTable:
    """Read a site's profile table (CSV, or Parquet when pyarrow is installed) into a :class:`ProfileTable`.

    A file that cannot be used at all (missing, unreadable, a mapped column absent from the header) raises
    :class:`ProfileError`. Every bad row (unparsable or out-of-range value, unknown category, empty or duplicated key,
    wrong number of cells) is reported in ``errors`` with its line and column and dropped; the others are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"profile table not found: {path}")
    if path.suffix.lower() in (".parquet", ".pq"):
        header, rows = _rows_from_parquet(path)
    else:
        header, rows = _rows_from_csv(path, mapping)
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise ProfileError(f"{path}: line 1: column(s) {', '.join(duplicated)} appear more than once")
    wanted = [mapping.key_column] + [c.column for c in mapping.columns]
    absent = [c for c in wanted if c not in header]
    if absent:
        raise ProfileError(
            f"{path}: line 1: mapped column(s) {', '.join(absent)} not in the file; found: {', '.join(header) or 'none'}"
        )
    key_at = header.index(mapping.key_column)
    plan = [
        (schema.names.index(c.variable), schema.variable(c.variable), c, header.index(c.column))
        for c in mapping.columns
    ]
    n_vars = len(schema.variables)
    counts: dict[int, Counter[str]] = {at: Counter() for _, _, _, at in plan}
    for _, record in rows:
        if len(record) == len(header):
            for at, counter in counts.items():
                counter[record[at].strip()] += 1
    frequent = {at: frozenset(t for t, n in counter.items() if n >= ECHO_MIN_ROWS) for at, counter in counts.items()}
    errors: list[RowError] = []
    parsed: list[tuple[int, str, np.ndarray, bool]] = []  # line, key, values, row is good
    lines_of: dict[str, list[int]] = {}
    n_rows = 0
    for line, record in rows:
        if not any(cell.strip() for cell in record):
            continue  # blank line (spreadsheet exports end with some)
        n_rows += 1
        if len(record) != len(header):
            errors.append(RowError(line, "(row)", f"has {len(record)} cells, the header has {len(header)}"))
            continue
        key = record[key_at].strip()
        if not key:
            errors.append(RowError(line, mapping.key_column, f"empty {mapping.key_kind}"))
            continue
        lines_of.setdefault(key, []).append(line)
        row = np.full(n_vars, np.nan)
        ok = True
        for j, variable, column, at in plan:
            value, error = _cell_value(record[at], variable, column, mapping, frequent[at])
            if error:
                errors.append(RowError(line, column.column, error))
                ok = False
            row[j] = value
        parsed.append((line, key, row, ok))
    for lines in lines_of.values():
        if len(lines) > 1:
            for line in lines:
                others = ", ".join(str(o) for o in lines if o != line)
                errors.append(
                    RowError(
                        line,
                        mapping.key_column,
                        f"the same {mapping.key_kind} is on line(s) {others}; all {len(lines)} rows dropped",
                    )
                )
    kept = [(line, key, row) for line, key, row, ok in parsed if ok and len(lines_of[key]) == 1]
    errors.sort(key=lambda e: e.line)
    values = np.array([row for _, _, row in kept], dtype=np.float64).reshape(len(kept), n_vars)
    mapped = {c.variable for c in mapping.columns}
    return ProfileTable(
        schema=schema,
        key_kind=mapping.key_kind,
        keys=tuple(k for _, k, _ in kept),
        values=values,
        missing=np.isnan(values),
        errors=tuple(errors),
        rows_read=n_rows,
        unmapped=tuple(n for n in schema.names if n not in mapped),
    )


def read_site_profile(site_dir: Path, schema: ProfileSchema | None = None) -> ProfileTable:
    """Read ``SITE_DIR/profile-mapping.toml`` and the table it names, against ``schema`` (default: the shipped one)."""
    site_dir = Path(site_dir)
    schema = schema if schema is not None else read_schema(DEFAULT_SCHEMA)
    mapping = read_mapping(site_dir / MAPPING_NAME, schema)
    return read_profile(site_dir / mapping.path, schema, mapping)


# --- aggregate statistics (federated normalisation) -----------------------------------------------------------------


@dataclass(frozen=True)
class VariableStatistics:
    """Aggregates of one variable over the studies where it was measured (no study-level value)."""

    count: int
    sum: float
    sum_squares: float
    histogram: tuple[float, ...] | None = None  # counts over histogram_edges(variable), coarsened to the floor


@dataclass(frozen=True)
class ProfileStatistics:
    """What a site may share about its profile: per-variable aggregates at or above the count floor."""

    n_rows: int
    variables: Mapping[str, VariableStatistics]
    withheld: tuple[str, ...]  # measured in fewer than min_count studies: nothing reported
    min_count: int


def histogram_edges(variable: Variable, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Bin edges every site uses for ``variable`` (so histograms add up): categories/bools one bin per value;
    numbers over the schema range, log-spaced (on value + 1) when the range spans more than two decades."""
    if variable.type == "bool":
        return np.array([-0.5, 0.5, 1.5])
    if variable.type == "category":
        return np.arange(len(variable.categories) + 1, dtype=float) - 0.5
    low, high = variable.range  # type: ignore[misc]
    if low >= 0 and (high + 1) / (low + 1) > 100:
        return np.expm1(np.linspace(math.log1p(low), math.log1p(high), bins + 1))
    return np.linspace(low, high, bins + 1)


def aggregate_statistics(
    table: ProfileTable, *, min_count: int | None = None, bins: int = HISTOGRAM_BINS
) -> ProfileStatistics:
    """Per-variable count, sum, sum of squares and a coarse histogram, for variables measured in >= ``min_count`` studies.

    ``min_count`` defaults to the metrics privacy floor (:data:`fl_client.metrics.MIN_COUNT`) and may only raise it.
    Histograms are coarsened with the same rule as the score histograms (every non-empty bin >= ``min_count``).
    Nothing returned holds a study key, a single study's value, or a site column name.
    """
    from fl_client.metrics import MIN_COUNT, coarsen_histogram

    k = MIN_COUNT if min_count is None else min_count
    if isinstance(k, bool) or not isinstance(k, int) or k < MIN_COUNT:
        raise ValueError(f"min_count must be an integer >= {MIN_COUNT} (the privacy floor), got {min_count!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    n_rows = len(table.keys)
    if n_rows < k:
        return ProfileStatistics(n_rows=0, variables=MappingProxyType({}), withheld=table.schema.names, min_count=k)
    stats: dict[str, VariableStatistics] = {}
    withheld = []
    for j, variable in enumerate(table.schema.variables):
        present = table.values[~table.missing[:, j], j]
        if present.size < k:
            withheld.append(variable.name)
            continue
        counts, _ = np.histogram(present, bins=histogram_edges(variable, bins))
        coarse = coarsen_histogram(counts.tolist(), k)
        stats[variable.name] = VariableStatistics(
            count=int(present.size),
            sum=float(np.sum(present)),
            sum_squares=float(np.sum(present * present)),
            histogram=None if coarse is None else tuple(coarse),
        )
    return ProfileStatistics(n_rows=n_rows, variables=MappingProxyType(stats), withheld=tuple(withheld), min_count=k)


def pooled_moments(sites: Sequence[ProfileStatistics]) -> dict[str, tuple[float, float, int]]:
    """``{variable: (mean, standard deviation, count)}`` pooled over sites' statistics (population SD, exact)."""
    totals: dict[str, list[float]] = {}
    for site in sites:
        for name, s in site.variables.items():
            t = totals.setdefault(name, [0.0, 0.0, 0.0])
            t[0] += s.count
            t[1] += s.sum
            t[2] += s.sum_squares
    out = {}
    for name, (n, total, squares) in totals.items():
        mean = total / n
        out[name] = (mean, math.sqrt(max(squares / n - mean * mean, 0.0)), int(n))
    return out


# --- fedct profile check --------------------------------------------------------------------------------------------


def check_command(args: argparse.Namespace) -> int:
    """``fedct profile check``: read and validate a site's profile; print per-variable counts and the bad rows.

    Exit status 0 when every row is usable, 1 when some rows were dropped, 2 when the files cannot be used.
    """
    site_dir = Path(args.site)
    try:
        schema = read_schema(Path(args.schema) if args.schema else DEFAULT_SCHEMA)
        mapping = read_mapping(site_dir / MAPPING_NAME, schema)
        table = read_profile(site_dir / mapping.path, schema, mapping)
    except ProfileError as exc:
        print(f"fedct profile check: error: {exc}", file=sys.stderr)
        return 2
    n = len(table.keys)
    print(
        f"schema {schema.name} v{schema.version}; {mapping.path}: {table.rows_read} row(s) read, {n} usable, "
        f"{table.rows_dropped} dropped; key {table.key_kind}"
    )
    width = max(len(v) for v in schema.names)
    print(f"  {'variable'.ljust(width)}  {'site column':<22} {'unit':<14} {'present':>7}  missing")
    for j, variable in enumerate(schema.variables):
        column = mapping.column_for(variable.name)
        present = int((~table.missing[:, j]).sum()) if n else 0
        fraction = 1.0 - present / n if n else 1.0
        site_col = column.column if column else "(not exported)"
        unit = (column.unit or "") if column else ""
        if column and column.unit and column.unit != variable.unit:
            unit = f"{column.unit}->{variable.unit}"
        print(f"  {variable.name.ljust(width)}  {site_col[:22]:<22} {unit[:14]:<14} {present:>7}  {fraction:6.1%}")
    if table.errors:
        print(f"{len(table.errors)} problem(s) in {table.rows_dropped} dropped row(s):")
        for error in table.errors:
            print(f"  {error}")
        return 1
    print("no bad rows")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``fedct profile check`` (hospital IT: validate the site's clinical/molecular profile export)."""
    p = sub.add_parser("profile", help="clinical and molecular profile of a site: check the export against the schema")
    psub = p.add_subparsers(dest="profile_command", required=True)
    c = psub.add_parser("check", help="read and validate SITE_DIR/profile-mapping.toml and the table it names")
    c.add_argument("--site", required=True, help="the site's folder (profile-mapping.toml, profile.csv)")
    c.add_argument("--schema", help=f"schema file (default: {DEFAULT_SCHEMA.name} shipped with fedct)")
    c.set_defaults(func=check_command)

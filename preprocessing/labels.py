"""Site labels: ``labels.csv`` keyed by StudyInstanceUID (or AccessionNumber), read and checked row by row."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Diagnostic classes, in the index order the model's outputs use.
DIAGNOSES = ("covid", "other_pneumonia", "normal")
#: Columns that link a row to a study; a file has exactly one of them.
KEY_COLUMNS = ("StudyInstanceUID", "AccessionNumber")
REQUIRED_COLUMNS = ("diagnosis",)
OPTIONAL_COLUMNS = ("severe", "time_days", "age", "sex")


@dataclass(frozen=True)
class StudyLabel:
    """Targets of one study. ``None`` means unknown for that task (masked, never guessed)."""

    diagnosis: int | None
    severe: int | None
    time_days: float | None
    age: float | None
    sex: str | None


@dataclass(frozen=True, eq=False)
class Labels(Mapping[str, StudyLabel]):
    """The rows of a labels file, keyed by the value of its ``key`` column."""

    key: str = "StudyInstanceUID"
    rows: dict[str, StudyLabel] = field(default_factory=dict)

    def __getitem__(self, value: str) -> StudyLabel:
        return self.rows[value]

    def __iter__(self) -> Iterator[str]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class LabelsError(ValueError):
    """labels.csv cannot be used; the message names the file and row."""


def _optional_float(value: str | None, *, path: Path, row: int, column: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise LabelsError(f"{path}: line {row}: {column}={value!r} is not a number") from exc
    if not math.isfinite(number):
        raise LabelsError(f"{path}: line {row}: {column}={value!r} is not finite")
    return number


def read_labels(path: Path) -> Labels:
    """Read labels.csv into :class:`Labels` (``{key value: StudyLabel}``); raise :class:`LabelsError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # "-sig": spreadsheet exports start with a BOM
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from exc
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        keys = [c for c in KEY_COLUMNS if c in columns]
        if len(keys) != 1:
            raise LabelsError(
                f"{path}: line 1: needs exactly one of the columns {' or '.join(KEY_COLUMNS)}; found {', '.join(columns) or 'none'}"
            )
        key = keys[0]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise LabelsError(
                f"{path}: line 1: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}"
            )
        known = set(KEY_COLUMNS) | set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise LabelsError(
                f"{path}: line 1: unknown column(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        labels: dict[str, StudyLabel] = {}
        for row_number, row in enumerate(reader, start=2):
            uid = (row.get(key) or "").strip()
            if not uid:
                raise LabelsError(f"{path}: line {row_number}: empty {key}")
            if uid in labels:
                raise LabelsError(f"{path}: line {row_number}: {key} listed twice")
            diagnosis_text = (row.get("diagnosis") or "").strip()
            if diagnosis_text and diagnosis_text not in DIAGNOSES:
                raise LabelsError(
                    f"{path}: line {row_number}: diagnosis {diagnosis_text!r} is not one of {', '.join(DIAGNOSES)}"
                )
            severe = _optional_float(row.get("severe"), path=path, row=row_number, column="severe")
            if severe is not None and severe not in (0.0, 1.0):
                raise LabelsError(f"{path}: line {row_number}: severe must be 0 or 1, got {severe}")
            time_days = _optional_float(row.get("time_days"), path=path, row=row_number, column="time_days")
            if time_days is not None and time_days < 0:
                raise LabelsError(f"{path}: line {row_number}: time_days must be >= 0, got {time_days}")
            sex = (row.get("sex") or "").strip() or None
            labels[uid] = StudyLabel(
                diagnosis=DIAGNOSES.index(diagnosis_text) if diagnosis_text else None,
                severe=None if severe is None else int(severe),
                time_days=time_days,
                age=_optional_float(row.get("age"), path=path, row=row_number, column="age"),
                sex=sex,
            )
    return Labels(key=key, rows=labels)

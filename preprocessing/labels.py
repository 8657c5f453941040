"""Site labels: ``labels.csv`` keyed by StudyInstanceUID, read and checked row by row."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

#: Diagnostic classes, in the index order the model's outputs use.
DIAGNOSES = ("covid", "other_pneumonia", "normal")
REQUIRED_COLUMNS = ("StudyInstanceUID", "diagnosis")


@dataclass(frozen=True)
class StudyLabel:
    """Targets of one study. ``None`` means unknown for that task (masked, never guessed)."""

    diagnosis: int | None
    severe: int | None
    time_days: float | None
    age: float | None
    sex: str | None


class LabelsError(ValueError):
    """labels.csv cannot be used; the message names the file and row."""


def _optional_float(value: str | None, *, path: Path, row: int, column: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError as exc:
        raise LabelsError(f"{path}: row {row}: {column}={value!r} is not a number") from exc
    if not math.isfinite(number):
        raise LabelsError(f"{path}: row {row}: {column}={value!r} is not finite")
    return number


def read_labels(path: Path) -> dict[str, StudyLabel]:
    """Read labels.csv into ``{StudyInstanceUID: StudyLabel}``; raise :class:`LabelsError` naming the bad row."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"labels file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:  # "-sig": spreadsheet exports start with a BOM
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise LabelsError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(columns) or 'none'}")
        labels: dict[str, StudyLabel] = {}
        for row_number, row in enumerate(reader, start=2):
            uid = (row.get("StudyInstanceUID") or "").strip()
            if not uid:
                raise LabelsError(f"{path}: row {row_number}: empty StudyInstanceUID")
            if uid in labels:
                raise LabelsError(f"{path}: row {row_number}: StudyInstanceUID listed twice")
            diagnosis_text = (row.get("diagnosis") or "").strip()
            if diagnosis_text and diagnosis_text not in DIAGNOSES:
                raise LabelsError(f"{path}: row {row_number}: diagnosis {diagnosis_text!r} is not one of {', '.join(DIAGNOSES)}")
            severe = _optional_float(row.get("severe"), path=path, row=row_number, column="severe")
            if severe is not None and severe not in (0.0, 1.0):
                raise LabelsError(f"{path}: row {row_number}: severe must be 0 or 1, got {severe}")
            time_days = _optional_float(row.get("time_days"), path=path, row=row_number, column="time_days")
            if time_days is not None and time_days < 0:
                raise LabelsError(f"{path}: row {row_number}: time_days must be >= 0, got {time_days}")
            sex = (row.get("sex") or "").strip() or None
            labels[uid] = StudyLabel(
                diagnosis=DIAGNOSES.index(diagnosis_text) if diagnosis_text else None,
                severe=None if severe is None else int(severe),
                time_days=time_days,
                age=_optional_float(row.get("age"), path=path, row=row_number, column="age"),
                sex=sex,
            )
    return labels

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


# --- clinician feedback as labels (issue #21) --------------------------------------------------------------------

#: What wins when a clinician's feedback and labels.csv give a training study different diagnoses
#: (site env FEEDBACK_CONFLICT): ``labels`` (default; the conflict is counted) or ``feedback``.
FEEDBACK_CONFLICT_RULES = ("labels", "feedback")
#: The review page's database table (``inference.review_store``), read here without the review code.
_FEEDBACK_QUERY = (
    "SELECT study_key, verdict, corrected_diagnosis, model_finding, study_uid, reader, created_utc, model_version "
    "FROM feedback f WHERE rowid = (SELECT max(rowid) FROM feedback g WHERE g.study_key = f.study_key)"
)


@dataclass(frozen=True)
class FeedbackSetting:
    """A site's opt-in to clinician feedback as training labels: the review page's ``feedback.sqlite`` and the rule
    when feedback and labels.csv disagree (:data:`FEEDBACK_CONFLICT_RULES`)."""

    db: Path
    conflict: str = "labels"

    def __post_init__(self) -> None:
        if self.conflict not in FEEDBACK_CONFLICT_RULES:
            raise ValueError(
                f"feedback conflict rule {self.conflict!r} is not one of {', '.join(FEEDBACK_CONFLICT_RULES)}"
            )


@dataclass(frozen=True)
class FeedbackLabel:
    """The diagnosis a clinician's latest review of a study gives it, with its provenance."""

    study_key: str
    study_uid: str
    diagnosis: int
    verdict: str
    reader: str
    created_utc: str
    model_version: str


@dataclass(frozen=True)
class FeedbackCounts:
    """What feedback did to a site's training studies (aggregate counts only)."""

    #: training studies whose diagnosis label comes from feedback (none in labels.csv, or feedback wins a conflict)
    used: int = 0
    #: training studies where feedback and labels.csv give different diagnoses
    conflicts: int = 0


def read_feedback_labels(db: Path) -> list[FeedbackLabel]:
    """The labels the review page's feedback gives, one per study (its latest review): *agree* confirms the model's
    finding, *disagree* with a corrected diagnosis gives that one, *disagree* without one gives none. Rows made before
    the provenance columns existed (no model finding recorded) give none. No database: no labels."""
    import sqlite3
    from contextlib import closing

    if not Path(db).is_file():
        return []
    try:
        with closing(sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True, timeout=10)) as con:
            rows = con.execute(_FEEDBACK_QUERY).fetchall()
    except sqlite3.Error as exc:
        raise LabelsError(f"{db}: the feedback database cannot be read ({exc})") from exc
    out = []
    for key, verdict, corrected, finding, uid, reader, created, version in rows:
        diagnosis = finding if verdict == "agree" else corrected if verdict == "disagree" else ""
        if diagnosis in DIAGNOSES:
            out.append(FeedbackLabel(key, uid or "", DIAGNOSES.index(diagnosis), verdict, reader, created, version))
    return out


def merge_feedback(
    studies: tuple, feedback: list[FeedbackLabel], *, conflict: str = "labels"
) -> tuple[tuple, FeedbackCounts]:
    """Training studies (``ingest.StudyEntry``) with feedback labels applied, and the counts.

    A review belongs to a study by its StudyInstanceUID (``series["StudyInstanceUID"]``) or, for feedback without
    one, by the study's keyed pseudonym (``fedct predict --site-dir`` names result folders by it). Only the ``train``
    split takes feedback labels: validation and test keep labels.csv, so the model is not judged by labels it
    suggested. A study without a diagnosis takes the feedback's; one whose diagnosis differs is a conflict, decided by
    ``conflict`` (``labels``: labels.csv wins; ``feedback``: the clinician's diagnosis)."""
    if conflict not in FEEDBACK_CONFLICT_RULES:
        raise ValueError(f"feedback conflict rule {conflict!r} is not one of {', '.join(FEEDBACK_CONFLICT_RULES)}")
    from dataclasses import replace

    by_uid = {f.study_uid: f for f in feedback if f.study_uid}
    by_key = {f.study_key: f for f in feedback}
    used = conflicts = 0
    out = []
    for study in studies:
        label = by_uid.get(str(study.series.get("StudyInstanceUID", ""))) or by_key.get(study.id)
        if study.split != "train" or label is None or label.diagnosis == study.diagnosis:
            out.append(study)
            continue
        if study.diagnosis is not None:
            conflicts += 1
            if conflict == "labels":
                out.append(study)
                continue
        used += 1
        out.append(replace(study, diagnosis=label.diagnosis))
    return tuple(out), FeedbackCounts(used=used, conflicts=conflicts)

"""The review page's data: the results folder written by ``fedct predict`` (studies, refused inputs) and the
clinicians' feedback store (SQLite, local to the site). No HTML, no HTTP: :mod:`inference.review_pages` renders,
:mod:`inference.review` serves."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.local_identity import HIDDEN, LocalIdentity, load_local_identity

__all__ = [
    "ALLOWED_VERDICTS",
    "DEFAULT_DB_NAME",
    "MAX_COMMENT_CHARS",
    "MAX_READER_CHARS",
    "Feedback",
    "FeedbackStore",
    "Study",
    "find_study",
    "inside_folder",
    "list_studies",
    "read_refused",
    "valid_segment",
]

#: Verdicts a clinician can record.
ALLOWED_VERDICTS = ("agree", "disagree")
#: Longest comment accepted (characters, after normalising line ends).
MAX_COMMENT_CHARS = 2000
#: Longest reader name accepted.
MAX_READER_CHARS = 100
DEFAULT_DB_NAME = "feedback.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    study_key   TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree')),
    comment     TEXT NOT NULL DEFAULT '',
    created_utc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_study ON feedback (study_key);
"""
#: Provenance columns added for clinician feedback as labels (issue #21): a database made before them is migrated
#: (ALTER TABLE ... ADD COLUMN); its older rows have them empty and are never used as labels.
_PROVENANCE_COLUMNS = (
    "corrected_diagnosis",  # the reader's diagnosis when disagreeing (one of the model's classes), or ''
    "reader",  # the name the reader entered, else the account that runs the review page
    "model_version",  # registry version of the model that made the prediction ('' when not registered)
    "model_sha256",  # its content SHA-256
    "study_uid",  # StudyInstanceUID of the study (site-local; maps the feedback to the training study)
    "model_finding",  # the model's most likely finding when the feedback was given
)


# ---------------------------------------------------------------------------------------------------------------
# Results folder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Study:
    """One study folder of the results folder, with what its prediction.json says (tolerant of gaps)."""

    key: str  # the folder name; used in URLs and as the feedback key
    folder: Path
    prediction: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # prediction.json unreadable

    @property
    def identifiers_hidden(self) -> bool:
        """Whether the results were written as a research copy (the local identifiers left out)."""
        return self.prediction.get("local_identifiers") == HIDDEN

    def identity(self) -> LocalIdentity | None:
        """The study's local identifiers (site-local ``local_identity.json``); None on a research copy or without one."""
        if self.identifiers_hidden:
            return None
        return load_local_identity(self.folder)

    @property
    def has_report(self) -> bool:
        return (self.folder / "report.html").is_file()

    def overlays(self) -> list[str]:
        """Overlay images as paths relative to the study folder: those prediction.json names, else *.png."""
        found: list[str] = []
        listed = self.prediction.get("overlays")
        if isinstance(listed, list):
            for entry in listed:
                rel = _relative_in_folder(self.folder, entry)
                if rel is not None and rel not in found:
                    found.append(rel)
        if not found:
            found = sorted(p.name for p in self.folder.glob("*.png") if inside_folder(self.folder, p) and p.is_file())
        return found


def inside_folder(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` (symlinks resolved) lies inside ``folder`` (resolved)."""
    try:
        return candidate.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
    except (OSError, RuntimeError):
        return False


def _relative_in_folder(folder: Path, entry: Any) -> str | None:
    """An overlay entry (file name, path relative to the study or results folder, or absolute) as a path
    relative to ``folder``, or None when it is not a file inside it."""
    if not isinstance(entry, str) or not entry.strip():
        return None
    raw = Path(entry)
    candidates = [raw] if raw.is_absolute() else [folder / raw, folder / raw.name]
    for candidate in candidates:
        if candidate.is_file() and inside_folder(folder, candidate):
            return candidate.resolve().relative_to(folder.resolve()).as_posix()
    return None


def valid_segment(segment: str) -> bool:
    """Whether one URL path segment may name a study or file (no traversal, no separators, no NUL)."""
    return bool(segment) and segment not in (".", "..") and not any(c in segment for c in "/\\\0")


def find_study(results_dir: Path, key: str) -> Study | None:
    """The study folder ``key`` (a plain folder with a prediction.json, not a symlink), or None."""
    if not valid_segment(key) or key.startswith("."):
        return None
    folder = results_dir / key
    if folder.is_symlink() or not folder.is_dir() or not (folder / "prediction.json").is_file():
        return None
    study = Study(key=key, folder=folder)
    try:
        data = json.loads((folder / "prediction.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        study.prediction = data
    except (OSError, ValueError) as exc:
        study.error = f"The prediction file could not be read ({type(exc).__name__})."
    return study


def list_studies(results_dir: Path) -> list[Study]:
    studies = []
    try:
        entries = sorted(results_dir.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    for entry in entries:
        study = find_study(results_dir, entry.name)
        if study is not None:
            studies.append(study)
    return studies


def read_refused(results_dir: Path) -> list[dict[str, str]]:
    """The studies the prediction step refused, from summary.json (absent or unreadable: none)."""
    try:
        data = json.loads((results_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    refused = data.get("refused") if isinstance(data, dict) else None
    if not isinstance(refused, list):
        return []
    rows = []
    for item in refused:
        if isinstance(item, dict):
            rows.append({k: str(item.get(k, "") or "") for k in ("path", "reason", "message")})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Feedback store
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """One review: the verdict and comment, and its provenance (who, when (UTC), which model, which study)."""

    study_key: str
    verdict: str
    comment: str
    created_utc: str
    corrected_diagnosis: str = ""
    reader: str = ""
    model_version: str = ""
    model_sha256: str = ""
    study_uid: str = ""
    model_finding: str = ""


_COLUMNS = "study_key, verdict, comment, created_utc, " + ", ".join(_PROVENANCE_COLUMNS)


class FeedbackStore:
    """Append-only feedback history in SQLite; the latest row of a study is its current review."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as con, con:
                con.executescript(_SCHEMA)
                present = {row[1] for row in con.execute("PRAGMA table_info(feedback)")}
                for column in _PROVENANCE_COLUMNS:
                    if column not in present:
                        con.execute(f"ALTER TABLE feedback ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the feedback database {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def add(
        self,
        study_key: str,
        verdict: str,
        comment: str,
        *,
        corrected_diagnosis: str = "",
        reader: str = "",
        model_version: str = "",
        model_sha256: str = "",
        study_uid: str = "",
        model_finding: str = "",
    ) -> Feedback:
        """Append one review with its provenance (the time is now, UTC). ValueError for a verdict other than
        agree/disagree, or a corrected diagnosis given with *agree* or equal to the model's finding."""
        if verdict not in ALLOWED_VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(ALLOWED_VERDICTS)}, got {verdict!r}")
        if corrected_diagnosis and verdict != "disagree":
            raise ValueError("a corrected diagnosis goes with a disagreement")
        if corrected_diagnosis and corrected_diagnosis == model_finding:
            raise ValueError("the corrected diagnosis is the model's own finding: choose another one, or agree")
        row = Feedback(
            study_key,
            verdict,
            comment,
            datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            corrected_diagnosis,
            reader,
            model_version,
            model_sha256,
            study_uid,
            model_finding,
        )
        with closing(self._connect()) as con, con:
            con.execute(
                f"INSERT INTO feedback ({_COLUMNS}) VALUES ({', '.join('?' * 10)})",
                tuple(getattr(row, f) for f in _COLUMNS.split(", ")),
            )
        return row

    def history(self, study_key: str) -> list[Feedback]:
        """All feedback of a study, newest first."""
        with closing(self._connect()) as con:
            rows = con.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE study_key = ? ORDER BY rowid DESC",
                (study_key,),
            ).fetchall()
        return [Feedback(*r) for r in rows]

    def latest_all(self) -> dict[str, Feedback]:
        """The latest feedback of every study that has one."""
        with closing(self._connect()) as con:
            rows = con.execute(
                f"SELECT {_COLUMNS} FROM feedback f WHERE rowid = "
                "(SELECT max(rowid) FROM feedback g WHERE g.study_key = f.study_key)"
            ).fetchall()
        return {r[0]: Feedback(*r) for r in rows}

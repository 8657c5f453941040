"""Local identifiers: the accession number, patient name and patient ID that let a reader at the site find the patient.

They are read at prediction time from the chosen series' own DICOM header (those three attributes and nothing else)
into a :class:`LocalIdentity`, and written only into the site-local outputs a clinician reads: the study's
``local_identity.json`` (which the review page shows), the HTML report, and the DICOM SR / Secondary Captures that go
back to the same hospital's PACS. They are never written into ``prediction.json``, ``summary.json``, folder or file
names, or messages; nothing the federated client sends comes near them.

A *research copy* is a results folder written with the identifiers off (``fedct predict --no-local-identifiers``, or
``FEDCT_LOCAL_IDENTIFIERS=no`` in the site env file): then nothing identifying is read or written, and the pages say
:data:`inference.wording.IDENTIFIERS_HIDDEN`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedct import envfile
from fedct.files import atomic_write_bytes
from preprocessing.discover import read_dicom

__all__ = [
    "ATTRIBUTES",
    "ENV_KEY",
    "HIDDEN",
    "LOCAL_IDENTITY_NAME",
    "SHOWN",
    "LocalIdentity",
    "identifiers_setting",
    "load_local_identity",
    "read_local_identity",
    "write_local_identity",
]

#: The study folder's site-local file holding the identifiers (never part of what a site shares).
LOCAL_IDENTITY_NAME = "local_identity.json"
#: The DICOM attributes read, in the order they are shown.
ATTRIBUTES = ("AccessionNumber", "PatientName", "PatientID")
#: Site env file key: ``no`` makes every prediction a research copy (``yes``, the default, shows the identifiers).
ENV_KEY = "FEDCT_LOCAL_IDENTIFIERS"
#: Values of ``prediction.json``'s ``local_identifiers``: whether the site-local identifiers were kept or left out.
SHOWN, HIDDEN = "site-local", "hidden"

_YES = ("yes", "true", "on", "1")
_NO = ("no", "false", "off", "0")


@dataclass(frozen=True)
class LocalIdentity:
    """The three identifiers of one study as its DICOM header holds them ("" when absent); ``repr`` hides them, so a
    traceback or log line that prints the object carries no patient data."""

    AccessionNumber: str = field(default="", repr=False)
    PatientName: str = field(default="", repr=False)  # DICOM PN as stored, e.g. ``DOE^JANE``
    PatientID: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"LocalIdentity.{name} must be a string, got {type(getattr(self, name)).__name__}")

    @property
    def display_name(self) -> str:
        """The patient name for people: ``DOE, JANE`` from ``DOE^JANE`` (family, given middle; prefix and suffix kept)."""
        parts = [p.strip() for p in self.PatientName.split("=")[0].split("^")] + [""] * 5
        family, given, middle, prefix, suffix = parts[:5]
        first = " ".join(p for p in (prefix, given, middle) if p)
        name = ", ".join(p for p in (family, first) if p)
        return f"{name} {suffix}".strip() if suffix else name

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) as the pages show them; a value the header lacks is ``not recorded``."""
        values = (self.AccessionNumber.strip(), self.display_name, self.PatientID.strip())
        labels = ("Accession number", "Patient name", "Patient ID")
        return [(label, value or "not recorded") for label, value in zip(labels, values)]

    def redact(self, text: str) -> str:
        """``text`` with every identifier (and each part of the name) replaced by ``[identifier]``: for messages that
        go into shared files or logs, e.g. a library's error quoting an attribute value."""
        parts = {self.AccessionNumber, self.PatientID, self.PatientName}
        parts |= {p for chunk in self.PatientName.split("=") for p in chunk.split("^")}
        for value in sorted((p.strip() for p in parts if len(p.strip()) >= 2), key=len, reverse=True):
            text = text.replace(value, "[identifier]")
        return text

    def to_dict(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def read_local_identity(path: str | Path) -> LocalIdentity:
    """The identifiers in the header of one DICOM file of the series (the three attributes, nothing else)."""
    ds = read_dicom(path, stop_before_pixels=True)
    return LocalIdentity(**{name: _text(ds.get(name)) for name in ATTRIBUTES})


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def write_local_identity(identity: LocalIdentity, study_dir: Path) -> Path:
    """Write ``study_dir/local_identity.json`` (site-local: read by the review page); return its path."""
    path = Path(study_dir) / LOCAL_IDENTITY_NAME
    data = {**identity.to_dict(), "note": "site-local: patient identifiers for readers at this site; never shared"}
    atomic_write_bytes(path, json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8"))
    return path


def load_local_identity(study_dir: Path) -> LocalIdentity | None:
    """The identifiers stored in a study folder; None when there is no (readable) ``local_identity.json``."""
    path = Path(study_dir) / LOCAL_IDENTITY_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LocalIdentity(**{name: str(data.get(name) or "") for name in ATTRIBUTES})
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def identifiers_setting(*, no_local_identifiers: bool = False, env_file: Path | None = None) -> bool:
    """Whether predict reads and writes the local identifiers: not with ``no_local_identifiers`` (the command-line
    switch), else ``FEDCT_LOCAL_IDENTIFIERS`` of the site env file when one is given (yes/no), else yes.

    Raises ValueError naming the file and the value when the key holds something else.
    """
    if no_local_identifiers:
        return False
    if env_file is None:
        return True
    values = envfile.read_env_lines(Path(env_file))
    if ENV_KEY not in values:
        return True
    entry = values[ENV_KEY]
    value = entry.value.strip().lower()
    if value in _YES:
        return True
    if value in _NO:
        return False
    raise ValueError(
        f"{env_file}: line {entry.line}: {ENV_KEY}={entry.value!r} must be yes or no "
        "(no: a research copy, without accession number, patient name and ID)"
    )

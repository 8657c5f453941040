"""The pull's local store: ``DEST/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, one file per instance.

Each instance is written under a temporary name and renamed into place as it arrives, so a file that exists is
complete, an interrupted pull resumes from what is on disk, and nothing in DEST is ever deleted or overwritten
(only ``.part`` leftovers of an interrupted run). UIDs are checked before they become file names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preprocessing.pacs.settings import PacsError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass(frozen=True)
class SeriesRef:
    """One series at the PACS."""

    study_uid: str
    series_uid: str


class InstanceStore:
    """``DEST/<study>/<series>/<sop>.dcm``; counts what this run wrote."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.written = 0
        self.bytes = 0

    def path(self, ref: SeriesRef, sop_uid: str) -> Path:
        """Where an instance lives (UIDs are checked: a PACS cannot make us write outside DEST)."""
        for uid in (ref.study_uid, ref.series_uid, sop_uid):
            if not _UID.fullmatch(uid) or len(uid) > 64:
                raise PacsError(f"the PACS sent an invalid UID {uid[:70]!r}; refusing to use it as a file name")
        return self.root / ref.study_uid / ref.series_uid / f"{sop_uid}.dcm"

    def has(self, ref: SeriesRef, sop_uid: str) -> bool:
        """True when the instance is on disk (complete: files appear only by atomic rename)."""
        return self.path(ref, sop_uid).is_file()

    def write(self, ref: SeriesRef, sop_uid: str, write: Callable[[Path], None]) -> None:
        """Write one instance through ``write(tmp_path)``, then rename it into place; an existing file is kept."""
        path = self.path(ref, sop_uid)
        if path.is_file():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            write(tmp)
            size = tmp.stat().st_size
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.written += 1
        self.bytes += size

    def remove_partials(self) -> None:
        """Delete ``.part`` files an interrupted run left behind (never a complete instance)."""
        for stale in self.root.rglob(".*.dcm.part"):
            stale.unlink(missing_ok=True)

"""Push: store DICOM files at the PACS, one request (STOW-RS) or association (C-STORE) per study.

Files are grouped by their StudyInstanceUID so the PACS files them with their study; objects with deterministic
UIDs replace rather than duplicate what an earlier push stored. Transient failures are retried (:mod:`.retry`);
anything else is a :class:`~preprocessing.pacs.settings.PacsError` naming the PACS and what to check.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from preprocessing.pacs.connection import connect
from preprocessing.pacs.retry import with_retries
from preprocessing.pacs.settings import PacsSettings


@dataclass(frozen=True)
class PushResult:
    """What was stored: ``instances`` files of ``studies`` studies at ``url``."""

    url: str
    studies: int
    instances: int
    seconds: float


def push_files(
    settings: PacsSettings, files: Sequence[Path], *, sleep: Callable[[float], None] = time.sleep
) -> PushResult:
    """Store ``files`` at the PACS (STOW-RS per study, or C-STORE); raise :class:`PacsError` naming what to check.

    A file that is not DICOM raises ``ValueError`` naming it, before anything is sent.
    """
    import pydicom

    t0 = time.perf_counter()
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            by_study[str(header.StudyInstanceUID)].append(path)
        except Exception as exc:
            raise ValueError(f"{path}: not a DICOM result file ({type(exc).__name__}: {exc})") from exc
    pacs = with_retries(settings, "connecting", lambda: connect(settings), sleep=sleep)
    for number, (study_uid, paths) in enumerate(sorted(by_study.items()), start=1):
        what = f"storing the results of study {number} of {len(by_study)} ({len(paths)} instances)"
        with_retries(settings, what, lambda study_uid=study_uid, paths=paths: pacs.store(study_uid, paths), sleep=sleep)
    return PushResult(settings.url, len(by_study), len(files), round(time.perf_counter() - t0, 2))

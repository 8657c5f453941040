"""Which results ``fedct predict --push`` stores in the PACS, and what it prints; the storing itself is
:func:`preprocessing.pacs.push_files` (STOW-RS or C-STORE, with the pull's settings, retries and error messages).

The files are those :mod:`inference.dicom_export` writes (``OUT/<study>/sr.dcm``, ``sc_NN.dcm``): they carry the
source study's StudyInstanceUID, so the PACS files them with the study, and deterministic UIDs, so pushing again
replaces rather than duplicates.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

from preprocessing.pacs import PacsError, PacsSettings, explain, push_files

_RESULT_FILE = re.compile(r"^(sr|sc_\d+)\.dcm$")


def result_files(results_dir: Path, study_keys: Iterable[str] | None = None) -> list[Path]:
    """The SR and Secondary Capture files under ``results_dir`` (of ``study_keys`` only, when given), in order."""
    results_dir = Path(results_dir)
    folders = [results_dir / key for key in study_keys] if study_keys is not None else sorted(results_dir.iterdir())
    return [p for folder in folders if folder.is_dir() for p in sorted(folder.iterdir()) if _RESULT_FILE.match(p.name)]


def push_results(settings: PacsSettings, out_dir: Path, study_keys: Iterable[str] | None = None) -> int:
    """Push the DICOM results under ``out_dir`` (of ``study_keys``, e.g. this predict run's); print; return the exit code."""
    files = result_files(out_dir, study_keys)
    if not files:
        print("fedct predict: nothing to push (no SR/Secondary Capture was written)", file=sys.stderr)
        return 0
    try:
        result = push_files(settings, files)
    except (PacsError, ValueError, OSError) as exc:
        error = (
            exc
            if isinstance(exc, (PacsError, ValueError))
            else explain(exc, settings, what="storing results", attempts=1)
        )
        print(f"fedct predict: error: results are in {out_dir} but were not pushed: {error}", file=sys.stderr)
        return 2
    print(
        f"pushed {result.instances} DICOM result(s) of {result.studies} study(ies) to PACS {result.url} in {result.seconds} s"
    )
    return 0

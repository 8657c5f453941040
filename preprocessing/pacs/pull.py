"""Pull: find the CT series at the PACS and retrieve them into the site's folder, resumable and bounded in memory.

Every instance is written to ``DEST/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` as it arrives
(:mod:`.store`); a second run lists the instances of each series and fetches only those not on disk (a series with
nothing on disk comes in one streamed request). Transient failures are retried (:mod:`.retry`); a series that broke
off mid-stream resumes from what was written. Nothing in DEST is ever deleted or overwritten.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preprocessing.pacs.connection import Query, connect
from preprocessing.pacs.retry import with_retries
from preprocessing.pacs.settings import PacsError, PacsSettings
from preprocessing.pacs.store import InstanceStore, SeriesRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullResult:
    """What a pull found and did. ``fetched`` instances were written by this run; ``present`` were already on disk."""

    url: str
    folder: Path
    studies: int
    series: int
    instances: int
    fetched: int
    present: int
    bytes_written: int
    seconds: float


def pull(
    settings: PacsSettings,
    dest: Path,
    *,
    query: Query | None = None,
    progress: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> PullResult:
    """Retrieve every series matching ``query`` into ``dest``, fetching only instances not already there.

    Raises :class:`PacsError` (naming the PACS and what to check) when the PACS refuses or stays unreachable;
    everything written before that stays in ``dest`` for the next run.
    """
    t0 = time.perf_counter()
    query = query or Query(modality=settings.modality, study_date=settings.study_date)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not os.access(dest, os.W_OK):
        raise PermissionError(f"PACS download folder is not writable: {dest}")
    store = InstanceStore(dest)
    store.remove_partials()
    pacs = with_retries(settings, "connecting", lambda: connect(settings), sleep=sleep)
    refs = with_retries(settings, "the series search (QIDO-RS / C-FIND)", lambda: pacs.find_series(query), sleep=sleep)
    if (query.study_uids or query.accession_numbers) and not refs:
        log.warning(
            "PACS %s: none of the %d studies of the labels file has a %s series",
            settings.url,
            len(query.study_uids or query.accession_numbers),
            query.modality,
        )
    total = present = 0
    bar = _progress(len(refs), progress)
    for number, ref in enumerate(refs, start=1):
        what = f"series {number} of {len(refs)}"
        sop_uids = with_retries(
            settings, f"the instance list of {what}", lambda ref=ref: pacs.list_instances(ref), sleep=sleep
        )
        total += len(sop_uids)
        present += sum(store.has(ref, uid) for uid in sop_uids)

        def fetch_missing(ref: SeriesRef = ref, sop_uids: list[str] = sop_uids, what: str = what) -> None:
            missing = [uid for uid in sop_uids if not store.has(ref, uid)]
            if missing:  # a series with nothing on disk comes in one streamed request
                pacs.fetch(ref, None if len(missing) == len(sop_uids) else missing, store)
            still = sum(not store.has(ref, uid) for uid in sop_uids)
            if still:
                raise PacsError(
                    f"PACS {settings.url}: {what}: {still} of {len(sop_uids)} instances listed but not sent; "
                    "check the PACS log (storage to this site's AE title, transfer syntaxes)"
                )

        with_retries(settings, f"retrieving {what} (WADO-RS / C-GET / C-MOVE)", fetch_missing, sleep=sleep)
        bar(number)
    return PullResult(
        url=settings.url,
        folder=dest,
        studies=len({r.study_uid for r in refs}),
        series=len(refs),
        instances=total,
        fetched=store.written,
        present=present,
        bytes_written=store.bytes,
        seconds=round(time.perf_counter() - t0, 2),
    )


def _progress(total: int, enabled: bool) -> Callable[[int], None]:
    if not enabled:
        return lambda n: None
    return lambda n: print(
        f"\r  pulled {n}/{total} series", end="\n" if n == total else "", file=sys.stderr, flush=True
    )

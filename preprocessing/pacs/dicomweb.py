"""DICOMweb with ``dicomweb-client``: QIDO-RS search and WADO-RS retrieval (pull), STOW-RS storage (push).

One ``requests`` session per connection carries the basic-auth credentials and the CA bundle of an https PACS
(``FEDCT_PACS_CA_FILE``); the client's own retries are off: one retry policy for both protocols, in :mod:`.retry`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from preprocessing.pacs.connection import Query
from preprocessing.pacs.settings import PacsError, PacsSettings, endpoint
from preprocessing.pacs.store import InstanceStore, SeriesRef


def _json_value(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return None if values[0] is None else str(values[0])


class DicomWebConnection:
    """QIDO-RS + WADO-RS (pull) and STOW-RS (push) with ``dicomweb-client``."""

    def __init__(self, settings: PacsSettings) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if settings.user is not None:
            session.auth = (settings.user, settings.password or "")
        if settings.ca_file is not None:
            session.verify = str(settings.ca_file)
        self.client = DICOMwebClient(endpoint(settings.url).url, session=session, timeout=settings.timeout_s)
        self.client.set_http_retry_params(retry=False)  # one retry policy for both protocols: with_retries
        self.settings = settings

    def find_series(self, query: Query) -> list[SeriesRef]:
        """QIDO-RS series search: one per study key, or one for the whole modality/date query."""
        filters: dict[str, str] = {"Modality": query.modality}
        if query.study_date:
            filters["StudyDate"] = query.study_date
        searches: list[dict[str, Any]] = []
        if query.study_uids:
            searches = [{"study_instance_uid": uid} for uid in query.study_uids]
        elif query.accession_numbers:
            searches = [{"search_filters": {**filters, "AccessionNumber": a}} for a in query.accession_numbers]
        else:
            searches = [{}]
        refs: dict[tuple[str, str], SeriesRef] = {}
        for search in searches:
            found = self.client.search_for_series(
                study_instance_uid=search.get("study_instance_uid"),
                search_filters=search.get("search_filters", filters),
                fields=["StudyInstanceUID", "SeriesInstanceUID", "Modality"],
                get_remaining=True,
            )
            for item in found:
                study, series = _json_value(item, "0020000D"), _json_value(item, "0020000E")
                if study and series:
                    refs[(study, series)] = SeriesRef(study, series)
        return list(refs.values())

    def list_instances(self, ref: SeriesRef) -> list[str]:
        """QIDO-RS instance search of one series: the SOP Instance UIDs."""
        found = self.client.search_for_instances(
            ref.study_uid, ref.series_uid, fields=["SOPInstanceUID"], get_remaining=True
        )
        return [uid for uid in (_json_value(item, "00080018") for item in found) if uid]

    def fetch(self, ref: SeriesRef, sop_uids: Sequence[str] | None, store: InstanceStore) -> None:
        """WADO-RS: the whole series as one streamed reply (``sop_uids`` None), else instance by instance.

        Instances are requested in their stored transfer syntax and written as they arrive.
        """
        any_syntax = (("application/dicom", "*"),)
        if sop_uids is None:
            datasets: Iterable[Any] = self.client.iter_series(ref.study_uid, ref.series_uid, media_types=any_syntax)
        else:
            datasets = (
                self.client.retrieve_instance(ref.study_uid, ref.series_uid, uid, media_types=any_syntax)
                for uid in sop_uids
            )
        for ds in datasets:
            store.write(ref, str(ds.SOPInstanceUID), lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))

    def store(self, study_uid: str, paths: Sequence[Path]) -> None:
        """STOW-RS of one study's files in one request; a failed SOP instance in the reply is an error."""
        import pydicom

        reply = self.client.store_instances([pydicom.dcmread(p) for p in paths], study_instance_uid=study_uid)
        failed = reply.get("FailedSOPSequence", []) if reply is not None else []
        if failed:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
            raise PacsError(
                f"PACS {self.settings.url} refused {len(failed)} of {len(paths)} result instances (failure reasons "
                f"{', '.join(reasons)}): check that the PACS accepts SR and Secondary Capture objects"
            )

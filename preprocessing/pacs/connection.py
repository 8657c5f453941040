"""One connection to the site's PACS, whatever its protocol: the pull's search and retrieval and the push's storage.

The URL picks the transport (:func:`connect`): ``http(s)://`` is DICOMweb (:mod:`.dicomweb`), ``dicom://`` is DIMSE
(:mod:`.dimse`). Opening a connection checks nothing on the network; every call below is one request (or one
association) that :func:`~preprocessing.pacs.retry.with_retries` may repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from preprocessing.pacs.settings import PacsSettings, endpoint
from preprocessing.pacs.store import InstanceStore, SeriesRef


@dataclass(frozen=True)
class Query:
    """What to pull: a modality, an optional study date range, optional study keys (from the labels file)."""

    modality: str = "CT"
    study_date: str | None = None
    study_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()


class Connection(Protocol):
    """A PACS that can be searched and retrieved from (pull) and stored to (push)."""

    settings: PacsSettings

    def find_series(self, query: Query) -> list[SeriesRef]:
        """The series matching ``query``."""
        ...

    def list_instances(self, ref: SeriesRef) -> list[str]:
        """The SOP Instance UIDs of one series."""
        ...

    def fetch(self, ref: SeriesRef, sop_uids: Sequence[str] | None, store: InstanceStore) -> None:
        """Retrieve the whole series (``sop_uids`` None) or those instances into ``store``, each as it arrives."""
        ...

    def store(self, study_uid: str, paths: Sequence[Path]) -> None:
        """Store the DICOM files ``paths`` of one study at the PACS; raise when any of them is refused."""
        ...


def connect(settings: PacsSettings) -> Connection:
    """The :class:`Connection` for the PACS URL's protocol."""
    from preprocessing.pacs.dicomweb import DicomWebConnection
    from preprocessing.pacs.dimse import DimseConnection

    return DicomWebConnection(settings) if endpoint(settings.url).kind == "dicomweb" else DimseConnection(settings)

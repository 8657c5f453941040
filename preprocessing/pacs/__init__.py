"""The site's PACS, both ways: pull CT series into the site's folder (``fedct ingest --pacs``) and push the DICOM
results back (``fedct predict --push``), over DICOMweb or DIMSE with one connection per PACS.

The URL picks the protocol (:func:`connect`):

- ``http(s)://host/dicom-web`` — DICOMweb with ``dicomweb-client`` (:mod:`.dicomweb`): QIDO-RS finds series and
  instances, WADO-RS retrieves them (a whole series as one streamed multipart reply, or single instances), STOW-RS
  stores results;
- ``dicom://AET@host:port`` — DIMSE with ``pynetdicom`` (:mod:`.dimse`): C-FIND (study, series, image level) and
  C-GET, or C-MOVE to this site's own storage SCP when ``FEDCT_PACS_MOVE_PORT`` is set (for PACS without C-GET);
  C-STORE stores results.

Modules: :mod:`.settings` (``FEDCT_PACS_*`` from the site env file, checked before anything connects),
:mod:`.retry` (transient failures retried with exponential backoff; clear errors), :mod:`.connection` (the
:class:`Connection` both transports implement), :mod:`.store` (the pull's resumable on-disk store), :mod:`.pull`,
:mod:`.push`, :mod:`.cli` (the ``fedct`` options).

Retrieval is resumable and bounded in memory: every instance is written to
``DEST/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (via a temporary name) as it arrives, and a
second run lists the instances of each series and fetches only those not on disk. Nothing in DEST is ever deleted or
overwritten. Credentials stay safe: they come only from the site env file (never a URL); basic auth over plain
``http://`` is refused unless ``FEDCT_PACS_ALLOW_PLAIN_HTTP=yes``; a password file that group or others may access is
refused; DIMSE runs over TLS when ``FEDCT_PACS_TLS_CA`` is set; the C-MOVE storage SCP listens only on
``FEDCT_PACS_LISTEN_ADDRESS`` (default 127.0.0.1). No password, patient identifier or UID is logged.
"""

from preprocessing.pacs.cli import add_pull_arguments, add_push_arguments, pull_for_ingest, push_settings
from preprocessing.pacs.connection import Connection, Query, connect
from preprocessing.pacs.dicomweb import DicomWebConnection
from preprocessing.pacs.dimse import DimseConnection, dimse_server_tls, dimse_tls_args
from preprocessing.pacs.pull import PullResult, pull
from preprocessing.pacs.push import PushResult, push_files
from preprocessing.pacs.retry import (
    TRANSIENT_HTTP,
    Refused,
    Transient,
    Unreachable,
    explain,
    is_transient,
    with_retries,
)
from preprocessing.pacs.settings import ENV_KEYS, Endpoint, PacsError, PacsSettings, endpoint, read_pacs_settings
from preprocessing.pacs.store import InstanceStore, SeriesRef

#: The pull-only names these classes had before the push moved in (kept for existing callers).
DicomWebSource = DicomWebConnection
DimseSource = DimseConnection

__all__ = [
    "ENV_KEYS",
    "TRANSIENT_HTTP",
    "Connection",
    "DicomWebConnection",
    "DicomWebSource",
    "DimseConnection",
    "DimseSource",
    "Endpoint",
    "InstanceStore",
    "PacsError",
    "PacsSettings",
    "PullResult",
    "PushResult",
    "Query",
    "Refused",
    "SeriesRef",
    "Transient",
    "Unreachable",
    "add_pull_arguments",
    "add_push_arguments",
    "connect",
    "dimse_server_tls",
    "dimse_tls_args",
    "endpoint",
    "explain",
    "is_transient",
    "pull",
    "pull_for_ingest",
    "push_files",
    "push_settings",
    "read_pacs_settings",
    "with_retries",
]

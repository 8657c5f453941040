"""The site's PACS as a source: find CT series, retrieve them into the site's DICOM folder, then ingest as usual.

Two protocols, chosen by the URL:

- ``http(s)://host/dicom-web`` — DICOMweb with ``dicomweb-client``: QIDO-RS finds series and instances, WADO-RS
  retrieves them (a whole series as one streamed multipart reply, or single instances);
- ``dicom://AET@host:port`` — DIMSE with ``pynetdicom``: C-FIND (study, series, image level) and C-GET, or C-MOVE
  to this site's own storage SCP when ``FEDCT_PACS_MOVE_PORT`` is set (for PACS without C-GET).

Retrieval is resumable and bounded in memory: every instance is written to
``DEST/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (via a temporary name) as it arrives, and a
second run lists the instances of each series and fetches only those not on disk. Transient failures (connection
errors, timeouts, HTTP 429/5xx, DIMSE "out of resources") are retried with exponential backoff; a series that broke
off mid-stream resumes from what was written. Nothing in DEST is ever deleted or overwritten.

Settings, credentials included, come only from the site env file (``KEY=VALUE`` lines, see :data:`ENV_KEYS`);
the URL may also be given on the command line, but never with credentials in it. No password is logged.
Credentials stay safe: basic auth over plain ``http://`` is refused unless ``FEDCT_PACS_ALLOW_PLAIN_HTTP=yes``; a
password file that group or others may access is refused; DIMSE runs over TLS when ``FEDCT_PACS_TLS_CA`` is set
(pynetdicom with an ``ssl`` context, optionally with this site's certificate); the C-MOVE storage SCP listens only on
``FEDCT_PACS_LISTEN_ADDRESS`` (default 127.0.0.1).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fedct import envfile

log = logging.getLogger(__name__)

#: The settings a site env file may hold for its PACS (other keys in the file belong to other parts of the site).
ENV_KEYS = {
    "FEDCT_PACS_URL": "http(s)://host[:port]/dicom-web (DICOMweb) or dicom://CALLED_AET@host:port (DIMSE)",
    "FEDCT_PACS_USER": "HTTP basic-auth user (DICOMweb only)",
    "FEDCT_PACS_PASSWORD_FILE": "file holding the password, one line (relative paths: to the env file's folder)",
    "FEDCT_PACS_AET": "this site's calling AE title for DIMSE (default FEDCT); the PACS must know it",
    "FEDCT_PACS_MODALITY": "modality of the series to pull (default CT)",
    "FEDCT_PACS_STUDY_DATE": "optional study date or range, DICOM style: 20240101-20241231, 20240101-, -20241231",
    "FEDCT_PACS_CA_FILE": "CA bundle (PEM) to verify an https PACS",
    "FEDCT_PACS_MOVE_PORT": "DIMSE: retrieve with C-MOVE to a storage SCP of this site on this port (default: C-GET)",
    "FEDCT_PACS_LISTEN_ADDRESS": "DIMSE C-MOVE: the interface the storage SCP listens on (default 127.0.0.1; the address "
                                 "the PACS reaches this host at, never all interfaces unless set to 0.0.0.0)",
    "FEDCT_PACS_ALLOW_PLAIN_HTTP": "yes to allow basic auth over plain http:// (the password travels readable; default: refused)",
    "FEDCT_PACS_TLS_CA": "DIMSE over TLS: CA bundle (PEM) that signed the PACS's certificate (setting it turns TLS on)",
    "FEDCT_PACS_TLS_CERT": "DIMSE over TLS: this site's certificate (PEM), if the PACS asks for one; also the C-MOVE SCP's",
    "FEDCT_PACS_TLS_KEY": "DIMSE over TLS: the private key (PEM) of FEDCT_PACS_TLS_CERT (keep it mode 0600)",
    "FEDCT_PACS_TIMEOUT_S": "network timeout per request in seconds (default 60)",
    "FEDCT_PACS_RETRIES": "retries of a failed request on transient errors (default 4)",
    "FEDCT_PACS_BACKOFF_S": "first retry delay in seconds, doubled each retry (default 1)",
}
#: HTTP statuses worth retrying: too many requests and server-side failures.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE_RANGE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")
_MAX_BACKOFF_S = 60.0


class PacsError(RuntimeError):
    """The PACS could not be used; the message names the PACS and what to check."""


@dataclass(frozen=True)
class PacsSettings:
    """How this site reaches its PACS (read from the site env file by :func:`read_pacs_settings`)."""

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    calling_aet: str = "FEDCT"
    modality: str = "CT"
    study_date: str | None = None
    ca_file: Path | None = None
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    move_port: int | None = None
    env_file: Path | None = None
    listen_address: str = "127.0.0.1"
    allow_plain_http: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        point = endpoint(self.url)  # validates the URL (scheme, no credentials in it)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"{self._where()}: FEDCT_PACS_TLS_CERT and FEDCT_PACS_TLS_KEY go together (set both or neither)")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError(f"{self._where()}: FEDCT_PACS_TLS_CERT needs FEDCT_PACS_TLS_CA (the CA that signed the PACS)")
        if self.tls_ca is not None and point.kind != "dimse":
            raise ValueError(f"{self._where()}: FEDCT_PACS_TLS_CA is for DIMSE (dicom://); an https PACS uses FEDCT_PACS_CA_FILE")
        if self.tls_ca is not None and self.move_port is not None and self.tls_cert is None:
            raise ValueError(f"{self._where()}: C-MOVE over TLS (FEDCT_PACS_MOVE_PORT with FEDCT_PACS_TLS_CA) needs this site's "
                             f"FEDCT_PACS_TLS_CERT and FEDCT_PACS_TLS_KEY for its storage SCP")  # fmt: skip
        try:
            import ipaddress

            ipaddress.ip_address(self.listen_address)
        except ValueError as exc:
            raise ValueError(f"{self._where()}: FEDCT_PACS_LISTEN_ADDRESS={self.listen_address!r} is not an IP address "
                             f"(the interface the PACS reaches this host at)") from exc  # fmt: skip
        if (self.user is None) != (self.password is None):
            raise ValueError(f"{self._where()}: FEDCT_PACS_USER and FEDCT_PACS_PASSWORD_FILE go together (set both or neither)")
        if self.user is not None and self.url.lower().startswith("http://") and not self.allow_plain_http:
            raise ValueError(f"{self._where()}: basic auth (FEDCT_PACS_USER) over plain http:// would send the password "
                             f"readable to anyone on the network: use https:// (FEDCT_PACS_CA_FILE), or set "
                             f"FEDCT_PACS_ALLOW_PLAIN_HTTP=yes if this link is protected otherwise")  # fmt: skip
        if not re.fullmatch(r"[\x20-\x5b\x5d-\x7e]{1,16}", self.calling_aet) or not self.calling_aet.strip():
            raise ValueError(f"{self._where()}: FEDCT_PACS_AET={self.calling_aet!r} is not an AE title (1-16 characters, no backslash)")
        if not re.fullmatch(r"[A-Z]{2}", self.modality):
            raise ValueError(f"{self._where()}: FEDCT_PACS_MODALITY={self.modality!r} is not a DICOM modality code (e.g. CT)")
        if self.study_date is not None and not (_DATE_RANGE.fullmatch(self.study_date) and self.study_date.strip("-")):
            raise ValueError(f"{self._where()}: FEDCT_PACS_STUDY_DATE={self.study_date!r} is not a date or range (YYYYMMDD-YYYYMMDD)")
        if self.move_port is not None and not 0 < self.move_port < 65536:
            raise ValueError(f"{self._where()}: FEDCT_PACS_MOVE_PORT={self.move_port} is not a TCP port")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError(f"{self._where()}: FEDCT_PACS_TIMEOUT_S must be > 0, FEDCT_PACS_RETRIES and FEDCT_PACS_BACKOFF_S >= 0")

    def _where(self) -> str:
        return f"PACS settings ({self.env_file})" if self.env_file else "PACS settings"

    @property
    def credentials_hint(self) -> str:
        """Where the credentials of this PACS are set, for error messages."""
        where = f" in {self.env_file}" if self.env_file else " (no site env file was given: --pacs-env FILE)"
        return f"FEDCT_PACS_USER and FEDCT_PACS_PASSWORD_FILE{where}"


@dataclass(frozen=True)
class Endpoint:
    """A parsed PACS URL: ``dicomweb`` (``url``) or ``dimse`` (``called_aet``, ``host``, ``port``)."""

    kind: str
    url: str
    host: str
    port: int
    called_aet: str = ""


def endpoint(url: str) -> Endpoint:
    """Parse a PACS URL; refuse credentials in it (they belong in the site env file) and unknown schemes."""
    parts = urlsplit(url)
    try:
        parts.port
    except ValueError as exc:
        raise ValueError(f"PACS URL {url!r}: the port is not a number from 1 to 65535") from exc
    if parts.password is not None or (parts.scheme in ("http", "https") and parts.username is not None):
        raise ValueError(
            "PACS URL must not contain credentials (command lines and logs are readable by others): "
            "put them in the site env file (FEDCT_PACS_USER, FEDCT_PACS_PASSWORD_FILE)"
        )
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise ValueError(f"PACS URL {url!r} has no host")
        return Endpoint("dicomweb", url.rstrip("/"), parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    if parts.scheme == "dicom":
        if not parts.username or not parts.hostname or parts.port is None:
            raise ValueError(f"PACS URL {url!r}: a DIMSE PACS is dicom://CALLED_AET@host:port")
        return Endpoint("dimse", url, parts.hostname, parts.port, called_aet=parts.username)
    raise ValueError(f"PACS URL {url!r}: use http(s)://host/dicom-web (DICOMweb) or dicom://CALLED_AET@host:port (DIMSE)")


def read_env_lines(path: Path) -> dict[str, tuple[str, int]]:
    """``KEY=VALUE`` lines of the site env file (fedct/envfile.py's syntax): key -> (value, line number)."""
    return {key: (setting.value, setting.line) for key, setting in envfile.read_env_lines(path).items()}


def read_pacs_settings(env_file: Path | None, *, url: str | None = None) -> PacsSettings:
    """PACS settings from the site env file; ``url`` (from ``--pacs``/``--push``) overrides FEDCT_PACS_URL.

    Unknown ``FEDCT_PACS_*`` keys are refused (a typo would silently drop a setting); other keys are ignored.
    """
    values = read_env_lines(env_file) if env_file is not None else {}
    for key, (_, number) in values.items():
        if key.startswith("FEDCT_PACS_") and key not in ENV_KEYS:
            raise ValueError(f"{env_file}: line {number}: unknown setting {key} (known: {', '.join(ENV_KEYS)})")

    def get(key: str) -> str | None:
        value = values.get(key, ("", 0))[0].strip()
        return value or None

    def number(key: str, kind: type, default: float | None) -> Any:
        text = get(key)
        if text is None:
            return default
        try:
            return kind(text)
        except ValueError as exc:
            raise ValueError(f"{env_file}: line {values[key][1]}: {key}={text!r} is not a {kind.__name__}") from exc

    url = url or get("FEDCT_PACS_URL")
    if not url:
        raise ValueError(f"no PACS URL: give it after --pacs/--push or as FEDCT_PACS_URL in the site env file ({env_file})")
    base = Path(env_file).parent if env_file is not None else Path.cwd()
    password = None
    password_file = get("FEDCT_PACS_PASSWORD_FILE")
    if password_file is not None:
        secret = base / password_file
        try:
            mode = secret.stat().st_mode
            password = next(iter(secret.read_text(encoding="utf-8").splitlines()), "")
        except OSError as exc:
            raise ValueError(f"{env_file}: FEDCT_PACS_PASSWORD_FILE: cannot read {secret}: {exc.strerror}") from exc
        if mode & 0o077:
            raise ValueError(f"{env_file}: FEDCT_PACS_PASSWORD_FILE: {secret} may be read by group or others "
                             f"(mode {mode & 0o777:04o}); make it private: chmod 600 {secret}")  # fmt: skip
    allow = (get("FEDCT_PACS_ALLOW_PLAIN_HTTP") or "no").lower()
    if allow not in ("yes", "no"):
        raise ValueError(f"{env_file}: line {values['FEDCT_PACS_ALLOW_PLAIN_HTTP'][1]}: FEDCT_PACS_ALLOW_PLAIN_HTTP={allow!r} "
                         f"must be yes or no")  # fmt: skip
    tls: dict[str, Path | None] = {}
    for key in ("FEDCT_PACS_TLS_CA", "FEDCT_PACS_TLS_CERT", "FEDCT_PACS_TLS_KEY"):
        text = get(key)
        tls[key] = base / text if text else None
        if tls[key] is not None and not tls[key].is_file():
            raise ValueError(f"{env_file}: {key}: {tls[key]} does not exist")
    ca_file = get("FEDCT_PACS_CA_FILE")
    if ca_file is not None and not (base / ca_file).is_file():
        raise ValueError(f"{env_file}: FEDCT_PACS_CA_FILE: {base / ca_file} does not exist")
    return PacsSettings(
        url=url,
        user=get("FEDCT_PACS_USER"),
        password=password,
        calling_aet=get("FEDCT_PACS_AET") or "FEDCT",
        modality=(get("FEDCT_PACS_MODALITY") or "CT").upper(),
        study_date=get("FEDCT_PACS_STUDY_DATE"),
        ca_file=base / ca_file if ca_file else None,
        timeout_s=number("FEDCT_PACS_TIMEOUT_S", float, 60.0),
        retries=number("FEDCT_PACS_RETRIES", int, 4),
        backoff_s=number("FEDCT_PACS_BACKOFF_S", float, 1.0),
        move_port=number("FEDCT_PACS_MOVE_PORT", int, None),
        env_file=Path(env_file) if env_file is not None else None,
        listen_address=get("FEDCT_PACS_LISTEN_ADDRESS") or "127.0.0.1",
        allow_plain_http=allow == "yes",
        tls_ca=tls["FEDCT_PACS_TLS_CA"],
        tls_cert=tls["FEDCT_PACS_TLS_CERT"],
        tls_key=tls["FEDCT_PACS_TLS_KEY"],
    )


def dimse_tls_args(settings: PacsSettings) -> tuple[Any, str] | None:
    """pynetdicom's ``tls_args`` for an association to the PACS: a client ``ssl`` context that verifies the PACS's
    certificate (and its host name) against ``FEDCT_PACS_TLS_CA`` and presents this site's certificate if set;
    None without TLS."""
    import ssl

    if settings.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context, endpoint(settings.url).host


def dimse_server_tls(settings: PacsSettings) -> Any:
    """The ``ssl`` context of this site's C-MOVE storage SCP under TLS (its certificate; the PACS's verified against
    ``FEDCT_PACS_TLS_CA``), or None without TLS."""
    import ssl

    if settings.tls_ca is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(settings.tls_ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    return context


# ---------------------------------------------------------------------------------------------------------------
# Errors and retries (both protocols)


class Transient(Exception):
    """A DIMSE failure worth retrying (no connection, association aborted, out of resources)."""


class Unreachable(Transient):
    """No DIMSE association could be opened (connection refused, aborted or timed out)."""


class Refused(Exception):
    """A DIMSE failure not worth retrying (association rejected, failure status)."""


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_transient(exc: BaseException) -> bool:
    """Connection errors, timeouts, broken streams, HTTP 408/429/5xx and DIMSE resource failures are retried."""
    import requests

    if isinstance(exc, Transient):
        return True
    if isinstance(exc, requests.HTTPError):
        return _http_status(exc) in TRANSIENT_HTTP
    return isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, ConnectionError))


def explain(exc: BaseException, settings: PacsSettings, *, what: str, attempts: int) -> PacsError:
    """A :class:`PacsError` that names the PACS, what failed and what to check."""
    import requests

    where = f"PACS {settings.url}"
    tried = f" after {attempts} attempt(s)" if attempts > 1 else ""
    if isinstance(exc, PacsError):
        return exc
    status = _http_status(exc)
    if isinstance(exc, requests.HTTPError) and status in (401, 403):
        return PacsError(
            f"{where} refused {what} (HTTP {status} {'unauthorized' if status == 401 else 'forbidden'}): check "
            f"{settings.credentials_hint}, and that this user may query and retrieve (store, for results) at the PACS"
        )
    if isinstance(exc, requests.HTTPError) and status == 404:
        return PacsError(f"{where} answered HTTP 404 to {what}: check the URL is the DICOMweb base (e.g. http://host:8042/dicom-web)")
    if isinstance(exc, requests.HTTPError) and status is not None and status >= 500 or status in TRANSIENT_HTTP:
        return PacsError(
            f"{where} failed {what}{tried} with HTTP {status}: the PACS is failing or overloaded; check its state and logs, "
            "then run again (instances already retrieved are kept and not fetched again)"
        )
    if isinstance(exc, requests.HTTPError):
        return PacsError(f"{where} answered HTTP {status} to {what}: {exc}")
    if isinstance(exc, (requests.Timeout,)):
        return PacsError(f"{where} did not answer {what} in {settings.timeout_s:g} s{tried}: check the PACS load and "
                         "FEDCT_PACS_TIMEOUT_S; run again to resume")  # fmt: skip
    if isinstance(exc, (requests.ConnectionError, ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return PacsError(
            f"cannot reach {where} for {what}{tried} ({_short(exc)}): check the URL, that the PACS is running, and that "
            "this host may connect to it (firewall, proxy; https: FEDCT_PACS_CA_FILE)"
        )
    if isinstance(exc, Unreachable):
        return PacsError(f"cannot reach {where} for {what}{tried} ({exc}): check the host, port and called AE title in the URL, "
                         "that the PACS is running, and that this host may connect to it (firewall)")  # fmt: skip
    if isinstance(exc, Transient):
        return PacsError(f"{where}: {what} failed{tried}: {exc}")
    if isinstance(exc, Refused):
        return PacsError(f"{where}: {what} refused: {exc}")
    return PacsError(f"{where}: {what} failed: {type(exc).__name__}: {exc}")


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset", "Connection aborted"):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def with_retries(settings: PacsSettings, what: str, call: Callable[[], Any], *, sleep: Callable[[float], None] = time.sleep) -> Any:
    """``call()``, retried on transient errors with exponential backoff; other errors become a :class:`PacsError`."""
    for attempt in range(settings.retries + 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or attempt == settings.retries:
                raise explain(exc, settings, what=what, attempts=attempt + 1) from exc
            delay = min(settings.backoff_s * 2**attempt, _MAX_BACKOFF_S)
            retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("Retry-After", "")
            if retry_after.isdigit():
                delay = min(max(delay, float(retry_after)), _MAX_BACKOFF_S)
            log.warning("PACS %s: %s failed (%s); retry %d of %d in %.1f s", settings.url, what,
                        _http_status(exc) or _short(exc), attempt + 1, settings.retries, delay)  # fmt: skip
            sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# The local store: one file per instance, written atomically, never overwritten


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


# ---------------------------------------------------------------------------------------------------------------
# Protocols


@dataclass(frozen=True)
class Query:
    """What to pull: a modality, an optional study date range, optional study keys (from the labels file)."""

    modality: str = "CT"
    study_date: str | None = None
    study_uids: tuple[str, ...] = ()
    accession_numbers: tuple[str, ...] = ()


class Source(Protocol):
    """A PACS that can be searched and retrieved from."""

    def find_series(self, query: Query) -> list[SeriesRef]: ...
    def list_instances(self, ref: SeriesRef) -> list[str]: ...
    def fetch(self, ref: SeriesRef, sop_uids: Sequence[str] | None, store: InstanceStore) -> None: ...


def _json_value(item: dict[str, Any], tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or [None]
    return None if values[0] is None else str(values[0])


class DicomWebSource:
    """QIDO-RS + WADO-RS with ``dicomweb-client``."""

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
        found = self.client.search_for_instances(ref.study_uid, ref.series_uid, fields=["SOPInstanceUID"], get_remaining=True)
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
                self.client.retrieve_instance(ref.study_uid, ref.series_uid, uid, media_types=any_syntax) for uid in sop_uids
            )
        for ds in datasets:
            store.write(ref, str(ds.SOPInstanceUID), lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))


class DimseSource:
    """C-FIND + C-GET (or C-MOVE to our own storage SCP) with ``pynetdicom`` (Study Root)."""

    def __init__(self, settings: PacsSettings) -> None:
        self.settings = settings
        self.endpoint = endpoint(settings.url)

    @contextmanager
    def _association(self, contexts: Sequence[str], *, get_storage: Sequence[str] = ()) -> Iterator[Any]:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role

        ae = AE(ae_title=self.settings.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        for context in contexts:
            ae.add_requested_context(context)
        for sop_class in get_storage:
            ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES[:16])
        roles = [build_role(sop_class, scp_role=True) for sop_class in get_storage]
        handlers = [(_evt_store(), self._store_handler)] if get_storage else []
        assoc = ae.associate(self.endpoint.host, self.endpoint.port, ae_title=self.endpoint.called_aet,
                             ext_neg=roles, evt_handlers=handlers, tls_args=dimse_tls_args(self.settings))  # fmt: skip
        if assoc.is_rejected:
            raise Refused(
                f"the association was rejected: check the called AE title in the URL ({self.endpoint.called_aet}) and that "
                f"FEDCT_PACS_AET ({self.settings.calling_aet}) is registered at the PACS for this host"
            )
        if not assoc.is_established:
            raise Unreachable("no association (connection refused, aborted or timed out)")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_handler(self, event: Any) -> int:
        store, ref = self._target
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if str(event.dataset.SeriesInstanceUID) != ref.series_uid:  # C-MOVE: only the series being retrieved
            return 0xA900
        store.write(ref, sop_uid, lambda tmp: tmp.write_bytes(event.encoded_dataset(include_meta=True)))
        return 0x0000

    def _find(self, identifier: Any) -> list[Any]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        with self._association([FIND]) as assoc:
            matches = []
            for status, found in assoc.send_c_find(identifier, FIND):
                _check_status(status, "C-FIND")
                if found is not None and status.Status in (0xFF00, 0xFF01):
                    matches.append(found)
            return matches

    def find_series(self, query: Query) -> list[SeriesRef]:
        """C-FIND at study level (modality in study, date, keys), then at series level per study."""
        from pydicom import Dataset

        study_uids = list(query.study_uids)
        if not study_uids:
            keys = list(query.accession_numbers) or [None]
            for accession in keys:
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = ""
                ds.ModalitiesInStudy = query.modality
                ds.StudyDate = query.study_date or ""
                ds.AccessionNumber = accession or ""
                study_uids += [str(m.StudyInstanceUID) for m in self._find(ds) if m.get("StudyInstanceUID")]
        refs: dict[tuple[str, str], SeriesRef] = {}
        for study_uid in dict.fromkeys(study_uids):
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = ""
            ds.Modality = query.modality
            for match in self._find(ds):
                if match.get("SeriesInstanceUID") and str(match.get("Modality", query.modality)) == query.modality:
                    refs[(study_uid, str(match.SeriesInstanceUID))] = SeriesRef(study_uid, str(match.SeriesInstanceUID))
        return list(refs.values())

    def list_instances(self, ref: SeriesRef) -> list[str]:
        """C-FIND at image level: the SOP Instance UIDs of one series."""
        from pydicom import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE"
        ds.StudyInstanceUID = ref.study_uid
        ds.SeriesInstanceUID = ref.series_uid
        ds.SOPInstanceUID = ""
        return [str(m.SOPInstanceUID) for m in self._find(ds) if m.get("SOPInstanceUID")]

    def fetch(self, ref: SeriesRef, sop_uids: Sequence[str] | None, store: InstanceStore) -> None:
        """C-GET (or C-MOVE) of the whole series (``sop_uids`` None) or of single instances; each is written as it arrives."""
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

        from preprocessing.discover import CT_SOP_CLASSES

        self._target = (store, ref)
        identifiers: list[Dataset] = []
        for uid in [None] if sop_uids is None else list(sop_uids):
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES" if uid is None else "IMAGE"
            ds.StudyInstanceUID = ref.study_uid
            ds.SeriesInstanceUID = ref.series_uid
            if uid is not None:
                ds.SOPInstanceUID = uid
            identifiers.append(ds)
        if self.settings.move_port is None:
            with self._association([GET], get_storage=sorted(CT_SOP_CLASSES)) as assoc:
                for identifier in identifiers:
                    for status, _ in assoc.send_c_get(identifier, GET):
                        _check_status(status, "C-GET")
            return
        with self._storage_scp(sorted(CT_SOP_CLASSES)), self._association([MOVE]) as assoc:
            for identifier in identifiers:
                for status, _ in assoc.send_c_move(identifier, self.settings.calling_aet, MOVE):
                    _check_status(status, "C-MOVE")

    @contextmanager
    def _storage_scp(self, sop_classes: Sequence[str]) -> Iterator[None]:
        """A storage SCP on FEDCT_PACS_LISTEN_ADDRESS:FEDCT_PACS_MOVE_PORT for the C-MOVE's sub-operations, accepting only
        the PACS's AE title (over TLS when FEDCT_PACS_TLS_CA is set)."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES

        ae = AE(ae_title=self.settings.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        ae.require_calling_aet = [self.endpoint.called_aet]
        for sop_class in sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        try:
            server = ae.start_server((self.settings.listen_address, self.settings.move_port), block=False,
                                     ssl_context=dimse_server_tls(self.settings),
                                     evt_handlers=[(_evt_store(), self._store_handler)])  # fmt: skip
        except OSError as exc:
            raise Refused(f"cannot listen on FEDCT_PACS_LISTEN_ADDRESS {self.settings.listen_address} FEDCT_PACS_MOVE_PORT "
                          f"{self.settings.move_port} for C-MOVE: {exc.strerror}") from exc  # fmt: skip
        self.listening = server.server_address
        try:
            yield
        finally:
            server.shutdown()


def _evt_store() -> Any:
    from pynetdicom import evt

    return evt.EVT_C_STORE


def _check_status(status: Any, what: str) -> None:
    """Raise on a missing or failed DIMSE status; 'out of resources' (0xA7xx) and a lost link are transient."""
    if status is None or "Status" not in status:
        raise Transient(f"{what}: no reply (association aborted or timed out)")
    code = int(status.Status)
    if code in (0x0000, 0xFF00, 0xFF01):  # success, pending
        return
    if code == 0xB000:
        raise Refused(f"{what}: some sub-operations failed (status 0xB000): check the PACS log for storage to this AE")
    if code >> 8 == 0xA7:
        raise Transient(f"{what}: PACS out of resources (status 0x{code:04X})")
    raise Refused(f"{what}: failure status 0x{code:04X}; check that FEDCT_PACS_AET may query and retrieve at the PACS")


def open_source(settings: PacsSettings) -> Source:
    """The :class:`Source` for the PACS URL's protocol."""
    return DicomWebSource(settings) if endpoint(settings.url).kind == "dicomweb" else DimseSource(settings)


# ---------------------------------------------------------------------------------------------------------------
# Pull


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
    source = with_retries(settings, "connecting", lambda: open_source(settings), sleep=sleep)
    refs = with_retries(settings, "the series search (QIDO-RS / C-FIND)", lambda: source.find_series(query), sleep=sleep)
    if (query.study_uids or query.accession_numbers) and not refs:
        log.warning("PACS %s: none of the %d studies of the labels file has a %s series", settings.url,
                    len(query.study_uids or query.accession_numbers), query.modality)  # fmt: skip
    total = present = 0
    bar = _progress(len(refs), progress)
    for number, ref in enumerate(refs, start=1):
        what = f"series {number} of {len(refs)}"
        sop_uids = with_retries(settings, f"the instance list of {what}", lambda ref=ref: source.list_instances(ref), sleep=sleep)
        total += len(sop_uids)
        present += sum(store.has(ref, uid) for uid in sop_uids)

        def fetch_missing(ref: SeriesRef = ref, sop_uids: list[str] = sop_uids) -> None:
            missing = [uid for uid in sop_uids if not store.has(ref, uid)]
            if missing:  # a series with nothing on disk comes in one streamed request
                source.fetch(ref, None if len(missing) == len(sop_uids) else missing, store)
            still = sum(not store.has(ref, uid) for uid in sop_uids)
            if still:
                raise PacsError(f"PACS {settings.url}: {what}: {still} of {len(sop_uids)} instances listed but not sent; "
                                "check the PACS log (storage to this site's AE title, transfer syntaxes)")  # fmt: skip

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
    return lambda n: print(f"\r  pulled {n}/{total} series", end="\n" if n == total else "", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# fedct ingest --pacs


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pacs [URL]`` and ``--pacs-env FILE`` of ``fedct ingest``."""
    parser.add_argument("--pacs", nargs="?", const="", metavar="URL",
                        help="pull the studies from the PACS first (http(s)://host/dicom-web or dicom://AET@host:port; "
                             "without URL: FEDCT_PACS_URL of --pacs-env); --input is then where they are kept (default OUT/pacs)")  # fmt: skip
    parser.add_argument("--pacs-env", metavar="FILE", help="site env file with the FEDCT_PACS_* settings and credentials")


def pull_for_ingest(args: argparse.Namespace) -> Path:
    """Pull for ``fedct ingest --pacs``: the query from the env file and the labels' study keys; return the folder.

    Raises ``ValueError`` (bad settings, before anything is fetched) or :class:`PacsError`.
    """
    from preprocessing.labels import read_labels

    settings = read_pacs_settings(Path(args.pacs_env) if args.pacs_env else None, url=args.pacs or None)
    query = Query(modality=settings.modality, study_date=settings.study_date)
    if args.labels:
        labels = read_labels(Path(args.labels))
        keys = tuple(sorted(labels))
        query = Query(modality=settings.modality, study_date=settings.study_date,
                      study_uids=keys if labels.key == "StudyInstanceUID" else (),
                      accession_numbers=keys if labels.key == "AccessionNumber" else ())  # fmt: skip
    dest = Path(args.input) if args.input else Path(args.out) / "pacs"
    result = pull(settings, dest, query=query, progress=True)
    print(f"PACS {result.url}: {result.studies} studies, {result.series} series, {result.instances} instances; fetched "
          f"{result.fetched} ({result.bytes_written / 1e6:.1f} MB), {result.present} already here; {result.seconds} s -> {dest}")  # fmt: skip
    return dest

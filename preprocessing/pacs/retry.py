"""Errors and retries of both protocols and both directions: which failures are transient, and what to tell the user.

Transient failures (connection errors, timeouts, broken streams, HTTP 408/429/5xx, DIMSE "out of resources" or a
lost association) are retried with exponential backoff (``Retry-After`` honoured, capped at 60 s); everything else
becomes a :class:`PacsError` naming the PACS, what failed and what to check. Logs carry the PACS URL (never with
credentials: :func:`~preprocessing.pacs.settings.endpoint` refuses them), the step and the status, nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from preprocessing.pacs.settings import PacsError, PacsSettings

log = logging.getLogger(__name__)

#: HTTP statuses worth retrying: too many requests and server-side failures.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 60.0


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
    return isinstance(
        exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, ConnectionError)
    )


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
        return PacsError(
            f"{where} answered HTTP 404 to {what}: check the URL is the DICOMweb base (e.g. http://host:8042/dicom-web)"
        )
    if isinstance(exc, requests.HTTPError) and status is not None and status >= 500 or status in TRANSIENT_HTTP:
        return PacsError(
            f"{where} failed {what}{tried} with HTTP {status}: the PACS is failing or overloaded; check its state and logs, "
            "then run again (instances already retrieved are kept and not fetched again)"
        )
    if isinstance(exc, requests.HTTPError):
        return PacsError(f"{where} answered HTTP {status} to {what}: {exc}")
    if isinstance(exc, (requests.Timeout,)):
        return PacsError(
            f"{where} did not answer {what} in {settings.timeout_s:g} s{tried}: check the PACS load and "
            "FEDCT_PACS_TIMEOUT_S; run again to resume"
        )
    if isinstance(exc, (requests.ConnectionError, ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return PacsError(
            f"cannot reach {where} for {what}{tried} ({_short(exc)}): check the URL, that the PACS is running, and that "
            "this host may connect to it (firewall, proxy; https: FEDCT_PACS_CA_FILE)"
        )
    if isinstance(exc, Unreachable):
        return PacsError(
            f"cannot reach {where} for {what}{tried} ({exc}): check the host, port and called AE title in the URL, "
            "that the PACS is running, and that this host may connect to it (firewall)"
        )
    if isinstance(exc, Transient):
        return PacsError(f"{where}: {what} failed{tried}: {exc}")
    if isinstance(exc, Refused):
        return PacsError(f"{where}: {what} refused: {exc}")
    return PacsError(f"{where}: {what} failed: {type(exc).__name__}: {exc}")


def _short(exc: BaseException) -> str:
    text = str(exc)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "Connection reset",
        "Connection aborted",
    ):
        if marker in text:
            return marker.lower()
    return type(exc).__name__


def with_retries(
    settings: PacsSettings, what: str, call: Callable[[], Any], *, sleep: Callable[[float], None] = time.sleep
) -> Any:
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
            log.warning(
                "PACS %s: %s failed (%s); retry %d of %d in %.1f s",
                settings.url,
                what,
                _http_status(exc) or _short(exc),
                attempt + 1,
                settings.retries,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")

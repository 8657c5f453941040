"""The clinicians' review page: a small local web server over a results folder written by ``fedct predict``.

It lists the predicted studies (overlay thumbnail, finding with its probability, risk group, model version, the
latest review), serves each study's ``report.html`` and overlay images, and records the clinicians' agreement or
disagreement with an optional comment and, with a disagreement, an optional corrected diagnosis (one of the model's
classes) in a local SQLite file, with its provenance (reader, UTC time, model registry version and hash, the study's
UID: :func:`feedback_provenance`). Nothing leaves the site: the page loads no external resource and the feedback is
written only to ``feedback.sqlite`` (by default inside the results folder); a site that opts in trains on it as labels
(``preprocessing.labels.read_feedback_labels``).

Standard library only. The server listens on the loopback interface; another host needs ``allow_remote=True``.

Routes::

    GET  /                               list of studies (+ studies the prediction step refused)
    GET  /study/<study_key>              one study: details, overlays, feedback form and history, report in a frame
    GET  /study/<study_key>/report       the study's report.html
    GET  /study/<study_key>/file/<name>  a file inside the study folder (no traversal, no symlink leaving it)
    POST /study/<study_key>/feedback     form fields verdict=agree|disagree, corrected, reader, comment, token,
                                         next; 303 back

Results folder layout read here (optional fields may be missing)::

    RESULTS/summary.json                  {"results": [...], "refused": [{"path", "reason", "message"}]}
    RESULTS/<study_key>/prediction.json   study_key, StudyInstanceUID, diagnosis, probabilities, risk_score,
                                          risk_group, model {name, fedct_version, ...}, created_utc, overlays
    RESULTS/<study_key>/report.html
    RESULTS/<study_key>/local_identity.json  site-local: accession number, patient name and ID, shown to find the
                                          patient (absent on a research copy: prediction.json says
                                          "local_identifiers": "hidden" and the pages say so)
    RESULTS/<study_key>/*.png             heat-map overlays
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import mimetypes
import secrets
import socket
import sys
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from inference.review_pages import PAGE_CSP, render_error, render_list, render_study, study_url
from inference.review_store import (
    ALLOWED_VERDICTS,
    DEFAULT_DB_NAME,
    MAX_COMMENT_CHARS,
    MAX_READER_CHARS,
    FeedbackStore,
    Study,
    find_study,
    inside_folder,
    valid_segment,
)

__all__ = ["ALLOWED_VERDICTS", "MAX_COMMENT_CHARS", "ReviewServer", "make_server", "serve"]

log = logging.getLogger(__name__)

#: Largest form body accepted (bytes).
MAX_BODY_BYTES = 64 * 1024

_CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".svg": "image/svg+xml",
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".pdf": "application/pdf",
    ".dcm": "application/dicom",
}

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

# ---------------------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ReviewServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with the results folder, the feedback store and the form token attached."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], results_dir: Path, store: FeedbackStore, *, allow_remote: bool):
        self.results_dir = results_dir
        self.store = store
        self.allow_remote = allow_remote
        #: Per-server random token in every form; a POST without it is refused (cross-site form posts).
        self.form_token = secrets.token_urlsafe(32)
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


class _ReviewServer6(ReviewServer):
    address_family = socket.AF_INET6


def _is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "fedct-review"
    sys_version = ""

    # -- plumbing -------------------------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's signature)
        log.info("%s %s", self.address_string(), format % args)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        *,
        page: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "SAMEORIGIN")
        if page:
            self.send_header("Content-Security-Policy", PAGE_CSP)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error_page(self, status: HTTPStatus, message: str) -> None:
        self._send(status, render_error(status, message), "text/html; charset=utf-8")

    def _check_host(self) -> None:
        """Refuse a Host header that is not a loopback name (DNS rebinding) unless remote access was allowed."""
        if self.server.allow_remote:
            return
        host = self.headers.get("Host", "").strip()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.split(":", 1)[0] if host.count(":") == 1 else host
        if not _is_loopback(name):
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "This page is only served to this computer (unexpected Host).")

    def _route(self) -> list[str]:
        path = urlsplit(self.path).path
        if path != "/" and path.endswith("/"):
            path = path[:-1]
        return path.split("/")[1:] if path != "/" else []

    def _study(self, raw_key: str) -> Study:
        study = find_study(self.server.results_dir, unquote(raw_key))
        if study is None:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "There is no such study in this results folder.")
        return study

    def _dispatch(self, handler: Any) -> None:
        try:
            self._check_host()
            handler()
        except _HTTPError as exc:
            self._send_error_page(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:  # one bad request must not take the page down
            log.exception("review page: request %s %s failed", self.command, self.path)
            try:
                self._send_error_page(HTTPStatus.INTERNAL_SERVER_ERROR, "Something went wrong on this page.")
            except OSError:
                pass

    # -- GET ------------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def _get(self) -> None:
        parts = self._route()
        srv = self.server
        db_note = f" ({srv.store.path.name})"
        if not parts:
            self._send(
                HTTPStatus.OK,
                render_list(srv.results_dir, srv.store, srv.form_token, db_note),
                "text/html; charset=utf-8",
            )
            return
        if parts[0] != "study" or len(parts) < 2:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "This page does not exist.")
        study = self._study(parts[1])
        if len(parts) == 2:
            self._send(
                HTTPStatus.OK, render_study(study, srv.store, srv.form_token, db_note), "text/html; charset=utf-8"
            )
        elif len(parts) == 3 and parts[2] == "report":
            self._send_file(study, ["report.html"], missing="No report was written for this study.")
        elif len(parts) >= 4 and parts[2] == "file":
            self._send_file(study, [unquote(p) for p in parts[3:]], missing="There is no such file for this study.")
        else:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "This page does not exist.")

    def _send_file(self, study: Study, segments: list[str], *, missing: str) -> None:
        if not segments or not all(valid_segment(s) for s in segments):
            raise _HTTPError(HTTPStatus.NOT_FOUND, missing)
        candidate = study.folder.joinpath(*segments)
        if not candidate.is_file() or not inside_folder(study.folder, candidate):
            raise _HTTPError(HTTPStatus.NOT_FOUND, missing)
        try:
            data = candidate.resolve(strict=True).read_bytes()
        except OSError as exc:
            raise _HTTPError(HTTPStatus.NOT_FOUND, missing) from exc
        suffix = candidate.suffix.lower()
        ctype = _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, data, ctype, page=False)

    # -- POST -----------------------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _read_form(self) -> dict[str, str]:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded":
            raise _HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "The review must be sent from the form on this page.")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _HTTPError(HTTPStatus.LENGTH_REQUIRED, "The review could not be read (no length).") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise _HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The review is too long.")
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        try:
            fields = parse_qs(body, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
        except ValueError:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "The review could not be read.") from None
        return {k: v[-1] for k, v in fields.items()}

    def _post(self) -> None:
        parts = self._route()
        if len(parts) != 3 or parts[0] != "study" or parts[2] != "feedback":
            raise _HTTPError(HTTPStatus.NOT_FOUND, "This page does not exist.")
        study = self._study(parts[1])
        form = self._read_form()
        if not hmac.compare_digest(form.get("token", "").encode(), self.server.form_token.encode()):
            raise _HTTPError(
                HTTPStatus.FORBIDDEN,
                "This form has expired (the review page was restarted). Reload the page and try again.",
            )
        verdict = form.get("verdict", "").strip().lower()
        if verdict not in ALLOWED_VERDICTS:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "Please choose \u201cI agree\u201d or \u201cI disagree\u201d.")
        comment = form.get("comment", "").replace("\r\n", "\n").replace("\r", "\n").strip()
        if len(comment) > MAX_COMMENT_CHARS:
            raise _HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"The comment is too long ({len(comment)} characters; at most {MAX_COMMENT_CHARS}).",
            )
        self.server.store.add(study.key, verdict, comment, **feedback_provenance(study, form))
        if form.get("next") == "study":
            target = study_url(study.key) + "#review"
        else:
            target = "/#study-" + quote(study.key, safe="")
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", headers={"Location": target})


def feedback_provenance(study: Study, form: Mapping[str, str]) -> dict[str, str]:
    """The corrected diagnosis (one of the model's classes, only with *disagree*) and the provenance stored with a
    review: the reader (the name entered, else the account running this page), the model's registry version and
    content hash and its finding (from the study's prediction.json), the StudyInstanceUID. _HTTPError when invalid."""
    prediction = study.prediction
    model = prediction.get("model") if isinstance(prediction.get("model"), dict) else {}
    classes = prediction.get("probabilities") if isinstance(prediction.get("probabilities"), dict) else {}
    corrected = form.get("corrected", "").strip()
    finding = str(prediction.get("diagnosis", "") or "")
    if corrected and corrected not in classes:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "The corrected diagnosis must be one of the model's findings.")
    if corrected and form.get("verdict", "").strip().lower() != "disagree":
        raise _HTTPError(HTTPStatus.BAD_REQUEST, "Choose \u201cI disagree\u201d to give a corrected diagnosis.")
    if corrected and corrected == finding:
        raise _HTTPError(
            HTTPStatus.BAD_REQUEST, "The corrected diagnosis is the model's own finding: choose another one, or agree."
        )
    reader = " ".join(form.get("reader", "").split())
    if len(reader) > MAX_READER_CHARS:
        raise _HTTPError(HTTPStatus.BAD_REQUEST, f"The name is too long (at most {MAX_READER_CHARS} characters).")
    return {
        "corrected_diagnosis": corrected,
        "reader": reader or _account(),
        "model_version": str(model.get("registry_version", "") or ""),
        "model_sha256": str(model.get("content_sha256", "") or ""),
        "study_uid": str(prediction.get("StudyInstanceUID", "") or ""),
        "model_finding": finding,
    }


def _account() -> str:
    """The account running the review page (the reader when none entered a name)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def make_server(
    results_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    db_path: Path | None = None,
    allow_remote: bool = False,
) -> ReviewServer:
    """A review server bound to ``host:port`` (port 0: a free port; see ``server.server_address``), not yet serving.

    Raises ValueError for a non-loopback ``host`` unless ``allow_remote=True`` (the page has no login), for a
    results folder that does not exist and for a feedback database that cannot be opened; OSError when the
    address cannot be bound.
    """
    results_dir = Path(results_dir)
    if not _is_loopback(host) and not allow_remote:
        raise ValueError(
            f"refusing to serve the review page on {host!r}: it has no login and shows study results, "
            "so it listens on this computer only (127.0.0.1). Pass allow_remote=True explicitly to "
            "serve it on another address (only behind an authenticated connection)."
        )
    if not results_dir.is_dir():
        raise ValueError(f"results folder {results_dir} does not exist or is not a folder")
    store = FeedbackStore(Path(db_path) if db_path is not None else results_dir / DEFAULT_DB_NAME)
    bind_host = host.strip("[]")
    cls = _ReviewServer6 if ":" in bind_host else ReviewServer
    return cls((bind_host, port), results_dir, store, allow_remote=allow_remote)


def serve(
    results_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    db_path: Path | None = None,
    allow_remote: bool = False,
) -> None:
    """Serve the review page until interrupted (Ctrl-C)."""
    server = make_server(results_dir, host=host, port=port, db_path=db_path, allow_remote=allow_remote)
    print(
        f"review page for {Path(results_dir)} at {server.url} (feedback in {server.store.path}); Ctrl-C stops it",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":  # python -m inference.review RESULTS [PORT]
    serve(Path(sys.argv[1]), port=int(sys.argv[2]) if len(sys.argv) > 2 else 8765)

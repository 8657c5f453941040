"""The clinicians' review page: a small local web server over a results folder written by ``fedct predict``.

It lists the predicted studies (overlay thumbnail, finding with its probability, risk group, model version, the
latest review), serves each study's ``report.html`` and overlay images, and records the clinicians' agreement or
disagreement with an optional comment in a local SQLite file. Nothing leaves the site: the page loads no external
resource and the feedback is written only to ``feedback.sqlite`` (by default inside the results folder).

Standard library only. The server listens on the loopback interface; another host needs ``allow_remote=True``.

Routes::

    GET  /                               list of studies (+ studies the prediction step refused)
    GET  /study/<study_key>              one study: details, overlays, feedback form and history, report in a frame
    GET  /study/<study_key>/report       the study's report.html
    GET  /study/<study_key>/file/<name>  a file inside the study folder (no traversal, no symlink leaving it)
    POST /study/<study_key>/feedback     form fields verdict=agree|disagree, comment, token, next; 303 back

Results folder layout read here (optional fields may be missing)::

    RESULTS/summary.json                  {"results": [...], "refused": [{"path", "reason", "message"}]}
    RESULTS/<study_key>/prediction.json   study_key, StudyInstanceUID, diagnosis, probabilities, risk_score,
                                          risk_group, model {name, fedct_version, ...}, created_utc, overlays
    RESULTS/<study_key>/report.html
    RESULTS/<study_key>/*.png             heat-map overlays
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import mimetypes
import secrets
import socket
import sqlite3
import sys
from collections.abc import Mapping
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from inference.wording import DISCLAIMER, class_title, finding_sentence, percent, risk_explanation, risk_label

__all__ = ["ALLOWED_VERDICTS", "MAX_COMMENT_CHARS", "ReviewServer", "make_server", "serve"]

log = logging.getLogger(__name__)

#: Verdicts a clinician can record.
ALLOWED_VERDICTS = ("agree", "disagree")
#: Longest comment accepted (characters, after normalising line ends).
MAX_COMMENT_CHARS = 2000
#: Largest form body accepted (bytes).
MAX_BODY_BYTES = 64 * 1024
DEFAULT_DB_NAME = "feedback.sqlite"

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

#: Our own pages run no script and load nothing from elsewhere.
_PAGE_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-src 'self'; "
             "form-action 'self'; base-uri 'none'; frame-ancestors 'self'")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    study_key   TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree')),
    comment     TEXT NOT NULL DEFAULT '',
    created_utc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_study ON feedback (study_key);
"""


# ---------------------------------------------------------------------------------------------------------------
# Results folder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Study:
    """One study folder of the results folder, with what its prediction.json says (tolerant of gaps)."""

    key: str  # the folder name; used in URLs and as the feedback key
    folder: Path
    prediction: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # prediction.json unreadable

    @property
    def has_report(self) -> bool:
        return (self.folder / "report.html").is_file()

    def overlays(self) -> list[str]:
        """Overlay images as paths relative to the study folder: those prediction.json names, else *.png."""
        found: list[str] = []
        listed = self.prediction.get("overlays")
        if isinstance(listed, list):
            for entry in listed:
                rel = _relative_in_folder(self.folder, entry)
                if rel is not None and rel not in found:
                    found.append(rel)
        if not found:
            found = sorted(p.name for p in self.folder.glob("*.png") if _inside(self.folder, p) and p.is_file())
        return found


def _inside(folder: Path, candidate: Path) -> bool:
    """Whether ``candidate`` (symlinks resolved) lies inside ``folder`` (resolved)."""
    try:
        return candidate.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
    except (OSError, RuntimeError):
        return False


def _relative_in_folder(folder: Path, entry: Any) -> str | None:
    """An overlay entry (file name, path relative to the study or results folder, or absolute) as a path
    relative to ``folder``, or None when it is not a file inside it."""
    if not isinstance(entry, str) or not entry.strip():
        return None
    raw = Path(entry)
    candidates = [raw] if raw.is_absolute() else [folder / raw, folder / raw.name]
    for candidate in candidates:
        if candidate.is_file() and _inside(folder, candidate):
            return candidate.resolve().relative_to(folder.resolve()).as_posix()
    return None


def _valid_segment(segment: str) -> bool:
    return bool(segment) and segment not in (".", "..") and not any(c in segment for c in "/\\\0")


def find_study(results_dir: Path, key: str) -> Study | None:
    """The study folder ``key`` (a plain folder with a prediction.json, not a symlink), or None."""
    if not _valid_segment(key) or key.startswith("."):
        return None
    folder = results_dir / key
    if folder.is_symlink() or not folder.is_dir() or not (folder / "prediction.json").is_file():
        return None
    study = Study(key=key, folder=folder)
    try:
        data = json.loads((folder / "prediction.json").read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        study.prediction = data
    except (OSError, ValueError) as exc:
        study.error = f"The prediction file could not be read ({type(exc).__name__})."
    return study


def list_studies(results_dir: Path) -> list[Study]:
    studies = []
    try:
        entries = sorted(results_dir.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    for entry in entries:
        study = find_study(results_dir, entry.name)
        if study is not None:
            studies.append(study)
    return studies


def read_refused(results_dir: Path) -> list[dict[str, str]]:
    """The studies the prediction step refused, from summary.json (absent or unreadable: none)."""
    try:
        data = json.loads((results_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    refused = data.get("refused") if isinstance(data, dict) else None
    if not isinstance(refused, list):
        return []
    rows = []
    for item in refused:
        if isinstance(item, dict):
            rows.append({k: str(item.get(k, "") or "") for k in ("path", "reason", "message")})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Feedback store
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    study_key: str
    verdict: str
    comment: str
    created_utc: str


class FeedbackStore:
    """Append-only feedback history in SQLite; the latest row of a study is its current review."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as con, con:
                con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open the feedback database {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def add(self, study_key: str, verdict: str, comment: str) -> Feedback:
        row = Feedback(study_key, verdict, comment, datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
        with closing(self._connect()) as con, con:
            con.execute("INSERT INTO feedback (study_key, verdict, comment, created_utc) VALUES (?, ?, ?, ?)",
                        (row.study_key, row.verdict, row.comment, row.created_utc))
        return row

    def history(self, study_key: str) -> list[Feedback]:
        """All feedback of a study, newest first."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT study_key, verdict, comment, created_utc FROM feedback WHERE study_key = ? "
                               "ORDER BY rowid DESC", (study_key,)).fetchall()
        return [Feedback(*r) for r in rows]

    def latest_all(self) -> dict[str, Feedback]:
        """The latest feedback of every study that has one."""
        with closing(self._connect()) as con:
            rows = con.execute("SELECT study_key, verdict, comment, created_utc FROM feedback f WHERE rowid = "
                               "(SELECT max(rowid) FROM feedback g WHERE g.study_key = f.study_key)").fetchall()
        return {r[0]: Feedback(*r) for r in rows}


# ---------------------------------------------------------------------------------------------------------------
# Wording
# ---------------------------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _probability(value: Any) -> float | None:
    try:
        p = float(value)
    except (TypeError, ValueError):
        return None
    return p if math.isfinite(p) and 0.0 <= p <= 1.0 else None


def _probabilities(prediction: Mapping[str, Any]) -> list[tuple[str, float]]:
    probs = prediction.get("probabilities")
    if not isinstance(probs, Mapping):
        return []
    out = [(str(k), p) for k, v in probs.items() if (p := _probability(v)) is not None]
    return sorted(out, key=lambda kv: -kv[1])


def finding_words(prediction: Mapping[str, Any]) -> str:
    """The finding sentence of :func:`inference.wording.finding_sentence` for a ``prediction.json`` (plain text)."""
    probs = dict(_probabilities(prediction))
    diagnosis = prediction.get("diagnosis")
    return finding_sentence(probs, None if diagnosis in (None, "") else str(diagnosis))


def risk_words(prediction: Mapping[str, Any]) -> tuple[str, str, str]:
    """(label, explanation, css class) of the risk group; ("", "", "") when there is none."""
    group = prediction.get("risk_group")
    label = risk_label(group)
    if not label:
        return "", "", ""
    key = str(group).strip().lower()
    explanation = risk_explanation(group)
    return label, explanation, f"risk-{key}" if explanation else "risk-other"


def model_words(prediction: Mapping[str, Any]) -> str:
    model = prediction.get("model")
    if not isinstance(model, Mapping):
        return str(model) if isinstance(model, str) else ""
    parts = []
    version = model.get("fedct_version") or model.get("version")
    if version:
        parts.append(f"fedct {version}")
    name = model.get("name")
    if name:
        parts.append(f"({name})" if parts else str(name))
    return " ".join(str(p) for p in parts)


def when_words(value: Any) -> str:
    """An ISO UTC time as "2026-11-23 13:12 UTC"; anything else as given."""
    if not value:
        return ""
    text = str(value)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M UTC")


def verdict_words(verdict: str) -> str:
    return {"agree": "Agrees with the finding", "disagree": "Disagrees with the finding"}.get(verdict, verdict)


def study_url(key: str, *rest: str) -> str:
    return "/study/" + "/".join([quote(key, safe="")] + [quote(r, safe="") for r in rest])


def file_url(key: str, relpath: str) -> str:
    return study_url(key, "file") + "/" + "/".join(quote(part, safe="") for part in relpath.split("/"))


# ---------------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------------

_CSS = """
:root { --ink:#1d2733; --muted:#5b6776; --line:#dde3ea; --bg:#f5f7fa; --card:#fff; --accent:#1f5fa8;
        --agree:#1e7a46; --disagree:#b3361b; }
* { box-sizing: border-box; }
body { margin:0; font: 16px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--ink); background:var(--bg); }
header.top { background:#fff; border-bottom:1px solid var(--line); padding:14px 28px; }
header.top h1 { margin:0; font-size:1.35rem; font-weight:600; }
header.top p { margin:2px 0 0; color:var(--muted); font-size:.95rem; }
main { padding:20px 28px 8px; max-width:1280px; }
a { color:var(--accent); }
.notice { background:#fff8e1; border:1px solid #f0d68a; border-radius:6px; padding:10px 14px; margin:0 0 18px;
          font-size:.95rem; }
table.studies { width:100%; border-collapse:collapse; background:var(--card); border:1px solid var(--line);
                border-radius:6px; }
table.studies th { text-align:left; font-weight:600; font-size:.85rem; color:var(--muted); padding:10px 12px;
                   border-bottom:1px solid var(--line); background:#fafbfc; }
table.studies td { padding:12px; border-bottom:1px solid var(--line); vertical-align:top; }
table.studies tr:last-child td { border-bottom:none; }
img.thumb { width:112px; height:112px; object-fit:contain; background:#000; border-radius:4px; display:block; }
.nothumb { width:112px; height:112px; border-radius:4px; background:#e9edf2; color:var(--muted); font-size:.8rem;
           display:flex; align-items:center; justify-content:center; text-align:center; }
.finding { font-weight:600; font-size:1.05rem; }
.small { font-size:.85rem; color:var(--muted); }
.pill { display:inline-block; padding:1px 10px; border-radius:999px; font-size:.9rem; font-weight:600;
        border:1px solid transparent; }
.risk-low { background:#e6f4ea; color:#1e5e34; }
.risk-intermediate { background:#fff1d6; color:#7a4b00; }
.risk-high { background:#fde4de; color:#8f2410; }
.risk-other { background:#eceff3; color:var(--ink); }
.fb-agree { color:var(--agree); font-weight:600; }
.fb-disagree { color:var(--disagree); font-weight:600; }
.comment { white-space:pre-wrap; overflow-wrap:anywhere; margin:2px 0 0; }
form.fb { margin-top:8px; }
form.fb fieldset { border:none; padding:0; margin:0 0 6px; display:flex; gap:14px; flex-wrap:wrap; }
form.fb label { cursor:pointer; }
form.fb textarea { width:100%; min-width:220px; font:inherit; font-size:.9rem; padding:6px; border:1px solid #c4ccd6;
                   border-radius:4px; }
button { font:inherit; font-size:.9rem; padding:5px 14px; border-radius:4px; border:1px solid var(--accent);
         background:var(--accent); color:#fff; cursor:pointer; }
.links a { margin-right:12px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:6px; padding:16px 18px;
        margin-bottom:18px; }
.grid { display:grid; grid-template-columns: minmax(280px, 1fr) minmax(280px, 1fr); gap:18px; }
.bar { display:flex; align-items:center; gap:10px; margin:4px 0; }
.bar .name { width:210px; }
.bar .track { flex:1; background:#eceff3; height:10px; border-radius:5px; overflow:hidden; max-width:260px; }
.bar .fill { background:var(--accent); height:100%; }
.gallery { display:flex; flex-wrap:wrap; gap:10px; }
.gallery img { height:220px; background:#000; border-radius:4px; }
iframe.report { width:100%; height:900px; border:1px solid var(--line); border-radius:6px; background:#fff; }
ul.history { list-style:none; padding:0; margin:6px 0 0; }
ul.history li { border-top:1px solid var(--line); padding:6px 0; }
footer { color:var(--muted); font-size:.85rem; padding:10px 28px 24px; max-width:1280px; }
.error { color:var(--disagree); }
"""


def _page(title: str, body: str, *, subtitle: str = "", footer_note: str = "") -> bytes:
    sub = f"<p>{esc(subtitle)}</p>" if subtitle else ""
    doc = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header class="top"><h1>{esc(title)}</h1>{sub}</header>
<main>
{body}
</main>
<footer>
<p>Reviews entered here are stored only at this site, in a local file{footer_note}. Nothing is sent anywhere.</p>
<p>{esc(DISCLAIMER)}</p>
</footer>
</body>
</html>
"""
    return doc.encode("utf-8")


def _feedback_summary(fb: Feedback | None) -> str:
    if fb is None:
        return '<div class="small">Not reviewed yet</div>'
    cls = "fb-agree" if fb.verdict == "agree" else "fb-disagree"
    comment = f'<p class="comment">{esc(fb.comment)}</p>' if fb.comment else ""
    return (f'<div class="feedback"><span class="{cls}">{esc(verdict_words(fb.verdict))}</span>'
            f' <span class="small">({esc(when_words(fb.created_utc))})</span>{comment}</div>')


def _feedback_form(study: Study, token: str, *, next_page: str, current: Feedback | None, compact: bool) -> str:
    key = study.key
    uid = f"{hashlib.sha1(key.encode()).hexdigest()[:10]}-{next_page}"
    checked = {v: (' checked' if current is not None and current.verdict == v else "") for v in ALLOWED_VERDICTS}
    rows = 2 if compact else 4
    return f"""<form class="fb" method="post" action="{esc(study_url(key, 'feedback'))}">
<input type="hidden" name="token" value="{esc(token)}">
<input type="hidden" name="next" value="{esc(next_page)}">
<fieldset>
<label><input type="radio" name="verdict" value="agree" id="agree-{uid}" required{checked['agree']}> I agree</label>
<label><input type="radio" name="verdict" value="disagree" id="disagree-{uid}"{checked['disagree']}> I disagree</label>
</fieldset>
<textarea name="comment" rows="{rows}" maxlength="{MAX_COMMENT_CHARS}" placeholder="Comment (optional)"
 aria-label="Comment (optional)"></textarea>
<div><button type="submit">Save review</button></div>
</form>"""


def _thumb(study: Study, overlays: list[str]) -> str:
    if overlays:
        return (f'<img class="thumb" src="{esc(file_url(study.key, overlays[0]))}" '
                f'alt="Heat-map overlay of study {esc(study.key)}">')
    return '<div class="nothumb">No image</div>'


def _risk_html(prediction: Mapping[str, Any]) -> str:
    label, explanation, cls = risk_words(prediction)
    if not label:
        return '<span class="small">Not available</span>'
    expl = f'<div class="small">{esc(explanation)}</div>' if explanation else ""
    return f'<span class="pill {esc(cls)}">{esc(label)}</span>{expl}'


def render_list(results_dir: Path, store: FeedbackStore, token: str, db_note: str) -> bytes:
    studies = list_studies(results_dir)
    latest = store.latest_all()
    refused = read_refused(results_dir)
    parts = [f'<div class="notice">{esc(DISCLAIMER)}</div>']
    if not studies:
        parts.append('<div class="card">No predicted studies in this results folder yet.</div>')
    else:
        rows = []
        for study in studies:
            pred = study.prediction
            overlays = study.overlays()
            shown_key = pred.get("study_key") or study.key
            when = when_words(pred.get("created_utc"))
            finding = (f'<div class="error">{esc(study.error)}</div>' if study.error
                       else f'<div class="finding">{esc(finding_words(pred))}</div>')
            report_link = (f'<a href="{esc(study_url(study.key, "report"))}" class="report-link">Open report</a>'
                           if study.has_report else '<span class="small">No report</span>')
            rows.append(f"""<tr class="study" id="study-{esc(study.key)}" data-study-key="{esc(study.key)}">
<td><a href="{esc(study_url(study.key))}">{_thumb(study, overlays)}</a></td>
<td>{finding}
<div class="small">Study <a href="{esc(study_url(study.key))}" class="study-link">{esc(shown_key)}</a>
{f'&middot; predicted {esc(when)}' if when else ''}</div>
<div class="links small">{report_link}<a href="{esc(study_url(study.key))}">Details and review</a></div></td>
<td>{_risk_html(pred)}</td>
<td class="small">{esc(model_words(pred)) or 'Not recorded'}</td>
<td class="review">{_feedback_summary(latest.get(study.key))}
{_feedback_form(study, token, next_page="list", current=latest.get(study.key), compact=True)}</td>
</tr>""")
        parts.append(f"""<table class="studies">
<thead><tr><th>Image</th><th>Finding</th><th>Risk of severe outcome</th><th>Model</th><th>Your review</th></tr></thead>
<tbody>
{''.join(rows)}
</tbody>
</table>""")
    if refused:
        items = "".join(
            f"<li><strong>{esc(Path(r['path']).name or r['path'])}</strong>: {esc(r['message'] or r['reason'])}</li>"
            for r in refused)
        parts.append(f'<div class="card refused" style="margin-top:18px"><h2 style="margin-top:0;font-size:1.1rem">'
                     f'Not analysed ({len(refused)})</h2><p class="small">These scans were not given to the model, '
                     f'so there is no finding for them.</p><ul>{items}</ul></div>')
    n = len(studies)
    return _page("CT review \u2014 model findings", "\n".join(parts),
                 subtitle=f"{n} stud{'y' if n == 1 else 'ies'} \u00b7 {results_dir.name}", footer_note=db_note)


def render_study(study: Study, store: FeedbackStore, token: str, db_note: str) -> bytes:
    pred = study.prediction
    history = store.history(study.key)
    current = history[0] if history else None
    overlays = study.overlays()
    shown_key = pred.get("study_key") or study.key
    probs = _probabilities(pred)
    bars = "".join(
        f'<div class="bar"><span class="name">{esc(class_title(name))}</span>'
        f'<span class="track"><span class="fill" style="display:block;width:{p * 100:.1f}%"></span></span>'
        f'<span>{esc(percent(p))}</span></div>' for name, p in probs)
    details = []
    if pred.get("StudyInstanceUID"):
        details.append(f"Study UID: {esc(pred['StudyInstanceUID'])}")
    if pred.get("created_utc"):
        details.append(f"Predicted: {esc(when_words(pred['created_utc']))}")
    model = model_words(pred)
    if model:
        details.append(f"Model: {esc(model)}")
    finding = (f'<p class="error">{esc(study.error)}</p>' if study.error
               else f'<p class="finding">{esc(finding_words(pred))}</p>')
    history_html = ""
    if len(history) > 1:
        items = "".join(f"<li>{_feedback_summary(fb)}</li>" for fb in history[1:])
        history_html = f'<details><summary class="small">Earlier reviews ({len(history) - 1})</summary>' \
                       f'<ul class="history">{items}</ul></details>'
    gallery = "".join(f'<a href="{esc(file_url(study.key, o))}"><img src="{esc(file_url(study.key, o))}" '
                      f'alt="Heat-map overlay {i + 1}"></a>' for i, o in enumerate(overlays))
    gallery_html = (f'<div class="card"><h2 style="margin-top:0;font-size:1.1rem">Where the model looked</h2>'
                    f'<p class="small">Warmer colours mark the regions that weighed most in the finding; they are '
                    f'not a segmentation of disease.</p><div class="gallery">{gallery}</div></div>') if overlays else ""
    if study.has_report:
        report_html = (f'<div class="card"><h2 style="margin-top:0;font-size:1.1rem">Report</h2>'
                       f'<p class="links small"><a href="{esc(study_url(study.key, "report"))}" class="report-link" '
                       f'target="_blank" rel="noopener">Open the report in a new tab</a></p>'
                       f'<iframe class="report" sandbox src="{esc(study_url(study.key, "report"))}" '
                       f'title="Report of study {esc(shown_key)}"></iframe></div>')
    else:
        report_html = '<div class="card small">No report was written for this study.</div>'
    body = f"""<p class="links small"><a href="/" class="back-link">&larr; All studies</a></p>
<div class="notice">{esc(DISCLAIMER)}</div>
<div class="grid">
<div class="card">
{finding}
{bars}
<p>Risk of severe outcome: {_risk_html(pred)}</p>
<p class="small">{'<br>'.join(details)}</p>
</div>
<div class="card" id="review">
<h2 style="margin-top:0;font-size:1.1rem">Your review</h2>
<div class="current">{_feedback_summary(current)}</div>
{_feedback_form(study, token, next_page="study", current=current, compact=False)}
{history_html}
</div>
</div>
{gallery_html}
{report_html}"""
    return _page(f"Study {shown_key}", body, subtitle="CT review \u2014 model finding", footer_note=db_note)


def render_error(status: HTTPStatus, message: str) -> bytes:
    body = f'<div class="card"><p>{esc(message)}</p><p><a href="/">Back to all studies</a></p></div>'
    return _page(f"{status.value} {status.phrase}", body)


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

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, page: bool = True,
              headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Frame-Options", "SAMEORIGIN")
        if page:
            self.send_header("Content-Security-Policy", _PAGE_CSP)
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
            self._send(HTTPStatus.OK, render_list(srv.results_dir, srv.store, srv.form_token, db_note),
                       "text/html; charset=utf-8")
            return
        if parts[0] != "study" or len(parts) < 2:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "This page does not exist.")
        study = self._study(parts[1])
        if len(parts) == 2:
            self._send(HTTPStatus.OK, render_study(study, srv.store, srv.form_token, db_note),
                       "text/html; charset=utf-8")
        elif len(parts) == 3 and parts[2] == "report":
            self._send_file(study, ["report.html"], missing="No report was written for this study.")
        elif len(parts) >= 4 and parts[2] == "file":
            self._send_file(study, [unquote(p) for p in parts[3:]], missing="There is no such file for this study.")
        else:
            raise _HTTPError(HTTPStatus.NOT_FOUND, "This page does not exist.")

    def _send_file(self, study: Study, segments: list[str], *, missing: str) -> None:
        if not segments or not all(_valid_segment(s) for s in segments):
            raise _HTTPError(HTTPStatus.NOT_FOUND, missing)
        candidate = study.folder.joinpath(*segments)
        if not candidate.is_file() or not _inside(study.folder, candidate):
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
            raise _HTTPError(HTTPStatus.FORBIDDEN,
                             "This form has expired (the review page was restarted). Reload the page and try again.")
        verdict = form.get("verdict", "").strip().lower()
        if verdict not in ALLOWED_VERDICTS:
            raise _HTTPError(HTTPStatus.BAD_REQUEST, "Please choose \u201cI agree\u201d or \u201cI disagree\u201d.")
        comment = form.get("comment", "").replace("\r\n", "\n").replace("\r", "\n").strip()
        if len(comment) > MAX_COMMENT_CHARS:
            raise _HTTPError(HTTPStatus.BAD_REQUEST,
                             f"The comment is too long ({len(comment)} characters; at most {MAX_COMMENT_CHARS}).")
        self.server.store.add(study.key, verdict, comment)
        if form.get("next") == "study":
            target = study_url(study.key) + "#review"
        else:
            target = "/#study-" + quote(study.key, safe="")
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", headers={"Location": target})


def make_server(results_dir: Path, *, host: str = "127.0.0.1", port: int = 8765, db_path: Path | None = None,
                allow_remote: bool = False) -> ReviewServer:
    """A review server bound to ``host:port`` (port 0: a free port; see ``server.server_address``), not yet serving.

    Raises ValueError for a non-loopback ``host`` unless ``allow_remote=True`` (the page has no login), for a
    results folder that does not exist and for a feedback database that cannot be opened; OSError when the
    address cannot be bound.
    """
    results_dir = Path(results_dir)
    if not _is_loopback(host) and not allow_remote:
        raise ValueError(f"refusing to serve the review page on {host!r}: it has no login and shows study results, "
                         "so it listens on this computer only (127.0.0.1). Pass allow_remote=True explicitly to "
                         "serve it on another address (only behind an authenticated connection).")
    if not results_dir.is_dir():
        raise ValueError(f"results folder {results_dir} does not exist or is not a folder")
    store = FeedbackStore(Path(db_path) if db_path is not None else results_dir / DEFAULT_DB_NAME)
    bind_host = host.strip("[]")
    cls = _ReviewServer6 if ":" in bind_host else ReviewServer
    return cls((bind_host, port), results_dir, store, allow_remote=allow_remote)


def serve(results_dir: Path, *, host: str = "127.0.0.1", port: int = 8765, db_path: Path | None = None,
          allow_remote: bool = False) -> None:
    """Serve the review page until interrupted (Ctrl-C)."""
    server = make_server(results_dir, host=host, port=port, db_path=db_path, allow_remote=allow_remote)
    print(f"review page for {Path(results_dir)} at {server.url} (feedback in {server.store.path}); Ctrl-C stops it",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":  # python -m inference.review RESULTS [PORT]
    serve(Path(sys.argv[1]), port=int(sys.argv[2]) if len(sys.argv) > 2 else 8765)

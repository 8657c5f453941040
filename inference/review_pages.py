"""The review page's HTML: the study list and one study's page, with the words of :mod:`inference.wording`.
Pure functions from the results folder's data (:mod:`inference.review_store`) to bytes; :mod:`inference.review`
serves them."""

from __future__ import annotations

import hashlib
import html
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote

from inference.report import profile_html
from inference.review_store import (
    ALLOWED_VERDICTS,
    MAX_COMMENT_CHARS,
    MAX_READER_CHARS,
    Feedback,
    FeedbackStore,
    Study,
    list_studies,
    read_refused,
)
from inference.wording import (
    DISCLAIMER,
    IDENTIFIERS_HIDDEN,
    IDENTIFIERS_LOCAL,
    class_title,
    confidence_note,
    finding_sentence,
    heat_map_legend,
    is_low_confidence,
    is_unusual_input,
    percent,
    registry_words,
    risk_explanation,
    risk_label,
    unusual_input_note,
)

__all__ = ["PAGE_CSP", "render_error", "render_list", "render_study"]

#: Our own pages run no script and load nothing from elsewhere.
PAGE_CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; frame-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
)

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
    words = " ".join(str(p) for p in parts)
    registered = registry_words(model)
    return f"{words}, {registered}" if words and registered else words or registered


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
        dt = dt.astimezone(UTC)
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
.low-confidence { background:#fdecea; border-left:4px solid #b42318; padding:.35rem .6rem; font-weight:600; }
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
.identity { margin:2px 0 4px; }
.identity > span { display:inline-block; margin-right:14px; }
.identity .id-value { font-weight:600; color:var(--ink); }
.identity.hidden { font-style:italic; }
.card.identity { display:flex; flex-wrap:wrap; gap:4px 22px; align-items:baseline; margin:0 0 18px; padding:10px 18px; }
.card.identity .id-value { font-size:1.1rem; }
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
    corrected = (
        f' <span class="fb-disagree">Corrected diagnosis: {esc(fb.corrected_diagnosis.replace("_", " "))}</span>'
        if fb.corrected_diagnosis
        else ""
    )
    by = f"{fb.reader}, " if fb.reader else ""
    model = f", model {fb.model_version}" if fb.model_version else ""
    return (
        f'<div class="feedback"><span class="{cls}">{esc(verdict_words(fb.verdict))}</span>{corrected}'
        f' <span class="small">({esc(by + when_words(fb.created_utc) + model)})</span>{comment}</div>'
    )


def _class_names(study: Study) -> list[str]:
    """The model's classes as its prediction lists them (the choices of a corrected diagnosis)."""
    probabilities = study.prediction.get("probabilities")
    return [str(k) for k in probabilities] if isinstance(probabilities, dict) else []


def _feedback_form(study: Study, token: str, *, next_page: str, current: Feedback | None, compact: bool) -> str:
    key = study.key
    uid = f"{hashlib.sha1(key.encode()).hexdigest()[:10]}-{next_page}"
    checked = {v: (" checked" if current is not None and current.verdict == v else "") for v in ALLOWED_VERDICTS}
    rows = 2 if compact else 4
    choices = '<option value="">(none)</option>' + "".join(
        f'<option value="{esc(c)}">{esc(c.replace("_", " "))}</option>' for c in _class_names(study)
    )
    return f"""<form class="fb" method="post" action="{esc(study_url(key, "feedback"))}">
<input type="hidden" name="token" value="{esc(token)}">
<input type="hidden" name="next" value="{esc(next_page)}">
<fieldset>
<label><input type="radio" name="verdict" value="agree" id="agree-{uid}" required{checked["agree"]}> I agree</label>
<label><input type="radio" name="verdict" value="disagree" id="disagree-{uid}"{checked["disagree"]}> I disagree</label>
</fieldset>
<label>Corrected diagnosis (if you disagree) <select name="corrected" id="corrected-{uid}">{choices}</select></label>
<input type="text" name="reader" maxlength="{MAX_READER_CHARS}" placeholder="Your name (optional)"
 aria-label="Your name (optional)">
<textarea name="comment" rows="{rows}" maxlength="{MAX_COMMENT_CHARS}" placeholder="Comment (optional)"
 aria-label="Comment (optional)"></textarea>
<div><button type="submit">Save review</button></div>
</form>"""


def _thumb(study: Study, overlays: list[str]) -> str:
    if overlays:
        return (
            f'<img class="thumb" src="{esc(file_url(study.key, overlays[0]))}" '
            f'alt="Heat-map overlay of study {esc(study.key)}">'
        )
    return '<div class="nothumb">No image</div>'


def _identity_html(study: Study, *, card: bool) -> str:
    """The study's local identifiers (accession number, patient name, ID), or that they are hidden on a research copy;
    nothing for results written before identifiers were kept."""
    if study.identifiers_hidden:
        cls = "card identity hidden" if card else "identity hidden small"
        return f'<div class="{cls}" data-hidden="true">{esc(IDENTIFIERS_HIDDEN)}</div>'
    identity = study.identity()
    if identity is None:
        return ""
    names = ("accession", "name", "patient-id")
    items = " ".join(
        f'<span class="id-{n}">{esc(label)}: <span class="id-value">{esc(value)}</span></span>'
        for n, (label, value) in zip(names, identity.rows())
    )
    if card:
        return f'<div class="card identity">{items}<span class="small">{esc(IDENTIFIERS_LOCAL)}</span></div>'
    return f'<div class="identity small">{items}</div>'


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
            probs = dict(_probabilities(pred))
            flag = (
                '<div class="small low-confidence">Low confidence: see the study page</div>'
                if probs and is_low_confidence(probs)
                else ""
            )
            if is_unusual_input(pred.get("out_of_distribution")):
                flag += '<div class="small low-confidence unusual-input">Unusual input: see the study page</div>'
            finding = (
                f'<div class="error">{esc(study.error)}</div>'
                if study.error
                else f'<div class="finding">{esc(finding_words(pred))}</div>{flag}'
            )
            report_link = (
                f'<a href="{esc(study_url(study.key, "report"))}" class="report-link">Open report</a>'
                if study.has_report
                else '<span class="small">No report</span>'
            )
            rows.append(f"""<tr class="study" id="study-{esc(study.key)}" data-study-key="{esc(study.key)}">
<td><a href="{esc(study_url(study.key))}">{_thumb(study, overlays)}</a></td>
<td>{finding}
{_identity_html(study, card=False)}
<div class="small">Study <a href="{esc(study_url(study.key))}" class="study-link">{esc(shown_key)}</a>
{f"&middot; predicted {esc(when)}" if when else ""}</div>
<div class="links small">{report_link}<a href="{esc(study_url(study.key))}">Details and review</a></div></td>
<td>{_risk_html(pred)}</td>
<td class="small">{esc(model_words(pred)) or "Not recorded"}</td>
<td class="review">{_feedback_summary(latest.get(study.key))}
{_feedback_form(study, token, next_page="list", current=latest.get(study.key), compact=True)}</td>
</tr>""")
        parts.append(f"""<table class="studies">
<thead><tr><th>Image</th><th>Finding</th><th>Risk of severe outcome</th><th>Model</th><th>Your review</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody>
</table>""")
    if refused:
        items = "".join(
            f"<li><strong>{esc(Path(r['path']).name or r['path'])}</strong>: {esc(r['message'] or r['reason'])}</li>"
            for r in refused
        )
        parts.append(
            f'<div class="card refused" style="margin-top:18px"><h2 style="margin-top:0;font-size:1.1rem">'
            f'Not analysed ({len(refused)})</h2><p class="small">These scans were not given to the model, '
            f"so there is no finding for them.</p><ul>{items}</ul></div>"
        )
    n = len(studies)
    return _page(
        "CT review \u2014 model findings",
        "\n".join(parts),
        subtitle=f"{n} stud{'y' if n == 1 else 'ies'} \u00b7 {results_dir.name}",
        footer_note=db_note,
    )


def _legend(pred: dict) -> str:
    """The overlay legend (method and colours) of a stored prediction."""
    explanation = pred.get("explanation") if isinstance(pred.get("explanation"), dict) else {}
    return heat_map_legend(explanation.get("method") or "Grad-CAM++", pred.get("diagnosis") or "the finding")


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
        f"<span>{esc(percent(p))}</span></div>"
        for name, p in probs
    )
    details = []
    if pred.get("StudyInstanceUID"):
        details.append(f"Study UID: {esc(pred['StudyInstanceUID'])}")
    if pred.get("created_utc"):
        details.append(f"Predicted: {esc(when_words(pred['created_utc']))}")
    model = model_words(pred)
    if model:
        details.append(f"Model: {esc(model)}")
    note = confidence_note(dict(probs)) if probs and not study.error else ""
    unusual = unusual_input_note(pred.get("out_of_distribution")) if not study.error else ""
    finding = (
        f'<p class="error">{esc(study.error)}</p>'
        if study.error
        else f'<p class="finding">{esc(finding_words(pred))}</p>'
        + (f'<p class="low-confidence" role="note">{esc(note)}</p>' if note else "")
        + (f'<p class="low-confidence unusual-input" role="note">{esc(unusual)}</p>' if unusual else "")
    )
    history_html = ""
    if len(history) > 1:
        items = "".join(f"<li>{_feedback_summary(fb)}</li>" for fb in history[1:])
        history_html = (
            f'<details><summary class="small">Earlier reviews ({len(history) - 1})</summary>'
            f'<ul class="history">{items}</ul></details>'
        )
    gallery = "".join(
        f'<a href="{esc(file_url(study.key, o))}"><img src="{esc(file_url(study.key, o))}" '
        f'alt="Heat-map overlay {i + 1}"></a>'
        for i, o in enumerate(overlays)
    )
    gallery_html = (
        (
            f'<div class="card"><h2 style="margin-top:0;font-size:1.1rem">Where the model looked</h2>'
            f'<p class="small legend">{esc(_legend(pred))}</p><div class="gallery">{gallery}</div></div>'
        )
        if overlays
        else ""
    )
    if study.has_report:
        report_html = (
            f'<div class="card"><h2 style="margin-top:0;font-size:1.1rem">Report</h2>'
            f'<p class="links small"><a href="{esc(study_url(study.key, "report"))}" class="report-link" '
            f'target="_blank" rel="noopener">Open the report in a new tab</a></p>'
            f'<iframe class="report" sandbox src="{esc(study_url(study.key, "report"))}" '
            f'title="Report of study {esc(shown_key)}"></iframe></div>'
        )
    else:
        report_html = '<div class="card small">No report was written for this study.</div>'
    body = f"""<p class="links small"><a href="/" class="back-link">&larr; All studies</a></p>
{_identity_html(study, card=True)}
<div class="notice">{esc(DISCLAIMER)}</div>
<div class="grid">
<div class="card">
{finding}
{bars}
<p>Risk of severe outcome: {_risk_html(pred)}</p>
<p class="small">{"<br>".join(details)}</p>
</div>
<div class="card" id="review">
<h2 style="margin-top:0;font-size:1.1rem">Your review</h2>
<div class="current">{_feedback_summary(current)}</div>
{_feedback_form(study, token, next_page="study", current=current, compact=False)}
{history_html}
</div>
</div>
{profile_html(pred.get("profile"))}
{gallery_html}
{report_html}"""
    return _page(f"Study {shown_key}", body, subtitle="CT review \u2014 model finding", footer_note=db_note)


def render_error(status: HTTPStatus, message: str) -> bytes:
    body = f'<div class="card"><p>{esc(message)}</p><p><a href="/">Back to all studies</a></p></div>'
    return _page(f"{status.value} {status.phrase}", body)

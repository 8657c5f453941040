"""The clinician's report: one self-contained HTML page per study (inline CSS, images as data URIs, no links out).

The page reads on one screen: the disclaimer, the finding in words with its (calibrated) probability, a
low-confidence note when the call is close (:func:`inference.wording.confidence_note`) or the study looks unlike the
training studies (:func:`inference.wording.unusual_input_note`), all class probabilities, the
risk group with its score and what it means against the training population, the key-slice heat maps with captions,
and the model's identity. To find the patient it shows the study's local identifiers (accession number, patient name
and ID: :mod:`inference.local_identity`), passed in by the prediction at this site; the report is a site-local file.
On a research copy (identifiers off) it says they are hidden and carries no patient data besides the StudyInstanceUID.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from inference.local_identity import HIDDEN, LocalIdentity
from inference.wording import (
    DISCLAIMER,
    IDENTIFIERS_HIDDEN,
    IDENTIFIERS_LOCAL,
    PROFILE_HEADING,
    calibration_sentence,
    class_phrase,
    class_title,
    confidence_note,
    finding_sentence,
    heat_map_legend,
    percent,
    profile_contribution_phrase,
    profile_contributions_sentence,
    profile_intro,
    profile_missing_sentence,
    profile_value_text,
    registry_words,
    risk_sentence,
    unusual_input_note,
)

__all__ = ["DISCLAIMER", "REPORT_NAME", "class_phrase", "percent", "write_report"]

REPORT_NAME = "report.html"
#: Risk groups with their own colour on the page.
_RISK_GROUPS = ("low", "intermediate", "high")


def _get(result: Any, name: str, default: Any = None) -> Any:
    if isinstance(result, Mapping):
        return result.get(name, default)
    return getattr(result, name, default)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0;background:#f4f5f7;color:#1b1f24;font-size:14px}
main{max-width:1280px;margin:0 auto;padding:12px 18px}
.disclaimer{background:#fff3cd;border:2px solid #d39e00;color:#5c4400;padding:8px 12px;border-radius:6px;font-weight:600;margin-bottom:10px}
.grid{display:grid;grid-template-columns:minmax(300px,1fr) 2.4fr;gap:14px;align-items:start}
@media (max-width:900px){.grid{grid-template-columns:1fr}}
.card{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:10px 14px}
h1{font-size:18px;margin:4px 0 8px} h2{font-size:15px;margin:10px 0 6px}
.finding{font-size:17px;font-weight:600;margin:4px 0 10px}
.low-confidence{background:#fdecea;border-left:4px solid #b42318;padding:6px 10px;margin:0 0 10px;font-weight:600}
table{border-collapse:collapse;width:100%} td,th{padding:3px 6px;text-align:left;border-bottom:1px solid #eceff2}
#probabilities td:first-child{width:45%} #probabilities td:last-child{width:40%}
td.num{text-align:right;font-variant-numeric:tabular-nums;width:4.5em}
.bar{background:#e6e9ed;border-radius:3px;height:10px;width:100%} .bar span{display:block;height:10px;border-radius:3px;background:#2f6fba}
tr.top td{font-weight:600} tr.top .bar span{background:#c0392b}
.risk-low{color:#1e7b34} .risk-intermediate{color:#9a6700} .risk-high{color:#b42318} .risk-unavailable{color:#57606a}
.overlays{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:8px} figure{margin:0}
figure img{width:100%;height:auto;border-radius:4px;background:#000} figcaption{font-size:12px;color:#444;margin-top:3px}
.identity{display:flex;flex-wrap:wrap;gap:4px 18px;align-items:baseline;background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:6px 12px;margin-bottom:10px}
.identity b{font-size:15px} .identity .note{font-size:12px;color:#57606a}
.profile tr.missing td{color:#8a9099} .profile tr.top td{font-weight:600}
.meta{font-size:12px;color:#57606a} .meta td{border:0;padding:1px 6px 1px 0} code{font-size:11px;word-break:break-all}
"""


def _probability_rows(probabilities: Mapping[str, float], diagnosis: str) -> str:
    rows = []
    for name, p in probabilities.items():
        width = max(0.0, min(100.0, 100.0 * float(p)))
        rows.append(
            f'<tr class="{"top" if name == diagnosis else ""}" data-class="{html.escape(name)}" data-probability="{float(p):.6f}">'
            f"<td>{html.escape(class_title(name))}</td>"
            f'<td class="num">{html.escape(percent(float(p)))}</td>'
            f'<td><div class="bar"><span style="width:{width:.1f}%"></span></div></td></tr>'
        )
    return "\n".join(rows)


def _figures(result: Any, class_label: str, method: str) -> str:
    overlays = [Path(p) for p in (_get(result, "overlays") or ())]
    slices = list(_get(result, "key_slices") or ())
    positions = list(_get(result, "key_slice_positions_mm") or ())
    n_slices = len((_get(result, "series") or {}).get("paths", ()))
    figures = []
    for i, path in enumerate(overlays):
        k = slices[i] if i < len(slices) else None
        where = ""
        if k is not None:
            where = f"slice {k + 1}" + (f" of {n_slices}" if n_slices else "")
            if i < len(positions):
                where += f", position {positions[i]:.1f} mm"
        caption = (
            f"Key slice {i + 1}{' (' + where + ')' if where else ''}: where the image most influenced the "
            f"prediction of {html.escape(class_phrase(class_label))} ({html.escape(method)}; red = strongest). Lung window."
        )
        figures.append(
            f'<figure><img src="{_data_uri(path)}" alt="Heat map, key slice {i + 1}" data-file="{html.escape(path.name)}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if not figures:
        return "<p>No heat-map images were produced for this study.</p>"
    legend = f'<p class="legend">{html.escape(heat_map_legend(method, class_label))}</p>'
    return legend + "\n" + "\n".join(figures)


def profile_html(profile: Mapping[str, Any] | None) -> str:
    """The profile section (values used, missing ones, contributions to the risk score), or "" for a model without
    profile fusion. Shared by the report and the review page."""
    if not profile:
        return ""
    esc = html.escape
    rows = []
    for e in profile.get("variables") or ():
        risk = e.get("risk_contribution")
        cls = "missing" if e.get("missing") else ("top" if e.get("name") in (profile.get("top_risk") or ()) else "")
        rows.append(
            f'<tr class="{cls}" data-variable="{esc(str(e.get("name")))}" data-missing="{str(bool(e.get("missing"))).lower()}"'
            + (f' data-risk-contribution="{float(risk):.6f}"' if isinstance(risk, int | float) else "")
            + ">"
            f"<td>{esc(str(e.get('label') or e.get('name')))}</td>"
            f"<td>{esc(profile_value_text(e.get('value'), e.get('unit')))}</td>"
            f"<td>{esc(profile_contribution_phrase(risk) or e.get('note', ''))}</td></tr>"
        )
    missing = profile_missing_sentence(profile)
    return (
        f'<section class="card" id="profile"><h2>{esc(PROFILE_HEADING)}</h2>'
        f'<p class="meta">{esc(profile_intro(profile.get("source")))}</p>'
        f'<p id="profile-summary">{esc(profile_contributions_sentence(profile))}</p>'
        + (f'<p id="profile-missing" class="meta">{esc(missing)}</p>' if missing else "")
        + '<table class="profile"><thead><tr><th>Variable</th><th>Value</th><th>Effect in this model</th></tr></thead><tbody>'
        + "".join(rows)
        + f'</tbody></table><p class="meta">Method: {esc(str(profile.get("method", "")))}</p></section>'
    )


def _identity_html(result: Any, identity: LocalIdentity | None) -> str:
    """The patient line at the top: the local identifiers, "hidden" on a research copy, else nothing."""
    esc = html.escape
    if str(_get(result, "local_identifiers", "")) == HIDDEN:
        return f'<div class="identity" id="identity" data-hidden="true"><span>{esc(IDENTIFIERS_HIDDEN)}</span></div>\n'
    if identity is None:
        return ""
    items = "".join(f"<span>{esc(label)}: <b>{esc(value)}</b></span>" for label, value in identity.rows())
    return f'<div class="identity" id="identity">{items}<span class="note">{esc(IDENTIFIERS_LOCAL)}</span></div>\n'


def render_report(result: Any, *, identity: LocalIdentity | None = None) -> str:
    """The report page of one result (a :class:`inference.predict.StudyResult` or its dict form) as HTML text;
    ``identity``: the study's local identifiers, shown at the top (ignored on a research copy)."""
    probabilities = {str(k): float(v) for k, v in dict(_get(result, "probabilities") or {}).items()}
    diagnosis = str(_get(result, "diagnosis"))
    if diagnosis not in probabilities:
        raise ValueError(f"diagnosis {diagnosis!r} is not one of the classes {sorted(probabilities)}")
    risk = float(_get(result, "risk_score", float("nan")))
    group = str(_get(result, "risk_group", "unavailable"))
    quantiles = _get(result, "risk_quantiles")
    model = dict(_get(result, "model") or {})
    explanation = dict(_get(result, "explanation") or {})
    esc = html.escape
    group_class = f"risk-{group}" if group in _RISK_GROUPS else "risk-unavailable"
    note = confidence_note(probabilities)
    note_html = f'<p class="low-confidence" id="confidence" role="note">{esc(note)}</p>\n' if note else ""
    unusual = unusual_input_note(_get(result, "out_of_distribution"))
    if unusual:
        note_html += f'<p class="low-confidence unusual-input" id="unusual-input" role="note">{esc(unusual)}</p>\n'
    rows_meta = [
        ("Model", f"{esc(str(model.get('name', 'unknown')))}, fedct {esc(str(model.get('fedct_version', 'unknown')))}"),
        ("Model version", esc(registry_words(model) or "not a registered version")),
        ("Probabilities", esc(calibration_sentence(model.get("temperature"), bool(model.get("calibrated"))))),
        ("Model created", esc(str(model.get("created_utc") or "unknown"))),
        (
            "Weights of round",
            esc(str(model.get("round_of_weights") if model.get("round_of_weights") is not None else "n/a")),
        ),
        ("Heat map", esc(f"{explanation.get('method', 'Grad-CAM')} at {explanation.get('target_layer', 'n/a')}")),
        ("Report created", esc(str(_get(result, "created_utc", "")))),
        ("StudyInstanceUID", f"<code>{esc(str(_get(result, 'StudyInstanceUID', '')))}</code>"),
        ("SeriesInstanceUID", f"<code>{esc(str(_get(result, 'SeriesInstanceUID', '')))}</code>"),
        ("Study key", f"<code>{esc(str(_get(result, 'study_key', '')))}</code>"),
    ]
    meta_html = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows_meta)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>fedct CT decision support — {esc(str(_get(result, "study_key", "")))}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<div class="disclaimer" role="note" id="disclaimer">&#9888; {esc(DISCLAIMER)}</div>
{_identity_html(result, identity)}<div class="grid">
<section class="card">
<h1>Chest CT — model findings</h1>
<p class="finding" id="finding">{esc(finding_sentence(probabilities, diagnosis))}</p>
{note_html}<table id="probabilities"><tbody>
{_probability_rows(probabilities, diagnosis)}
</tbody></table>
<h2>Prognosis</h2>
<p id="risk" class="{group_class}" data-risk-score="{risk:.6f}" data-risk-group="{esc(group)}">{esc(risk_sentence(group, risk, quantiles))}</p>
<h2>About this result</h2>
<table class="meta"><tbody>{meta_html}</tbody></table>
</section>
<section class="card">
<h2>Where the model looked</h2>
<div class="overlays">
{_figures(result, diagnosis, str(explanation.get("method", "Grad-CAM")))}
</div>
</section>
</div>
{profile_html(_get(result, "profile"))}
</main>
</body>
</html>
"""


def write_report(result: Any, out_dir: Path, *, identity: LocalIdentity | None = None) -> Path:
    """Write ``out_dir/report.html`` for ``result`` (with the study's local ``identity`` when given); return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(result, identity=identity), encoding="utf-8")
    tmp.replace(path)
    return path

"""What a clinician reads, said once: the disclaimer, class names, percentages, the finding and risk sentences.

Every place that shows a prediction to a person — the HTML report (:mod:`inference.report`), the review page
(:mod:`inference.review`), the DICOM SR and secondary-capture objects (:mod:`inference.dicom_export`) and the
heat-map overlays' titles (:mod:`inference.explain`) — takes its words from here, so they cannot drift apart.
Plain text only: callers escape for HTML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "DISCLAIMER",
    "IDENTIFIERS_HIDDEN",
    "IDENTIFIERS_LOCAL",
    "LOW_CONFIDENCE_BELOW",
    "LOW_CONFIDENCE_MARGIN",
    "UNCERTAIN_BELOW",
    "calibration_sentence",
    "class_phrase",
    "class_title",
    "confidence_note",
    "finding_sentence",
    "is_low_confidence",
    "is_unusual_input",
    "unusual_input_note",
    "heat_map_colour_label",
    "heat_map_legend",
    "heat_map_method",
    "percent",
    "registry_words",
    "PROFILE_HEADING",
    "profile_contribution_phrase",
    "profile_contributions_sentence",
    "profile_intro",
    "profile_missing_sentence",
    "profile_value_text",
    "risk_explanation",
    "risk_label",
    "risk_sentence",
    "score",
]

#: Carried by every report, review page, SR (TEXT item) and secondary capture (ImageComments). ASCII only: it goes
#: into DICOM text attributes whatever the source's SpecificCharacterSet.
DISCLAIMER = (
    "Decision support from a research model, not a diagnosis; it may be wrong. Read it together with the images, "
    "the radiology report and the clinical picture; not for clinical use without local validation."
)

#: Shown where the patient's identifiers would be, on a results folder written with them off (a research copy).
IDENTIFIERS_HIDDEN = "Patient identifiers hidden (research copy)"
#: Said next to the identifiers the report and review page show: where they come from, that they stay here.
IDENTIFIERS_LOCAL = "Read from this study's DICOM at this site, to find the patient; they stay at this site."

#: Below this probability of the most likely class the finding is worded as uncertain.
UNCERTAIN_BELOW = 0.5
#: A result is flagged as low confidence when the (calibrated) probability of the most likely class is below this, or
#: when it leads the next class by less than :data:`LOW_CONFIDENCE_MARGIN`: the call is close to the decision between
#: two findings (the most likely class is the call), and a calibrated 60 % is wrong about 4 times in 10.
LOW_CONFIDENCE_BELOW = 0.6
LOW_CONFIDENCE_MARGIN = 0.2

#: How each class is said in a sentence ("Findings suggest ...") and as a label. Aliases map to the same words.
_CLASS_WORDS: dict[str, tuple[str, str]] = {
    "covid": ("a COVID-19-like pattern", "COVID-19-like pattern"),
    "other_pneumonia": ("another (non-COVID-19) pneumonia pattern", "Other pneumonia pattern"),
    "normal": ("no pneumonia pattern (normal lungs)", "No pneumonia pattern (normal)"),
}
_CLASS_ALIASES: dict[str, str] = {"covid19": "covid", "covid-19": "covid", "other-pneumonia": "other_pneumonia"}

#: Risk groups are tertiles of the training population's risk scores: (label, what the group means).
_RISK_WORDS: dict[str, tuple[str, str]] = {
    "low": ("Low", "lower than about two thirds of the training population (lowest third)"),
    "intermediate": ("Intermediate", "in the middle third of the training population"),
    "high": ("High", "higher than about two thirds of the training population (highest third)"),
}


def _class_key(name: Any) -> str:
    key = str(name).strip().lower()
    return _CLASS_ALIASES.get(key, key)


def class_phrase(name: Any) -> str:
    """The class in a sentence, e.g. ``a COVID-19-like pattern``; an unknown class with "_" as spaces."""
    words = _CLASS_WORDS.get(_class_key(name))
    return words[0] if words else str(name).replace("_", " ")


def class_title(name: Any) -> str:
    """The class as a label, e.g. ``COVID-19-like pattern``."""
    words = _CLASS_WORDS.get(_class_key(name))
    if words:
        return words[1]
    text = str(name).replace("_", " ")
    return text[:1].upper() + text[1:]


def percent(p: float | None) -> str:
    """A probability for people: ``82%``, ``<1%``, ``>99%`` (whole percent, never 0 % or 100 %), ``n/a``."""
    if p is None or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        return "n/a"
    if p < 0.005:
        return "<1%"
    if p >= 0.995:
        return ">99%"
    return f"{math.floor(100.0 * p + 0.5):.0f}%"


def score(x: float | None) -> str:
    """A risk score as printed (signed, two decimals), ``n/a`` when missing."""
    return f"{x:+.2f}" if x is not None and math.isfinite(x) else "n/a"


def finding_sentence(probabilities: Mapping[str, float], diagnosis: str | None = None) -> str:
    """``Findings suggest a COVID-19-like pattern (probability 82%).``; worded as uncertain when the most likely
    class is below :data:`UNCERTAIN_BELOW`; ``diagnosis`` defaults to the most likely class."""
    probs = {str(k): float(v) for k, v in probabilities.items()}
    if not probs:
        return "No finding recorded."
    if diagnosis is None or str(diagnosis) not in probs:
        diagnosis = max(probs, key=probs.__getitem__)
    p = probs[str(diagnosis)]
    if not (math.isfinite(p) and p >= UNCERTAIN_BELOW):
        return f"Uncertain result: the most likely is {class_phrase(diagnosis)} (probability {percent(p)})."
    return f"Findings suggest {class_phrase(diagnosis)} (probability {percent(p)})."


def _ranked(probabilities: Mapping[str, float]) -> list[tuple[str, float]]:
    probs = [(str(k), float(v)) for k, v in probabilities.items()]
    return sorted(((k, v) for k, v in probs if math.isfinite(v)), key=lambda kv: -kv[1])


def is_low_confidence(probabilities: Mapping[str, float]) -> bool:
    """True when the most likely class is below :data:`LOW_CONFIDENCE_BELOW` or leads the next one by less than
    :data:`LOW_CONFIDENCE_MARGIN` (also when no probability is finite)."""
    ranked = _ranked(probabilities)
    if not ranked:
        return True
    top = ranked[0][1]
    second = ranked[1][1] if len(ranked) > 1 else 0.0
    return top < LOW_CONFIDENCE_BELOW or top - second < LOW_CONFIDENCE_MARGIN


def confidence_note(probabilities: Mapping[str, float]) -> str:
    """Words for a low-confidence result (:func:`is_low_confidence`), ``""`` for a confident one. ASCII only."""
    if not is_low_confidence(probabilities):
        return ""
    ranked = _ranked(probabilities)
    if not ranked:
        return "Low confidence: the model gave no usable probability for this study."
    (top, p), rest = ranked[0], ranked[1:]
    runner = f"; next is {class_phrase(rest[0][0])} ({percent(rest[0][1])})" if rest else ""
    return (
        f"Low confidence: {class_phrase(top)} is the most likely at only {percent(p)}{runner}. The model cannot tell "
        "these findings apart reliably for this study; rely on the images and the clinical picture."
    )


def is_unusual_input(record: Mapping[str, Any] | None) -> bool:
    """True when a result's out-of-distribution record (prediction.json ``out_of_distribution``, :mod:`models.ood`)
    flags the study; False without a record (a bundle without a reference says nothing)."""
    return bool(isinstance(record, Mapping) and record.get("flagged") is True)


def unusual_input_note(record: Mapping[str, Any] | None) -> str:
    """Words for a study whose image features lie far from the training studies' (:func:`is_unusual_input`), ``""``
    otherwise. ASCII only."""
    if not is_unusual_input(record):
        return ""
    try:
        distance, threshold = float(record["distance"]), float(record["threshold"])
        share = 100.0 * (1.0 - float(record.get("quantile", 0.99)))
        figures = (
            f" (distance {distance:.1f} from the training studies' image features; a study like the training sites' "
            f"validation studies lies beyond {threshold:.1f} only about {share:.0f}% of the time)"
        )
    except (KeyError, TypeError, ValueError):
        figures = ""
    return (
        f"Unusual input: this study looks unlike the studies the model was trained on{figures}. The result may not "
        "apply to it: check that it is a chest CT of the kind the model is meant for, and rely on the images and the "
        "clinical picture."
    )


def calibration_sentence(temperature: Any, calibrated: bool = True) -> str:
    """How the probabilities were calibrated, for the report's "About this result" (``temperature`` of the bundle)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        t = math.nan
    if not calibrated or not math.isfinite(t) or t <= 0:
        return "not calibrated (the network's raw softmax; it may be over-confident)"
    return (
        f"calibrated on the training sites' validation data (temperature scaling, T = {t:.2f}): of results shown "
        "at 70%, about 7 in 10 should be right"
    )


def registry_words(model: Mapping[str, Any]) -> str:
    """Which registered model version made a result (the coordinator's registry, ``models.registry``), e.g.
    ``registry version v0003 (SHA-256 1a2b3c4d5e6f)``; ``""`` for a bundle that was never registered. ASCII only."""
    version = str(model.get("registry_version") or "").strip()
    if not version:
        return ""
    digest = str(model.get("content_sha256") or "")[:12]
    return f"registry version {version}" + (f" (SHA-256 {digest})" if digest else "")


def risk_label(group: Any) -> str:
    """``Low`` / ``Intermediate`` / ``High``; the group as given otherwise, ``""`` when there is none."""
    if group is None or str(group).strip() == "":
        return ""
    return _RISK_WORDS.get(str(group).strip().lower(), (str(group), ""))[0]


def risk_explanation(group: Any) -> str:
    """What the risk group means against the training population; ``""`` for an unknown group."""
    if group is None:
        return ""
    return _RISK_WORDS.get(str(group).strip().lower(), ("", ""))[1]


def risk_sentence(group: Any, risk: float | None, quantiles: Any = None) -> str:
    """What the risk group means, with the score and the tertile cut points; says so when there is no group."""
    meaning = risk_explanation(group)
    if meaning and quantiles:
        q1, q2 = (float(q) for q in quantiles)
        return (
            f"Risk of a severe outcome: {risk_label(group).lower()} (score {score(risk)}), {meaning}. "
            f"Tertile cut points of the training population: {score(q1)} and {score(q2)}. "
            "The score is a relative log-risk (Cox model): it ranks patients, it is not a probability."
        )
    return (
        f"Risk score {score(risk)}: no risk group, because this model carries no reference distribution of the "
        "training population. The score only ranks studies scored by the same model; it is not a probability."
    )


#: What each heat-map method shows, in words (keys: the names :mod:`inference.explain` records as ``method``).
_METHOD_WORDS: dict[str, str] = {
    "grad-cam": "Grad-CAM (which regions of the network's image features raised this finding's score)",
    "grad-cam++": "Grad-CAM++ (which regions of the network's image features raised this finding's score)",
    "occlusion": "occlusion sensitivity (how much the probability drops when a region is hidden)",
    "smoothgrad": "SmoothGrad (how strongly each voxel changes the score, averaged over noisy copies)",
    "guided-backprop": "guided backpropagation (voxels whose brightening raises the score)",
}


def heat_map_method(method: Any) -> str:
    """The heat-map method in words, e.g. ``Grad-CAM++ (which regions ...)``; an unknown name as given."""
    name = str(method or "").strip() or "unknown method"
    words = _METHOD_WORDS.get(name.lower().replace(" ", "-"), name)
    return words


def heat_map_colour_label() -> str:
    """The colour bar's label on an overlay: what the colours mean."""
    return "weight in the finding: red = most, blue = least (1 = study maximum)"


def heat_map_legend(method: Any, diagnosis: Any, *, threshold: float = 0.3) -> str:
    """One legend for every overlay (review page, report, secondary capture): the method and what the colours mean."""
    return (
        f"Heat map by {heat_map_method(method)}, for {class_phrase(diagnosis)}. Colours: red marks the regions that "
        f"weighed most in this finding, yellow and green less, blue least; below {100 * threshold:.0f}% of the "
        "study's maximum nothing is drawn. Key slices pass through the hottest separate regions. It shows where the "
        "model looked, not an outline of disease."
    )


# --- the clinical/molecular profile (inference.profile_view) --------------------------------------------------------

PROFILE_HEADING = "Clinical and laboratory profile used by the model"


def profile_intro(source: Any) -> str:
    """What the profile table is, where its values came from, and how to read the contributions."""
    where = str(source or "").strip()
    if where.startswith("no profile export"):
        return (
            "No clinical or laboratory values were given for this prediction: the model treated every one as "
            "missing (it does not estimate them)."
        )
    return (
        "Values the model received with the CT, from this site's clinical and laboratory export, in the "
        "consortium's units. The contribution says how much each value moved this model's output compared with "
        "leaving that value out; it describes the model, not a cause, and supports — does not replace — clinical "
        "judgement."
    )


def profile_value_text(value: Any, unit: Any) -> str:
    """A profile value as printed: "yes"/"no", a category, or a number with its unit; "not available" when missing."""
    if value is None:
        return "not available"
    if isinstance(value, str):
        return value
    number = f"{float(value):.3g}" if abs(float(value)) < 1000 else f"{float(value):.0f}"
    shown_unit = "" if unit in (None, "1") else f" {unit}"
    return number + shown_unit


def profile_contribution_phrase(risk: Any) -> str:
    """One value's effect on the risk score in words ("raised the risk score by 0.31"); "" when not computed."""
    if risk is None or not isinstance(risk, int | float) or not math.isfinite(risk):
        return ""
    if abs(risk) < 0.005:
        return "no visible effect on the risk score"
    return f"{'raised' if risk > 0 else 'lowered'} the risk score by {abs(risk):.2f}"


def profile_contributions_sentence(profile: Mapping[str, Any]) -> str:
    """Which values moved the risk score most, as decision support ("" when none did)."""
    by_name = {e.get("name"): e for e in profile.get("variables") or ()}
    parts = []
    for name in profile.get("top_risk") or ():
        entry = by_name.get(name) or {}
        phrase = profile_contribution_phrase(entry.get("risk_contribution"))
        if phrase:
            parts.append(
                f"{entry.get('label') or name} ({profile_value_text(entry.get('value'), entry.get('unit'))}: {phrase})"
            )
    if not parts:
        return "No clinical or laboratory value changed this model's risk score noticeably."
    return (
        "The values that moved this model's risk score most: "
        + "; ".join(parts)
        + ". For consideration with the full clinical picture."
    )


def profile_missing_sentence(profile: Mapping[str, Any]) -> str:
    """The variables that were missing (masked, not estimated), or "" when none was."""
    missing = [e.get("label") or e.get("name") for e in profile.get("variables") or () if e.get("missing")]
    if not missing:
        return ""
    return (
        f"Not available for this study ({len(missing)}), treated as missing and not estimated: "
        + ", ".join(missing)
        + "."
    )

"""Site-level evaluation metrics of the diagnostic and prognostic heads (scikit-learn where it has the metric).

Every metric is always present (NaN when undefined, e.g. AUC of a class absent from the split), so
all sites send records with the same keys and the server can aggregate them.

- :func:`classification_metrics`: loss, accuracy, balanced accuracy, one-vs-rest ROC AUC, sensitivity and
  specificity at given operating points, multiclass Brier score, expected calibration error, and the
  per-class counts of positives/negatives (``n-pos-<class>``, ``n-neg-<class>``) that weight the
  sensitivities/specificities when the server pools sites.
- :func:`choose_operating_points`: per-class thresholds (Youden's J) chosen on validation data, to be
  applied unchanged to the test split.
- :func:`score_histograms`: per-class binned score counts of positives and negatives; summed over sites
  they give the AUC of the pooled predictions without any study leaving its site.
- :func:`survival_metrics`: Harrell's concordance index and cumulative/dynamic AUC at a horizon.
- :func:`floor_evaluation` / :func:`floor_training`: the privacy floor applied to everything a site sends: no
  metric may depend on fewer than ``min_count`` (k, at least :data:`MIN_COUNT`) studies. Histograms are coarsened
  (:func:`coarsen_histogram`) or left out, metrics of too few studies become NaN, unknown keys are not sent.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    log_loss,
    roc_auc_score,
    roc_curve,
)

from fedct import protocol
from fedct.protocol import (
    FEEDBACK_CONFLICTS,
    FEEDBACK_LABELS,
    NEW_STUDIES,
    NUM_EXAMPLES,
    TEST_PREFIX,
    TRAIN_HIST_RISK,
    TRAIN_LOSS,
    TRAIN_LOSS_DIAGNOSIS,
    TRAIN_LOSS_PROGNOSIS,
    TRAIN_SECONDS,
    VAL_CALIBRATION_NLL,
    VAL_PREFIX,
    reliability_key,
)
from models.calibration import coarsen_reliability

log = logging.getLogger("fedct.client")

#: The privacy floor k: no metric a site sends depends on fewer studies (a run or the site may raise it, never lower).
MIN_COUNT = 5


def _checked(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``probs`` as float (n, classes) and ``labels`` as int (n,), or ValueError naming the bad shape."""
    n_classes = len(class_names)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probs must have shape (n, {n_classes}), got {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    if labels.size and (not np.all(np.isfinite(labels.astype(np.float64))) or np.any(labels != np.round(labels))):
        raise ValueError(f"labels must be class indices, got {labels[:10].tolist()}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes - 1}], got values {sorted(set(labels.tolist()))}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs must be finite, got NaN or infinity")
    return probs, labels


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def choose_operating_points(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Per class (one-vs-rest), the threshold on its probability that maximises Youden's J = sens + spec - 1.

    Meant for *validation* data; the thresholds are then applied unchanged to the test split through
    ``classification_metrics(..., thresholds=...)``. A study is called positive when its probability is
    ``>= threshold`` (scikit-learn's ``roc_curve`` convention). Among thresholds with the same J the highest
    (most specific) wins. NaN for a class without both positives and negatives.
    """
    probs, labels = _checked(probs, labels, class_names)
    thresholds: dict[str, float] = {}
    for k, name in enumerate(class_names):
        positives = labels == k
        if positives.all() or not positives.any():
            thresholds[name] = math.nan
            continue
        fpr, tpr, cuts = roc_curve(positives, probs[:, k], drop_intermediate=False)
        finite = np.isfinite(cuts)  # the first cut (inf) calls nobody positive: never an operating point
        j = np.where(finite, tpr - fpr, -np.inf)
        best = np.flatnonzero(j >= j.max() - 1e-12)[0]  # cuts decrease: the first of the (rounding-)tied maxima
        thresholds[name] = float(cuts[best])
    return thresholds


def _calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Expected calibration error of the top-label confidence (equal-width bins, ``np.histogram`` edges)."""
    confidence = np.clip(probs.max(axis=1), 0.0, 1.0)  # rounding may put a certain prediction just above 1
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    counts, _ = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0))
    conf_sum, _ = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0), weights=confidence)
    correct_sum, _ = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0), weights=correct)
    return float(np.abs(correct_sum - conf_sum).sum() / len(labels))


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    thresholds: Mapping[str, float] | None = None,
    n_bins: int = 10,
) -> dict[str, float]:
    """Diagnostic metrics of one split.

    ``probs`` has shape (n, classes) and rows summing to 1; ``labels`` holds class indices. Keys:
    ``n``, ``loss``, ``accuracy``, ``balanced-accuracy``, ``auc-macro``, and per class ``auc-<class>``,
    ``sens-<class>``/``spec-<class>`` (probability ``>= thresholds[class]`` called positive; NaN without
    thresholds or without positives/negatives), ``n-pos-<class>``/``n-neg-<class>``; plus ``brier`` (mean
    over studies of the sum over classes of (p - one-hot)^2, range [0, 2]) and ``ece`` (expected calibration
    error of the top-label confidence over ``n_bins`` equal-width bins on [0, 1]).
    """
    probs, labels = _checked(probs, labels, class_names)
    n_bins = _positive_int(n_bins, "n_bins")
    if thresholds is not None:
        unknown, missing = set(thresholds) - set(class_names), set(class_names) - set(thresholds)
        if unknown or missing:
            raise ValueError(
                f"thresholds must name exactly the classes {list(class_names)}: "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
    n_classes = len(class_names)
    metrics: dict[str, float] = {"n": float(len(labels))}
    for k, name in enumerate(class_names):
        metrics[f"n-pos-{name}"] = float(np.sum(labels == k))
        metrics[f"n-neg-{name}"] = float(np.sum(labels != k))
    if len(labels) == 0:
        metrics.update(
            {
                "loss": math.nan,
                "accuracy": math.nan,
                "balanced-accuracy": math.nan,
                "auc-macro": math.nan,
                "brier": math.nan,
                "ece": math.nan,
            }
        )
        for name in class_names:
            metrics.update({f"auc-{name}": math.nan, f"sens-{name}": math.nan, f"spec-{name}": math.nan})
        return metrics
    normalised = probs / probs.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1)
    metrics["loss"] = float(log_loss(labels, normalised, labels=list(range(n_classes))))
    metrics["accuracy"] = float(accuracy_score(labels, predicted))
    metrics["balanced-accuracy"] = (
        float(balanced_accuracy_score(labels, predicted)) if len(set(labels)) > 1 else math.nan
    )
    metrics["brier"] = float(brier_score_loss(labels, normalised, labels=list(range(n_classes)), scale_by_half=False))
    metrics["ece"] = _calibration_error(normalised, labels, n_bins)
    aucs = []
    for k, name in enumerate(class_names):
        positives = labels == k
        threshold = math.nan if thresholds is None else float(thresholds[name])
        called = probs[:, k] >= threshold  # all False for a NaN threshold; then masked below
        defined = math.isfinite(threshold)
        metrics[f"sens-{name}"] = float(called[positives].mean()) if defined and positives.any() else math.nan
        metrics[f"spec-{name}"] = float((~called[~positives]).mean()) if defined and (~positives).any() else math.nan
        if positives.all() or not positives.any():
            metrics[f"auc-{name}"] = math.nan
            continue
        auc = float(roc_auc_score(positives, probs[:, k]))
        metrics[f"auc-{name}"] = auc
        aucs.append(auc)
    metrics["auc-macro"] = float(np.mean(aucs)) if len(aucs) >= 2 else math.nan
    return metrics


def score_histograms(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, bins: int = 20
) -> dict[str, list[float]]:
    """Per class, how many positive and negative studies fall in each of ``bins`` equal-width bins on [0, 1].

    Keys ``hist-pos-<class>`` and ``hist-neg-<class>``, lists of ``bins`` counts (``np.histogram`` edges:
    [lo, hi) and the last bin closed; probabilities are clipped to [0, 1]). Only counts leave the site;
    summed over sites they give the AUC of the pooled predictions (``fl_server.run_log.pooled_auc_from_histograms``).
    """
    probs, labels = _checked(probs, labels, class_names)
    bins = _positive_int(bins, "bins")
    scores = np.clip(probs, 0.0, 1.0)
    out: dict[str, list[float]] = {}
    for k, name in enumerate(class_names):
        positives = labels == k
        pos, _ = np.histogram(scores[positives, k], bins=bins, range=(0.0, 1.0))
        neg, _ = np.histogram(scores[~positives, k], bins=bins, range=(0.0, 1.0))
        out[f"hist-pos-{name}"] = [float(c) for c in pos]
        out[f"hist-neg-{name}"] = [float(c) for c in neg]
    return out


# Range and bins of the risk-score histogram every site sends: the wire contract's (the server reads them too).
RISK_RANGE, RISK_BINS = protocol.RISK_RANGE, protocol.RISK_BINS
#: Risk scores within this tolerance of each other are ties (``|a - b| <= RISK_TIE_ATOL + RISK_TIE_RTOL * |a|``): the
#: network computes in float32 (or float16), and the same input can give outputs that differ in their last bits between
#: batches of different sizes; without it a model that predicts one value for every study scored a C-index of 0.58.
RISK_TIE_RTOL, RISK_TIE_ATOL = 1e-5, 1e-7


def tie_float_noise(values: np.ndarray, *, rtol: float = RISK_TIE_RTOL, atol: float = RISK_TIE_ATOL) -> np.ndarray:
    """``values`` (1-D) with each value set to the smallest value of its run when it lies within tolerance of it
    (runs are anchored at their first value, so a run is never wider than the tolerance)."""
    values = np.asarray(values, dtype=np.float64)
    out = values.copy()
    order = np.argsort(values, kind="stable")
    anchor = math.nan
    for index in order:
        value = values[index]
        if value - anchor <= atol + rtol * abs(anchor):
            out[index] = anchor
        else:
            anchor = value
    return out


def risk_histogram(risk: np.ndarray) -> dict[str, list[float]]:
    """``{"hist-risk": counts}``: how many studies fall in each of ``RISK_BINS`` bins over ``RISK_RANGE``.

    Summed over sites, the server derives the training population's risk distribution (risk groups at
    inference) without seeing any study's score.
    """
    values = np.asarray(risk, dtype=np.float64)
    values = np.clip(values[np.isfinite(values)], *RISK_RANGE)
    counts, _ = np.histogram(values, bins=RISK_BINS, range=RISK_RANGE)
    return {"hist-risk": [float(c) for c in counts]}


def survival_metrics(risk: np.ndarray, time: np.ndarray, event: np.ndarray, *, horizon_days: float) -> dict[str, float]:
    """Prognostic metrics of a risk score (higher = earlier event): ``c-index``, ``td-auc``, ``n-events``.

    Studies whose ``time`` or ``event`` is NaN (unknown follow-up) are left out; ``event`` is 1 for an
    observed event, 0 for censored; ``time`` in days.

    - ``c-index``: Harrell's concordance. Comparable pairs (i, j) have time_i < time_j and event_i = 1;
      a pair is concordant when risk_i > risk_j and counts 0.5 when the risks tie (within :data:`RISK_TIE_RTOL` and
      :data:`RISK_TIE_ATOL`, float noise, :func:`tie_float_noise`). NaN without a comparable pair.
    - ``td-auc``: cumulative/dynamic AUC at ``horizon_days``: cases had the event at time <= horizon,
      controls were followed beyond the horizon (time > horizon); studies censored at or before the
      horizon are excluded (no inverse-probability-of-censoring weights). NaN without a case or a control.
    - ``n-events``: observed events among the studies used (the server weights both by it);
      ``n-known`` studies with known time and event, ``n-td-cases``/``n-td-controls`` the td-auc's cases and controls
      (what :func:`floor_evaluation` needs to apply the privacy floor).
    """
    risk = np.asarray(risk, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event, dtype=np.float64)
    if risk.ndim != 1:
        raise ValueError(f"risk must be one-dimensional, got shape {risk.shape}")
    for name, values in (("time", time), ("event", event)):
        if values.shape != risk.shape:
            raise ValueError(f"{name} must have the shape of risk {risk.shape}, got {values.shape}")
    if (
        isinstance(horizon_days, bool)
        or not isinstance(horizon_days, numbers.Real)
        or not math.isfinite(horizon_days)
        or horizon_days <= 0
    ):
        raise ValueError(f"horizon_days must be a positive finite number, got {horizon_days!r}")
    known = ~(np.isnan(time) | np.isnan(event))
    risk, time, event = risk[known], time[known], event[known]
    if not np.all(np.isfinite(risk)):
        raise ValueError("risk must be finite where time and event are known, got NaN or infinity")
    if np.any(~np.isin(event, (0.0, 1.0))):
        raise ValueError(f"event must be 0 or 1 (or NaN when unknown), got values {sorted(set(event.tolist()))}")
    if np.any(~np.isfinite(time)) or np.any(time < 0):
        raise ValueError(f"time must be finite and >= 0 (or NaN when unknown), got min {time.min()} max {time.max()}")
    risk = tie_float_noise(risk)
    observed = event == 1
    concordant, comparable = 0.0, 0
    for i in np.flatnonzero(observed):
        later = time > time[i]
        comparable += int(later.sum())
        concordant += float(np.sum(risk[i] > risk[later])) + 0.5 * float(np.sum(risk[i] == risk[later]))
    cases = observed & (time <= horizon_days)
    controls = time > horizon_days
    used = cases | controls
    td_auc = float(roc_auc_score(cases[used], risk[used])) if cases.any() and controls.any() else math.nan
    return {
        "c-index": concordant / comparable if comparable else math.nan,
        "td-auc": td_auc,
        "n-events": float(observed.sum()),
        "n-known": float(len(risk)),
        "n-td-cases": float(cases.sum()),
        "n-td-controls": float(controls.sum()),
    }


# --- the privacy floor ------------------------------------------------------------------------------------------


def coarsen_histogram(counts: Sequence[float], min_count: int) -> list[float] | None:
    """Merge adjacent bins until every group holds at least ``min_count`` studies; None when the total is smaller.

    Groups are built left to right (a group closes as soon as it reaches ``min_count``; a short remainder joins the
    last group), so they partition all bins, and each group's whole count is put in the bin of its mean position
    (the mean of >= ``min_count`` studies' bins): the list keeps its length (sites' lists still add up bin by bin)
    and its total, every non-empty bin holds >= ``min_count`` studies, and no bin reveals a single study's score.
    """
    min_count = _positive_int(min_count, "min_count")
    values = [float(c) for c in counts]
    if any(not math.isfinite(c) or c < 0 for c in values):
        raise ValueError(f"histogram counts must be finite and >= 0, got {values}")
    if math.fsum(values) < min_count:
        return None
    groups: list[list[int]] = []
    current: list[int] = []
    running = 0.0
    for i, c in enumerate(values):
        current.append(i)
        running += c
        if running >= min_count:
            groups.append(current)
            current, running = [], 0.0
    if current:  # a remainder below min_count (perhaps only empty bins) joins the last group
        groups[-1].extend(current)
    out = [0.0] * len(values)
    for group in groups:
        total = math.fsum(values[i] for i in group)
        mean_bin = math.fsum(i * values[i] for i in group) / total  # the group's mean position (>= min_count studies)
        out[min(group[-1], max(group[0], round(mean_bin)))] += total
    return out


def _counts_ok(value: float, k: int) -> bool:
    return math.isfinite(value) and value >= k


def _count_or_nan(value: Any, k: int) -> float:
    """A count is sent when it is 0 or at least k; 1..k-1 would single out studies."""
    v = float(value)
    return v if v == 0 or _counts_ok(v, k) else math.nan


_SPLIT_SCALARS = ("loss", "accuracy", "brier", "ece")
_PER_CLASS = re.compile(r"(n-pos|n-neg|auc|sens|spec|hist-pos|hist-neg)-(.+)")
_SURVIVAL = ("c-index", "td-auc", "n-events", "n-known", "n-td-cases", "n-td-controls")


def _floor_split(values: Mapping[str, Any], k: int) -> dict[str, Any]:
    """The floor on one split's metrics (keys without the ``val-``/``test-`` prefix)."""
    n = float(values.get("n", 0.0))
    enough = _counts_ok(n, k)
    classes = sorted({m.group(2) for key in values if (m := _PER_CLASS.fullmatch(key))})
    pos = {c: float(values.get(f"n-pos-{c}", 0.0)) for c in classes}
    neg = {c: float(values.get(f"n-neg-{c}", 0.0)) for c in classes}
    out: dict[str, Any] = {"n": n}
    for key in _SPLIT_SCALARS:
        if key in values:
            out[key] = float(values[key]) if enough else math.nan
    if "balanced-accuracy" in values:  # mean of per-class recalls: every class present needs k studies
        fine = enough and all(pos[c] == 0 or _counts_ok(pos[c], k) for c in classes)
        out["balanced-accuracy"] = float(values["balanced-accuracy"]) if fine else math.nan
    reported_aucs = []
    for c in classes:
        both = enough and _counts_ok(pos[c], k) and _counts_ok(neg[c], k)
        for key, ok in ((f"n-pos-{c}", enough), (f"n-neg-{c}", enough)):
            if key in values:
                out[key] = _count_or_nan(values[key], k) if ok else math.nan
        if f"sens-{c}" in values:
            out[f"sens-{c}"] = float(values[f"sens-{c}"]) if enough and _counts_ok(pos[c], k) else math.nan
        if f"spec-{c}" in values:
            out[f"spec-{c}"] = float(values[f"spec-{c}"]) if enough and _counts_ok(neg[c], k) else math.nan
        if f"auc-{c}" in values:
            auc = float(values[f"auc-{c}"]) if both else math.nan
            out[f"auc-{c}"] = auc
            if math.isfinite(auc):
                reported_aucs.append(auc)
        if f"hist-pos-{c}" in values and f"hist-neg-{c}" in values:
            # an empty list is "no histogram": every site keeps the same keys (Flower's strategies require it)
            out[f"hist-pos-{c}"], out[f"hist-neg-{c}"] = [], []
            hist_pos = coarsen_histogram(values[f"hist-pos-{c}"], k) if both else None
            hist_neg = coarsen_histogram(values[f"hist-neg-{c}"], k) if both else None
            if hist_pos is not None and hist_neg is not None:
                out[f"hist-pos-{c}"], out[f"hist-neg-{c}"] = hist_pos, hist_neg
    if "auc-macro" in values:
        out["auc-macro"] = float(np.mean(reported_aucs)) if len(reported_aucs) >= 2 else math.nan
    if any(key in values for key in _SURVIVAL):
        known = float(values.get("n-known", math.nan))
        events = float(values.get("n-events", math.nan))
        cases, controls = float(values.get("n-td-cases", math.nan)), float(values.get("n-td-controls", math.nan))
        fine = _counts_ok(known, k)
        for key in ("n-events", "n-known", "n-td-cases", "n-td-controls"):
            if key in values:
                out[key] = _count_or_nan(values[key], k) if fine or key == "n-known" else math.nan
        if "c-index" in values:
            out["c-index"] = float(values["c-index"]) if fine and _counts_ok(events, k) else math.nan
        if "td-auc" in values:
            out["td-auc"] = (
                float(values["td-auc"]) if fine and _counts_ok(cases, k) and _counts_ok(controls, k) else math.nan
            )
    return out


def _split_known(key: str) -> bool:
    return (
        key == "n"
        or key in _SPLIT_SCALARS
        or key in ("balanced-accuracy", "auc-macro")
        or key in _SURVIVAL
        or _PER_CLASS.fullmatch(key) is not None
    )


def _evaluation_known(key: str) -> bool:
    if key == VAL_CALIBRATION_NLL:  # "val-" prefixed, but floored on its own (val-n >= k), not as a split figure
        return True
    for prefix in (VAL_PREFIX, TEST_PREFIX):
        if key.startswith(prefix):
            return _split_known(key[len(prefix) :])
    return key in (TRAIN_HIST_RISK, NUM_EXAMPLES, VAL_CALIBRATION_NLL)


def floor_evaluation(metrics: Mapping[str, Any], *, min_count: int = MIN_COUNT) -> dict[str, Any]:
    """What a site may send of :func:`fl_client.train.evaluate_round`'s metrics (plus ``num-examples``).

    With k = ``max(min_count, MIN_COUNT)``, per split (``val-``, ``test-``):

    - ``n`` (labelled studies of the split) is sent; ``loss``, ``accuracy``, ``brier``, ``ece`` need n >= k;
      ``balanced-accuracy`` also needs every class present to have >= k studies;
    - per class: ``sens-`` needs >= k positives, ``spec-`` >= k negatives, ``auc-`` and the score histograms both;
      histograms are coarsened to groups of >= k studies (:func:`coarsen_histogram`) or sent empty (``[]``: no
      histogram; the keys stay, as Flower's strategies require the same keys from every site);
      ``auc-macro`` is the mean of the AUCs sent (NaN with fewer than 2);
    - counts (``n-pos-*``, ``n-neg-*``, ``n-events``, ...) are sent when 0 or >= k, else NaN;
    - ``c-index`` needs >= k studies with known outcome and >= k events, ``td-auc`` >= k cases and >= k controls;

    ``train-hist-risk`` (the training studies' risk histogram) is coarsened the same way or sent empty;
    ``val-calib-nll`` (summed NLL of the labelled validation studies at each calibration temperature) is sent when
    ``val-n`` >= k, else empty. Keys this function does not know are dropped (logged at the site): a new metric leaves
    only once the floor covers it.
    """
    k = max(_positive_int(min_count, "min_count"), MIN_COUNT)
    out: dict[str, Any] = {}
    for prefix in (VAL_PREFIX, TEST_PREFIX):
        values = {
            key[len(prefix) :]: v for key, v in metrics.items() if key.startswith(prefix) and key != VAL_CALIBRATION_NLL
        }
        if values:
            out.update({prefix + key: v for key, v in _floor_split(values, k).items()})
    if TRAIN_HIST_RISK in metrics:
        out[TRAIN_HIST_RISK] = coarsen_histogram(metrics[TRAIN_HIST_RISK], k) or []
    if VAL_CALIBRATION_NLL in metrics:
        enough = _counts_ok(float(metrics.get(f"{VAL_PREFIX}n", 0.0)), k)
        out[VAL_CALIBRATION_NLL] = [float(v) for v in metrics[VAL_CALIBRATION_NLL]] if enough else []
    if NUM_EXAMPLES in metrics:
        out[NUM_EXAMPLES] = metrics[NUM_EXAMPLES]
    unknown = [key for key in metrics if not _evaluation_known(key)]
    if unknown:
        log.warning("metrics %s are not covered by the privacy floor and are not sent", ", ".join(sorted(unknown)))
    return out


def floor_calibration(metrics: Mapping[str, Any], *, min_count: int = MIN_COUNT) -> dict[str, Any]:
    """What a site may send of :func:`fl_client.train.calibration_round`'s statistics (plus ``num-examples``).

    Each stage's reliability bins (count, summed confidence, summed correct calls) are merged into groups of at least
    k studies (:func:`models.calibration.coarsen_reliability`) or sent empty; ``test-n`` as a count, the calibrated
    ``test-loss``/``test-brier``/``test-accuracy`` need ``test-n`` >= k. Other keys are dropped (logged).
    """
    k = max(_positive_int(min_count, "min_count"), MIN_COUNT)
    out: dict[str, Any] = {}
    known = {NUM_EXAMPLES}
    for stage in protocol.CALIBRATION_STAGES:
        keys = [reliability_key(stage, field) for field in protocol.RELIABILITY_FIELDS]
        known.update(keys)
        if not all(key in metrics for key in keys):
            continue
        coarse = coarsen_reliability(*(metrics[key] for key in keys), k)
        for i, key in enumerate(keys):
            out[key] = [] if coarse is None else coarse[i]
    scalars = {key[len(TEST_PREFIX) :]: v for key, v in metrics.items() if key in _CALIBRATED_SCALARS}
    known.update(_CALIBRATED_SCALARS)
    out.update({TEST_PREFIX + key: v for key, v in _floor_split(scalars, k).items()} if scalars else {})
    if NUM_EXAMPLES in metrics:
        out[NUM_EXAMPLES] = metrics[NUM_EXAMPLES]
    unknown = sorted(set(metrics) - known)
    if unknown:
        log.warning("metrics %s are not covered by the privacy floor and are not sent", ", ".join(unknown))
    return out


#: The calibrated test split's scalars a calibration reply carries.
_CALIBRATED_SCALARS = tuple(f"{TEST_PREFIX}{name}" for name in ("n", "loss", "brier", "accuracy"))


#: Training-reply metrics and whether they describe the training studies (NaN below k) or not (always sent).
TRAINING_KEYS = {
    TRAIN_LOSS: True,
    TRAIN_LOSS_DIAGNOSIS: True,
    TRAIN_LOSS_PROGNOSIS: True,
    TRAIN_SECONDS: False,
    NUM_EXAMPLES: False,
    NEW_STUDIES: False,
    FEEDBACK_LABELS: False,
    FEEDBACK_CONFLICTS: False,
}
#: Campaign counts of a training reply (``fl_client.campaign``): sent when 0 or >= k, else NaN.
CAMPAIGN_COUNTS = (NEW_STUDIES, FEEDBACK_LABELS, FEEDBACK_CONFLICTS)


def floor_training(metrics: Mapping[str, Any], *, min_count: int = MIN_COUNT) -> dict[str, Any]:
    """What a site may send of a training round's metrics: losses need >= k training studies; the campaign counts
    (new studies, feedback labels used and conflicting) are sent when 0 or >= k; other keys dropped."""
    k = max(_positive_int(min_count, "min_count"), MIN_COUNT)
    enough = _counts_ok(float(metrics.get(NUM_EXAMPLES, 0)), k)
    out = {
        key: (float(v) if enough or not TRAINING_KEYS[key] else math.nan) if key != NUM_EXAMPLES else v
        for key, v in metrics.items()
        if key in TRAINING_KEYS
    }
    out.update({key: _count_or_nan(metrics[key], k) for key in CAMPAIGN_COUNTS if key in metrics})
    unknown = sorted(set(metrics) - set(TRAINING_KEYS))
    if unknown:
        log.warning("metrics %s are not covered by the privacy floor and are not sent", ", ".join(unknown))
    return out

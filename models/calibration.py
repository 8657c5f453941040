"""Temperature scaling of the diagnosis head, fitted federatedly from sums only (shared by sites, server and inference).

Calibrated probabilities are ``softmax(logits / T)``: one temperature ``T > 0`` for the whole head, which leaves the
most likely class (and every AUC) unchanged and only makes the probabilities less (T > 1) or more (T < 1) confident.

How T is found without any study leaving its site:

- each site computes, on its validation split, the *summed* negative log-likelihood of its labelled studies at every
  temperature of the fixed grid :data:`fedct.protocol.CALIBRATION_TEMPERATURES` (:func:`nll_grid`);
- the server adds the sites' sums and takes the grid point with the smallest total, refined by a parabola through it
  and its two neighbours in log T (:func:`fit_temperature`). The sum over sites is the pooled sum, so the federated
  fit equals the fit on all sites' logits pooled;
- the expected calibration error (ECE) before and after is computed the same way on the held-out test split: each site
  sends per-bin counts, summed confidences and summed correct calls (:func:`reliability_bins`, coarsened to groups of
  at least k studies by :func:`coarsen_reliability`); the server adds them and reads the ECE (:func:`ece_from_bins`).

Plain numpy/scipy (no torch, no flwr): the sites' metrics floor and the server import it too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax

from fedct.protocol import CALIBRATION_BINS, CALIBRATION_TEMPERATURES

__all__ = [
    "Reliability",
    "apply_temperature",
    "bundle_temperature",
    "coarsen_reliability",
    "ece_from_bins",
    "ece_sampling_floor",
    "fit_temperature",
    "nll_grid",
    "reliability_bins",
]

Reliability = tuple[list[float], list[float], list[float]]
"""Per-bin (count, summed confidence, summed correct) of the top-label confidence."""


def _logits(logits: Any, labels: Any | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"logits must have shape (n, classes >= 2), got {tuple(values.shape)}")
    if not np.isfinite(values).all():
        raise ValueError("logits must be finite, got NaN or infinity")
    if labels is None:
        return values, None
    target = np.asarray(labels)
    if target.shape != (values.shape[0],):
        raise ValueError(f"labels must have shape ({values.shape[0]},), got {target.shape}")
    target = target.astype(np.int64)
    if target.size and (target.min() < 0 or target.max() >= values.shape[1]):
        raise ValueError(f"labels must lie in [0, {values.shape[1] - 1}], got values {sorted(set(target.tolist()))}")
    return values, target


def _temperature(value: Any) -> float:
    t = float(value)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a positive finite number, got {value!r}")
    return t


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / temperature)`` (float64, rows sum to 1)."""
    values, _ = _logits(logits)
    return softmax(values / _temperature(temperature), axis=1)


def nll_grid(logits: Any, labels: Any, temperatures: Sequence[float] = CALIBRATION_TEMPERATURES) -> list[float]:
    """Summed negative log-likelihood of ``labels`` under ``softmax(logits / T)`` for every T of ``temperatures``
    (a site's validation statistics; zeros for no study)."""
    values, target = _logits(logits, labels)
    temps = [_temperature(t) for t in temperatures]
    if not len(target):
        return [0.0 for _ in temps]
    out = []
    for t in temps:
        log_probs = log_softmax(values / t, axis=1)
        out.append(float(-np.take_along_axis(log_probs, target[:, None], axis=1).sum()))
    return out


def fit_temperature(nll_sums: Sequence[float], temperatures: Sequence[float] = CALIBRATION_TEMPERATURES) -> float:
    """The temperature minimising the summed NLL known on the grid ``temperatures`` (increasing).

    The grid's argmin, refined by the vertex of the parabola through it and its two neighbours in log T (kept
    within those neighbours); at an end of the grid the end itself. ValueError for lengths that differ or a
    non-finite sum.
    """
    sums = [float(v) for v in nll_sums]
    temps = [_temperature(t) for t in temperatures]
    if len(sums) != len(temps) or len(temps) < 3:
        raise ValueError(f"need one NLL sum per grid temperature ({len(temps)} >= 3), got {len(sums)}")
    if not all(math.isfinite(v) for v in sums):
        raise ValueError("NLL sums must be finite")
    if any(b <= a for a, b in zip(temps, temps[1:])):
        raise ValueError("calibration temperatures must increase")
    i = int(np.argmin(sums))
    if i == 0 or i == len(sums) - 1:
        return temps[i]
    x0, x1, x2 = (math.log(temps[j]) for j in (i - 1, i, i + 1))
    y0, y1, y2 = sums[i - 1], sums[i], sums[i + 1]
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denominator
    if a <= 0:  # flat or not convex here: the grid point
        return temps[i]
    return float(math.exp(min(max(-b / (2 * a), x0), x2)))


def reliability_bins(probs: Any, labels: Any, *, n_bins: int = CALIBRATION_BINS) -> Reliability:
    """Per equal-width bin of the top-label confidence on [0, 1]: studies, summed confidence, summed correct calls."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise ValueError(f"probs (n, classes) and labels (n,) must match, got {p.shape} and {y.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidence = np.clip(p.max(axis=1), 0.0, 1.0) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) == y).astype(np.float64) if len(p) else np.zeros(0)
    count, _ = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0))
    conf, _ = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0), weights=confidence)
    hits, _ = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0), weights=correct)
    return [float(c) for c in count], [float(c) for c in conf], [float(c) for c in hits]


def coarsen_reliability(
    count: Sequence[float], confidence: Sequence[float], correct: Sequence[float], min_count: int
) -> Reliability | None:
    """The privacy floor on reliability bins: adjacent bins merged (left to right) into groups of at least
    ``min_count`` studies (a short remainder joins the last group); each group's sums go into the bin of its mean
    confidence (which lies within the group). None when there are fewer than ``min_count`` studies in all.

    No bin then describes fewer than ``min_count`` studies; merging can only lower the ECE read from the bins.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    n, c, k = ([float(v) for v in values] for values in (count, confidence, correct))
    if not len(n) == len(c) == len(k):
        raise ValueError(f"reliability lists must have the same length, got {len(n)}, {len(c)}, {len(k)}")
    if math.fsum(n) < min_count:
        return None
    groups: list[list[int]] = []
    current: list[int] = []
    running = 0.0
    for i, value in enumerate(n):
        current.append(i)
        running += value
        if running >= min_count:
            groups.append(current)
            current, running = [], 0.0
    if current:
        groups[-1].extend(current)
    out: Reliability = ([0.0] * len(n), [0.0] * len(n), [0.0] * len(n))
    for group in groups:
        total = math.fsum(n[i] for i in group)
        conf = math.fsum(c[i] for i in group)
        hits = math.fsum(k[i] for i in group)
        where = min(group[-1], max(group[0], int(conf / total * len(n)) if total else group[0]))
        out[0][where] += total
        out[1][where] += conf
        out[2][where] += hits
    return out


def ece_from_bins(count: Sequence[float], confidence: Sequence[float], correct: Sequence[float]) -> float:
    """Expected calibration error ``sum_b |correct_b - confidence_b| / N`` of (summed) reliability bins; NaN when
    there is no study."""
    total = math.fsum(float(v) for v in count)
    if total <= 0:
        return math.nan
    return math.fsum(abs(float(h) - float(c)) for h, c in zip(correct, confidence, strict=True)) / total


def ece_sampling_floor(
    count: Sequence[float], confidence: Sequence[float], *, quantile: float = 0.95, draws: int = 4000, seed: int = 0
) -> dict[str, float]:
    """What the ECE of a *perfectly calibrated* model would read on bins of these sizes: the sampling floor.

    With ``n_b`` studies of mean confidence ``p_b`` in bin b, a calibrated model's correct calls are
    Binomial(n_b, p_b), so its ECE is still ``sum_b |K_b - n_b p_b| / N > 0`` by chance alone. Returns ``expected``
    (exact, from the binomial probabilities) and ``upper`` (the ``quantile`` of ``draws`` simulated ECEs, a fixed
    ``seed``): a measured ECE at or below ``upper`` is consistent with calibration at this test size. NaN for no study.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws!r}")
    from scipy.stats import binom

    n = np.asarray([float(v) for v in count], dtype=np.float64)
    c = np.asarray([float(v) for v in confidence], dtype=np.float64)
    if n.shape != c.shape:
        raise ValueError(f"count and confidence must have the same length, got {n.size} and {c.size}")
    if np.any(n < 0) or np.any(n != np.round(n)):
        raise ValueError("count must hold whole numbers of studies >= 0")
    total = float(n.sum())
    if total <= 0:
        return {"expected": math.nan, "upper": math.nan, "quantile": quantile}
    used = n > 0
    n, c = n[used].astype(np.int64), c[used]
    p = np.clip(c / n, 0.0, 1.0)
    expected = 0.0
    for n_b, p_b in zip(n, p, strict=True):
        k = np.arange(n_b + 1)
        expected += float(np.sum(binom.pmf(k, n_b, p_b) * np.abs(k - n_b * p_b)))
    rng = np.random.default_rng(seed)
    hits = rng.binomial(n[None, :], p[None, :], size=(draws, n.size))
    simulated = np.abs(hits - n * p).sum(axis=1) / total
    return {"expected": expected / total, "upper": float(np.quantile(simulated, quantile)), "quantile": quantile}


def bundle_temperature(meta: Mapping[str, Any], *, source: str = "model.json") -> float:
    """The temperature a bundle's metadata carries (``calibration.temperature``); 1.0 (uncalibrated) without one.

    ValueError naming ``source`` for a temperature that is not a positive finite number.
    """
    calibration = meta.get("calibration")
    if not calibration:
        return 1.0
    value = calibration.get("temperature") if isinstance(calibration, Mapping) else None
    if value is None:
        return 1.0
    try:
        return _temperature(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: calibration.temperature must be a positive finite number, got {value!r}") from None

"""Out-of-distribution reference of a model: how far a study's image features lie from the training sites' (issue #23.4).

The reference is built federatedly after the last round, from aggregates only (``fl_server.ood`` asks, each site's
``fl_client.ood_stats`` answers):

1. **moments**: every site runs the final model's backbone over its training and validation studies and sends the
   count, the per-feature sum and the per-feature sum of squares of the pooled image features (the vector of F numbers
   the heads read; nothing when the count is below the site's privacy floor). The server adds them
   (:func:`pooled_moments`): mean and variance per feature over all sites' studies;
2. **distance** of a study (:func:`feature_distance`): the mean over the F features of the squared z-score
   ``(f - mean)^2 / (var + ridge)``, i.e. a diagonal Mahalanobis distance divided by F; about 1 for a study like the
   training ones, much larger for an input the network has never seen the like of. The ridge
   (:data:`FEATURE_RIDGE` times the mean variance) keeps features that never varied in training from dominating;
3. **threshold**: every site sends the count, sum and sum of squares of log10(distance) of its validation studies
   and of its training studies (:func:`log_moments`, nothing below k); the server fits a log-normal distribution to
   the pooled validation moments and takes the upper bound of its :data:`DEFAULT_QUANTILE` prediction interval for a
   new study (:func:`threshold_from_moments`: a plug-in quantile from a few validation studies flags in-distribution
   studies more often than 1 - q; the prediction bound allows for the uncertainty of the fitted mean and SD), and
   estimates from the training moments how many training studies lie above it (:func:`expected_above`).
   Why moments and not a histogram: a histogram a site sends is coarsened to groups of at least k studies, which
   puts a whole validation split of a few studies into one bin at its mean, so a high quantile read from it is
   about the median (tried first: every training study of the test federation lay above it).

At prediction (``inference.predict``) a study whose distance exceeds the threshold is flagged: it looks unlike the
training studies and the result may not apply. Plain numpy (no torch, no flwr): sites, server and inference share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

__all__ = [
    "DEFAULT_QUANTILE",
    "FEATURE_RIDGE",
    "OodReference",
    "bundle_ood",
    "expected_above",
    "feature_distance",
    "feature_moments",
    "log_moments",
    "pooled_moments",
    "threshold_from_moments",
]

#: Level of the one-sided prediction bound on the pooled validation distances taken as the threshold.
DEFAULT_QUANTILE = 0.99
#: Added to every feature's variance, as a fraction of the mean variance over features.
FEATURE_RIDGE = 0.01

Moments = tuple[int, np.ndarray, np.ndarray]
"""(studies, per-feature sum, per-feature sum of squares)."""


def _features(features: Any) -> np.ndarray:
    values = np.asarray(features, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise ValueError(f"features must have shape (n, F), got {tuple(values.shape)}")
    if not np.isfinite(values).all():
        raise ValueError("features must be finite, got NaN or infinity")
    return values


def feature_moments(features: Any) -> Moments:
    """Count, per-feature sum and per-feature sum of squares of ``features`` (n, F) (a site's raw moments)."""
    values = _features(features)
    return values.shape[0], values.sum(axis=0), (values * values).sum(axis=0)


def pooled_moments(parts: Sequence[Moments]) -> tuple[int, np.ndarray, np.ndarray]:
    """(studies, mean, variance) per feature of the sites' moments added together (the pooled population variance).

    ValueError for no study, lengths that differ, or non-finite sums."""
    parts = [(int(n), np.asarray(s, dtype=np.float64), np.asarray(q, dtype=np.float64)) for n, s, q in parts if n]
    if not parts:
        raise ValueError("no site sent feature moments")
    width = parts[0][1].shape
    if any(s.shape != width or q.shape != width or s.ndim != 1 for _, s, q in parts):
        raise ValueError("feature moments of different lengths")
    n = sum(p[0] for p in parts)
    total = np.sum([p[1] for p in parts], axis=0)
    squares = np.sum([p[2] for p in parts], axis=0)
    if not (np.isfinite(total).all() and np.isfinite(squares).all()):
        raise ValueError("feature moments must be finite")
    mean = total / n
    var = np.maximum(squares / n - mean * mean, 0.0)
    return n, mean, var


def feature_distance(features: Any, mean: Any, var: Any) -> np.ndarray:
    """Mean squared z-score over features of each row of ``features`` (n, F) or (F,), against ``mean``/``var`` (F,):
    ``mean_j (f_j - mean_j)^2 / (var_j + ridge)``, ridge = :data:`FEATURE_RIDGE` x the mean variance (n,)."""
    values = _features(features)
    mu, sigma2 = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    if mu.shape != (values.shape[1],) or sigma2.shape != mu.shape:
        raise ValueError(f"mean and var must have shape ({values.shape[1]},), got {mu.shape} and {sigma2.shape}")
    if (sigma2 < 0).any() or not (np.isfinite(mu).all() and np.isfinite(sigma2).all()):
        raise ValueError("mean and var must be finite, var >= 0")
    ridge = FEATURE_RIDGE * float(sigma2.mean()) + 1e-12
    return (((values - mu) ** 2) / (sigma2 + ridge)).mean(axis=1)


def log_moments(distances: Any) -> list[float]:
    """``[studies, sum, sum of squares]`` of log10(distance) (a site's aggregate of one split)."""
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if not (np.isfinite(d).all() and (d > 0).all()):
        raise ValueError("distances must be finite and > 0")
    logs = np.log10(d)
    return [float(len(d)), float(logs.sum()), float((logs * logs).sum())]


def _log_normal(moments: Sequence[float]) -> tuple[float, float, float]:
    """(studies, mean, SD) of log10(distance) from pooled :func:`log_moments`."""
    n, total, squares = (float(v) for v in moments)
    if not (n >= 2 and math.isfinite(total) and math.isfinite(squares)):
        raise ValueError(f"need the log-distance moments of at least 2 studies, got {list(moments)}")
    mean = total / n
    sd = math.sqrt(max(squares / n - mean * mean, 0.0) * n / (n - 1))
    return n, mean, sd


def threshold_from_moments(moments: Sequence[float], quantile: float = DEFAULT_QUANTILE) -> float:
    """Upper ``quantile`` prediction bound for the distance of a new study, from a log-normal fitted to pooled
    :func:`log_moments`: ``10 ** (mean + t_{q, n-1} * SD * sqrt(1 + 1/n))`` of log10(distance).

    A new study drawn like the validation studies lies above it with probability ``1 - quantile`` whatever the number
    n of validation studies (under log-normality); the plug-in quantile ``mean + z_q * SD`` does so only for large n
    (at n = 14 and q = 0.99 about 2 % of such studies lie above it, see tests/test_ood.py).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    n, mean, sd = _log_normal(moments)
    return float(10.0 ** (mean + float(student_t.ppf(quantile, n - 1)) * sd * math.sqrt(1.0 + 1.0 / n)))


def expected_above(moments: Sequence[float], threshold: float) -> float:
    """How many of the studies described by :func:`log_moments` lie above ``threshold`` under the log-normal fit of
    their own moments (an estimate: no site sends which study lies where)."""
    n, mean, sd = _log_normal(moments)
    gap = math.log10(threshold) - mean
    if sd <= 0:
        return 0.0 if gap >= 0 else n
    return float(n * norm.sf(gap / sd))


@dataclass(frozen=True)
class OodReference:
    """What a bundle carries to flag an unusual study: the pooled feature mean and variance and the threshold on
    :func:`feature_distance` (``quantile`` of the training sites' validation distances)."""

    mean: tuple[float, ...]
    var: tuple[float, ...]
    threshold: float
    quantile: float = DEFAULT_QUANTILE

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.var):
            raise ValueError(
                f"feature mean and variance need the same length > 0, got {len(self.mean)}, {len(self.var)}"
            )
        if not all(math.isfinite(v) for v in (*self.mean, *self.var)) or min(self.var) < 0:
            raise ValueError("feature mean and variance must be finite, variance >= 0")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive finite number, got {self.threshold!r}")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile!r}")

    def distance(self, features: Any) -> float:
        """The distance of one study's features (F,)."""
        return float(feature_distance(features, self.mean, self.var)[0])

    def to_dict(self) -> dict[str, Any]:
        """model.json's ``ood`` fields of the reference (the bundle adds the figures beside them)."""
        return {
            "feature_mean": list(self.mean),
            "feature_var": list(self.var),
            "threshold": self.threshold,
            "quantile": self.quantile,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OodReference:
        """The reference of :meth:`to_dict`; ValueError naming what is missing or wrong."""
        try:
            return cls(
                mean=tuple(float(v) for v in data["feature_mean"]),
                var=tuple(float(v) for v in data["feature_var"]),
                threshold=float(data["threshold"]),
                quantile=float(data.get("quantile", DEFAULT_QUANTILE)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an out-of-distribution reference ({type(exc).__name__}: {exc})") from None


def bundle_ood(meta: Mapping[str, Any], *, source: str = "model.json") -> OodReference | None:
    """The reference a bundle's metadata carries (``ood``), None for a bundle without one (older bundles, or no site
    above the privacy floor); ValueError naming ``source`` for an unusable one."""
    data = meta.get("ood")
    if not isinstance(data, Mapping) or data.get("threshold") is None:
        return None
    try:
        return OodReference.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{source}: ood: {exc}") from None

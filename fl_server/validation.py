"""Checks on the sites' updates before aggregation. Pure functions on plain mappings of numpy/torch arrays.

An update that fails a check is excluded from the round (the caller logs node id, site and reason):

- :func:`structure_problem`: same keys, shapes and dtypes as the global model;
- :func:`finite_problem`: every value finite;
- :func:`update_norm` with ``max_norm``: ``||w_i - w_global||`` (all floating tensors as one vector) within a bound;
- :func:`zscore_outliers`: a robust z-score of the update norms across the round's sites (median and MAD), for
  an update far larger than the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Scale of the MAD of a normal distribution (so that the robust z-score reads like a standard score).
MAD_TO_SIGMA = 1.4826
#: Fewest updates for which the z-score is meaningful (with two, each is as far from the median as the other).
MIN_UPDATES_FOR_ZSCORE = 3


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def structure_problem(update: Mapping[str, Any], reference: Mapping[str, Any]) -> str | None:
    """Why ``update`` does not have the reference's keys, shapes and dtypes (None when it does)."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) (first {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} unknown tensor(s) (first {extra[0]!r})")
        return "keys differ from the global model: " + ", ".join(parts)
    for key, ref in reference.items():
        got, want = _np(update[key]), _np(ref)
        if got.shape != want.shape:
            return f"shape of {key!r} is {tuple(got.shape)}, global model has {tuple(want.shape)}"
        if got.dtype != want.dtype:
            return f"dtype of {key!r} is {got.dtype}, global model has {want.dtype}"
    return None


def finite_problem(update: Mapping[str, Any]) -> str | None:
    """Why ``update`` holds NaN or infinite values (None when every value is finite)."""
    for key, value in update.items():
        array = _np(value)
        if array.dtype.kind in "fc":
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                return f"{bad} non-finite value(s) in {key!r}"
    return None


def update_norm(update: Mapping[str, Any], reference: Mapping[str, Any]) -> float:
    """L2 norm of ``update - reference`` over all floating tensors taken as one vector (float64)."""
    total = 0.0
    for key, ref in reference.items():
        want = _np(ref)
        if want.dtype.kind != "f":
            continue
        diff = _np(update[key]).astype(np.float64) - want.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def robust_zscores(values: Sequence[float]) -> list[float]:
    """``(x - median) / (1.4826 * MAD)`` for each value; 0 for all when the MAD is 0 and the values equal the median,
    +inf for a value off the median when the MAD is 0."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return []
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)))
    if mad == 0.0:
        return [0.0 if v == median else math.copysign(math.inf, v - median) for v in x]
    return [float((v - median) / (MAD_TO_SIGMA * mad)) for v in x]


def zscore_outliers(norms: Mapping[Any, float], threshold: float) -> dict[Any, str]:
    """Updates whose norm lies more than ``threshold`` robust standard deviations *above* the median norm.

    Returns ``{key: reason}``. Small updates are never outliers (a site that barely moved does no harm), and
    with fewer than three updates nothing is flagged (the median and MAD say nothing then).
    """
    if threshold <= 0 or len(norms) < MIN_UPDATES_FOR_ZSCORE:
        return {}
    keys = list(norms)
    scores = robust_zscores([norms[k] for k in keys])
    median = float(np.median([norms[k] for k in keys]))
    return {
        k: f"update norm {norms[k]:.4g} is {z:.3g} robust SDs above the round's median norm {median:.4g} (update-zscore {threshold:g})"
        for k, z in zip(keys, scores, strict=True)
        if z > threshold
    }


def check_updates(
    updates: Mapping[Any, Mapping[str, Any]],
    reference: Mapping[str, Any],
    *,
    max_norm: float = 0.0,
    zscore: float = 0.0,
) -> dict[Any, str]:
    """Run every check on a round's updates (``{key: state}``); return ``{key: reason}`` of the rejected ones.

    Structure and finiteness are checked first; the norm bound (``max_norm`` > 0) and the z-score (``zscore`` > 0)
    are then applied to the updates that passed, the z-score among those within the bound.
    """
    rejected: dict[Any, str] = {}
    norms: dict[Any, float] = {}
    for key, update in updates.items():
        reason = structure_problem(update, reference) or finite_problem(update)
        if reason is None:
            norm = update_norm(update, reference)
            if not math.isfinite(norm):
                reason = f"update norm is {norm} (values too large for float64)"
            elif max_norm > 0 and norm > max_norm:
                reason = f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}"
            else:
                norms[key] = norm
        if reason is not None:
            rejected[key] = reason
    rejected.update(zscore_outliers(norms, zscore))
    return rejected

"""The out-of-distribution reference of a finished model, gathered from the sites' aggregates (issue #23.4), server side.

After the last round (beside the calibration, ``fl_server.rounds.reference_bundles``) the server sends the model's
weights to every connected site twice, in evaluate messages with :data:`fedct.protocol.OOD_STATISTICS`:

1. ``moments``: each site's count, per-feature sum and sum of squares of the pooled image features over its training
   and validation studies (``fl_client.ood_stats``); the server pools them into a mean and variance per feature
   (:func:`models.ood.pooled_moments`);
2. ``distances``, with that mean and variance: each site's count, sum and sum of squares of log10(distance) of its
   validation and of its training studies; the threshold is the upper :data:`models.ood.DEFAULT_QUANTILE`
   prediction bound for a new study of a log-normal fitted to the pooled validation moments, and the number of training (and validation) studies above it
   is estimated from their own pooled moments (:mod:`models.ood` says why moments rather than histograms).

Each reply passes :func:`screen_moments_reply` / :func:`screen_distances_reply` (the site is who it says, exactly the
``metrics`` and ``site`` records, counts 0 or at least the privacy floor, lists of the right length, sums
consistent); a rejected reply is recorded like any other (``rejected_replies``). The reference (mean, variance,
threshold) goes into the bundle (``model.json`` ``ood``), the figures into metrics.json and the model card. The server
sees each site's aggregates (not covered by secure aggregation, as the calibration sums are not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedct.protocol import (
    METRICS_RECORD,
    OOD_COUNT,
    OOD_DISTANCES,
    OOD_MEAN,
    OOD_MOMENTS,
    OOD_STATISTICS,
    OOD_SUM,
    OOD_SUMSQ,
    OOD_TRAIN_LOG,
    OOD_VAL_LOG,
    OOD_VAR,
    SITE_RECORD,
)
from fl_server.config import SiteRegistry
from fl_server.validation import ReplyRejected, ScreenedReply, site_identity
from models.ood import DEFAULT_QUANTILE, OodReference, expected_above, pooled_moments, threshold_from_moments

#: The round loop (``fl_server.rounds.RoundLoop``, not imported: it imports this module) and its weights.
RoundLoop = Any
NDArrays = Mapping[str, np.ndarray]

__all__ = ["gather_reference", "screen_distances_reply", "screen_moments_reply"]

Screen = Callable[[RecordDict, int], ScreenedReply]


def _metrics(content: RecordDict, node_id: int, registry: SiteRegistry | None) -> tuple[str, dict[str, Any]]:
    site = site_identity(content, node_id, registry)
    if set(content.keys()) != {METRICS_RECORD, SITE_RECORD}:
        raise ReplyRejected(
            "malformed_reply",
            f"a feature statistics reply carries exactly the records {METRICS_RECORD} and {SITE_RECORD}",
        )
    record = content[METRICS_RECORD]
    if not isinstance(record, MetricRecord):
        raise ReplyRejected("malformed_reply", f"record {METRICS_RECORD!r} is not a MetricRecord")
    return site, dict(record.items())


def _finite_list(values: Any, length: int, name: str) -> np.ndarray:
    if not isinstance(values, list) or len(values) != length:
        raise ReplyRejected("bad_ood_statistics", f"{name} must be a list of {length} numbers")
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ReplyRejected("bad_ood_statistics", f"{name} must be finite")
    return array


def screen_moments_reply(
    content: RecordDict,
    *,
    node_id: int,
    registry: SiteRegistry | None,
    width: int,
    min_count: int,
    count_bound: int,
) -> tuple[ScreenedReply, tuple[int, np.ndarray, np.ndarray] | None]:
    """Check a ``moments`` reply: ``ood-n`` 0 (nothing else) or in [``min_count``, 2 x ``count_bound``] with ``width``
    sums and sums of squares (>= 0, sum^2 <= n * sum of squares). Returns the screened reply and the moments (None
    for a site below its floor); :class:`fl_server.validation.ReplyRejected` naming what is wrong, never a value."""
    site, metrics = _metrics(content, node_id, registry)
    n = metrics.get(OOD_COUNT)
    if isinstance(n, bool) or not isinstance(n, int | float) or not math.isfinite(n) or n != int(n) or n < 0:
        raise ReplyRejected("bad_ood_statistics", f"{OOD_COUNT} must be a whole number >= 0")
    n = int(n)
    if n == 0:
        if set(metrics) != {OOD_COUNT}:
            raise ReplyRejected("bad_ood_statistics", f"a site below its privacy floor sends only {OOD_COUNT} = 0")
        return ScreenedReply(node_id=node_id, site=site, arrays=None, metrics={OOD_COUNT: 0.0}, evaluation=None), None
    if set(metrics) != {OOD_COUNT, OOD_SUM, OOD_SUMSQ}:
        raise ReplyRejected("bad_ood_statistics", f"a moments reply has exactly {OOD_COUNT}, {OOD_SUM}, {OOD_SUMSQ}")
    if not min_count <= n <= 2 * count_bound:  # training + validation studies
        raise ReplyRejected(
            "bad_ood_statistics",
            f"{OOD_COUNT} must be 0 or between the privacy floor {min_count} and {2 * count_bound}",
        )
    total = _finite_list(metrics[OOD_SUM], width, OOD_SUM)
    squares = _finite_list(metrics[OOD_SUMSQ], width, OOD_SUMSQ)
    if (squares < 0).any() or (total * total > n * squares * (1 + 1e-6) + 1e-9).any():
        raise ReplyRejected("bad_ood_statistics", "the sums and sums of squares are inconsistent")
    screened = ScreenedReply(node_id=node_id, site=site, arrays=None, metrics={OOD_COUNT: float(n)}, evaluation=None)
    return screened, (n, total, squares)


def screen_distances_reply(
    content: RecordDict,
    *,
    node_id: int,
    registry: SiteRegistry | None,
    min_count: int,
    count_bound: int,
) -> tuple[ScreenedReply, dict[str, list[float]]]:
    """Check a ``distances`` reply: exactly ``ood-val-log-distance`` and ``ood-train-log-distance``, each empty or
    ``[studies, sum, sum of squares]`` of log10(distance) with studies a whole number in [``min_count``,
    ``count_bound``] and sum^2 <= studies * sum of squares."""
    site, metrics = _metrics(content, node_id, registry)
    if set(metrics) != {OOD_VAL_LOG, OOD_TRAIN_LOG}:
        raise ReplyRejected("bad_ood_statistics", f"a distances reply has exactly {OOD_VAL_LOG} and {OOD_TRAIN_LOG}")
    out: dict[str, list[float]] = {}
    for key in (OOD_VAL_LOG, OOD_TRAIN_LOG):
        if metrics[key] == []:
            out[key] = []
            continue
        n, total, squares = _finite_list(metrics[key], 3, key)
        if n != round(n) or not min_count <= n <= count_bound:
            raise ReplyRejected(
                "bad_ood_statistics", f"{key}: studies must be between the privacy floor {min_count} and {count_bound}"
            )
        if squares < 0 or total * total > n * squares * (1 + 1e-6) + 1e-9:
            raise ReplyRejected("bad_ood_statistics", f"{key}: the sum and sum of squares are inconsistent")
        out[key] = [float(n), float(total), float(squares)]
    summary = {f"{k}-n": float(v[0]) if v else 0.0 for k, v in out.items()}
    return ScreenedReply(node_id=node_id, site=site, arrays=None, metrics=summary, evaluation=None), out


def _ask(
    loop: RoundLoop, server_round: int, arrays: NDArrays, config: Mapping[str, Any], screen: Screen, what: str
) -> tuple[Any, list[str]]:
    report = loop.evaluate_everywhere(
        server_round, arrays, ConfigRecord(dict(config)), what=what, group=f"ood-{what}-{server_round}", screen=screen
    )
    return report, sorted(report.evaluate_sites or {})


def _traffic(reports: list[Any]) -> dict[str, Any]:
    return {
        "rejected_replies": [r for report in reports for r in report.rejected],
        "missing_replies": [m for report in reports for m in report.missing],
        "bytes_sent": sum(report.bytes_sent for report in reports),
        "bytes_received": sum(report.bytes_received for report in reports),
    }


def gather_reference(
    loop: RoundLoop,
    server_round: int,
    arrays: NDArrays,
    settings: Mapping[str, Any],
    *,
    width: int,
    quantile: float = DEFAULT_QUANTILE,
) -> tuple[dict[str, Any], OodReference | None]:
    """Both exchanges for the model ``arrays`` (after ``server_round``), ``settings`` its round settings; ``width``
    the number F of pooled image features. Returns the figures for metrics.json (or the reason there is no reference)
    and the reference for the bundle (None without one)."""
    config = loop.config
    moments: dict[str, tuple[int, np.ndarray, np.ndarray] | None] = {}

    def screen_moments(content: RecordDict, node_id: int) -> ScreenedReply:
        screened, value = screen_moments_reply(
            content,
            node_id=node_id,
            registry=loop.registry,
            width=width,
            min_count=config.metrics_min_count,
            count_bound=config.examples_bound,
        )
        moments[screened.site] = value
        return screened

    first, replied = _ask(
        loop, server_round, arrays, {**settings, OOD_STATISTICS: OOD_MOMENTS}, screen_moments, "moments"
    )
    used = [site for site in replied if moments.get(site) is not None]
    record: dict[str, Any] = {"round": server_round, "quantile": quantile, "features": width}
    if first.evaluate_sites is None or not used:
        reason = first.evaluation_missing or "every site below its privacy floor"
        return {**record, "threshold": None, "reason": f"no feature moments ({reason})", **_traffic([first])}, None
    n, mean, var = pooled_moments([moments[site] for site in used])
    by_site: dict[str, dict[str, list[float]]] = {}  # each site's log-distance moments

    def screen_distances(content: RecordDict, node_id: int) -> ScreenedReply:
        screened, value = screen_distances_reply(
            content,
            node_id=node_id,
            registry=loop.registry,
            min_count=config.metrics_min_count,
            count_bound=config.examples_bound,
        )
        by_site[screened.site] = value
        return screened

    request = {**settings, OOD_STATISTICS: OOD_DISTANCES, OOD_MEAN: mean.tolist(), OOD_VAR: var.tolist()}
    second, replied = _ask(loop, server_round, arrays, request, screen_distances, "distances")
    pooled = {key: np.zeros(3) for key in (OOD_VAL_LOG, OOD_TRAIN_LOG)}
    for site in replied:
        for key, values in by_site[site].items():
            if values:
                pooled[key] += np.asarray(values)
    record.update({"sites": used, "reference_studies": n, **_traffic([first, second])})
    if second.evaluate_sites is None or pooled[OOD_VAL_LOG][0] < 2:
        reason = second.evaluation_missing or "every site below its privacy floor for validation distances"
        return {**record, "threshold": None, "reason": f"no distance moments ({reason})"}, None
    val, train = pooled[OOD_VAL_LOG].tolist(), pooled[OOD_TRAIN_LOG].tolist()
    threshold = threshold_from_moments(val, quantile)
    reference = OodReference(mean=tuple(mean.tolist()), var=tuple(var.tolist()), threshold=threshold, quantile=quantile)
    record.update(
        {
            "threshold": threshold,
            "distance": "mean squared z-score of the pooled image features (diagonal Mahalanobis / F)",
            "fit": "log-normal fitted to the pooled log10 distances of the validation studies",
            "validation_studies": int(val[0]),
            "validation_log10_mean": val[1] / val[0],
            "validation_above_expected": round(expected_above(val, threshold), 2),
            "training_studies": int(train[0]),
            "training_log10_mean": train[1] / train[0] if train[0] else None,
            "training_above_expected": round(expected_above(train, threshold), 2) if train[0] >= 2 else None,
        }
    )
    return record, reference

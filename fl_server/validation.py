"""Checks on the sites' replies before anything of them is used: one gate for every reply, then the update checks.

Every check returns or raises a :class:`Problem`: a stable reason code (``CODES``) and a reason written by the server
(never text taken from the reply: no site-chosen key, name or message is echoed). The round loop records the node id,
the registered site name and the problem, drops the reply and goes on with the others.

The reply gate (:func:`screen_reply`, on Flower records, called by ``fl_server.rounds`` for train and evaluate
replies and the fused ``evaluate`` ConfigRecord inside train replies):

- :func:`site_identity`: the ``site`` record names the site; with a site registry the name is the registry's for the
  reply's node id (unregistered node or another claimed name: rejected);
- the record layout: exactly the records the server expects, each of its type;
- the weights: packed index and buffers checked against the global model before decoding
  (``fedct.transport.decode_checked``);
- :func:`plain_metrics`: metric names of the metric grammar, scalars where scalars belong, lists only for
  ``*-hist-*`` metrics (counts) and ``*-calib-*`` metrics (non-negative sums), no infinities, bounded magnitudes, ``num-examples`` a positive integer, counts clipped to
  ``max-site-examples``;
- :func:`histogram_length_problems`: each ``*-hist-*`` and ``*-calib-*`` list has the same length at every site.

Then, on the decoded updates (pure functions on plain mappings of numpy/torch arrays):

- :func:`structure_problem`: same keys, shapes and dtypes as the global model;
- :func:`finite_problem`: every value finite;
- :func:`update_norm` with ``max_norm``: ``||w_i - w_global||`` (all floating tensors as one vector) within a bound;
- :func:`zscore_outliers`: a robust z-score of the update norms across the round's sites (median and MAD), for
  an update far larger than the others.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_NORM_BIT

from fedct.protocol import ARRAYS_RECORD, EVALUATION_RECORD, INDEX_RECORD, METRICS_RECORD, NUM_EXAMPLES, SITE_RECORD
from fedct.transport import TransportError, decode_checked
from fl_server.config import SiteRegistry, is_site_name
from fl_server.run_log import is_calibration_key, is_count_key, is_histogram_key, is_list_key

#: Scale of the MAD of a normal distribution (so that the robust z-score reads like a standard score).
#: Smallest scale of the robust z-score, as a share of the median norm (see robust_zscores).
SCALE_FLOOR = 0.1
MAD_TO_SIGMA = 1.4826
#: Fewest updates for which the z-score is meaningful (with two, each is as far from the median as the other).
MIN_UPDATES_FOR_ZSCORE = 3
#: Largest absolute value of a floating weight the server accepts (a trained network's weights are orders of
#: magnitude smaller; 1e308 or 1e30 is an attack or a broken site).
MAX_WEIGHT_MAGNITUDE = 1e6
#: Largest absolute value of a scalar metric other than a count (losses, AUCs, seconds ...).
MAX_METRIC_MAGNITUDE = 1e9
#: Most metrics in one reply, most bins in one histogram metric.
MAX_METRIC_KEYS = 2048
MAX_HISTOGRAM_BINS = 4096
#: Metric names: ``num-examples`` or ``<split>-<name>`` (class names come from the sites' labels), or the keys
#: Flower's client-side DP mods add.
METRIC_KEY_PATTERN = re.compile(r"num-examples|(?:train|val|test)-[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
FLOWER_METRIC_KEYS = frozenset({KEY_NORM_BIT})

#: Every reason code the server records (metrics.json ``rejected_updates[].code``).
CODES = {
    "error_reply": "the site answered with an error instead of a result",
    "duplicate_reply": "a second reply from the same node in one exchange",
    "unregistered_node": "the reply comes from a node that is not in the site registry",
    "site_name_mismatch": "the reply's site record claims another name than the registry's for its node",
    "bad_site_name": "the site record is missing or its name is not a site name",
    "duplicate_site_name": "another node of the round already answered under this site name",
    "malformed_reply": "records missing, unexpected or of the wrong type",
    "bad_index": "the packed weights index is not well formed",
    "unknown_dtype": "the packed weights name a dtype the server does not know",
    "dtype_mismatch": "a tensor or buffer has another dtype than the global model's",
    "shape_mismatch": "tensor names or shapes differ from the global model's",
    "size_mismatch": "a buffer's byte length or element count differs from what the index says",
    "malformed_weights": "an array cannot be read",
    "bad_metric": "a metric name, type or value is not what the server accepts",
    "bad_num_examples": "num-examples is not a positive integer",
    "bad_profile_statistics": "profile statistics below the privacy floor, of the wrong length or inconsistent",
    "bad_ood_statistics": "feature or distance statistics below the privacy floor, of the wrong length or inconsistent",
    "bad_histogram": "a histogram metric has another number of bins than at the other sites",
    "non_finite": "NaN or infinite values where finite ones are required",
    "huge_value": "a weight beyond the magnitude any trained network has",
    "norm_exceeded": "update norm above max-update-norm",
    "norm_outlier": "update norm far above the round's median (update-zscore)",
    "internal_error": "the server's checks failed on this reply (a server bug; the reply is dropped)",
}


@dataclass(frozen=True)
class Problem:
    """Why a reply (or its update) is rejected: a code from ``CODES`` and a reason written by the server."""

    code: str
    reason: str

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown reason code {self.code!r}")


class ReplyRejected(Exception):
    """Raised inside the reply gate; carries the :class:`Problem`."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.problem = Problem(code, reason)


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
            parts.append(f"{len(extra)} unknown tensor(s)")  # their names are the site's: not echoed
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


def magnitude_problem(update: Mapping[str, Any], max_abs: float = MAX_WEIGHT_MAGNITUDE) -> str | None:
    """Why a floating tensor of ``update`` holds a value beyond ``max_abs`` in magnitude (None when none does)."""
    for key, value in update.items():
        array = _np(value)
        if array.dtype.kind == "f" and array.size and float(np.max(np.abs(array))) > max_abs:
            return f"values beyond {max_abs:g} in {key!r}"
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
    """``(x - median) / scale`` for each value, with ``scale = max(1.4826 * MAD, SCALE_FLOOR * |median|)``.

    The floor matters with few sites: two or three honest updates can have nearly equal norms, so the MAD is tiny and
    a site 10 % above the others would score several robust SDs (seen: 12.45 vs a median of 11.28 scored 8.5 and an
    honest site was rejected). With the floor, norms within ``threshold * SCALE_FLOOR`` of the median never stand out,
    while a poisoned update (norms 1000x the median) still does. 0 for all when every value equals a median of 0;
    +inf for a value off a zero median with zero MAD."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return []
    median = float(np.median(x))
    scale = max(MAD_TO_SIGMA * float(np.median(np.abs(x - median))), SCALE_FLOOR * abs(median))
    if scale == 0.0:
        return [0.0 if v == median else math.copysign(math.inf, v - median) for v in x]
    return [float((v - median) / scale) for v in x]


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
) -> dict[Any, Problem]:
    """Run every check on a round's updates (``{key: state}``); return ``{key: Problem}`` of the rejected ones.

    Structure, finiteness and magnitude are checked first; the norm bound (``max_norm`` > 0) and the z-score
    (``zscore`` > 0) are then applied to the updates that passed, the z-score among those within the bound.
    """
    rejected: dict[Any, Problem] = {}
    norms: dict[Any, float] = {}
    for key, update in updates.items():
        reason = structure_problem(update, reference)
        if reason is not None:
            rejected[key] = Problem("shape_mismatch" if "dtype" not in reason else "dtype_mismatch", reason)
            continue
        reason = finite_problem(update)
        if reason is not None:
            rejected[key] = Problem("non_finite", reason)
            continue
        reason = magnitude_problem(update)
        if reason is not None:
            rejected[key] = Problem("huge_value", reason)
            continue
        norm = update_norm(update, reference)
        if not math.isfinite(norm):
            rejected[key] = Problem("huge_value", f"update norm is {norm} (values too large for float64)")
        elif max_norm > 0 and norm > max_norm:
            rejected[key] = Problem("norm_exceeded", f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}")
        else:
            norms[key] = norm
    rejected.update({k: Problem("norm_outlier", reason) for k, reason in zscore_outliers(norms, zscore).items()})
    return rejected


# --- the reply gate ---------------------------------------------------------------------------------------------


def site_identity(content: RecordDict, node_id: int, registry: SiteRegistry | None) -> str:
    """The site name under which a reply is recorded: the registry's name for ``node_id`` (the reply's ``site``
    record must claim the same), or without a registry the name the reply gives (a site name, nothing else)."""
    if registry is not None and node_id not in registry.names:
        raise ReplyRejected("unregistered_node", f"node {node_id} is not in the site registry")
    record = content.get(SITE_RECORD) if SITE_RECORD in content else None
    claimed = record.get("name") if isinstance(record, ConfigRecord) and set(record.keys()) == {"name"} else None
    if not is_site_name(claimed):
        raise ReplyRejected("bad_site_name", "the reply's site record is missing or does not hold a site name")
    if registry is not None and claimed != registry.names[node_id]:
        raise ReplyRejected(
            "site_name_mismatch", f"the reply claims another site name than node {node_id}'s registered one"
        )
    return claimed if registry is None else registry.names[node_id]


def _number(value: Any) -> float | None:
    """``value`` as a float when it is an int or float (bool excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf


def plain_metrics(
    values: Mapping[str, Any], *, count_bound: int, train: bool, what: str = "metrics"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A reply's metrics as plain floats (lists of floats for ``*-hist-*``), and the counts clipped to ``count_bound``.

    ``num-examples`` must be an integer, > 0 in a training reply (its aggregation weight), >= 0 in an evaluation.
    Other counts (``<split>-n``, ``<split>-n-*``) are integers >= 0 or NaN (a site's privacy floor); every count above
    ``count_bound`` is clipped to it (returned as ``{"metric", "claimed", "used"}``). Other scalars may be NaN
    (undefined) but not infinite, and at most ``MAX_METRIC_MAGNITUDE`` in magnitude. Raises :class:`ReplyRejected`.
    """
    if len(values) > MAX_METRIC_KEYS:
        raise ReplyRejected("bad_metric", f"{what}: more than {MAX_METRIC_KEYS} metrics")
    out: dict[str, Any] = {}
    clipped: list[dict[str, Any]] = []
    for position, (key, value) in enumerate(values.items()):
        if not isinstance(key, str) or not (METRIC_KEY_PATTERN.fullmatch(key) or key in FLOWER_METRIC_KEYS):
            raise ReplyRejected("bad_metric", f"{what}: metric #{position + 1} does not have a metric name")
        if is_histogram_key(key):
            if not isinstance(value, list) or len(value) > MAX_HISTOGRAM_BINS:
                raise ReplyRejected(
                    "bad_metric", f"{what}: {key} must be a list of at most {MAX_HISTOGRAM_BINS} counts"
                )
            counts = [_number(c) for c in value]
            if any(c is None for c in counts):
                raise ReplyRejected("bad_metric", f"{what}: {key} holds something other than numbers")
            if not all(math.isfinite(c) for c in counts):
                raise ReplyRejected("non_finite", f"{what}: {key} holds NaN or infinite counts")
            if any(c < 0 or c > count_bound for c in counts):
                raise ReplyRejected("bad_metric", f"{what}: {key} holds counts below 0 or above {count_bound}")
            out[key] = counts
            continue
        if is_calibration_key(key):  # sums (NLL, confidences, counts): finite, >= 0, bounded; not counts
            if not isinstance(value, list) or len(value) > MAX_HISTOGRAM_BINS:
                raise ReplyRejected("bad_metric", f"{what}: {key} must be a list of at most {MAX_HISTOGRAM_BINS} sums")
            sums = [_number(c) for c in value]
            if any(c is None for c in sums):
                raise ReplyRejected("bad_metric", f"{what}: {key} holds something other than numbers")
            if not all(math.isfinite(c) for c in sums):
                raise ReplyRejected("non_finite", f"{what}: {key} holds NaN or infinite sums")
            if any(c < 0 or c > MAX_METRIC_MAGNITUDE for c in sums):
                raise ReplyRejected("bad_metric", f"{what}: {key} holds sums below 0 or above {MAX_METRIC_MAGNITUDE:g}")
            out[key] = sums
            continue
        number = _number(value)
        if number is None:
            raise ReplyRejected("bad_metric", f"{what}: {key} must be a single number")
        if key == NUM_EXAMPLES:
            if not math.isfinite(number) or number != math.floor(number) or number < (1 if train else 0):
                raise ReplyRejected(
                    "bad_num_examples", f"{what}: num-examples must be an integer >= {1 if train else 0}"
                )
        if math.isinf(number):
            raise ReplyRejected("non_finite", f"{what}: {key} is infinite")
        if is_count_key(key):
            if not math.isnan(number) and (number < 0 or number != math.floor(number)):
                raise ReplyRejected("bad_metric", f"{what}: count {key} must be an integer >= 0")
            if number > count_bound:
                clipped.append(
                    {"metric": key, "claimed": number, "used": float(count_bound), "bound": "max-site-examples"}
                )
                number = float(count_bound)
        elif abs(number) > MAX_METRIC_MAGNITUDE:
            raise ReplyRejected("bad_metric", f"{what}: {key} is beyond {MAX_METRIC_MAGNITUDE:g} in magnitude")
        out[key] = number
    if NUM_EXAMPLES not in out:
        raise ReplyRejected("bad_num_examples", f"{what}: num-examples is missing")
    return out, clipped


@dataclass(frozen=True)
class ScreenedReply:
    """A reply that passed the gate, as plain Python: its site, decoded weights (train), metrics and the fused
    evaluation it carried (or None), and the counts that were clipped."""

    node_id: int
    site: str
    arrays: dict[str, np.ndarray] | None
    metrics: dict[str, Any]
    evaluation: dict[str, Any] | None
    clipped: tuple[dict[str, Any], ...] = ()


def _expect_type(content: RecordDict, name: str, kind: type) -> Any:
    record = content[name]
    if not isinstance(record, kind):
        raise ReplyRejected("malformed_reply", f"record {name!r} must be a {kind.__name__}")
    return record


def screen_reply(
    content: RecordDict,
    *,
    node_id: int,
    train: bool,
    reference: Mapping[str, np.ndarray],
    registry: SiteRegistry | None,
    count_bound: int,
    evaluation_expected: bool = False,
) -> ScreenedReply:
    """Check one reply's identity, record layout, weights (train) and metrics; :class:`ReplyRejected` if anything
    is off. Train replies: ``arrays`` (ArrayRecord, packed with a ``weights-index`` ConfigRecord or per tensor),
    ``metrics`` (MetricRecord), ``site`` (ConfigRecord) and, when ``evaluation_expected``, optionally ``evaluate``
    (ConfigRecord of metrics). Evaluate replies: ``metrics`` and ``site`` only."""
    site = site_identity(content, node_id, registry)
    names = set(content.keys())
    required = {ARRAYS_RECORD, METRICS_RECORD, SITE_RECORD} if train else {METRICS_RECORD, SITE_RECORD}
    allowed = set(required)
    if train:
        allowed |= {INDEX_RECORD} | ({EVALUATION_RECORD} if evaluation_expected else set())
    if not required <= names:
        raise ReplyRejected("malformed_reply", f"reply lacks record(s) {', '.join(sorted(required - names))}")
    if not names <= allowed:
        raise ReplyRejected("malformed_reply", f"reply carries {len(names - allowed)} unexpected record(s)")
    _expect_type(content, SITE_RECORD, ConfigRecord)
    metric_record = _expect_type(content, METRICS_RECORD, MetricRecord)
    arrays = None
    if train:
        _expect_type(content, ARRAYS_RECORD, ArrayRecord)
        if INDEX_RECORD in names:
            _expect_type(content, INDEX_RECORD, ConfigRecord)
        try:
            arrays = decode_checked(content, reference, key=ARRAYS_RECORD)
        except TransportError as exc:
            raise ReplyRejected(exc.code, exc.reason) from None
    metrics, clipped = plain_metrics(dict(metric_record.items()), count_bound=count_bound, train=train)
    evaluation = None
    if train and EVALUATION_RECORD in names:
        record = _expect_type(content, EVALUATION_RECORD, ConfigRecord)
        evaluation, more = plain_metrics(
            dict(record.items()), count_bound=count_bound, train=False, what="fused evaluation"
        )
        clipped = clipped + [{**c, "metric": f"evaluate/{c['metric']}"} for c in more]
    return ScreenedReply(
        node_id=node_id, site=site, arrays=arrays, metrics=metrics, evaluation=evaluation, clipped=tuple(clipped)
    )


def histogram_length_problems(
    per_reply: Mapping[Any, Sequence[Mapping[str, Any]]], pinned: dict[str, int]
) -> dict[Any, Problem]:
    """Replies whose ``*-hist-*`` metrics have another number of bins than the other sites' (run_log sums them bin by bin).

    ``per_reply`` maps a reply to its metric mappings (e.g. train metrics and fused evaluation). A key's length is
    taken from ``pinned`` (lengths agreed in earlier rounds), else from the length most replies of this round carry
    (then pinned); when two lengths are equally common nothing can be told apart and every reply with the key is
    rejected. Empty lists (a site's privacy floor: no histogram) are always accepted. ``pinned`` is updated in place.
    """
    lengths: dict[str, Counter[int]] = {}
    for metric_maps in per_reply.values():
        for metrics in metric_maps:
            for key, value in metrics.items():
                if is_list_key(key) and isinstance(value, list) and value:
                    lengths.setdefault(key, Counter())[len(value)] += 1
    expected: dict[str, int | None] = {}
    for key, counter in lengths.items():
        if key in pinned:
            expected[key] = pinned[key]
            continue
        ranked = counter.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            expected[key] = None
        else:
            expected[key] = pinned[key] = ranked[0][0]
    problems: dict[Any, Problem] = {}
    for reply, metric_maps in per_reply.items():
        for metrics in metric_maps:
            bad = next(
                (
                    k
                    for k, v in metrics.items()
                    if is_list_key(k) and isinstance(v, list) and v and len(v) != expected.get(k)
                ),
                None,
            )
            if bad is not None:
                want = expected.get(bad)
                problems[reply] = Problem(
                    "bad_histogram",
                    f"{bad} has {len(metrics[bad])} bins; "
                    + (
                        f"the other sites send {want}"
                        if want is not None
                        else "the sites disagree on the number of bins"
                    ),
                )
                break
    return problems

"""Per-round metrics of a federated run: aggregation across sites, ``metrics.json``, table rows, curves.

Plain Python (no flwr): the ServerApp hands over ``{site name: {metric: value}}`` mappings, where a value
is a float or, for binned score counts (``<split>-hist-pos-<class>``, ``<split>-hist-neg-<class>``), a
list of floats.

Aggregation rules (:func:`aggregate`):

- counts (``num-examples``, ``<split>-n``, ``<split>-n-*`` such as ``val-n-events``, ``val-n-pos-covid``)
  are summed over the sites that sent them (a site sends NaN for a count of 1..k-1, ``fl_client.metrics``' privacy
  floor k; NaN when no site sent one);
- histograms (``<split>-hist-*``) are summed bin by bin, and from the summed histograms the AUC of the
  *pooled* predictions is added: ``<split>-pooled-auc-<class>`` and ``<split>-pooled-auc-macro`` (mean
  over classes with both positives and negatives). It is exact up to binning (see
  :func:`pooled_auc_from_histograms`); sites send histograms coarsened to groups of >= k studies spread evenly
  over their bins (``fl_client.metrics.coarsen_histogram``), and leave out a class with < k positives or negatives,
  so the pooled AUC covers the sites that sent it and carries the coarsening error (README "Privacy");
- every other metric is a weighted mean of the sites' values, skipping sites where it is undefined
  (NaN); the weight is given by :func:`weight_key_for`: ``val-*`` the site's validation count,
  ``test-*`` its test count, ``train-*`` its training count, except ``c-index``/``td-auc`` (number of
  events, ``<split>-n-events``), ``sens-<class>`` (positives of the class, ``<split>-n-pos-<class>``) and
  ``spec-<class>`` (negatives, ``<split>-n-neg-<class>``).

So there are two macro AUCs: ``val-auc-macro`` is the weighted mean of the *site* AUCs (how well the model
ranks studies within a site), ``val-pooled-auc-macro`` the AUC of all sites' predictions pooled (it also
rewards scores that are comparable across sites). Model selection uses ``val-auc-macro``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedct.files import atomic_write_bytes, json_safe
from fedct.protocol import (
    AUC_MACRO,
    C_INDEX,
    CALIBRATION_PREFIX,
    CALIBRATION_STAGES,
    NUM_EXAMPLES,
    RELIABILITY_FIELDS,
    TD_AUC,
    TEST_PREFIX,
    TRAIN_PREFIX,
    VAL_CALIBRATION_NLL,
    VAL_PREFIX,
    reliability_key,
)
from fl_server.observe import plot_learning_curves
from models.calibration import ece_from_bins, ece_sampling_floor, fit_temperature

SiteMetrics = Mapping[str, Mapping[str, Any]]
"""``{site: {metric: float or, for ``*-hist-*`` keys, list of floats}}``."""


def _split_prefix(key: str) -> tuple[str, str]:
    """``("val-", "auc-macro")`` for ``"val-auc-macro"``; ``("", key)`` when there is no split prefix."""
    for prefix in (VAL_PREFIX, TEST_PREFIX, TRAIN_PREFIX):
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def is_histogram_key(key: str) -> bool:
    """True for binned score counts (``hist-*`` after the split prefix): summed bin by bin across sites."""
    return _split_prefix(key)[1].startswith("hist-")


def is_calibration_key(key: str) -> bool:
    """True for calibration sums (``calib-*`` after the split prefix: ``val-calib-nll``, ``test-calib-after-count``
    ...): lists of sums, added element-wise across sites like histograms, but not counts."""
    return _split_prefix(key)[1].startswith(CALIBRATION_PREFIX)


def is_list_key(key: str) -> bool:
    """True for the metrics that are lists (histograms and calibration sums), summed element-wise across sites."""
    return is_histogram_key(key) or is_calibration_key(key)


def is_count_key(key: str) -> bool:
    """True for counts (``num-examples``, ``<split>-n``, ``<split>-n-*``): summed across sites."""
    name = _split_prefix(key)[1]
    return key == NUM_EXAMPLES or name == "n" or name.startswith("n-")


def weighted_mean(per_site: SiteMetrics, key: str, weight_key: str) -> float:
    """Weighted mean of ``key`` over sites where both the value and a positive weight are finite."""
    total, weight_sum = 0.0, 0.0
    for metrics in per_site.values():
        value, weight = metrics.get(key, math.nan), metrics.get(weight_key, 0.0)
        if math.isfinite(value) and math.isfinite(weight) and weight > 0:
            total += value * weight
            weight_sum += weight
    return total / weight_sum if weight_sum > 0 else math.nan


def weight_key_for(key: str) -> str:
    """The count that weights ``key`` in the aggregate (see the module docstring)."""
    prefix, name = _split_prefix(key)
    if name in (C_INDEX, TD_AUC):
        return f"{prefix}n-events"
    if name.startswith("sens-"):
        return f"{prefix}n-pos-{name[len('sens-') :]}"
    if name.startswith("spec-"):
        return f"{prefix}n-neg-{name[len('spec-') :]}"
    if prefix == VAL_PREFIX:
        return "val-n"
    if prefix == TEST_PREFIX:
        return "test-n"
    return NUM_EXAMPLES


def pooled_auc_from_histograms(pos: Sequence[float], neg: Sequence[float]) -> float:
    """ROC AUC from binned score counts: P(score of a random positive > that of a random negative).

    ``pos[b]``/``neg[b]`` count positives/negatives whose score fell in bin ``b`` (bins in increasing score
    order). Pairs in different bins are ranked exactly; a pair sharing a bin counts 0.5, as a tie. The
    result is therefore exact up to binning: it equals the AUC of the raw scores when no bin holds both a
    positive and a negative (with different scores), and otherwise differs from it by at most
    ``0.5 * sum(pos[b] * neg[b]) / (sum(pos) * sum(neg))``. NaN without positives or without negatives.
    """
    if len(pos) != len(neg):
        raise ValueError(f"pos and neg must have the same number of bins, got {len(pos)} and {len(neg)}")
    pos_f, neg_f = [float(c) for c in pos], [float(c) for c in neg]
    for name, counts in (("pos", pos_f), ("neg", neg_f)):
        bad = [c for c in counts if not math.isfinite(c) or c < 0]
        if bad:
            raise ValueError(f"{name} counts must be finite and >= 0, got {bad[0]!r}")
    n_pos, n_neg = sum(pos_f), sum(neg_f)
    if n_pos <= 0 or n_neg <= 0:
        return math.nan
    wins, negatives_below = 0.0, 0.0
    for p, n in zip(pos_f, neg_f, strict=True):
        wins += p * (negatives_below + 0.5 * n)
        negatives_below += n
    return wins / (n_pos * n_neg)


def _sum_histograms(key: str, values: Sequence[Any]) -> list[float]:
    """Bin-by-bin sum of the sites' lists for ``key`` (ValueError if one is not a list or lengths differ)."""
    lists = []
    for value in values:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ValueError(f"histogram metric {key!r} must be a list of counts at every site, got {value!r}")
        if len(value):  # an empty list: the site sent no histogram (fewer than k studies, its privacy floor)
            lists.append([float(c) for c in value])
    lengths = sorted({len(v) for v in lists})
    if len(lengths) > 1:
        raise ValueError(f"histogram metric {key!r} has different numbers of bins across sites: {lengths}")
    return [math.fsum(bins) for bins in zip(*lists, strict=True)] if lists else []


def _pooled_aucs(histograms: Mapping[str, list[float]]) -> dict[str, float]:
    """``<split>-pooled-auc-<class>`` and ``<split>-pooled-auc-macro`` from summed ``<split>-hist-pos/neg-<class>``."""
    result: dict[str, float] = {}
    per_prefix: dict[str, list[float]] = {}
    for key in sorted(histograms):
        prefix, name = _split_prefix(key)
        if not name.startswith("hist-pos-"):
            continue
        cls = name[len("hist-pos-") :]
        neg = histograms.get(f"{prefix}hist-neg-{cls}")
        if neg is None:
            continue
        # NaN when no site could send this class's histograms (each had fewer than k positives or negatives)
        auc = pooled_auc_from_histograms(histograms[key], neg) if histograms[key] and neg else math.nan
        result[f"{prefix}pooled-auc-{cls}"] = auc
        per_prefix.setdefault(prefix, []).append(auc)
    for prefix, aucs in per_prefix.items():
        defined = [a for a in aucs if math.isfinite(a)]
        result[f"{prefix}pooled-auc-macro"] = sum(defined) / len(defined) if defined else math.nan
    return result


def histogram_quantiles(
    counts: Sequence[float], value_range: tuple[float, float], quantiles: Sequence[float]
) -> list[float]:
    """Quantiles of a distribution known only by equal-width bin counts (linear within a bin)."""
    total = math.fsum(counts)
    if total <= 0:
        return [math.nan for _ in quantiles]
    low, high = value_range
    width = (high - low) / len(counts)
    cumulative = 0.0
    out = []
    targets = iter(sorted(quantiles))
    target = next(targets)
    for i, count in enumerate(counts):
        while target is not None and cumulative + count >= target * total and count > 0:
            out.append(low + width * (i + (target * total - cumulative) / count))
            target = next(targets, None)
        cumulative += count
    out += [high] * (len(quantiles) - len(out))
    return out


def aggregate(per_site: SiteMetrics) -> dict[str, Any]:
    """Aggregate every metric key present at the sites (rules in the module docstring).

    Scalars map to floats; ``*-hist-*`` keys to the bin-by-bin sums (lists), from which the pooled AUCs
    (``<split>-pooled-auc-<class>``, ``<split>-pooled-auc-macro``) are added.
    """
    keys = sorted({k for metrics in per_site.values() for k in metrics})
    result: dict[str, Any] = {}
    histograms: dict[str, list[float]] = {}
    for key in keys:
        values = [m[key] for m in per_site.values() if key in m]
        if is_list_key(key):
            result[key] = _sum_histograms(key, values)
            if is_histogram_key(key):
                histograms[key] = result[key]
            continue
        lists = [v for v in values if isinstance(v, list | tuple)]
        if lists:
            raise ValueError(
                f"metric {key!r} is a list at some site ({lists[0]!r}); only *-hist-* and *-calib-* metrics "
                "may be lists"
            )
        if is_count_key(key):  # a site sends NaN for a count of 1..k-1 (privacy floor): summed over the others
            counts = [float(m[key]) for m in per_site.values() if key in m and math.isfinite(float(m[key]))]
            result[key] = math.fsum(counts) if counts else math.nan
        else:
            result[key] = weighted_mean(per_site, key, weight_key_for(key))
    result.update(_pooled_aucs(histograms))
    return dict(sorted(result.items()))


def temperature_fit(evaluation: Mapping[str, Any], per_site: SiteMetrics | None = None) -> dict[str, Any] | None:
    """The temperature of a round's global model from its evaluation's aggregate (``val-calib-nll``, the sites' summed
    validation NLL on the calibration grid, :func:`models.calibration.fit_temperature`); None when no site sent sums
    (every site below the privacy floor). ``per_site`` (the sites' evaluation metrics) names the sites used."""
    sums = evaluation.get(VAL_CALIBRATION_NLL)
    if not sums:
        return None
    fit: dict[str, Any] = {
        "method": "temperature scaling",
        "temperature": fit_temperature(sums),
        "fitted_on": "validation split of every site (summed NLL on the temperature grid; no study left its site)",
    }
    if per_site is not None:
        used = sorted(site for site, m in per_site.items() if m.get(VAL_CALIBRATION_NLL))
        fit["sites"] = used
        fit["validation_studies"] = int(sum(float(per_site[s].get(f"{VAL_PREFIX}n") or 0) for s in used))
    return fit


def calibration_outcome(per_site: SiteMetrics) -> dict[str, Any]:
    """ECE before/after temperature scaling on the held-out test split, from the sites' calibration replies.

    The sites' reliability bins (coarsened to >= k studies per bin) are added bin by bin and the ECE read from the
    sums (:func:`models.calibration.ece_from_bins`); ``brier_after``/``loss_after``/``accuracy_after`` are the
    weighted means of the sites' calibrated test values. ``reliability`` keeps the summed bins.
    ``ece_floor_expected``/``ece_floor_upper95``: the ECE a perfectly calibrated model would read on the same bins
    (its mean and 95th percentile, :func:`models.calibration.ece_sampling_floor`): the test size's sampling floor.
    """
    agg = aggregate(per_site)
    out: dict[str, Any] = {}
    reliability: dict[str, dict[str, list[float]]] = {}
    for stage in CALIBRATION_STAGES:
        lists = {field: list(agg.get(reliability_key(stage, field)) or []) for field in RELIABILITY_FIELDS}
        complete = all(lists.values())
        out[f"ece_{stage}"] = ece_from_bins(*lists.values()) if complete else math.nan
        reliability[stage] = lists
    out["test_studies"] = int(math.fsum(reliability["after"]["count"]))
    if all(reliability["after"].values()):  # what a perfectly calibrated model would read on these bins
        floor = ece_sampling_floor(reliability["after"]["count"], reliability["after"]["confidence"])
        out["ece_floor_expected"] = floor["expected"]
        out["ece_floor_upper95"] = floor["upper"]
    for name in ("brier", "loss", "accuracy"):
        out[f"{name}_after"] = agg.get(f"{TEST_PREFIX}{name}", math.nan)
    out["sites"] = sorted(site for site, m in per_site.items() if m.get(reliability_key("after", "count")))
    out["reliability"] = reliability
    return out


@dataclass(frozen=True)
class BestRound:
    """The round whose global model scored best on validation."""

    round: int
    metric: str
    value: float


def _compact_number_lists(text: str) -> str:
    """Put every list of numbers of an indented JSON text on one line (histograms stay readable)."""
    number = r"(?:-?\d[\d.eE+-]*|null)"
    pattern = rf"\[\n\s*({number}(?:,\n\s*{number})*)\n\s*\]"
    return re.sub(pattern, lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text)


def _section(per_site: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One round's train or evaluate entry: the aggregate, the sites' scalars, their histograms apart."""
    sites = {site: {k: v for k, v in m.items() if not is_list_key(k)} for site, m in per_site.items()}
    entry: dict[str, Any] = {"aggregate": aggregate(per_site), "sites": sites}
    histograms = {site: {k: v for k, v in m.items() if is_list_key(k)} for site, m in per_site.items()}
    if any(histograms.values()):
        entry["site_histograms"] = {site: h for site, h in histograms.items() if h}
    return entry


class RunLog:
    """Collects site metrics round by round and writes ``metrics.json`` after every round."""

    def __init__(
        self,
        run_dir: Path,
        *,
        run_config: Mapping[str, Any],
        emit: Callable[[str], None] = print,
        selection_metric: str = VAL_PREFIX + AUC_MACRO,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_config = dict(run_config)
        self.emit = emit
        self.selection_metric = selection_metric
        self.rounds: list[dict[str, Any]] = []
        self.best: BestRound | None = None
        #: Calibration of the bundles (``{"best"|"final": {...}}``), set after the last round.
        self.calibration: dict[str, Any] = {}
        #: Out-of-distribution reference figures of the bundles (``{"best"|"final": {...}}``, fl_server.ood).
        self.ood: dict[str, Any] = {}
        #: The registry champion's evaluation on every site after the last round (fl_server.rounds.evaluate_champion).
        self.champion_evaluation: dict[str, Any] = {}
        #: The pooled profile normalisation of a profile-fusion run (``fl_server.profile_norm.summary``), or {}.
        self.profile_normalisation: dict[str, Any] = {}
        self._pending_train: dict[str, dict[str, float]] = {}
        self._pending_eval: dict[str, dict[str, float]] = {}
        self._round_started = time.perf_counter()
        self._started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def site_train(self, per_site: SiteMetrics) -> dict[str, float]:
        """Record this round's training metrics per site; return their aggregate."""
        self._pending_train = {site: dict(m) for site, m in per_site.items()}
        return aggregate(per_site)

    def site_evaluate(self, per_site: SiteMetrics) -> dict[str, float]:
        """Record this round's evaluation metrics per site; return their aggregate."""
        self._pending_eval = {site: dict(m) for site, m in per_site.items()}
        return aggregate(per_site)

    def end_round(self, server_round: int, *, extra: Mapping[str, Any] | None = None) -> bool:
        """Close ``server_round``: store it, print its row, rewrite metrics.json. True if it is the new best.

        ``extra`` adds fields to the round's entry (e.g. ``skipped``, ``rejected_updates``, ``bytes_sent``); a
        ``seconds`` there replaces the time measured since the previous round.
        """
        seconds = time.perf_counter() - self._round_started
        self._round_started = time.perf_counter()
        entry = {
            "round": server_round,
            "seconds": round(seconds, 2),
            "train": _section(self._pending_train),
            "evaluate": _section(self._pending_eval),
        }
        entry.update(dict(extra or {}))
        self.rounds.append(entry)
        self._pending_train, self._pending_eval = {}, {}
        improved = self._update_best(server_round, entry["evaluate"]["aggregate"])
        if len(self.rounds) == 1:
            self.emit(self.header())
        self.emit(self.row(entry, improved))
        self.write()
        return improved

    def _update_best(self, server_round: int, eval_agg: Mapping[str, Any]) -> bool:
        value = eval_agg.get(self.selection_metric, math.nan)
        metric = self.selection_metric
        if not math.isfinite(value):  # fall back to (negated) validation loss when AUC is undefined everywhere
            metric, value = "-val-loss", -eval_agg.get("val-loss", math.nan)
        if not math.isfinite(value):
            return False
        if (
            self.best is None
            or (metric == self.best.metric and value > self.best.value)
            or (metric != self.best.metric and metric == self.selection_metric)
        ):
            self.best = BestRound(server_round, metric, value)
            return True
        return False

    def state(self) -> dict[str, Any]:
        """What :meth:`restore` needs to continue this log after a restart (JSON-ready)."""
        best = (
            None
            if self.best is None
            else {"round": self.best.round, "metric": self.best.metric, "value": self.best.value}
        )
        return {"rounds": json_safe(self.rounds), "best": best, "started_utc": self._started}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (rounds so far, best round, start time); undefined values come back as NaN."""

        def unclean(value: Any) -> Any:
            if value is None:
                return math.nan
            if isinstance(value, Mapping):
                return {k: unclean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [unclean(v) for v in value]
            return value

        self.rounds = [
            {**entry, **{section: unclean(entry[section]) for section in ("train", "evaluate") if section in entry}}
            for entry in state["rounds"]
        ]
        best = state.get("best")
        self.best = None if best is None else BestRound(int(best["round"]), str(best["metric"]), float(best["value"]))
        self._started = str(state.get("started_utc", self._started))
        self._round_started = time.perf_counter()

    def header(self) -> str:
        """Column titles of the per-round table."""
        return (
            f"{'round':>5} {'train loss':>10} {'val loss':>9} {'val acc':>8} {'val AUC':>8} {'pooled AUC':>10} {'val C':>6} "
            f"{'test AUC':>8} {'sec':>6}  site val AUC"
        )

    def row(self, entry: Mapping[str, Any], improved: bool) -> str:
        """One line of the per-round table."""
        t, e = entry["train"]["aggregate"], entry["evaluate"]["aggregate"]

        def f(x: float | None, width: int) -> str:
            return f"{x:>{width}.3f}" if x is not None and math.isfinite(x) else f"{'-':>{width}}"

        sites = " ".join(
            f"{name}={f(m.get('val-auc-macro', math.nan), 5).strip()}"
            for name, m in sorted(entry["evaluate"]["sites"].items())
        )
        mark = " *" if improved else ""
        return (
            f"{entry['round']:>5} {f(t.get('train-loss'), 10)} {f(e.get('val-loss'), 9)} {f(e.get('val-accuracy'), 8)} "
            f"{f(e.get('val-auc-macro'), 8)} {f(e.get('val-pooled-auc-macro'), 10)} {f(e.get('val-c-index'), 6)} "
            f"{f(e.get('test-auc-macro'), 8)} {entry['seconds']:>6.1f}  {sites}{mark}"
        )

    def summary(self) -> dict[str, Any]:
        """The whole run as a JSON-ready dict."""
        best = None
        if self.best is not None:
            chosen = next(r for r in self.rounds if r["round"] == self.best.round)
            best = {
                "round": self.best.round,
                "selected_by": self.best.metric,
                "value": self.best.value,
                "validation": {k: v for k, v in chosen["evaluate"]["aggregate"].items() if k.startswith(VAL_PREFIX)},
                "test": {k: v for k, v in chosen["evaluate"]["aggregate"].items() if k.startswith(TEST_PREFIX)},
                "test_sites": {
                    s: {k: v for k, v in m.items() if k.startswith(TEST_PREFIX)}
                    for s, m in chosen["evaluate"]["sites"].items()
                },
            }
        return {
            "started_utc": self._started,
            "run_config": self.run_config,
            "aggregation_note": "aggregate = weighted mean of site values (val by val-n, test by test-n, train by num-examples; "
            "c-index and td-auc by the split's n-events, sens-<class> by n-pos-<class>, spec-<class> by n-neg-<class>); "
            "undefined site values (null) are skipped; counts (n, n-*, num-examples) are summed. "
            "auc-macro = weighted mean of the site AUCs (ranking within each site); "
            "pooled-auc-<class> and pooled-auc-macro = AUC of all sites' predictions pooled, computed from the "
            "bin-by-bin sums of the sites' score histograms (hist-pos/neg-<class>, exact up to binning). "
            "Per-site histograms are under each round's site_histograms.",
            "rounds": self.rounds,
            "best_round": best,
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"ood": self.ood} if self.ood else {}),
            **({"champion_evaluation": self.champion_evaluation} if self.champion_evaluation else {}),
            **({"profile_normalisation": self.profile_normalisation} if self.profile_normalisation else {}),
        }

    def write(self) -> Path:
        """Write ``metrics.json`` atomically."""
        text = _compact_number_lists(json.dumps(json_safe(self.summary()), indent=2))
        return atomic_write_bytes(self.run_dir / "metrics.json", text.encode())

    def plot(self) -> Path:
        """The learning curves as ``curves.png`` (:func:`fl_server.observe.plot_learning_curves`, the one plotter)."""
        return plot_learning_curves(self.run_dir, self.rounds, name="curves.png")

"""Per-round metrics of a federated run: aggregation across sites, ``metrics.json``, table rows, curves.

Plain Python (no flwr): the ServerApp hands over ``{site name: {metric: value}}`` mappings.

Aggregates are example-weighted means of the sites' values, skipping sites where a metric is undefined
(NaN): ``val-*`` weighted by each site's validation count, ``test-*`` by its test count, ``train-*`` by its
training count. An aggregated AUC is therefore the weighted mean of site AUCs, not the AUC of pooled
predictions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SiteMetrics = Mapping[str, Mapping[str, float]]


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
    """The count that weights ``key`` in the aggregate."""
    if key.startswith("val-"):
        return "val-n"
    if key.startswith("test-"):
        return "test-n"
    return "num-examples"


def aggregate(per_site: SiteMetrics) -> dict[str, float]:
    """Aggregate every metric key present at the sites (counts are summed, the rest weighted means)."""
    keys = sorted({k for metrics in per_site.values() for k in metrics})
    result: dict[str, float] = {}
    for key in keys:
        if key in ("num-examples", "val-n", "test-n"):
            result[key] = float(sum(m.get(key, 0.0) for m in per_site.values()))
        else:
            result[key] = weighted_mean(per_site, key, weight_key_for(key))
    return result


@dataclass(frozen=True)
class BestRound:
    """The round whose global model scored best on validation."""

    round: int
    metric: str
    value: float


def _clean(value: Any) -> Any:
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class RunLog:
    """Collects site metrics round by round and writes ``metrics.json`` after every round."""

    def __init__(self, run_dir: Path, *, run_config: Mapping[str, Any], emit: Callable[[str], None] = print,
                 selection_metric: str = "val-auc-macro") -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_config = dict(run_config)
        self.emit = emit
        self.selection_metric = selection_metric
        self.rounds: list[dict[str, Any]] = []
        self.best: BestRound | None = None
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

    def end_round(self, server_round: int) -> bool:
        """Close ``server_round``: store it, print its row, rewrite metrics.json. True if it is the new best."""
        seconds = time.perf_counter() - self._round_started
        self._round_started = time.perf_counter()
        train_agg, eval_agg = aggregate(self._pending_train), aggregate(self._pending_eval)
        entry = {
            "round": server_round,
            "seconds": round(seconds, 2),
            "train": {"aggregate": train_agg, "sites": self._pending_train},
            "evaluate": {"aggregate": eval_agg, "sites": self._pending_eval},
        }
        self.rounds.append(entry)
        self._pending_train, self._pending_eval = {}, {}
        improved = self._update_best(server_round, eval_agg)
        if server_round == 1:
            self.emit(self.header())
        self.emit(self.row(entry, improved))
        self.write()
        return improved

    def _update_best(self, server_round: int, eval_agg: Mapping[str, float]) -> bool:
        value = eval_agg.get(self.selection_metric, math.nan)
        metric = self.selection_metric
        if not math.isfinite(value):  # fall back to (negated) validation loss when AUC is undefined everywhere
            metric, value = "-val-loss", -eval_agg.get("val-loss", math.nan)
        if not math.isfinite(value):
            return False
        if self.best is None or (metric == self.best.metric and value > self.best.value) or (
            metric != self.best.metric and metric == self.selection_metric
        ):
            self.best = BestRound(server_round, metric, value)
            return True
        return False

    def header(self) -> str:
        """Column titles of the per-round table."""
        return f"{'round':>5} {'train loss':>10} {'val loss':>9} {'val acc':>8} {'val AUC':>8} {'test AUC':>8} {'sec':>6}  site val AUC"

    def row(self, entry: Mapping[str, Any], improved: bool) -> str:
        """One line of the per-round table."""
        t, e = entry["train"]["aggregate"], entry["evaluate"]["aggregate"]

        def f(x: float | None, width: int) -> str:
            return f"{x:>{width}.3f}" if x is not None and math.isfinite(x) else f"{'-':>{width}}"

        sites = " ".join(
            f"{name}={f(m.get('val-auc-macro', math.nan), 5).strip()}" for name, m in sorted(entry["evaluate"]["sites"].items())
        )
        mark = " *" if improved else ""
        return (
            f"{entry['round']:>5} {f(t.get('train-loss'), 10)} {f(e.get('val-loss'), 9)} {f(e.get('val-accuracy'), 8)} "
            f"{f(e.get('val-auc-macro'), 8)} {f(e.get('test-auc-macro'), 8)} {entry['seconds']:>6.1f}  {sites}{mark}"
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
                "validation": {k: v for k, v in chosen["evaluate"]["aggregate"].items() if k.startswith("val-")},
                "test": {k: v for k, v in chosen["evaluate"]["aggregate"].items() if k.startswith("test-")},
                "test_sites": {s: {k: v for k, v in m.items() if k.startswith("test-")} for s, m in chosen["evaluate"]["sites"].items()},
            }
        return {
            "started_utc": self._started,
            "run_config": self.run_config,
            "aggregation_note": "aggregate = example-weighted mean of site values (val by val-n, test by test-n, train by num-examples); "
            "undefined site values (null) are skipped",
            "rounds": self.rounds,
            "best_round": best,
        }

    def write(self) -> Path:
        """Write ``metrics.json`` atomically."""
        path = self.run_dir / "metrics.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_clean(self.summary()), indent=2))
        tmp.replace(path)
        return path

    def plot(self) -> Path:
        """Learning curves (loss; macro AUC aggregated and per site) as ``curves.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]

        def series(section: str, key: str, site: str | None = None) -> list[float]:
            out = []
            for r in self.rounds:
                src = r[section]["aggregate"] if site is None else r[section]["sites"].get(site, {})
                value = src.get(key, math.nan)
                out.append(value if value is not None else math.nan)
            return out

        fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
        ax_loss.plot(rounds, series("train", "train-loss"), "o-", label="train (sites' mean)")
        ax_loss.plot(rounds, series("evaluate", "val-loss"), "s-", label="validation")
        ax_loss.set_xlabel("round")
        ax_loss.set_ylabel("cross-entropy")
        ax_loss.set_title("Loss")
        ax_loss.legend()
        ax_auc.plot(rounds, series("evaluate", "val-auc-macro"), "o-", linewidth=2.5, color="black", label="validation, all sites")
        ax_auc.plot(rounds, series("evaluate", "test-auc-macro"), "s--", color="grey", label="test, all sites")
        sites = sorted({s for r in self.rounds for s in r["evaluate"]["sites"]})
        for site in sites:
            ax_auc.plot(rounds, series("evaluate", "val-auc-macro", site), ".-", alpha=0.7, label=f"validation, {site}")
        ax_auc.axhline(0.5, color="red", linestyle=":", linewidth=1, label="chance")
        ax_auc.set_ylim(0.0, 1.02)
        ax_auc.set_xlabel("round")
        ax_auc.set_ylabel("macro ROC AUC (one-vs-rest)")
        ax_auc.set_title("Diagnosis: macro AUC")
        ax_auc.legend(fontsize=7, loc="lower right")
        for ax in (ax_loss, ax_auc):
            ax.grid(alpha=0.3)
            if rounds:
                ax.set_xticks(rounds)
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

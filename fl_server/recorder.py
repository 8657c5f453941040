"""The run folder's bookkeeping of a federation: what each round leaves behind, and where a resumed run starts.

:class:`RunRecorder` owns the run folder of :func:`fl_server.rounds.run_federation`:

- ``metrics.json`` (through :class:`fl_server.run_log.RunLog`), TensorBoard scalars and PNGs (``fl_server.observe``)
  after every round;
- ``checkpoints/round-NNN.pt``: the global weights after each round (000 = the initial weights);
- ``model/best`` (whenever the selection metric improves) and ``model/final`` bundles (``models.bundle``), with
  their provenance (strategy, sites, run config, the round's metrics, privacy) and risk reference;
- ``state/``: the resume state, written atomically after every recorded round (``fl_server.checkpoint``).

The round loop hands it one :class:`RoundReport` per round; the recorder never talks to the sites.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedct.protocol import NUM_EXAMPLES, RISK_RANGE, TEST_PREFIX, TRAIN_HIST_RISK, VAL_PREFIX
from fl_server.checkpoint import RunState, load_run_state, save_run_state
from fl_server.config import RESUMABLE_KEYS, ServerConfig
from fl_server.observe import observe_round
from fl_server.privacy import privacy_summary
from fl_server.run_log import RunLog, histogram_quantiles, temperature_fit
from fl_server.strategy import load_strategy_state
from models.bundle import save_state, set_calibration, set_ood, write_bundle
from models.ood import OodReference
from preprocessing.profile_features import ProfileNormalisation

NDArrays = dict[str, np.ndarray]
#: The strategy's state right after a round's aggregation (``fl_server.strategy.strategy_state``).
StrategySnapshot = tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]


@dataclass
class RoundReport:
    """What happened in one round (the round loop's result; the recorder turns it into metrics.json fields)."""

    server_round: int
    arrays: NDArrays
    aggregated: bool = False
    skip_reason: str | None = None
    train_sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluate_sites: dict[str, dict[str, Any]] | None = None
    evaluation_missing: str | None = None
    #: ``evaluate-mode = "fused"``: the evaluation of the previous round's global model that came back with this
    #: round's training replies (per site), or why there is none (set only when the sites were asked for it).
    previous_evaluate_sites: dict[str, dict[str, Any]] | None = None
    previous_evaluation_missing: str | None = None
    rejected: list[dict[str, Any]] = field(default_factory=list)
    #: Counts a site reported above the bounds, clipped: ``{"node_id", "site", "metric", "claimed", "used"}``.
    clipped: list[dict[str, Any]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
    nodes_connected: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    def extra(self) -> dict[str, Any]:
        """The round's fields for metrics.json besides the train/evaluate sections."""
        return {
            "skipped": self.skip_reason is not None,
            "skip_reason": self.skip_reason,
            "rejected_updates": self.rejected,
            "clipped_examples": self.clipped,
            "missing_replies": self.missing,
            "evaluation_missing": self.evaluation_missing,
            "nodes_connected": self.nodes_connected,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "seconds": round(self.seconds, 2),
        }

    def add_evaluation(self, evaluation: RoundReport) -> None:
        """Take the evaluation of this round's global model from a later exchange (``evaluate-mode = "fused"``: the
        evaluate-only exchange after the last round), with its traffic, time and problems."""
        self.evaluate_sites, self.evaluation_missing = evaluation.evaluate_sites, evaluation.evaluation_missing
        self.bytes_sent += evaluation.bytes_sent
        self.bytes_received += evaluation.bytes_received
        self.seconds += evaluation.seconds
        self.missing.extend(evaluation.missing)
        self.rejected.extend(evaluation.rejected)
        self.clipped.extend(evaluation.clipped)


@dataclass
class FinishedRound:
    """A round trained and checkpointed, waiting for its evaluation to be recorded (at once, or with
    ``evaluate-mode = "fused"`` once the next round's training replies have brought it)."""

    report: RoundReport
    #: Fields ``round_extras`` added right after the round (e.g. the accountant's epsilon).
    extras: dict[str, Any]
    #: The round's global weights as a torch state dict (the bundle's weights).
    state: dict[str, torch.Tensor]
    #: The strategy's state right after the round's aggregation: with ``fused`` the strategy has aggregated the next
    #: round by the time this one is recorded; the resume state must match this round's weights.
    snapshot: StrategySnapshot


@dataclass(frozen=True)
class RunStart:
    """Where a run starts: the first round to run, the global weights before it, and the round loop's bounds
    (``first_examples``, ``histogram_bins``) kept from the run being resumed."""

    first_round: int
    arrays: NDArrays
    loop_bounds: dict[str, dict[str, Any]]


def round_metrics(run_log: RunLog, server_round: int) -> dict[str, Any]:
    """Scalar validation/test metrics of one round, aggregated and per site, for the model bundle."""
    entry = next((r for r in run_log.rounds if r["round"] == server_round), None)
    if entry is None:
        return {}

    def scalars(values: Mapping[str, Any]) -> dict[str, float]:
        return {
            k: v for k, v in values.items() if isinstance(v, int | float) and k.startswith((VAL_PREFIX, TEST_PREFIX))
        }

    return {
        "aggregate": scalars(entry["evaluate"]["aggregate"]),
        "sites": {site: scalars(m) for site, m in entry["evaluate"]["sites"].items()},
        "training_studies": {site: m.get(NUM_EXAMPLES) for site, m in entry["train"]["sites"].items()},
    }


def risk_reference(run_log: RunLog, server_round: int) -> dict[str, Any] | None:
    """Tertile cut points of the training studies' risk scores (from the sites' summed histograms) at a round."""
    entry = next((r for r in run_log.rounds if r["round"] == server_round), None)
    counts = entry["evaluate"]["aggregate"].get(TRAIN_HIST_RISK) if entry else None
    if not counts or sum(counts) == 0:
        return None
    cuts = histogram_quantiles(counts, RISK_RANGE, (1 / 3, 2 / 3))
    return {
        "quantiles": cuts,
        "groups": ["low", "intermediate", "high"],
        "studies": int(sum(counts)),
        "source": f"risk scores of all sites' training studies under the round-{server_round} weights (histogram, "
        f"{len(counts)} bins over {list(RISK_RANGE)})",
    }


def round_temperature(run_log: RunLog, server_round: int) -> dict[str, Any] | None:
    """The temperature fitted on a round's evaluation (:func:`fl_server.run_log.temperature_fit`), None without one."""
    entry = next((r for r in run_log.rounds if r["round"] == server_round), None)
    if entry is None:
        return None
    per_site = {
        site: {**m, **entry["evaluate"].get("site_histograms", {}).get(site, {})}
        for site, m in entry["evaluate"]["sites"].items()
    }
    return temperature_fit(entry["evaluate"]["aggregate"], per_site)


def bundle_figures(figures: Mapping[str, Any], reference: OodReference | None) -> dict[str, Any] | None:
    """model.json's ``ood``: the reference (mean, variance, threshold) and its figures (without the replies' bookkeeping); None
    without a reference."""
    if reference is None:
        return None
    kept = {
        k: v for k, v in figures.items() if not k.endswith(("_histogram", "_replies")) and not k.startswith("bytes_")
    }
    return {**kept, **reference.to_dict()}


def resume_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Run-config keys (other than ``RESUMABLE_KEYS``) whose values differ between a saved state and now."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_KEYS)
    return [
        f"{k}: {saved.get(k)!r} (saved) vs {current.get(k)!r} (now)" for k in keys if saved.get(k) != current.get(k)
    ]


def torch_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy weights as a torch state dict (copies)."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


class RunRecorder:
    """Metrics, checkpoints, the best and final bundles and the resume state of one run (see the module doc)."""

    def __init__(self, config: ServerConfig, strategy: Strategy) -> None:
        self.config = config
        self.strategy = strategy
        self.run_dir = config.run_path
        self.state_dir = self.run_dir / "state"
        self.run_config = config.to_run_config()
        self.run_log = RunLog(self.run_dir, run_config=self.run_config, emit=lambda line: log(INFO, "%s", line))
        #: Sites whose update went into an aggregate, over the whole run (kept over a resume).
        self.sites_seen: set[str] = set()
        #: The last round whose aggregate was accepted: the final bundle's round of weights.
        self.last_aggregated = 0
        #: Calibration of the bundles after the run (``{"best"|"final": {...}}``), set by the round loop's calibration.
        self.calibration: dict[str, dict[str, Any]] = {}
        #: The pooled profile normalisation of a run with profile fusion (``fl_server.profile_norm``), for the bundles.
        self.profile_normalisation: ProfileNormalisation | None = None
        #: The out-of-distribution reference of the bundles after the run (``{"best"|"final": (figures, reference)}``,
        #: set by ``fl_server.rounds.reference_bundles``; reference None without one).
        self.ood: dict[str, tuple[dict[str, Any], OodReference | None]] = {}

    def start(self, initial: NDArrays) -> RunStart:
        """Round 1 from ``initial`` (checkpoint ``round-000.pt`` written), or, with ``resume`` and a saved state,
        the round after it: its weights, the strategy's state, metrics and bounds restored. A saved state of another
        run config, or whose weights do not fit the model, is a ValueError naming the folder and the difference."""
        saved = load_run_state(self.state_dir) if self.config.resume else None
        if self.config.resume and saved is None:
            log(INFO, "fedct: resume=true but %s holds no saved state; starting at round 1", self.state_dir)
        if saved is None:
            save_state(self.run_dir / "checkpoints" / "round-000.pt", torch_state(initial))
            return RunStart(first_round=1, arrays=initial, loop_bounds={})
        differences = resume_mismatch(saved.run_config, self.run_config)
        if differences:
            raise ValueError(
                f"cannot resume from {self.state_dir}: it was written by a run with a different run config ("
                + "; ".join(differences)
                + "). Restore those settings, or start a new run (resume=false or another run-dir)."
            )
        missing = set(initial) ^ set(saved.global_arrays)
        if missing:
            raise ValueError(
                f"cannot resume from {self.state_dir}: saved weights do not match the model (e.g. {sorted(missing)[0]!r})"
            )
        arrays = {k: saved.global_arrays[k].astype(initial[k].dtype) for k in initial}
        load_strategy_state(self.strategy, saved.strategy_scalars, saved.strategy_arrays)
        self.run_log.restore(saved.run_log)
        self.sites_seen.update(saved.extra.get("sites", []))
        self.last_aggregated = int(saved.extra.get("last_aggregated_round", saved.server_round))
        bounds = {
            "first_examples": {str(k): float(v) for k, v in saved.extra.get("first_examples", {}).items()},
            "histogram_bins": {str(k): int(v) for k, v in saved.extra.get("histogram_bins", {}).items()},
        }
        log(
            INFO,
            "fedct: resuming after round %d of %d from %s",
            saved.server_round,
            self.config.num_server_rounds,
            self.state_dir,
        )
        return RunStart(first_round=saved.server_round + 1, arrays=arrays, loop_bounds=bounds)

    def checkpoint(self, report: RoundReport, extras: Mapping[str, Any], snapshot: StrategySnapshot) -> FinishedRound:
        """Write the round's ``checkpoints/round-NNN.pt``; the round, ready to be recorded once evaluated."""
        state = torch_state(report.arrays)
        save_state(self.run_dir / "checkpoints" / f"round-{report.server_round:03d}.pt", state)
        return FinishedRound(report=report, extras=dict(extras), state=state, snapshot=snapshot)

    def provenance(self, server_round: int) -> dict[str, Any]:
        """What a bundle of the weights after ``server_round`` records about how they were made."""
        return {
            "strategy": type(self.strategy).__name__,
            "round_of_weights": server_round,
            "rounds_planned": self.config.num_server_rounds,
            "best_round": self.run_log.best.round if self.run_log.best else None,
            "sites": sorted(self.sites_seen),
            "run_config": self.run_config,
            "metrics": round_metrics(self.run_log, server_round),
            "privacy": privacy_summary(self.strategy),
        }

    def record(self, done: FinishedRound, loop_bounds: Mapping[str, Mapping[str, Any]]) -> None:
        """Record a round whose evaluation is in: metrics.json entry, best bundle, observability, resume state
        (with the round loop's current ``loop_bounds``)."""
        report = done.report
        if report.aggregated:
            self.last_aggregated = report.server_round
            self.sites_seen.update(report.train_sites)
            self.run_log.site_train(report.train_sites)
        if report.evaluate_sites is not None:
            self.run_log.site_evaluate(report.evaluate_sites)
        extra = report.extra()
        extra.update(done.extras)
        if self.run_log.end_round(report.server_round, extra=extra):
            self._bundle("best", done.state, report.server_round)
        observe_round(self.run_dir, self.run_log.rounds)  # TensorBoard scalars, learning curves and per-site PNGs
        save_run_state(
            self.state_dir,
            RunState(
                server_round=report.server_round,
                global_arrays=report.arrays,
                strategy_scalars=done.snapshot[0],
                strategy_arrays=done.snapshot[1],
                run_log=self.run_log.state(),
                run_config=self.run_config,
                extra={
                    "sites": sorted(self.sites_seen),
                    "last_aggregated_round": self.last_aggregated,
                    **{name: dict(values) for name, values in loop_bounds.items()},
                },
            ),
        )

    def close(self, arrays: NDArrays) -> RunLog:
        """The end of the run: the ``model/final`` bundle (weights of the last aggregated round), the best bundle's
        calibration, metrics.json (with ``calibration``) and the learning curves."""
        self._bundle("final", torch_state(arrays), self.last_aggregated, calibration=self.calibration.get("final"))
        best = self.run_dir / "model" / "best"
        if "best" in self.calibration and (best / "model.json").is_file():
            set_calibration(best, self.calibration["best"])
        for name, (figures, reference) in self.ood.items():
            if (self.run_dir / "model" / name / "model.json").is_file():
                set_ood(self.run_dir / "model" / name, bundle_figures(figures, reference))
        self.run_log.calibration = dict(self.calibration)
        self.run_log.ood = {name: figures for name, (figures, _) in self.ood.items()}
        self.run_log.write()
        self.run_log.plot()
        return self.run_log

    def _bundle(
        self,
        name: str,
        state: Mapping[str, torch.Tensor],
        server_round: int,
        *,
        calibration: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``model/<name>``; ``calibration`` by default the temperature fitted on the round's evaluation."""
        if calibration is None:
            calibration = round_temperature(self.run_log, server_round)
        write_bundle(
            self.run_dir / "model" / name,
            dict(state),
            model=self.config.model,
            pipeline=self.config.pipeline,
            provenance=self.provenance(server_round),
            risk_reference=risk_reference(self.run_log, server_round),
            calibration=calibration,
            profile_normalisation=self.profile_normalisation,
        )

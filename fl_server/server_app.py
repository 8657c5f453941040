"""Flower ServerApp: FedAvg over the sites, with checkpoints, metrics and the final model bundle.

The handlers here only convert Flower records to plain Python and back; the bookkeeping lives in
``fl_server.run_log`` and ``fl_server.checkpoint``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fl_server.checkpoint import save_state, write_bundle
from fl_server.config import ServerConfig
from fl_server.privacy import privacy_summary, round_privacy, wrap_strategy
from fl_server.secagg import run_secagg
from fl_client.metrics import RISK_RANGE
from fl_server.run_log import RunLog, histogram_quantiles
from models.factory import build_model


def _site_metrics(records: list[RecordDict]) -> dict[str, dict[str, float | list[float]]]:
    """``{site name: {metric: value}}`` from the reply records (unnamed sites get a positional name).

    List values are aggregate histograms (score counts per bin), used for pooled AUCs.
    """
    per_site: dict[str, dict[str, float | list[float]]] = {}
    for i, record in enumerate(records):
        name = str(record["site"]["name"]) if "site" in record.config_records else f"node-{i}"
        metrics = next(iter(record.metric_records.values()))
        per_site[name] = {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in metrics.items()}
    return per_site


def _metric_record(values: Mapping[str, Any]) -> MetricRecord:
    """Finite scalar aggregates for Flower's own log (histograms and undefined values stay in metrics.json)."""
    return MetricRecord({k: float(v) for k, v in values.items() if isinstance(v, int | float) and math.isfinite(v)})


def _round_metrics(run_log: RunLog, server_round: int) -> dict[str, Any]:
    """Scalar validation/test metrics of one round, aggregated and per site, for the model bundle."""
    entry = next((r for r in run_log.rounds if r["round"] == server_round), None)
    if entry is None:
        return {}

    def scalars(values: Mapping[str, Any]) -> dict[str, float]:
        return {k: v for k, v in values.items() if isinstance(v, int | float) and (k.startswith("val-") or k.startswith("test-"))}

    return {
        "aggregate": scalars(entry["evaluate"]["aggregate"]),
        "sites": {site: scalars(m) for site, m in entry["evaluate"]["sites"].items()},
        "training_studies": {site: m.get("num-examples") for site, m in entry["train"]["sites"].items()},
    }


def _risk_reference(run_log: RunLog, server_round: int) -> dict[str, Any] | None:
    """Tertile cut points of the training studies' risk scores (from the sites' summed histograms) at a round."""
    entry = next((r for r in run_log.rounds if r["round"] == server_round), None)
    counts = entry["evaluate"]["aggregate"].get("train-hist-risk") if entry else None
    if not counts or sum(counts) == 0:
        return None
    cuts = histogram_quantiles(counts, RISK_RANGE, (1 / 3, 2 / 3))
    return {"quantiles": cuts, "groups": ["low", "intermediate", "high"], "studies": int(sum(counts)),
            "source": f"risk scores of all sites' training studies under the round-{server_round} weights (histogram, "
                      f"{len(counts)} bins over {list(RISK_RANGE)})"}  # fmt: skip


def run_federation(grid: Grid, config: ServerConfig, *, context: Context | None = None) -> RunLog:
    """Run ``config.num_server_rounds`` rounds of FedAvg and write the run folder (``context``: Flower's, needed
    for secure aggregation)."""
    run_dir = config.run_path
    run_log = RunLog(run_dir, run_config=config.to_run_config(), emit=lambda line: log(INFO, "%s", line))
    torch.manual_seed(config.seed)
    initial = {k: v.detach().clone() for k, v in build_model(config.model).state_dict().items()}
    sites_seen: set[str] = set()
    trained_this_round: list[str] = []

    def train_metrics(records: list[RecordDict], _weight_key: str) -> MetricRecord:
        per_site = _site_metrics(records)
        sites_seen.update(per_site)
        trained_this_round[:] = sorted(per_site)
        return _metric_record(run_log.site_train(per_site))

    def evaluate_metrics(records: list[RecordDict], _weight_key: str) -> MetricRecord:
        return _metric_record(run_log.site_evaluate(_site_metrics(records)))

    def provenance(server_round: int) -> dict[str, Any]:
        return {
            "strategy": "FedAvg",
            "round_of_weights": server_round,
            "rounds_planned": config.num_server_rounds,
            "best_round": run_log.best.round if run_log.best else None,
            "sites": sorted(sites_seen),
            "run_config": config.to_run_config(),
            "metrics": _round_metrics(run_log, server_round),
            "privacy": privacy_summary(strategy),
        }

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        state = arrays.to_torch_state_dict()
        save_state(run_dir / "checkpoints" / f"round-{server_round:03d}.pt", state)
        if server_round == 0:
            return None
        if not trained_this_round:
            raise RuntimeError(
                f"round {server_round}: no site returned a trained model (all failed or timed out); "
                "the sites' logs say why. Stopping instead of repeating an empty round."
            )
        trained_this_round.clear()
        improved = run_log.end_round(server_round)
        if (dp := round_privacy(strategy, server_round)) is not None:  # ε so far into this round's metrics.json entry
            run_log.rounds[-1]["privacy"] = dp
            run_log.write()
        if improved:
            write_bundle(run_dir / "model" / "best", state, model=config.model, pipeline=config.pipeline,
                         provenance=provenance(server_round), risk_reference=_risk_reference(run_log, server_round))  # fmt: skip
        return None

    strategy = FedAvg(
        min_train_nodes=config.min_sites,
        min_evaluate_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
        train_metrics_aggr_fn=train_metrics,
        evaluate_metrics_aggr_fn=evaluate_metrics,
    )
    strategy = wrap_strategy(strategy, config.privacy, expected_sites=config.min_sites)  # unchanged when dp-mode=off
    t0 = time.perf_counter()
    rounds = dict(
        initial_arrays=ArrayRecord(initial),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout_s,
        train_config=ConfigRecord(config.round_settings(0).to_record()),
        evaluate_config=ConfigRecord(config.round_settings(0).to_record()),
        evaluate_fn=end_of_round,
    )
    if config.privacy.secure_aggregation:
        if context is None:
            raise ValueError("secure-aggregation=true needs the ServerApp's Flower context")
        final_arrays = run_secagg(grid, context, strategy=strategy, settings=config.privacy, **rounds)
    else:
        final_arrays = strategy.start(grid=grid, **rounds).arrays
    final_state = final_arrays.to_torch_state_dict() if len(final_arrays) else initial
    write_bundle(run_dir / "model" / "final", final_state, model=config.model, pipeline=config.pipeline,
                 provenance=provenance(config.num_server_rounds),
                 risk_reference=_risk_reference(run_log, config.num_server_rounds))  # fmt: skip
    run_log.write()
    run_log.plot()
    log(INFO, "fedct: run finished in %.1fs; results in %s", time.perf_counter() - t0, run_dir)
    return run_log


def build_server_app(run_config_overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The ServerApp; ``run_config_overrides`` stand in for the run config where Flower passes none
    (in-process simulation)."""
    overrides = dict(run_config_overrides or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, ServerConfig.from_run_config({**dict(context.run_config), **overrides}), context=context)

    return app


#: Entry point named in pyproject.toml ([tool.flwr.app.components] serverapp).
app = build_server_app()

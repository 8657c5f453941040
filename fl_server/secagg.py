"""Secure aggregation (SecAgg+) rounds on Flower's legacy workflow, with fedct's Message-API bookkeeping.

Flower 1.41 offers SecAgg+ only as ``flwr.server.workflow.SecAggPlusWorkflow`` inside a ``DefaultWorkflow`` with a
``LegacyContext`` and a legacy strategy. :func:`run_secagg` runs that workflow but keeps everything else of a fedct
run as it is with ``Strategy.start``: the same Message-API strategy object provides the sampling settings, its
``train_metrics_aggr_fn`` receives each round's per-site training metrics (as Message-API records), its
``configure_evaluate`` / ``aggregate_evaluate`` run the normal federated evaluation, and ``evaluate_fn(round, arrays)``
(checkpoints, metrics.json, bundles) is called at round 0 and after every round, with named tensors.

What the server sees: only the *sum* of the sites' masked, quantized, count-weighted updates (plus each site's
training metrics, as without SecAgg+). Sites send the update (trained minus global weights) of the floating-point
tensors (``fl_client.secagg``); the server adds the unmasked weighted mean to the global weights. Integer buffers
(BatchNorm's batch counter) are not aggregated and keep their global value.

Precision: SecAgg+ multiplies a site's update by ``w = num-examples / secagg-max-weight`` (rounded to a multiple of
2**-22; the server divides by the sum of the same rounded weights), clips ``w * update`` to
``±secagg-clipping-range`` and quantizes it with stochastic rounding to 2**22 levels (Flower's default
``quantization_range``): a step of ``2 * clipping_range / 2**22`` (3.8e-6 for the default range 8), an error below
one step per site. After division by the summed weights the aggregate differs from the exact weighted mean
(FedAvg) by less than ``sites * step / sum(w)`` per value, plus the weights' rounding (relative 2**-22 / w). Keep
``secagg-max-weight`` near the largest site's training count: a larger one makes every ``w`` smaller and the error
larger; a smaller one makes ``w > 1`` and risks clipping (Flower warns).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import INFO
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_server.privacy import PrivacyConfig

#: Quantization levels of SecAgg+ (Flower's default ``quantization_range``, 2**22).
QUANTIZATION_RANGE = 2**22


def quantization_tolerance(*, clipping_range: float, weights: list[float], max_update: float) -> float:
    """Bound on the deviation of a SecAgg+ aggregate from the exact weighted mean, per value (see module doc).

    ``weights`` are the sites' ``num-examples / secagg-max-weight``; ``max_update`` the largest absolute update value.
    """
    step = 2 * clipping_range / QUANTIZATION_RANGE
    rounding = len(weights) * step / sum(weights)
    weight_rounding = 2 * max_update * 2.0**-22 / min(weights)
    return rounding + weight_rounding


class _SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg whose fit results are the SecAgg+ weighted mean of the sites' updates."""

    def __init__(self, *, initial: ArrayRecord, train_config: ConfigRecord, template: FedAvg) -> None:
        self.names = list(initial.keys())
        self.state = {k: np.array(v, copy=True) for k, v in zip(self.names, initial.to_numpy_ndarrays(), strict=True)}
        self.float_names = [k for k, v in self.state.items() if np.issubdtype(v.dtype, np.floating)]
        self.template = template
        self._train_config = dict(train_config)
        super().__init__(
            fraction_fit=template.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=template.min_train_nodes,
            min_evaluate_clients=0,
            min_available_clients=template.min_available_nodes,
            on_fit_config_fn=self._fit_config,
            initial_parameters=ndarrays_to_parameters([self.state[k] for k in self.names]),
            accept_failures=True,
        )

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return cast(dict[str, Scalar], {**self._train_config, "server-round": server_round})

    def arrays(self) -> ArrayRecord:
        """The current global weights, named."""
        return ArrayRecord({k: Array(np.ascontiguousarray(self.state[k])) for k in self.names})

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Add the unmasked mean update to the global weights; hand the sites' metrics to the template strategy."""
        if not results:
            log(INFO, "fedct SecAgg+ round %d: no site update (%d failures)", server_round, len(failures))
            return None, {}
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same aggregate
        if len(mean_update) != len(self.float_names):
            raise ValueError(f"SecAgg+ round {server_round}: aggregate has {len(mean_update)} tensors, "
                             f"the model {len(self.float_names)} floating-point ones")  # fmt: skip
        for name, delta in zip(self.float_names, mean_update, strict=True):
            self.state[name] = (self.state[name] + delta.reshape(self.state[name].shape)).astype(self.state[name].dtype)
        if self.template.train_metrics_aggr_fn is not None:
            records = [_metric_records(fitres) for _, fitres in results]
            self.template.train_metrics_aggr_fn(records, self.template.weighted_by_key)
        return ndarrays_to_parameters([self.state[k] for k in self.names]), {}


def _metric_records(fitres: FitRes) -> RecordDict:
    """A legacy fit result's metrics as the Message-API reply records fedct's callbacks read."""
    metrics = {k: v for k, v in fitres.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if "site-name" in fitres.metrics:
        content["site"] = ConfigRecord({"name": str(fitres.metrics["site-name"])})
    return content


def run_secagg(
    grid: Grid,
    context: Context,
    *,
    strategy: FedAvg,
    settings: PrivacyConfig,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float | None,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
) -> ArrayRecord:
    """``num_rounds`` rounds with SecAgg+ training and the Message-API evaluation of ``strategy``; the final weights.

    Mirrors ``strategy.start(...)``: ``evaluate_fn`` is called at round 0 and after every round's evaluation.
    """
    if not settings.secure_aggregation:
        raise ValueError("run_secagg needs secure-aggregation=true")
    legacy = _SecAggFedAvg(initial=initial_arrays, train_config=train_config, template=strategy)
    evaluate_fn(0, legacy.arrays())

    def evaluate_workflow(grid: Grid, ctx: Context) -> None:
        server_round = cast(int, ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
        arrays = legacy.arrays()
        messages = strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(evaluate_config)), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        strategy.aggregate_evaluate(server_round, replies)
        evaluate_fn(server_round, arrays)

    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=settings.secagg_num_shares,
            reconstruction_threshold=settings.secagg_reconstruction_threshold,
            max_weight=settings.secagg_max_weight,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=QUANTIZATION_RANGE,
            timeout=timeout if timeout is not None and math.isfinite(timeout) else None,
        ),
        evaluate_workflow=evaluate_workflow,
    )
    legacy_context = LegacyContext(context=context, config=LegacyServerConfig(num_rounds=num_rounds), strategy=legacy)
    workflow(grid, legacy_context)
    return legacy.arrays()

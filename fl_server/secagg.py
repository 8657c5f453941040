"""Secure aggregation (SecAgg+) rounds on Flower's legacy workflow, with fedct's Message-API bookkeeping.

Flower 1.41 offers SecAgg+ only as ``flwr.server.workflow.SecAggPlusWorkflow``, a legacy workflow driven by a
``LegacyContext`` and a legacy strategy. :class:`SecAggRoundLoop` is fedct's round loop
(``fl_server.rounds.RoundLoop``) with its one hook, the training step (``train``), replaced by one run of that
workflow; everything else stays: bounded wait for ``min-sites`` sites, the run's Message-API strategy for sampling settings and federated evaluation (packed weights),
the :class:`~fl_server.recorder.RoundReport` that ``run_federation`` turns into checkpoints, metrics.json and bundles.
Update validation (``max-update-norm``, ``update-zscore``) cannot run: the server never sees a single site's update.

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

The profile statistics exchange before round 1 of a fused run (:meth:`SecAggRoundLoop.pool_profile`) is one more
run of the workflow, with its own settings (:mod:`preprocessing.profile_secagg`): weight 1 per site, clipping range
2**21 and 2**22 quantization levels, so the whole-number limbs the sites send are summed exactly; the server sees
only masked vectors and their sum, never one site's counts or sums (:meth:`SecAggRoundLoop.profile_statistics`, the
plain exchange, refuses to run). Precision: see :mod:`preprocessing.profile_secagg` (each site's fixed-point rounding,
2**-53 of a variable's range, is the only error; the bounds on mean and SD are recorded in the run folder).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server import ServerConfig as LegacyServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedct.protocol import SITE_NAME_METRIC
from fl_server.config import ServerConfig
from fl_server.profile_norm import ProfileNormalisationFailed, exchange_record, secure_request_config, secure_summary
from fl_server.recorder import RoundReport
from fl_server.rounds import TTL_SLACK_S, NDArrays, RoundLoop, TrainStep
from preprocessing.profile import ProfileSchema, ProfileStatistics
from preprocessing.profile_features import ProfileNormalisation, ProfileStatisticsError
from preprocessing.profile_secagg import CLIPPING_RANGE as STATS_CLIPPING_RANGE
from preprocessing.profile_secagg import MAX_SITES as MAX_STATISTICS_SITES
from preprocessing.profile_secagg import MODULUS_RANGE as STATS_MODULUS_RANGE
from preprocessing.profile_secagg import QUANTIZATION_RANGE as STATS_QUANTIZATION_RANGE
from preprocessing.profile_secagg import SecureLayout

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


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: arrays, plus the bytes values of ConfigRecords (SecAgg+ sends keys, encrypted
    shares and masked vectors there)."""
    total = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


class _CountingGrid:
    """The grid, adding the payload bytes of what SecAgg+ sends and receives to a round's report; messages expire
    like the round loop's (``ttl``), so a site that comes back late does not answer an abandoned stage."""

    def __init__(self, grid: Grid, report: RoundReport, *, ttl: float) -> None:
        self._grid = grid
        self._report = report
        self._ttl = ttl

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            msg.metadata.ttl = self._ttl
        self._report.bytes_sent += sum(content_nbytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._report.bytes_received += sum(content_nbytes(r.content) for r in replies if not r.has_error())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _SecAggFedAvg(LegacyFedAvg):
    """Legacy FedAvg for one round whose fit results carry the SecAgg+ weighted mean of the sites' updates."""

    def __init__(self, *, arrays: Mapping[str, np.ndarray], train_config: ConfigRecord, template: Strategy) -> None:
        self.state = {k: np.array(v, copy=True) for k, v in arrays.items()}
        self.float_names = [k for k, v in self.state.items() if np.issubdtype(v.dtype, np.floating)]
        self.aggregated = False
        self.site_metrics: dict[int, dict[str, Any]] = {}
        self.site_names: dict[int, str] = {}
        config = cast(dict[str, Scalar], dict(train_config))
        if hasattr(template, "proximal_mu"):  # FedProx sends its mu with the training config (the sites add the term)
            config["proximal-mu"] = float(template.proximal_mu)
        super().__init__(
            fraction_fit=float(getattr(template, "fraction_train", 1.0)),
            fraction_evaluate=0.0,
            min_fit_clients=int(getattr(template, "min_train_nodes", 2)),
            min_evaluate_clients=0,
            min_available_clients=int(getattr(template, "min_available_nodes", 2)),
            on_fit_config_fn=lambda _round: config,
            initial_parameters=ndarrays_to_parameters(list(self.state.values())),
            accept_failures=True,
        )

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Add the unmasked mean update to the global weights; keep each site's training metrics."""
        if not results:
            log(INFO, "fedct SecAgg+ round %d: no site update (%d failures)", server_round, len(failures))
            return None, {}
        mean_update = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same aggregate
        if len(mean_update) != len(self.float_names):
            raise ValueError(
                f"SecAgg+ round {server_round}: aggregate has {len(mean_update)} tensors, "
                f"the model {len(self.float_names)} floating-point ones"
            )
        for name, delta in zip(self.float_names, mean_update, strict=True):
            self.state[name] = (self.state[name] + delta.reshape(self.state[name].shape)).astype(self.state[name].dtype)
        for proxy, fitres in results:
            if SITE_NAME_METRIC in fitres.metrics:
                self.site_names[proxy.node_id] = str(fitres.metrics[SITE_NAME_METRIC])
            self.site_metrics[proxy.node_id] = {
                k: float(v) for k, v in fitres.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
        self.aggregated = True
        return ndarrays_to_parameters(list(self.state.values())), {}


class _SecAggProfileStatistics(LegacyFedAvg):
    """Legacy FedAvg for the profile statistics exchange: sends the request (no parameters) to every node and keeps
    the SecAgg+ sum of the sites' statistics vectors (the workflow's result is their mean: every weight is 1)."""

    def __init__(self, *, request: ConfigRecord, nodes: int) -> None:
        self.total: np.ndarray | None = None
        self.site_names: dict[int, str] = {}
        config = cast(dict[str, Scalar], dict(request))
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_evaluate_clients=0,
            min_available_clients=nodes,
            on_fit_config_fn=lambda _round: config,
            initial_parameters=ndarrays_to_parameters([]),
            accept_failures=True,
        )

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The sum of the sites' vectors: the unmasked mean times the number of sites in it."""
        if not results:
            log(INFO, "fedct SecAgg+ profile statistics: no site vector (%d failures)", len(failures))
            return None, {}
        mean = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same aggregate
        self.total = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in mean]) * len(results)
        for proxy, fitres in results:
            self.site_names[proxy.node_id] = str(fitres.metrics.get(SITE_NAME_METRIC, f"node-{proxy.node_id}"))
        return None, {}


class SecAggRoundLoop(RoundLoop):
    """fedct's round loop with SecAgg+ training (Flower's SecAggPlusWorkflow): only :meth:`train` differs, and a
    fused run's profile statistics are pooled through SecAgg+ too (:meth:`pool_profile`)."""

    secure_aggregation = True

    def __init__(self, grid: Grid, strategy: Strategy, *, config: ServerConfig, **kwargs: Any) -> None:
        settings = config.privacy
        if not settings.secure_aggregation:
            raise ValueError("SecAggRoundLoop needs secure-aggregation=true")
        super().__init__(grid, strategy, config=config, **kwargs)
        self.workflow = SecAggPlusWorkflow(
            num_shares=settings.secagg_num_shares,
            reconstruction_threshold=settings.secagg_reconstruction_threshold,
            max_weight=settings.secagg_max_weight,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=QUANTIZATION_RANGE,
            timeout=config.round_timeout_s,
        )

        self.statistics_workflow = SecAggPlusWorkflow(
            num_shares=settings.secagg_num_shares,
            reconstruction_threshold=settings.secagg_reconstruction_threshold,
            max_weight=1.0,
            clipping_range=STATS_CLIPPING_RANGE,
            quantization_range=STATS_QUANTIZATION_RANGE,
            modulus_range=STATS_MODULUS_RANGE,
            timeout=config.round_timeout_s,
        )

    def _run_workflow(
        self,
        workflow: SecAggPlusWorkflow,
        legacy: LegacyFedAvg,
        server_round: int,
        nodes: list[int],
        report: RoundReport,
    ) -> None:
        """One run of ``workflow`` over ``nodes`` with the legacy strategy ``legacy`` (bytes counted into ``report``)."""
        manager = SimpleClientManager()
        run_id = self.grid.run.run_id
        for node_id in nodes:
            manager.register(GridClientProxy(node_id=node_id, grid=self.grid, run_id=run_id))
        context = LegacyContext(
            Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=LegacyServerConfig(num_rounds=1),
            strategy=legacy,
            client_manager=manager,
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            cast(Parameters, legacy.initial_parameters), keep_input=True
        )
        grid = _CountingGrid(self.grid, report, ttl=self.config.round_timeout_s + TTL_SLACK_S)
        workflow(cast(Grid, grid), context)

    def _secure_train(
        self,
        server_round: int,
        nodes: list[int],
        global_arrays: Mapping[str, np.ndarray],
        train_config: ConfigRecord,
        report: RoundReport,
    ) -> _SecAggFedAvg:
        """One run of the SecAgg+ training workflow over ``nodes`` (bytes counted into ``report``)."""
        legacy = _SecAggFedAvg(arrays=global_arrays, train_config=train_config, template=self.strategy)
        self._run_workflow(self.workflow, legacy, server_round, nodes, report)
        return legacy

    def profile_statistics(self, schema: ProfileSchema) -> tuple[RoundReport, dict[str, ProfileStatistics]]:
        """Refused: with SecAgg+ the server must not receive one site's statistics (:meth:`pool_profile` runs)."""
        raise RuntimeError("secure-aggregation=true: the profile statistics are pooled by SecAgg+ (pool_profile)")

    def pool_profile(self, schema: ProfileSchema) -> tuple[ProfileNormalisation, dict[str, Any]]:
        """The profile statistics exchange through SecAgg+: every connected site adds its statistics vector
        (:mod:`preprocessing.profile_secagg`) to a masked sum; the server decodes the sum (checking the pooled
        counts and sums) into the normalisation. Fewer than ``min-sites`` sites in the sum, or a sum that fails a
        check, raise :class:`fl_server.profile_norm.ProfileNormalisationFailed` (one site's share cannot be told
        apart, so the whole sum is refused)."""
        t0 = self.clock()
        minimum = self.config.min_sites
        report = RoundReport(server_round=0, arrays={})
        nodes = self.wait_for_nodes(minimum)
        report.nodes_connected = len(nodes)
        if len(nodes) > MAX_STATISTICS_SITES:  # their limbs would wrap around SecAgg+'s modulus
            raise ProfileNormalisationFailed(
                f"{len(nodes)} sites connected; the secure profile statistics sum at most {MAX_STATISTICS_SITES}"
            )
        legacy = _SecAggProfileStatistics(request=secure_request_config(schema), nodes=len(nodes))
        if len(nodes) >= max(minimum, 2):
            self._run_workflow(self.statistics_workflow, legacy, 0, nodes, report)
        self.site_names.update(legacy.site_names)
        summed = sorted(legacy.site_names)
        for node_id in nodes:
            if node_id not in legacy.site_names:
                report.missing.append(
                    {
                        "node_id": node_id,
                        "site": self._site(node_id),
                        "reason": "no masked profile statistics (an error reply, or none within round-timeout-s="
                        f"{self.config.round_timeout_s:g})",
                    }
                )
        self._done(report, t0)
        if legacy.total is None or len(summed) < minimum:
            raise ProfileNormalisationFailed(
                f"{len(summed)} site(s) in the secure sum of the profile statistics, fewer than min-sites={minimum} "
                f"({len(nodes)} connected)"
            )
        try:
            pooled = SecureLayout.from_schema(schema).decode(
                legacy.total,
                sites=len(summed),
                min_count=self.config.metrics_min_count,
                count_bound=self.config.examples_bound,
            )
        except ProfileStatisticsError as exc:
            raise ProfileNormalisationFailed(f"the secure sum of the profile statistics is refused: {exc}") from None
        normalisation = pooled.normalisation(schema, min_count=self.config.metrics_min_count)
        names = [self._site(node_id) for node_id in summed]
        return normalisation, {**secure_summary(normalisation, pooled, names), **exchange_record(report)}

    def train(
        self,
        server_round: int,
        nodes: list[int],
        global_arrays: NDArrays,
        train_config: ConfigRecord,
        report: RoundReport,
    ) -> TrainStep | None:
        """The training step with SecAgg+: the workflow's unmasked weighted mean added to the global weights; the
        sites' training metrics as they sent them (the server never sees a single update, so none is checked)."""
        minimum = self.config.min_sites
        legacy = self._secure_train(server_round, nodes, global_arrays, train_config, report)
        self.site_names.update(legacy.site_names)
        if not legacy.aggregated or len(legacy.site_metrics) < minimum:
            report.skip_reason = (
                f"SecAgg+ aggregated {len(legacy.site_metrics)} site(s), fewer than min-sites={minimum} "
                "(too few sites completed every stage); global model kept"
            )
            return None
        new_arrays = {k: legacy.state[k].astype(ref.dtype).reshape(ref.shape) for k, ref in self.reference.items()}
        sites = {self._site(node_id): metrics for node_id, metrics in legacy.site_metrics.items()}
        for metrics in sites.values():
            metrics.pop(SITE_NAME_METRIC, None)
        return TrainStep(arrays=new_arrays, sites=sites)

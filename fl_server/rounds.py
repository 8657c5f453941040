"""The federated round loop: any ``flwr.serverapp.strategy`` Strategy driven through its public methods.

Why not ``Strategy.start``: it blocks forever in node sampling once a site has died (it waits for
``min_available_nodes`` with no timeout) and it cannot resume. Here every round is bounded:

1. wait (at most ``round-timeout-s``, polling ``grid.get_node_ids()``) until ``min-sites`` sites are connected,
   else skip the round (recorded with its reason) and go on; a site that comes back is sampled again;
2. ``configure_train`` on the connected nodes, weights packed into a few buffers (``models.weights``), then
   ``exchange`` (push, then pull replies every 0.1 s until all are in or round-timeout-s has passed);
3. replies unpacked to per-tensor arrays, checked (``fl_server.validation``), rejected ones logged and dropped;
   with fewer than ``min-sites`` valid updates the round is skipped and the global model kept, else
   ``aggregate_train``;
4. the same for evaluation: fewer than ``min-sites`` replies → evaluation recorded as missing, the run goes on;
   with ``evaluate-mode = "fused"`` there is no evaluate exchange: round r's training message asks the sites to
   evaluate the weights they receive (round r-1's global model) first, the replies carry that evaluation beside the
   update, and round r-1 is recorded once round r's exchange is back (after the last round, one evaluate exchange);
5. bookkeeping (``run_federation``): metrics.json, checkpoints, best/final bundles, and the resume state written
   atomically after every round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from fl_client.config import EVALUATION_RECORD
from fl_client.metrics import RISK_RANGE
from fl_client.transport import decode_content, encode_content, record_nbytes
from fl_server.checkpoint import RunState, load_run_state, save_run_state, save_state, write_bundle
from fl_server.config import RESUMABLE_KEYS, ServerConfig
from fl_server.privacy import privacy_summary
from fl_server.observe import observe_round
from fl_server.run_log import RunLog, histogram_quantiles
from fl_server.strategy import SERVER_OPTIMISERS, load_strategy_state, strategy_state
from fl_server.validation import check_updates
from models.factory import buffer_keys, build_model

NDArrays = dict[str, np.ndarray]
#: Messages expire this long after the round stops waiting for them (Flower's default TTL is 12 h).
TTL_SLACK_S = 30.0


def encode_messages(messages: Iterable[Message], *, transport: str) -> tuple[list[Message], int]:
    """Pack the arrays of every message (content shared between messages is packed once); total bytes to send."""
    encoded: dict[int, RecordDict] = {}
    out, total = [], 0
    for msg in messages:
        key = id(msg.content)
        if key not in encoded:
            encoded[key] = encode_content(msg.content, transport=transport)
        msg.content = encoded[key]
        total += record_nbytes(msg.content)
        out.append(msg)
    return out, total


#: Seconds between reply polls. Flower's ``Grid.send_and_receive`` sleeps a hard-coded 3 s between polls
#: (1.5 s of idle wait per exchange on average, docs/flower-overhead.md); a poll of the SuperLink is cheap.
REPLY_POLL_S = 0.1


def exchange(grid: Grid, messages: Iterable[Message], *, timeout_s: float, poll_s: float = REPLY_POLL_S) -> list[Message]:
    """``Grid.send_and_receive`` with a short reply poll: push, then pull until every reply is in or ``timeout_s``."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while pending:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
    return replies


# --- one round --------------------------------------------------------------------------------------------------


class _SnapshotGrid:
    """The grid as the strategy sees it while configuring: the nodes the loop found connected, fixed, so that
    Flower's ``sample_nodes`` never waits for more."""

    def __init__(self, grid: Grid, node_ids: Sequence[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class RoundReport:
    """What happened in one round (the loop's result; ``run_federation`` turns it into metrics.json fields)."""

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
            "missing_replies": self.missing,
            "evaluation_missing": self.evaluation_missing,
            "nodes_connected": self.nodes_connected,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "seconds": round(self.seconds, 2),
        }


def _plain_metrics(content: RecordDict) -> dict[str, Any]:
    metrics = next(iter(content.metric_records.values()), MetricRecord())
    return {k: [float(x) for x in v] if isinstance(v, list) else float(v) for k, v in metrics.items()}


class RoundLoop:
    """Runs rounds of a strategy over a grid with bounded waits, validation and packed transport.

    ``reference`` gives the model's layout (keys, shapes, dtypes); the current global weights are passed to each
    :meth:`run_round`. ``buffers`` are the state-dict keys that are running statistics, not trained weights.
    """

    def __init__(
        self,
        grid: Grid,
        strategy: Strategy,
        *,
        config: ServerConfig,
        reference: Mapping[str, np.ndarray],
        buffers: frozenset[str] = frozenset(),
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grid = grid
        self.strategy = strategy
        self.config = config
        self.reference = {k: np.asarray(v) for k, v in reference.items()}
        self.buffers = buffers
        self.poll_s = poll_s
        self.clock = clock
        self.site_names: dict[int, str] = {}

    def wait_for_nodes(self, minimum: int) -> list[int]:
        """Connected node ids once at least ``minimum`` are connected, or the last list seen at the timeout."""
        deadline = self.clock() + self.config.round_timeout_s
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= minimum or self.clock() >= deadline:
                return nodes
            log(INFO, "fedct: %d of %d required sites connected; waiting", len(nodes), minimum)
            time.sleep(min(self.poll_s, max(deadline - self.clock(), 0.0)))

    def _site(self, node_id: int) -> str:
        return self.site_names.get(node_id, f"node-{node_id}")

    def _exchange(self, messages: Iterable[Message], report: RoundReport) -> tuple[list[Message], list[int]]:
        """Send, wait at most round-timeout-s, decode; returns (content replies, node ids sent to)."""
        encoded, sent_bytes = encode_messages(messages, transport=self.config.transport)
        for msg in encoded:  # a site that comes back later must not train on a round the server has given up on
            msg.metadata.ttl = self.config.round_timeout_s + TTL_SLACK_S
        report.bytes_sent += sent_bytes
        targets = [m.metadata.dst_node_id for m in encoded]
        if not encoded:
            return [], targets
        replies = exchange(self.grid, encoded, timeout_s=self.config.round_timeout_s)
        answered = {r.metadata.src_node_id for r in replies}
        for node_id in targets:
            if node_id not in answered:
                report.missing.append({"node_id": node_id, "site": self._site(node_id),
                                       "reason": f"no reply within round-timeout-s={self.config.round_timeout_s:g}"})  # fmt: skip
        good = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                report.rejected.append({"node_id": node_id, "site": self._site(node_id), "reason": f"error reply: {reply.error.reason}"})
                continue
            report.bytes_received += record_nbytes(reply.content)
            if "site" in reply.content.config_records:
                self.site_names[node_id] = str(reply.content["site"]["name"])
            try:
                reply.content = decode_content(reply.content)
            except (ValueError, KeyError, RuntimeError, TypeError) as exc:
                report.rejected.append({"node_id": node_id, "site": self._site(node_id), "reason": f"undecodable weights: {exc}"})
                continue
            good.append(reply)
        return good, targets

    def _validated(self, replies: list[Message], global_arrays: NDArrays, report: RoundReport) -> list[Message]:
        updates: dict[int, NDArrays] = {}
        kept = []
        for i, reply in enumerate(replies):
            node_id = reply.metadata.src_node_id
            if len(reply.content.array_records) != 1 or len(reply.content.metric_records) != 1:
                report.rejected.append({"node_id": node_id, "site": self._site(node_id),
                                        "reason": "reply must carry one ArrayRecord and one MetricRecord"})  # fmt: skip
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            weight = metrics.get("num-examples")
            if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
                report.rejected.append({"node_id": node_id, "site": self._site(node_id),
                                        "reason": f"num-examples must be a positive number, got {weight!r}"})  # fmt: skip
                continue
            record = next(iter(reply.content.array_records.values()))
            updates[i] = {k: a.numpy() for k, a in record.items()}
            kept.append(i)
        reasons = check_updates(
            updates,
            {k: global_arrays[k] for k in self.reference},
            max_norm=self.config.max_update_norm,
            zscore=self.config.update_zscore,
        )
        accepted = []
        for i in kept:
            node_id = replies[i].metadata.src_node_id
            if i in reasons:
                report.rejected.append({"node_id": node_id, "site": self._site(node_id), "reason": reasons[i]})
                log(WARNING, "fedct: round %d: update of %s (node %d) rejected: %s", report.server_round, self._site(node_id),
                    node_id, reasons[i])  # fmt: skip
            else:
                accepted.append(replies[i])
        return accepted

    def _finish_aggregate(self, aggregated: ArrayRecord, accepted: list[Message]) -> NDArrays:
        """Aggregated arrays in the model's dtypes; for server optimisers, buffers (running statistics) are the
        plain weighted mean of the sites' (an adaptive step on a variance can make it negative)."""
        arrays = {k: a.numpy() for k, a in aggregated.items()}
        if self.config.strategy in SERVER_OPTIMISERS and self.buffers:
            weights = np.array([float(next(iter(r.content.metric_records.values()))["num-examples"]) for r in accepted])
            weights = weights / weights.sum()
            for key in self.buffers & set(arrays):
                stacked = np.stack([next(iter(r.content.array_records.values()))[key].numpy().astype(np.float64) for r in accepted])
                arrays[key] = np.tensordot(weights, stacked, axes=1)
        out = {}
        for key, ref in self.reference.items():
            value = np.asarray(arrays[key])
            if ref.dtype.kind in "iub":
                value = np.rint(value)
            out[key] = value.astype(ref.dtype).reshape(ref.shape)
        return out

    def run_round(self, server_round: int, global_arrays: NDArrays, train_config: ConfigRecord,
                  evaluate_config: ConfigRecord) -> RoundReport:  # fmt: skip
        """Train, aggregate and evaluate one round; the report holds the new global arrays (unchanged when skipped).

        With ``evaluate-mode = "fused"`` the round is not evaluated here (the next round's training replies carry its
        evaluation, or :meth:`evaluate_global` after the last round); when ``train_config`` has ``evaluate-first``
        the replies' evaluations of ``global_arrays`` are collected into ``report.previous_evaluate_sites``.
        """
        t0 = self.clock()
        minimum = self.config.min_sites
        evaluate_first = bool(train_config.get("evaluate-first", False))
        report = RoundReport(server_round=server_round, arrays=global_arrays)
        nodes = self.wait_for_nodes(minimum)
        report.nodes_connected = len(nodes)
        if len(nodes) < minimum:
            report.skip_reason = (f"only {len(nodes)} site(s) connected after round-timeout-s={self.config.round_timeout_s:g} "
                                  f"(min-sites={minimum})")  # fmt: skip
            if evaluate_first:
                report.previous_evaluation_missing = report.skip_reason
            return self._done(report, t0)
        current = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in global_arrays.items()})
        messages = self.strategy.configure_train(server_round, current, train_config, _SnapshotGrid(self.grid, nodes))
        replies, _ = self._exchange(messages, report)
        if evaluate_first:
            self._previous_evaluation(report, replies, minimum)
        accepted = self._validated(replies, global_arrays, report)
        if len(accepted) < minimum:
            report.skip_reason = f"{len(accepted)} valid update(s), fewer than min-sites={minimum}; global model kept"
            return self._done(report, t0)
        try:
            aggregated, _ = self.strategy.aggregate_train(server_round, accepted)
        except (InconsistentMessageReplies, AggregationError, ValueError) as exc:
            report.skip_reason = f"strategy {type(self.strategy).__name__} could not aggregate: {exc}; global model kept"
            return self._done(report, t0)
        if aggregated is None:
            report.skip_reason = f"strategy {type(self.strategy).__name__} returned no aggregate; global model kept"
            return self._done(report, t0)
        new_arrays = self._finish_aggregate(aggregated, accepted)
        bad = next((k for k, v in new_arrays.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))), None)
        if bad is not None:
            report.skip_reason = f"aggregate has non-finite values in {bad!r}; global model kept"
            return self._done(report, t0)
        report.arrays, report.aggregated = new_arrays, True
        report.train_sites = {self._site(r.metadata.src_node_id): _plain_metrics(r.content) for r in accepted}
        if self.config.evaluate_mode == "fused":
            return self._done(report, t0)
        return self._evaluate(report, server_round, new_arrays, evaluate_config, minimum, t0)

    def _previous_evaluation(self, report: RoundReport, replies: list[Message], minimum: int) -> None:
        """Collect the evaluations of the previous round's global model from training replies (``evaluate-mode =
        "fused"``), counted like an evaluate exchange's replies; a site whose update is later rejected still counts
        (it evaluated the global model, as with a separate exchange).

        The strategy's ``aggregate_evaluate`` is called as after an evaluate exchange, with evaluate replies rebuilt
        from the ConfigRecords (a MetricRecord each, the same values), so strategies that track evaluation see it.
        """
        previous = report.server_round - 1
        evaluated, rebuilt = [], []
        for reply in replies:
            if EVALUATION_RECORD not in reply.content.config_records:
                continue
            try:  # the same value types as an evaluate reply's MetricRecord (numbers and lists of numbers)
                metrics = MetricRecord(dict(reply.content[EVALUATION_RECORD].items()))
            except (TypeError, ValueError) as exc:
                node_id = reply.metadata.src_node_id
                report.rejected.append({"node_id": node_id, "site": self._site(node_id),
                                        "reason": f"evaluation of round {previous} is not metrics: {exc}"})  # fmt: skip
                continue
            evaluated.append(reply)
            rebuilt.append(Message(RecordDict({"metrics": metrics}), dst_node_id=reply.metadata.src_node_id,
                                   message_type=MessageType.EVALUATE, group_id=str(previous)))  # fmt: skip
        if len(evaluated) < minimum:
            report.previous_evaluation_missing = (f"{len(evaluated)} evaluation repl(ies) with round {report.server_round}'s "
                                                  f"training, fewer than min-sites={minimum}")  # fmt: skip
            return
        self.strategy.aggregate_evaluate(previous, rebuilt)
        report.previous_evaluate_sites = {self._site(r.metadata.src_node_id): _plain_metrics(m.content)
                                          for r, m in zip(evaluated, rebuilt, strict=True)}  # fmt: skip

    def evaluate_global(self, server_round: int, arrays: NDArrays, evaluate_config: ConfigRecord) -> RoundReport:
        """An evaluate-only exchange of ``arrays`` (the global model after ``server_round``): the last round of an
        ``evaluate-mode = "fused"`` run, which no later training exchange evaluates."""
        t0 = self.clock()
        report = RoundReport(server_round=server_round, arrays=arrays)
        return self._evaluate(report, server_round, arrays, evaluate_config, self.config.min_sites, t0)

    def _evaluate(self, report: RoundReport, server_round: int, new_arrays: NDArrays, evaluate_config: ConfigRecord,
                  minimum: int, t0: float) -> RoundReport:
        """Evaluate the round's new global model on the connected sites (bounded like training); finish the report."""
        nodes = self.wait_for_nodes(minimum)
        if len(nodes) < minimum:
            report.evaluation_missing = f"only {len(nodes)} site(s) connected for evaluation (min-sites={minimum})"
            return self._done(report, t0)
        current = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in new_arrays.items()})
        messages = self.strategy.configure_evaluate(server_round, current, evaluate_config, _SnapshotGrid(self.grid, nodes))
        evaluated, _ = self._exchange(messages, report)
        evaluated = [r for r in evaluated if len(r.content.metric_records) == 1]
        if len(evaluated) < minimum:
            report.evaluation_missing = f"{len(evaluated)} evaluation repl(ies), fewer than min-sites={minimum}"
            return self._done(report, t0)
        self.strategy.aggregate_evaluate(server_round, evaluated)
        report.evaluate_sites = {self._site(r.metadata.src_node_id): _plain_metrics(r.content) for r in evaluated}
        return self._done(report, t0)

    def _done(self, report: RoundReport, t0: float) -> RoundReport:
        report.seconds = self.clock() - t0
        if report.skip_reason:
            log(WARNING, "fedct: round %d skipped: %s", report.server_round, report.skip_reason)
        if report.evaluation_missing:
            log(WARNING, "fedct: round %d evaluation missing: %s", report.server_round, report.evaluation_missing)
        if report.previous_evaluation_missing:
            log(WARNING, "fedct: round %d evaluation missing: %s", report.server_round - 1, report.previous_evaluation_missing)
        for item in report.missing:
            log(WARNING, "fedct: round %d: %s (node %d): %s", report.server_round, item["site"], item["node_id"], item["reason"])
        return report


# --- the whole run ----------------------------------------------------------------------------------------------


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


def resume_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Run-config keys (other than ``RESUMABLE_KEYS``) whose values differ between a saved state and now."""
    keys = sorted((set(saved) | set(current)) - RESUMABLE_KEYS)
    return [f"{k}: {saved.get(k)!r} (saved) vs {current.get(k)!r} (now)" for k in keys if saved.get(k) != current.get(k)]


def initial_arrays(config: ServerConfig) -> NDArrays:
    """The seeded initial global model as numpy arrays (keys in state-dict order)."""
    torch.manual_seed(config.seed)
    return {k: v.detach().cpu().numpy().copy() for k, v in build_model(config.model).state_dict().items()}


def _torch_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def run_federation(
    grid: Grid,
    config: ServerConfig,
    strategy: Strategy,
    *,
    poll_s: float = 1.0,
    round_extras: Callable[[RoundReport], Mapping[str, Any]] | None = None,
) -> RunLog:
    """Run (or, with ``resume``, continue) ``config.num_server_rounds`` rounds of ``strategy`` and write the run folder.

    Run folder: ``metrics.json``, ``curves.png``, ``checkpoints/round-NNN.pt`` (global weights after each round,
    000 = initial), ``model/best`` and ``model/final`` bundles, ``state/`` (resume state of the last round).
    ``strategy`` may be any Flower strategy, also a wrapper (e.g. a DP strategy around the one of
    :func:`fl_server.strategy.build_strategy`); ``round_extras(report)`` adds fields to each round's metrics.json
    entry (e.g. a privacy accountant's epsilon), after the loop's own.
    """
    run_dir = config.run_path
    state_dir = run_dir / "state"
    run_config = config.to_run_config()
    run_log = RunLog(run_dir, run_config=run_config, emit=lambda line: log(INFO, "%s", line))
    model = build_model(config.model)
    arrays = initial_arrays(config)
    sites_seen: set[str] = set()
    last_aggregated = 0
    start = 1
    if config.resume:
        saved = load_run_state(state_dir)
        if saved is None:
            log(INFO, "fedct: resume=true but %s holds no saved state; starting at round 1", state_dir)
        else:
            differences = resume_mismatch(saved.run_config, run_config)
            if differences:
                raise ValueError(
                    f"cannot resume from {state_dir}: it was written by a run with a different run config ("
                    + "; ".join(differences)
                    + "). Restore those settings, or start a new run (resume=false or another run-dir)."
                )
            missing = set(arrays) ^ set(saved.global_arrays)
            if missing:
                raise ValueError(f"cannot resume from {state_dir}: saved weights do not match the model (e.g. {sorted(missing)[0]!r})")
            arrays = {k: saved.global_arrays[k].astype(arrays[k].dtype) for k in arrays}
            load_strategy_state(strategy, saved.strategy_scalars, saved.strategy_arrays)
            run_log.restore(saved.run_log)
            sites_seen.update(saved.extra.get("sites", []))
            last_aggregated = int(saved.extra.get("last_aggregated_round", saved.server_round))
            start = saved.server_round + 1
            log(INFO, "fedct: resuming after round %d of %d from %s", saved.server_round, config.num_server_rounds, state_dir)
    if start == 1:
        save_state(run_dir / "checkpoints" / "round-000.pt", _torch_state(arrays))

    def provenance(server_round: int) -> dict[str, Any]:
        return {
            "strategy": type(strategy).__name__,
            "round_of_weights": server_round,
            "rounds_planned": config.num_server_rounds,
            "best_round": run_log.best.round if run_log.best else None,
            "sites": sorted(sites_seen),
            "run_config": run_config,
            "metrics": _round_metrics(run_log, server_round),
            "privacy": privacy_summary(strategy),
        }

    loop_class = RoundLoop
    if config.privacy.secure_aggregation:
        from fl_server.secagg import SecAggRoundLoop  # (fl_server.secagg builds on this module)

        loop_class = SecAggRoundLoop
    loop = loop_class(grid, strategy, config=config, reference=arrays, buffers=buffer_keys(model), poll_s=poll_s)
    fused = config.evaluate_mode == "fused"

    def finish(report: RoundReport, extras: Mapping[str, Any], state: dict[str, torch.Tensor],
               snapshot: tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]) -> None:  # fmt: skip
        """Record a round whose evaluation is in: metrics.json entry, best bundle, observability, resume state.

        ``snapshot`` is the strategy's state right after the round's aggregation (with ``fused`` the strategy has
        aggregated the next round by the time this round is finished; its resume state must match its weights).
        """
        nonlocal last_aggregated
        if report.aggregated:
            last_aggregated = report.server_round
            sites_seen.update(report.train_sites)
            run_log.site_train(report.train_sites)
        if report.evaluate_sites is not None:
            run_log.site_evaluate(report.evaluate_sites)
        extra = report.extra()
        extra.update(extras)
        if run_log.end_round(report.server_round, extra=extra):
            write_bundle(run_dir / "model" / "best", state, model=config.model, pipeline=config.pipeline,
                         provenance=provenance(report.server_round),
                         risk_reference=_risk_reference(run_log, report.server_round))  # fmt: skip
        observe_round(run_dir, run_log.rounds)  # TensorBoard scalars, learning curves and per-site PNGs, every round
        save_run_state(state_dir, RunState(
            server_round=report.server_round, global_arrays=report.arrays, strategy_scalars=snapshot[0],
            strategy_arrays=snapshot[1], run_log=run_log.state(), run_config=run_config,
            extra={"sites": sorted(sites_seen), "last_aggregated_round": last_aggregated},
        ))  # fmt: skip

    # fused: the round whose global model the next training exchange evaluates (finish's arguments); None on the
    # first round of a run or after resuming (the resume state already holds the previous round's evaluation)
    pending: tuple[RoundReport, dict[str, Any], dict[str, torch.Tensor], Any] | None = None
    t0 = time.perf_counter()
    for server_round in range(start, config.num_server_rounds + 1):
        log(INFO, "")
        log(INFO, "fedct: [ROUND %d/%d] %s", server_round, config.num_server_rounds, type(strategy).__name__)
        settings = ConfigRecord(config.round_settings(server_round, evaluate_first=pending is not None).to_record())
        report = loop.run_round(server_round, arrays, settings, ConfigRecord(config.round_settings(server_round).to_record()))
        if pending is not None:
            pending[0].evaluate_sites = report.previous_evaluate_sites
            pending[0].evaluation_missing = report.previous_evaluation_missing
            finish(*pending)
            pending = None
        arrays = report.arrays
        state = _torch_state(arrays)
        save_state(run_dir / "checkpoints" / f"round-{server_round:03d}.pt", state)
        extras = dict(round_extras(report)) if round_extras is not None else {}  # now: e.g. the accountant's epsilon
        snapshot = strategy_state(strategy)
        if fused:
            pending = (report, extras, state, snapshot)
        else:
            finish(report, extras, state, snapshot)
    if pending is not None:  # fused: the last round's global model, in an evaluate exchange of its own
        last = pending[0]
        evaluate_config = ConfigRecord(config.round_settings(last.server_round).to_record())
        final = loop.evaluate_global(last.server_round, last.arrays, evaluate_config)
        last.evaluate_sites, last.evaluation_missing = final.evaluate_sites, final.evaluation_missing
        last.bytes_sent += final.bytes_sent
        last.bytes_received += final.bytes_received
        last.seconds += final.seconds
        last.missing.extend(final.missing)
        last.rejected.extend(final.rejected)
        finish(*pending)
    write_bundle(run_dir / "model" / "final", _torch_state(arrays), model=config.model, pipeline=config.pipeline,
                 provenance=provenance(last_aggregated), risk_reference=_risk_reference(run_log, last_aggregated))  # fmt: skip
    run_log.write()
    run_log.plot()
    log(INFO, "fedct: run finished in %.1fs; results in %s", time.perf_counter() - t0, run_dir)
    return run_log

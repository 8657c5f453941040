"""The federated round loop: any ``flwr.serverapp.strategy`` Strategy driven through its public methods.

Why not ``Strategy.start``: it blocks forever in node sampling once a site has died (it waits for
``min_available_nodes`` with no timeout) and it cannot resume. Here every round is bounded:

1. wait (at most ``round-timeout-s``, polling ``grid.get_node_ids()``) until ``min-sites`` sites are connected,
   else skip the round (recorded with its reason) and go on; a site that comes back is sampled again;
2. ``configure_train`` on the connected nodes, weights packed into a few buffers (``models.weights``), then
   ``exchange`` (push, then pull replies every 0.1 s until all are in or round-timeout-s has passed);
3. every reply (train and evaluate, and the fused evaluation inside a train reply) passes one gate
   (``fl_server.validation.screen_reply``): the site is who the site registry says its node is, the records are
   those expected, the packed weights fit the global model, the metrics are numbers of the expected shapes; a
   reply that fails is recorded with a reason code (``rejected_updates``: node id, registered name, code, reason)
   and dropped, the round goes on with the others. ``num-examples`` (the aggregation weight) is clipped to
   ``max-site-examples`` and to twice the site's first count (recorded in ``clipped_examples``); the decoded updates
   are checked (``check_updates``); with fewer than ``min-sites`` valid updates the round is skipped and the
   global model kept, else ``aggregate_train``;
4. the same for evaluation: fewer than ``min-sites`` replies → evaluation recorded as missing, the run goes on;
   with ``evaluate-mode = "fused"`` there is no evaluate exchange: round r's training message asks the sites to
   evaluate the weights they receive (round r-1's global model) first, the replies carry that evaluation beside the
   update, and round r-1 is recorded once round r's exchange is back (after the last round, one evaluate exchange);
5. bookkeeping (``run_federation``): metrics.json, checkpoints, best/final bundles, and the resume state written
   atomically after every round.
"""

from __future__ import annotations

import math
import re
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

from fedct.protocol import NUM_EXAMPLES, RISK_RANGE, TEST_PREFIX, TRAIN_HIST_RISK, VAL_PREFIX
from fedct.transport import encode_content, record_nbytes
from fl_server.checkpoint import RunState, load_run_state, save_run_state, save_state, write_bundle
from fl_server.config import EXAMPLES_GROWTH_FACTOR, RESUMABLE_KEYS, ServerConfig, SiteRegistry, is_site_name
from fl_server.privacy import privacy_summary
from fl_server.observe import observe_round
from fl_server.run_log import RunLog, histogram_quantiles
from fl_server.strategy import SERVER_OPTIMISERS, load_strategy_state, strategy_state
from fl_server.validation import (
    ARRAYS_RECORD,
    METRICS_RECORD,
    Problem,
    ReplyRejected,
    ScreenedReply,
    check_updates,
    histogram_length_problems,
    screen_reply,
)
from models.factory import buffer_keys, build_model

NDArrays = dict[str, np.ndarray]
#: Messages expire this long after the round stops waiting for them (Flower's default TTL is 12 h).
TTL_SLACK_S = 30.0
#: An error reply's reason is recorded only when it is a bare reason code (as fedct sites send: "<code> incident=<id>");
#: any other text from a site stays out of metrics.json and the log.
ERROR_REASON_PATTERN = re.compile(r"[a-z0-9_.-]{1,48}(?: incident=[A-Za-z0-9_-]{1,64})?")


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


def _strategy_messages(pairs: Sequence[tuple[Message, ScreenedReply]], *, train: bool) -> list[Message]:
    """The replies as the strategy is given them: the decoded arrays (train) and a MetricRecord of the scalar metrics
    every reply has (Flower's strategies refuse replies whose metric keys differ), ``num-examples`` the weight used."""
    common = set.intersection(*({k for k, v in s.metrics.items() if not isinstance(v, list)} for _, s in pairs)) if pairs else set()
    out = []
    for reply, screened in pairs:
        content = RecordDict({METRICS_RECORD: MetricRecord({k: screened.metrics[k] for k in sorted(common)})})
        if train and screened.arrays is not None:
            content[ARRAYS_RECORD] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in screened.arrays.items()})
        reply.content = content
        out.append(reply)
    return out


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
        registry: SiteRegistry | None = None,
    ) -> None:
        self.grid = grid
        self.strategy = strategy
        self.config = config
        self.reference = {k: np.asarray(v) for k, v in reference.items()}
        self.buffers = buffers
        self.poll_s = poll_s
        self.clock = clock
        #: Who each node is (``FEDCT_SITE_REGISTRY``); None: the name a reply gives (simulation, insecure demo).
        self.registry = registry
        self.site_names: dict[int, str] = {}
        #: Each site's training count in its first screened update (the growth bound of num-examples).
        self.first_examples: dict[str, float] = {}
        #: Bins of each ``*-hist-*`` metric, agreed by the sites in an earlier round.
        self.histogram_bins: dict[str, int] = {}

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
        """The name recorded for a node: the registry's, else the (checked) name it gave, else ``node-<id>``."""
        if self.registry is not None:
            return self.registry.names.get(node_id, f"node-{node_id}")
        name = self.site_names.get(node_id)
        return name if is_site_name(name) else f"node-{node_id}"

    def _reject(self, report: RoundReport, node_id: int, problem: Problem, *, site: str | None = None) -> None:
        """Record and log a rejected reply (node id, recorded name, code, the server's reason)."""
        site = site or self._site(node_id)
        report.rejected.append({"node_id": node_id, "site": site, "code": problem.code, "reason": problem.reason})
        log(WARNING, "fedct: round %d: reply of %s (node %d) rejected [%s]: %s", report.server_round, site, node_id,
            problem.code, problem.reason)  # fmt: skip

    @staticmethod
    def _error_problem(reply: Message) -> Problem:
        reason = str(getattr(reply.error, "reason", "") or "").strip()
        code = getattr(reply.error, "code", None)
        text = f"error reply (code {code})" if isinstance(code, int) else "error reply"
        return Problem("error_reply", f"{text}: {reason}" if ERROR_REASON_PATTERN.fullmatch(reason) else text)

    def _clip_examples(self, report: RoundReport, screened: ScreenedReply) -> ScreenedReply:
        """Clip a training reply's ``num-examples`` to twice the site's first count (the gate has clipped it to
        ``max-site-examples``); record every clipping. Honest sites, whose count does not jump, keep theirs."""
        claimed = screened.metrics[NUM_EXAMPLES]
        first = self.first_examples.setdefault(screened.site, claimed)
        used = min(claimed, math.floor(EXAMPLES_GROWTH_FACTOR * first))
        clipped = list(screened.clipped)
        if used < claimed:
            clipped.append({"metric": NUM_EXAMPLES, "claimed": claimed, "used": float(used),
                            "bound": f"{EXAMPLES_GROWTH_FACTOR:g}x the site's first count {first:g}"})  # fmt: skip
        for item in clipped:
            report.clipped.append({"node_id": screened.node_id, "site": screened.site, **item})
            log(WARNING, "fedct: round %d: %s (node %d) reported %s = %g; %g used", report.server_round, screened.site,
                screened.node_id, item["metric"], item["claimed"], item["used"])  # fmt: skip
        if used == claimed:
            return screened
        return ScreenedReply(node_id=screened.node_id, site=screened.site, arrays=screened.arrays,
                             metrics={**screened.metrics, NUM_EXAMPLES: float(used)}, evaluation=screened.evaluation,
                             clipped=tuple(clipped))  # fmt: skip

    def _exchange(self, messages: Iterable[Message], report: RoundReport, *, train: bool,
                  evaluation_expected: bool = False) -> list[tuple[Message, ScreenedReply]]:  # fmt: skip
        """Send, wait at most round-timeout-s, and pass every reply through the gate; returns the replies that passed
        with their plain contents (rejected ones are recorded in ``report.rejected``)."""
        encoded, sent_bytes = encode_messages(messages, transport=self.config.transport)
        for msg in encoded:  # a site that comes back later must not train on a round the server has given up on
            msg.metadata.ttl = self.config.round_timeout_s + TTL_SLACK_S
        report.bytes_sent += sent_bytes
        targets = [m.metadata.dst_node_id for m in encoded]
        if not encoded:
            return []
        replies = exchange(self.grid, encoded, timeout_s=self.config.round_timeout_s)
        answered = {r.metadata.src_node_id for r in replies}
        if self.registry is not None and any(n not in self.registry.names for n in answered):
            self.registry = self.registry.refreshed()  # a site registered while the run goes on
        for node_id in targets:
            if node_id not in answered:
                report.missing.append({"node_id": node_id, "site": self._site(node_id),
                                       "reason": f"no reply within round-timeout-s={self.config.round_timeout_s:g}"})  # fmt: skip
        passed: list[tuple[Message, ScreenedReply]] = []
        seen_nodes: set[int] = set()
        seen_names: set[str] = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id in seen_nodes:
                self._reject(report, node_id, Problem("duplicate_reply", "a second reply from this node in one exchange"))
                continue
            seen_nodes.add(node_id)
            if reply.has_error():
                self._reject(report, node_id, self._error_problem(reply))
                continue
            try:
                report.bytes_received += record_nbytes(reply.content)
                screened = screen_reply(reply.content, node_id=node_id, train=train, reference=self.reference,
                                        registry=self.registry, count_bound=self.config.examples_bound,
                                        evaluation_expected=evaluation_expected)  # fmt: skip
            except ReplyRejected as exc:
                self._reject(report, node_id, exc.problem)
                continue
            except Exception as exc:  # noqa: BLE001 - one site's reply must never end the run
                log(WARNING, "fedct: round %d: checking the reply of node %d failed", report.server_round, node_id, exc_info=exc)
                self._reject(report, node_id, Problem("internal_error", f"the server's checks raised {type(exc).__name__}"))
                continue
            if screened.site in seen_names:
                self._reject(report, node_id, Problem("duplicate_site_name", "another node already answered under this "
                                                                             "site name in this exchange"),
                             site=f"node-{node_id}")  # fmt: skip
                continue
            seen_names.add(screened.site)
            if self.registry is None:
                self.site_names[node_id] = screened.site
            passed.append((reply, screened))
        bins = histogram_length_problems(
            {i: [s.metrics] + ([s.evaluation] if s.evaluation is not None else []) for i, (_, s) in enumerate(passed)},
            self.histogram_bins,
        )
        for i, problem in bins.items():
            self._reject(report, passed[i][1].node_id, problem)
        return [pair for i, pair in enumerate(passed) if i not in bins]

    def _validated(self, pairs: list[tuple[Message, ScreenedReply]], global_arrays: NDArrays,
                   report: RoundReport) -> list[tuple[Message, ScreenedReply]]:  # fmt: skip
        """The screened training replies whose updates pass ``check_updates``, weights clipped (recorded)."""
        pairs = [(reply, self._clip_examples(report, screened)) for reply, screened in pairs]
        reasons = check_updates(
            {i: screened.arrays for i, (_, screened) in enumerate(pairs)},
            {k: global_arrays[k] for k in self.reference},
            max_norm=self.config.max_update_norm,
            zscore=self.config.update_zscore,
        )
        for i, problem in reasons.items():
            self._reject(report, pairs[i][1].node_id, problem)
        return [pair for i, pair in enumerate(pairs) if i not in reasons]

    def _finish_aggregate(self, aggregated: ArrayRecord, accepted: list[Message]) -> NDArrays:
        """Aggregated arrays in the model's dtypes; for server optimisers, buffers (running statistics) are the
        plain weighted mean of the sites' (an adaptive step on a variance can make it negative)."""
        arrays = {k: a.numpy() for k, a in aggregated.items()}
        if self.config.strategy in SERVER_OPTIMISERS and self.buffers:
            weights = np.array([float(next(iter(r.content.metric_records.values()))[NUM_EXAMPLES]) for r in accepted])
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
        pairs = self._exchange(messages, report, train=True, evaluation_expected=evaluate_first)
        if evaluate_first:
            self._previous_evaluation(report, pairs, minimum)
        valid = self._validated(pairs, global_arrays, report)
        if len(valid) < minimum:
            report.skip_reason = f"{len(valid)} valid update(s), fewer than min-sites={minimum}; global model kept"
            return self._done(report, t0)
        accepted = _strategy_messages(valid, train=True)
        try:
            aggregated, _ = self.strategy.aggregate_train(server_round, accepted)
        except (InconsistentMessageReplies, AggregationError, ValueError) as exc:
            report.skip_reason = f"strategy {type(self.strategy).__name__} could not aggregate: {exc}; global model kept"
            return self._done(report, t0)
        except Exception as exc:  # noqa: BLE001 - a strategy failing on the round's updates must not end the run
            log(WARNING, "fedct: round %d: aggregation failed", server_round, exc_info=exc)
            report.skip_reason = f"strategy {type(self.strategy).__name__} failed ({type(exc).__name__}); global model kept"
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
        # the site's metrics, with what the strategy added to its reply (e.g. the DP wrapper's uniform weight)
        report.train_sites = {screened.site: {**screened.metrics, **{k: float(v) for k, v in reply.content[METRICS_RECORD].items()
                                                                     if not isinstance(v, list)}}
                              for reply, screened in valid}  # fmt: skip
        if self.config.evaluate_mode == "fused":
            return self._done(report, t0)
        return self._evaluate(report, server_round, new_arrays, evaluate_config, minimum, t0)

    def _previous_evaluation(self, report: RoundReport, pairs: list[tuple[Message, ScreenedReply]], minimum: int) -> None:
        """Collect the evaluations of the previous round's global model from training replies (``evaluate-mode =
        "fused"``), counted like an evaluate exchange's replies; a site whose update is later rejected still counts
        (it evaluated the global model, as with a separate exchange). The gate has checked them (a malformed one
        rejects its reply).

        The strategy's ``aggregate_evaluate`` is called as after an evaluate exchange, with evaluate replies rebuilt
        from the ConfigRecords (a MetricRecord each, the same values), so strategies that track evaluation see it.
        """
        previous = report.server_round - 1
        evaluated = [(reply, screened) for reply, screened in pairs if screened.evaluation is not None]
        if len(evaluated) < minimum:
            report.previous_evaluation_missing = (f"{len(evaluated)} evaluation repl(ies) with round {report.server_round}'s "
                                                  f"training, fewer than min-sites={minimum}")  # fmt: skip
            return
        common = set.intersection(*({k for k, v in s.evaluation.items() if not isinstance(v, list)} for _, s in evaluated))
        rebuilt = [Message(RecordDict({"metrics": MetricRecord({k: s.evaluation[k] for k in sorted(common)})}),
                           dst_node_id=s.node_id, message_type=MessageType.EVALUATE, group_id=str(previous))
                   for _, s in evaluated]  # fmt: skip
        self._aggregate_evaluate(previous, rebuilt)
        report.previous_evaluate_sites = {s.site: dict(s.evaluation) for _, s in evaluated}

    def _aggregate_evaluate(self, server_round: int, replies: list[Message]) -> None:
        """The strategy's ``aggregate_evaluate`` (fedct's metrics come from run_log); its failure is logged only."""
        try:
            self.strategy.aggregate_evaluate(server_round, replies)
        except Exception as exc:  # noqa: BLE001 - the evaluation is recorded by run_log whatever the strategy says
            log(WARNING, "fedct: round %d: strategy %s could not aggregate the evaluation (%s)", server_round,
                type(self.strategy).__name__, type(exc).__name__)  # fmt: skip

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
        evaluated = self._exchange(messages, report, train=False)
        if len(evaluated) < minimum:
            report.evaluation_missing = f"{len(evaluated)} evaluation repl(ies), fewer than min-sites={minimum}"
            return self._done(report, t0)
        self._aggregate_evaluate(server_round, _strategy_messages(evaluated, train=False))
        report.evaluate_sites = {screened.site: dict(screened.metrics) for _, screened in evaluated}
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
        return {k: v for k, v in values.items() if isinstance(v, int | float) and (k.startswith((VAL_PREFIX, TEST_PREFIX)))}

    return {
        "aggregate": scalars(entry["evaluate"]["aggregate"]),
        "sites": {site: scalars(m) for site, m in entry["evaluate"]["sites"].items()},
        "training_studies": {site: m.get(NUM_EXAMPLES) for site, m in entry["train"]["sites"].items()},
    }


def _risk_reference(run_log: RunLog, server_round: int) -> dict[str, Any] | None:
    """Tertile cut points of the training studies' risk scores (from the sites' summed histograms) at a round."""
    entry = next((r for r in run_log.rounds if r["round"] == server_round), None)
    counts = entry["evaluate"]["aggregate"].get(TRAIN_HIST_RISK) if entry else None
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
    registry: SiteRegistry | None = None,
) -> RunLog:
    """Run (or, with ``resume``, continue) ``config.num_server_rounds`` rounds of ``strategy`` and write the run folder.

    Run folder: ``metrics.json``, ``curves.png``, ``checkpoints/round-NNN.pt`` (global weights after each round,
    000 = initial), ``model/best`` and ``model/final`` bundles, ``state/`` (resume state of the last round).
    ``strategy`` may be any Flower strategy, also a wrapper (e.g. a DP strategy around the one of
    :func:`fl_server.strategy.build_strategy`); ``round_extras(report)`` adds fields to each round's metrics.json
    entry (e.g. a privacy accountant's epsilon), after the loop's own. ``registry`` (``FEDCT_SITE_REGISTRY``, read by the
    ServerApp) names the sites by their node ids; without it the names the replies give are used.
    """
    run_dir = config.run_path
    state_dir = run_dir / "state"
    run_config = config.to_run_config()
    run_log = RunLog(run_dir, run_config=run_config, emit=lambda line: log(INFO, "%s", line))
    model = build_model(config.model)
    arrays = initial_arrays(config)
    sites_seen: set[str] = set()
    first_examples: dict[str, float] = {}  # the loop's bounds on num-examples and histogram bins, kept over a resume
    histogram_bins: dict[str, int] = {}
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
            first_examples.update({str(k): float(v) for k, v in saved.extra.get("first_examples", {}).items()})
            histogram_bins.update({str(k): int(v) for k, v in saved.extra.get("histogram_bins", {}).items()})
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
    loop.registry = registry  # (set here: the SecAgg+ loop's constructor does not take it)
    loop.first_examples.update(first_examples)
    loop.histogram_bins.update(histogram_bins)
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
            extra={"sites": sorted(sites_seen), "last_aggregated_round": last_aggregated,
                   "first_examples": dict(loop.first_examples), "histogram_bins": dict(loop.histogram_bins)},
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
        last.clipped.extend(final.clipped)
        finish(*pending)
    write_bundle(run_dir / "model" / "final", _torch_state(arrays), model=config.model, pipeline=config.pipeline,
                 provenance=provenance(last_aggregated), risk_reference=_risk_reference(run_log, last_aggregated))  # fmt: skip
    run_log.write()
    run_log.plot()
    log(INFO, "fedct: run finished in %.1fs; results in %s", time.perf_counter() - t0, run_dir)
    return run_log

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
5. bookkeeping (``run_federation`` with :class:`fl_server.recorder.RunRecorder`): metrics.json, checkpoints,
   best/final bundles, and the resume state written atomically after every round;
6. after the last round, calibration (:func:`calibrate_bundles`): the temperature of the best and final models from
   the sites' summed validation NLL (sent with every evaluation), then one calibration exchange per model for the
   ECE before/after on the test split; both go into metrics.json (``calibration``) and the bundles;
   then the out-of-distribution reference of the same models (:func:`reference_bundles`, ``fl_server.ood``): two
   exchanges of feature statistics per model, into metrics.json (``ood``) and the bundles;
7. with a model registry's champion to beat (``fl_server.campaign``), one more evaluate exchange of the champion's
   weights on every site (:func:`evaluate_champion`, metrics.json ``champion_evaluation``).

One skeleton (:meth:`RoundLoop.run_round`) for every loop: a subclass overrides the training step only
(:meth:`RoundLoop.train`); SecAgg+ does so in ``fl_server.secagg``, which this module does not import (the
ServerApp chooses the loop).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from fedct.protocol import CALIBRATION_TEMPERATURE, CONFIG_RECORD, EVALUATE_FIRST, NUM_EXAMPLES
from fedct.transport import encode_content, record_nbytes
from fl_server.config import EXAMPLES_GROWTH_FACTOR, ServerConfig, SiteRegistry, is_site_name
from fl_server.ood import gather_reference
from fl_server.profile_norm import (
    ProfileNormalisationFailed,
    exchange_record,
    load_normalisation,
    request_config,
    save_normalisation,
    screen_profile_reply,
    summary,
)
from fl_server.recorder import FinishedRound, RoundReport, RunRecorder, round_temperature
from fl_server.run_log import RunLog, aggregate, calibration_outcome
from fl_server.strategy import SERVER_OPTIMISERS, strategy_state
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
from models.factory import MultiTaskNet, buffer_keys, build_model
from preprocessing.profile import ProfileSchema, ProfileStatistics
from preprocessing.profile_features import ProfileNormalisation

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


def exchange(
    grid: Grid, messages: Iterable[Message], *, timeout_s: float, poll_s: float = REPLY_POLL_S
) -> list[Message]:
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


def _strategy_messages(pairs: Sequence[tuple[Message, ScreenedReply]], *, train: bool) -> list[Message]:
    """The replies as the strategy is given them: the decoded arrays (train) and a MetricRecord of the scalar metrics
    every reply has (Flower's strategies refuse replies whose metric keys differ), ``num-examples`` the weight used."""
    common = (
        set.intersection(*({k for k, v in s.metrics.items() if not isinstance(v, list)} for _, s in pairs))
        if pairs
        else set()
    )
    out = []
    for reply, screened in pairs:
        content = RecordDict({METRICS_RECORD: MetricRecord({k: screened.metrics[k] for k in sorted(common)})})
        if train and screened.arrays is not None:
            content[ARRAYS_RECORD] = ArrayRecord(
                {k: Array(np.asarray(v, order="C")) for k, v in screened.arrays.items()}
            )
        reply.content = content
        out.append(reply)
    return out


@dataclass(frozen=True)
class TrainStep:
    """What a round's training step produced: the new global arrays and each site's training metrics."""

    arrays: NDArrays
    sites: dict[str, dict[str, Any]]


class RoundLoop:
    """Runs rounds of a strategy over a grid with bounded waits, validation and packed transport.

    ``reference`` gives the model's layout (keys, shapes, dtypes); the current global weights are passed to each
    :meth:`run_round`. ``buffers`` are the state-dict keys that are running statistics, not trained weights.
    A subclass replaces the training step only (:meth:`train`); ``secure_aggregation`` says whether it keeps the
    sites' single updates from the server (a run configured with ``secure-aggregation = true`` refuses a loop that
    does not).
    """

    #: True for a loop whose training step never sees a single site's update (SecAgg+).
    secure_aggregation: bool = False

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
        if config.privacy.secure_aggregation and not self.secure_aggregation:
            raise ValueError(
                f"secure-aggregation=true but {type(self).__name__} sees every site's update; the SecAgg+ "
                "round loop (fl_server.secagg.SecAggRoundLoop, chosen by fl_server.server_app) must run it"
            )
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

    def bounds(self) -> dict[str, dict[str, Any]]:
        """The bounds the loop has learnt from the sites (kept in the resume state): each site's first training
        count, and the agreed bins of each histogram metric."""
        return {"first_examples": dict(self.first_examples), "histogram_bins": dict(self.histogram_bins)}

    def restore_bounds(self, bounds: Mapping[str, Mapping[str, Any]]) -> None:
        """Take back the bounds of :meth:`bounds` (a resumed run)."""
        self.first_examples.update(bounds.get("first_examples", {}))
        self.histogram_bins.update(bounds.get("histogram_bins", {}))

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
        log(
            WARNING,
            "fedct: round %d: reply of %s (node %d) rejected [%s]: %s",
            report.server_round,
            site,
            node_id,
            problem.code,
            problem.reason,
        )

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
            clipped.append(
                {
                    "metric": NUM_EXAMPLES,
                    "claimed": claimed,
                    "used": float(used),
                    "bound": f"{EXAMPLES_GROWTH_FACTOR:g}x the site's first count {first:g}",
                }
            )
        for item in clipped:
            report.clipped.append({"node_id": screened.node_id, "site": screened.site, **item})
            log(
                WARNING,
                "fedct: round %d: %s (node %d) reported %s = %g; %g used",
                report.server_round,
                screened.site,
                screened.node_id,
                item["metric"],
                item["claimed"],
                item["used"],
            )
        if used == claimed:
            return screened
        return ScreenedReply(
            node_id=screened.node_id,
            site=screened.site,
            arrays=screened.arrays,
            metrics={**screened.metrics, NUM_EXAMPLES: float(used)},
            evaluation=screened.evaluation,
            clipped=tuple(clipped),
        )

    def _exchange(
        self,
        messages: Iterable[Message],
        report: RoundReport,
        *,
        train: bool,
        evaluation_expected: bool = False,
        screen: Callable[[RecordDict, int], ScreenedReply] | None = None,
    ) -> list[tuple[Message, ScreenedReply]]:
        """Send, wait at most round-timeout-s, and pass every reply through the gate (``screen(content, node_id)``
        in place of :func:`fl_server.validation.screen_reply` when given); returns the replies that passed with their
        plain contents (rejected ones are recorded in ``report.rejected``)."""
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
                report.missing.append(
                    {
                        "node_id": node_id,
                        "site": self._site(node_id),
                        "reason": f"no reply within round-timeout-s={self.config.round_timeout_s:g}",
                    }
                )
        passed: list[tuple[Message, ScreenedReply]] = []
        seen_nodes: set[int] = set()
        seen_names: set[str] = set()
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if node_id in seen_nodes:
                self._reject(
                    report, node_id, Problem("duplicate_reply", "a second reply from this node in one exchange")
                )
                continue
            seen_nodes.add(node_id)
            if reply.has_error():
                self._reject(report, node_id, self._error_problem(reply))
                continue
            try:
                report.bytes_received += record_nbytes(reply.content)
                if screen is not None:
                    screened = screen(reply.content, node_id)
                else:
                    screened = screen_reply(
                        reply.content,
                        node_id=node_id,
                        train=train,
                        reference=self.reference,
                        registry=self.registry,
                        count_bound=self.config.examples_bound,
                        evaluation_expected=evaluation_expected,
                    )
            except ReplyRejected as exc:
                self._reject(report, node_id, exc.problem)
                continue
            except Exception as exc:  # noqa: BLE001 - one site's reply must never end the run
                log(
                    WARNING,
                    "fedct: round %d: checking the reply of node %d failed",
                    report.server_round,
                    node_id,
                    exc_info=exc,
                )
                self._reject(
                    report, node_id, Problem("internal_error", f"the server's checks raised {type(exc).__name__}")
                )
                continue
            if screened.site in seen_names:
                self._reject(
                    report,
                    node_id,
                    Problem(
                        "duplicate_site_name", "another node already answered under this site name in this exchange"
                    ),
                    site=f"node-{node_id}",
                )
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

    def _validated(
        self, pairs: list[tuple[Message, ScreenedReply]], global_arrays: NDArrays, report: RoundReport
    ) -> list[tuple[Message, ScreenedReply]]:
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
                stacked = np.stack(
                    [next(iter(r.content.array_records.values()))[key].numpy().astype(np.float64) for r in accepted]
                )
                arrays[key] = np.tensordot(weights, stacked, axes=1)
        out = {}
        for key, ref in self.reference.items():
            value = np.asarray(arrays[key])
            if ref.dtype.kind in "iub":
                value = np.rint(value)
            out[key] = value.astype(ref.dtype).reshape(ref.shape)
        return out

    def run_round(
        self, server_round: int, global_arrays: NDArrays, train_config: ConfigRecord, evaluate_config: ConfigRecord
    ) -> RoundReport:
        """Train, aggregate and evaluate one round; the report holds the new global arrays (unchanged when skipped).

        The skeleton every round loop shares: bounded wait for ``min-sites`` sites, the training step
        (:meth:`train`, the one hook a subclass overrides: SecAgg+ in ``fl_server.secagg``), the check of the
        aggregate, then the evaluation. With ``evaluate-mode = "fused"`` the round is not evaluated here (the next
        round's training replies carry its evaluation, or :meth:`evaluate_global` after the last round); when
        ``train_config`` has ``evaluate-first`` the replies' evaluations of ``global_arrays`` are collected into
        ``report.previous_evaluate_sites``.
        """
        t0 = self.clock()
        minimum = self.config.min_sites
        report = RoundReport(server_round=server_round, arrays=global_arrays)
        nodes = self.wait_for_nodes(minimum)
        report.nodes_connected = len(nodes)
        if len(nodes) < minimum:
            report.skip_reason = (
                f"only {len(nodes)} site(s) connected after round-timeout-s={self.config.round_timeout_s:g} "
                f"(min-sites={minimum})"
            )
            if bool(train_config.get(EVALUATE_FIRST, False)):
                report.previous_evaluation_missing = report.skip_reason
            return self._done(report, t0)
        step = self.train(server_round, nodes, global_arrays, train_config, report)
        if step is None:  # the step has set report.skip_reason
            return self._done(report, t0)
        bad = next((k for k, v in step.arrays.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v))), None)
        if bad is not None:
            report.skip_reason = f"aggregate has non-finite values in {bad!r}; global model kept"
            return self._done(report, t0)
        report.arrays, report.aggregated, report.train_sites = step.arrays, True, step.sites
        if self.config.evaluate_mode == "fused":
            return self._done(report, t0)
        return self._evaluate(report, server_round, step.arrays, evaluate_config, minimum, t0)

    def train(
        self,
        server_round: int,
        nodes: list[int],
        global_arrays: NDArrays,
        train_config: ConfigRecord,
        report: RoundReport,
    ) -> TrainStep | None:
        """The training half of a round over the connected ``nodes``: the new global arrays (in the model's dtypes)
        and each site's training metrics, or None with ``report.skip_reason`` set (the global model is kept).

        Here: the strategy's ``configure_train``, one packed exchange, the reply gate, the update checks, the
        strategy's ``aggregate_train``; a fused evaluation riding on the replies is collected on the way.
        """
        minimum = self.config.min_sites
        evaluate_first = bool(train_config.get(EVALUATE_FIRST, False))
        current = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in global_arrays.items()})
        messages = self.strategy.configure_train(server_round, current, train_config, _SnapshotGrid(self.grid, nodes))
        pairs = self._exchange(messages, report, train=True, evaluation_expected=evaluate_first)
        if evaluate_first:
            self._previous_evaluation(report, pairs, minimum)
        valid = self._validated(pairs, global_arrays, report)
        if len(valid) < minimum:
            report.skip_reason = f"{len(valid)} valid update(s), fewer than min-sites={minimum}; global model kept"
            return None
        accepted = _strategy_messages(valid, train=True)
        try:
            aggregated, _ = self.strategy.aggregate_train(server_round, accepted)
        except (InconsistentMessageReplies, AggregationError, ValueError) as exc:
            report.skip_reason = (
                f"strategy {type(self.strategy).__name__} could not aggregate: {exc}; global model kept"
            )
            return None
        except Exception as exc:  # noqa: BLE001 - a strategy failing on the round's updates must not end the run
            log(WARNING, "fedct: round %d: aggregation failed", server_round, exc_info=exc)
            report.skip_reason = (
                f"strategy {type(self.strategy).__name__} failed ({type(exc).__name__}); global model kept"
            )
            return None
        if aggregated is None:
            report.skip_reason = f"strategy {type(self.strategy).__name__} returned no aggregate; global model kept"
            return None
        # the site's metrics, with what the strategy added to its reply (e.g. the DP wrapper's uniform weight)
        sites = {
            screened.site: {
                **screened.metrics,
                **{k: float(v) for k, v in reply.content[METRICS_RECORD].items() if not isinstance(v, list)},
            }
            for reply, screened in valid
        }
        return TrainStep(arrays=self._finish_aggregate(aggregated, accepted), sites=sites)

    def _previous_evaluation(
        self, report: RoundReport, pairs: list[tuple[Message, ScreenedReply]], minimum: int
    ) -> None:
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
            report.previous_evaluation_missing = (
                f"{len(evaluated)} evaluation repl(ies) with round {report.server_round}'s "
                f"training, fewer than min-sites={minimum}"
            )
            return
        common = set.intersection(
            *({k for k, v in s.evaluation.items() if not isinstance(v, list)} for _, s in evaluated)
        )
        rebuilt = [
            Message(
                RecordDict({"metrics": MetricRecord({k: s.evaluation[k] for k in sorted(common)})}),
                dst_node_id=s.node_id,
                message_type=MessageType.EVALUATE,
                group_id=str(previous),
            )
            for _, s in evaluated
        ]
        self._aggregate_evaluate(previous, rebuilt)
        report.previous_evaluate_sites = {s.site: dict(s.evaluation) for _, s in evaluated}

    def _aggregate_evaluate(self, server_round: int, replies: list[Message]) -> None:
        """The strategy's ``aggregate_evaluate`` (fedct's metrics come from run_log); its failure is logged only."""
        try:
            self.strategy.aggregate_evaluate(server_round, replies)
        except Exception as exc:  # noqa: BLE001 - the evaluation is recorded by run_log whatever the strategy says
            log(
                WARNING,
                "fedct: round %d: strategy %s could not aggregate the evaluation (%s)",
                server_round,
                type(self.strategy).__name__,
                type(exc).__name__,
            )

    def evaluate_global(self, server_round: int, arrays: NDArrays, evaluate_config: ConfigRecord) -> RoundReport:
        """An evaluate-only exchange of ``arrays`` (the global model after ``server_round``): the last round of an
        ``evaluate-mode = "fused"`` run, which no later training exchange evaluates."""
        t0 = self.clock()
        report = RoundReport(server_round=server_round, arrays=arrays)
        return self._evaluate(report, server_round, arrays, evaluate_config, self.config.min_sites, t0)

    def _evaluate(
        self,
        report: RoundReport,
        server_round: int,
        new_arrays: NDArrays,
        evaluate_config: ConfigRecord,
        minimum: int,
        t0: float,
    ) -> RoundReport:
        """Evaluate the round's new global model on the connected sites (bounded like training); finish the report."""
        nodes = self.wait_for_nodes(minimum)
        if len(nodes) < minimum:
            report.evaluation_missing = f"only {len(nodes)} site(s) connected for evaluation (min-sites={minimum})"
            return self._done(report, t0)
        current = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in new_arrays.items()})
        messages = self.strategy.configure_evaluate(
            server_round, current, evaluate_config, _SnapshotGrid(self.grid, nodes)
        )
        evaluated = self._exchange(messages, report, train=False)
        if len(evaluated) < minimum:
            report.evaluation_missing = f"{len(evaluated)} evaluation repl(ies), fewer than min-sites={minimum}"
            return self._done(report, t0)
        self._aggregate_evaluate(server_round, _strategy_messages(evaluated, train=False))
        report.evaluate_sites = {screened.site: dict(screened.metrics) for _, screened in evaluated}
        return self._done(report, t0)

    def calibrate(self, server_round: int, arrays: NDArrays, evaluate_config: ConfigRecord) -> RoundReport:
        """The calibration exchange of ``arrays`` (the global model after ``server_round``): an evaluate message to every
        connected site (no sampling, no strategy: nothing is aggregated into a model) whose config carries
        ``calibration-temperature``; each reply passes the gate. ``report.evaluate_sites`` holds the sites' statistics,
        ``report.evaluation_missing`` why there are too few (fewer than ``min-sites`` replies)."""
        return self.evaluate_everywhere(
            server_round, arrays, evaluate_config, what="calibration", group=f"calibrate-{server_round}"
        )

    def evaluate_everywhere(
        self,
        server_round: int,
        arrays: NDArrays,
        evaluate_config: ConfigRecord,
        *,
        what: str,
        group: str,
        screen: Callable[[RecordDict, int], ScreenedReply] | None = None,
    ) -> RoundReport:
        """An evaluate message with ``arrays`` to every connected site (no sampling, no strategy), each reply through
        the gate: the calibration exchange, the out-of-distribution statistics (``fl_server.ood``, its own ``screen``)
        and the champion's evaluation after a run (``what`` names it in the reasons, ``group`` is the messages' group
        id)."""
        t0 = self.clock()
        minimum = self.config.min_sites
        report = RoundReport(server_round=server_round, arrays=arrays)
        nodes = self.wait_for_nodes(minimum)
        if len(nodes) < minimum:
            report.evaluation_missing = f"only {len(nodes)} site(s) connected for {what} (min-sites={minimum})"
            return self._done(report, t0)
        content = RecordDict(
            {
                ARRAYS_RECORD: ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()}),
                CONFIG_RECORD: evaluate_config,
            }
        )
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=group) for node in nodes
        ]
        replies = self._exchange(messages, report, train=False, screen=screen)
        if len(replies) < minimum:
            report.evaluation_missing = f"{len(replies)} {what} repl(ies), fewer than min-sites={minimum}"
            return self._done(report, t0)
        report.evaluate_sites = {screened.site: dict(screened.metrics) for _, screened in replies}
        return self._done(report, t0)

    def profile_statistics(self, schema: ProfileSchema) -> tuple[RoundReport, dict[str, ProfileStatistics]]:
        """The profile statistics exchange before round 1 (``fl_server.profile_norm``): an evaluate message without
        weights to every connected site, each reply checked by :func:`fl_server.profile_norm.screen_profile_reply`.
        Returns the exchange's report (round 0: rejected and missing replies, bytes) and each site's statistics."""
        t0 = self.clock()
        minimum = self.config.min_sites
        report = RoundReport(server_round=0, arrays={})
        nodes = self.wait_for_nodes(minimum)
        content = RecordDict({CONFIG_RECORD: request_config(schema)})
        messages = [
            Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id="profile-statistics")
            for node in nodes
        ]
        stats: dict[str, ProfileStatistics] = {}

        def screen(content: RecordDict, node_id: int) -> ScreenedReply:
            screened, site_stats = screen_profile_reply(
                content,
                node_id=node_id,
                registry=self.registry,
                schema=schema,
                min_count=self.config.metrics_min_count,
                count_bound=self.config.examples_bound,
            )
            stats[screened.site] = site_stats
            return screened

        passed = self._exchange(messages, report, train=False, screen=screen)
        kept = {s.site for _, s in passed}
        return self._done(report, t0), {site: v for site, v in stats.items() if site in kept}

    def pool_profile(self, schema: ProfileSchema) -> tuple[ProfileNormalisation, dict[str, Any]]:
        """The pooled profile normalisation and its run-folder record: :meth:`profile_statistics`, then
        :meth:`ProfileNormalisation.pooled` (SecAgg+'s loop overrides this: there the server sees only the sum).
        Fewer than ``min-sites`` usable replies raise :class:`fl_server.profile_norm.ProfileNormalisationFailed`."""
        report, stats = self.profile_statistics(schema)
        if len(stats) < self.config.min_sites:
            reasons = "; ".join(f"{r['site']}: {r['code']}" for r in report.rejected) or "no reply"
            raise ProfileNormalisationFailed(
                f"{len(stats)} site(s) sent usable profile statistics, fewer than min-sites={self.config.min_sites} "
                f"({reasons})"
            )
        normalisation = ProfileNormalisation.pooled(schema, list(stats.values()))
        return normalisation, {**summary(normalisation, stats), **exchange_record(report)}

    def _done(self, report: RoundReport, t0: float) -> RoundReport:
        report.seconds = self.clock() - t0
        if report.skip_reason:
            log(WARNING, "fedct: round %d skipped: %s", report.server_round, report.skip_reason)
        if report.evaluation_missing:
            log(WARNING, "fedct: round %d evaluation missing: %s", report.server_round, report.evaluation_missing)
        if report.previous_evaluation_missing:
            log(
                WARNING,
                "fedct: round %d evaluation missing: %s",
                report.server_round - 1,
                report.previous_evaluation_missing,
            )
        for item in report.missing:
            log(
                WARNING,
                "fedct: round %d: %s (node %d): %s",
                report.server_round,
                item["site"],
                item["node_id"],
                item["reason"],
            )
        return report


# --- the whole run ----------------------------------------------------------------------------------------------


def initial_arrays(config: ServerConfig) -> NDArrays:
    """The seeded initial global model as numpy arrays (keys in state-dict order)."""
    torch.manual_seed(config.seed)
    return {k: v.detach().cpu().numpy().copy() for k, v in build_model(config.model).state_dict().items()}


def calibrate_bundles(loop: RoundLoop, recorder: RunRecorder, final_arrays: NDArrays) -> dict[str, dict[str, Any]]:
    """Calibrate the best and final models after the last round (into ``recorder.calibration``).

    For each (the same round once): the temperature from the round's evaluation (the sites' summed validation NLL,
    :func:`fl_server.recorder.round_temperature`), then one calibration exchange (:meth:`RoundLoop.calibrate`) for the
    sites' test reliability bins before/after, pooled into the ECE (:func:`fl_server.run_log.calibration_outcome`).
    A model without a temperature (no site above the privacy floor) or whose exchange fails keeps the reason.
    """
    run_log = recorder.run_log
    targets = {"final": recorder.last_aggregated}
    if run_log.best is not None:
        targets["best"] = run_log.best.round
    done: dict[int, dict[str, Any]] = {}
    for name, server_round in sorted(targets.items()):
        if server_round in done:
            recorder.calibration[name] = done[server_round]
            continue
        fit = round_temperature(run_log, server_round) if server_round > 0 else None
        if fit is None:
            result: dict[str, Any] = {
                "temperature": None,
                "reason": f"no site sent validation sums for round {server_round} "
                "(no evaluation, or every site below the privacy floor)",
            }
        else:
            arrays = (
                final_arrays if server_round == recorder.last_aggregated else _checkpoint_arrays(recorder, server_round)
            )
            settings = {
                **loop.config.round_settings(server_round, profile=recorder.profile_normalisation).to_record(),
                CALIBRATION_TEMPERATURE: fit["temperature"],
            }
            log(INFO, "fedct: calibrating the round-%d model (temperature %.3f)", server_round, fit["temperature"])
            report = loop.calibrate(server_round, arrays, ConfigRecord(settings))
            result = {"round": server_round, **fit}
            if report.evaluate_sites is None:
                result["ece_reason"] = report.evaluation_missing
            else:
                result.update(calibration_outcome(report.evaluate_sites))
                agg = next(r for r in run_log.rounds if r["round"] == server_round)["evaluate"]["aggregate"]
                result.update({f"{k}_before": agg.get(f"test-{k}", math.nan) for k in ("brier", "loss", "accuracy")})
            result.update(
                {
                    "rejected_replies": report.rejected,
                    "missing_replies": report.missing,
                    "bytes_sent": report.bytes_sent,
                    "bytes_received": report.bytes_received,
                }
            )
        done[server_round] = recorder.calibration[name] = {"round": server_round, **result}
    return recorder.calibration


def feature_width(model: MultiTaskNet) -> int:
    """F, the number of pooled image features the heads read (0 for a model without an image branch)."""
    if not model.uses_image:
        return 0
    extra = model.profile.out_features if model.profile is not None else 0
    return model.diagnosis.in_features - extra - model.n_covariates


def reference_bundles(loop: RoundLoop, recorder: RunRecorder, final_arrays: NDArrays) -> dict[str, dict[str, Any]]:
    """The out-of-distribution reference of the best and final models after the last round (``fl_server.ood``, into
    ``recorder.ood``: metrics.json's figures and the bundles' reference); the same round once."""
    width = feature_width(build_model(loop.config.model))
    targets = {"final": recorder.last_aggregated}
    if recorder.run_log.best is not None:
        targets["best"] = recorder.run_log.best.round
    done: dict[int, tuple[dict[str, Any], Any]] = {}
    for name, server_round in sorted(targets.items()):
        if server_round not in done:
            if width == 0:
                done[server_round] = ({"round": server_round, "threshold": None, "reason": "no image branch"}, None)
            else:
                arrays = (
                    final_arrays
                    if server_round == recorder.last_aggregated
                    else _checkpoint_arrays(recorder, server_round)
                )
                settings = loop.config.round_settings(
                    max(server_round, 1), profile=recorder.profile_normalisation
                ).to_record()
                log(INFO, "fedct: gathering the out-of-distribution reference of the round-%d model", server_round)
                done[server_round] = gather_reference(loop, server_round, arrays, settings, width=width)
        recorder.ood[name] = done[server_round]
    return {name: record for name, (record, _) in recorder.ood.items()}


def evaluate_champion(loop: RoundLoop, recorder: RunRecorder, version: str, arrays: NDArrays) -> dict[str, Any]:
    """After the last round: the champion's weights (``version`` of the model registry) evaluated on every connected
    site's validation and test splits, in one evaluate exchange under the last round's settings (same split, same
    seed as the run's own final evaluation), so the challenger and the champion are compared on the same studies.
    Returns ``{"champion", "round", "sites": {site: scalar metrics}, "aggregate"}`` or, without enough replies,
    ``{"champion", "missing": reason}`` (fl_server.campaign records it in the lineage)."""
    server_round = recorder.last_aggregated or 1
    log(INFO, "fedct: evaluating the champion %s on every site for the promotion rule", version)
    profile = _champion_profile(loop.config, version) or recorder.profile_normalisation  # a fused champion: its own
    settings = loop.config.round_settings(server_round, profile=profile).to_record()
    report = loop.evaluate_everywhere(
        server_round, arrays, ConfigRecord(settings), what="champion evaluation", group=f"champion-{server_round}"
    )
    out: dict[str, Any] = {
        "champion": version,
        "round": server_round,
        "rejected_replies": report.rejected,
        "missing_replies": report.missing,
        "bytes_sent": report.bytes_sent,
        "bytes_received": report.bytes_received,
    }
    if report.evaluate_sites is None:
        return {**out, "missing": report.evaluation_missing}
    sites = {site: {k: v for k, v in m.items() if not isinstance(v, list)} for site, m in report.evaluate_sites.items()}
    return {**out, "sites": sites, "aggregate": {k: v for k, v in aggregate(sites).items() if not isinstance(v, list)}}


def _champion_profile(config: ServerConfig, version: str) -> ProfileNormalisation | None:
    """The profile normalisation a fused champion was trained with (its bundle's ``model.json``), else None."""
    if config.profile_fusion == "none" or not config.model_registry:
        return None
    from models.registry import ModelRegistry

    meta = json.loads((ModelRegistry(Path(config.model_registry)).bundle_path(version) / "model.json").read_text())
    stored = meta.get("profile_normalisation")
    return ProfileNormalisation.from_dict(stored) if stored else None


def profile_normalisation(loop: RoundLoop, recorder: RunRecorder, *, resumed: bool) -> ProfileNormalisation | None:
    """The run's pooled profile normalisation (None without profile fusion), set on ``recorder`` for the bundles.

    A resumed run reuses ``profile-normalisation.json`` of its folder; otherwise the sites' statistics are gathered
    and pooled (:meth:`RoundLoop.pool_profile`; with SecAgg+ the server sees only their sum). Fewer than
    ``min-sites`` usable replies end the run with :class:`fl_server.profile_norm.ProfileNormalisationFailed` (a fused
    model cannot be trained without it).
    """
    config = loop.config
    if config.profile_fusion == "none":
        return None
    schema = config.profile_schema
    saved = load_normalisation(recorder.run_dir) if resumed else None
    if saved is not None:
        recorder.profile_normalisation = saved
        return saved
    log(INFO, "fedct: gathering the sites' profile statistics (%d variables) for the normalisation", len(schema.names))
    normalisation, record = loop.pool_profile(schema)
    save_normalisation(recorder.run_dir, record)
    recorder.profile_normalisation = normalisation
    recorder.run_log.profile_normalisation = record
    log(
        INFO,
        "fedct: profile normalisation pooled from %d site(s); %d of %d variables have statistics",
        normalisation.sites,
        int(normalisation.usable.sum()),
        len(schema.names),
    )
    return normalisation


def _checkpoint_arrays(recorder: RunRecorder, server_round: int) -> NDArrays:
    """The global weights after ``server_round`` from its checkpoint, in the model's dtypes."""
    state = torch.load(recorder.run_dir / "checkpoints" / f"round-{server_round:03d}.pt", weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def run_federation(
    grid: Grid,
    config: ServerConfig,
    strategy: Strategy,
    *,
    poll_s: float = 1.0,
    round_extras: Callable[[RoundReport], Mapping[str, Any]] | None = None,
    registry: SiteRegistry | None = None,
    loop_class: type[RoundLoop] = RoundLoop,
    initial: NDArrays | None = None,
    champion: tuple[str, NDArrays] | None = None,
) -> RunLog:
    """Run (or, with ``resume``, continue) ``config.num_server_rounds`` rounds of ``strategy`` and write the run folder.

    Run folder (:class:`fl_server.recorder.RunRecorder`): ``metrics.json``, ``curves.png``, ``checkpoints/round-NNN.pt``
    (global weights after each round, 000 = initial), ``model/best`` and ``model/final`` bundles, ``state/`` (resume
    state of the last round). ``strategy`` may be any Flower strategy, also a wrapper (e.g. a DP strategy around the
    one of :func:`fl_server.strategy.build_strategy`); ``round_extras(report)`` adds fields to each round's
    metrics.json entry (e.g. a privacy accountant's epsilon), after the loop's own. ``registry``
    (``FEDCT_SITE_REGISTRY``, read by the ServerApp) names the sites by their node ids; without it the names the
    replies give are used. ``loop_class``: the round loop (the ServerApp passes SecAgg+'s when the run asks for it).
    ``initial``: the weights of round 0 (``init-from``, checked by ``fl_server.campaign``), else the seeded ones.
    ``champion``: ``(version, weights)`` of the registry's champion, evaluated on every site after the last round
    (:func:`evaluate_champion`, in metrics.json as ``champion_evaluation``).
    """
    recorder = RunRecorder(config, strategy)
    start = recorder.start(initial if initial is not None else initial_arrays(config))
    loop = loop_class(
        grid,
        strategy,
        config=config,
        reference=start.arrays,
        buffers=buffer_keys(build_model(config.model)),
        poll_s=poll_s,
        registry=registry,
    )
    loop.restore_bounds(start.loop_bounds)
    profile = profile_normalisation(loop, recorder, resumed=start.first_round > 1)
    arrays = start.arrays
    # fused: the round whose global model the next training exchange evaluates; None on the first round of a run or
    # after resuming (the resume state already holds the previous round's evaluation)
    pending: FinishedRound | None = None
    t0 = time.perf_counter()
    for server_round in range(start.first_round, config.num_server_rounds + 1):
        log(INFO, "")
        log(INFO, "fedct: [ROUND %d/%d] %s", server_round, config.num_server_rounds, type(strategy).__name__)
        settings = ConfigRecord(
            config.round_settings(server_round, evaluate_first=pending is not None, profile=profile).to_record()
        )
        report = loop.run_round(
            server_round,
            arrays,
            settings,
            ConfigRecord(config.round_settings(server_round, profile=profile).to_record()),
        )
        if pending is not None:
            pending.report.evaluate_sites = report.previous_evaluate_sites
            pending.report.evaluation_missing = report.previous_evaluation_missing
            recorder.record(pending, loop.bounds())
            pending = None
        arrays = report.arrays
        extras = dict(round_extras(report)) if round_extras is not None else {}  # now: e.g. the accountant's epsilon
        done = recorder.checkpoint(report, extras, strategy_state(strategy))
        if config.evaluate_mode == "fused":
            pending = done
        else:
            recorder.record(done, loop.bounds())
    if pending is not None:  # fused: the last round's global model, in an evaluate exchange of its own
        last = pending.report
        evaluate_config = ConfigRecord(config.round_settings(last.server_round, profile=profile).to_record())
        last.add_evaluation(loop.evaluate_global(last.server_round, last.arrays, evaluate_config))
        recorder.record(pending, loop.bounds())
    calibrate_bundles(loop, recorder, arrays)
    reference_bundles(loop, recorder, arrays)
    if champion is not None:
        recorder.run_log.champion_evaluation = evaluate_champion(loop, recorder, *champion)
    run_log = recorder.close(arrays)
    log(INFO, "fedct: run finished in %.1fs; results in %s", time.perf_counter() - t0, recorder.run_dir)
    return run_log

"""The real round loop under a fuzzer: one malformed reply never aborts the run, and never changes the aggregate.

``SiteGrid`` is a grid as :class:`fl_server.rounds.RoundLoop` uses it (node ids, push, pull) whose nodes answer at
once with real Flower ``Message`` replies, passed through Flower's wire format (protobuf) when it can carry them:
three honest sites (a seeded step from the weights they receive, packed with the client's own
``fedct.transport``), two registered adversaries whose every reply is the honest one corrupted by a seeded
generator (records, types, metrics, packed index, dtypes, shapes, buffers, NaN/inf, huge values, histograms,
``arrays-key="site"``, error replies, fused evaluations ...), and one node missing from the site registry.

Asserted over a few hundred corrupted replies in separate and fused evaluation mode: no exception escapes; every
corrupted reply is rejected with a reason code and the node's registered name; the new global model equals the
weighted mean ``sum(n_i w_i) / sum(n_i)`` of the honest updates, computed here from what the honest sites sent; the
recorded train and evaluate sites are exactly the honest ones. Also: num-examples clipping (max-site-examples and
growth) and metrics.json entries through ``run_federation``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from itertools import count

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.serde import message_from_proto, message_to_proto

from fedct.protocol import EVALUATION_RECORD, RoundSettings
from fedct.transport import INDEX_RECORD, received_state, weights_records
from fl_server.config import ServerConfig, SiteRegistry
from fl_server.rounds import RoundLoop, initial_arrays, run_federation
from fl_server.strategy import build_strategy
from fl_server.validation import CODES
from models.factory import buffer_keys, build_model

HONEST = {1: ("site-a", 5), 2: ("site-b", 9), 3: ("site-c", 13)}  # node id: (name, training studies)
ADVERSARIES = {4: "site-d", 5: "site-e"}
UNREGISTERED = 9
#: Codes of updates rejected after the gate (their reply, and a fused evaluation in it, was well formed).
UPDATE_CODES = {"non_finite", "huge_value", "norm_exceeded", "norm_outlier"}
BINS = {"val-hist-pos-a": 20, "val-hist-neg-a": 20, "train-hist-risk": 160}


def registry(tmp_path) -> SiteRegistry:
    names = {**{n: name for n, (name, _) in HONEST.items()}, **ADVERSARIES}
    path = tmp_path / "site-registry.json"
    path.write_text(json.dumps({str(n): name for n, name in names.items()}))
    return SiteRegistry.from_environ({"FEDCT_SITE_REGISTRY": str(path)})


def evaluation(node_id: int, server_round: int) -> dict:
    rng = np.random.default_rng([node_id, server_round, 7])
    n = 4 + node_id
    return {
        "val-loss": float(rng.uniform(0.5, 1.5)),
        "val-n": n,
        "num-examples": n,
        "val-auc-macro": float(rng.uniform(0.4, 0.9)),
        "val-n-events": float("nan"),  # a count under the site's privacy floor
        **{key: [float(c) for c in rng.integers(0, 3, bins)] for key, bins in BINS.items()},
    }


def _received(msg: Message) -> dict[str, torch.Tensor]:
    """The weights a message carries, decoded by the client's own code (once per exchange: messages share content)."""
    cache = _received.__dict__.setdefault("cache", {})
    key = id(msg.content)
    if key not in cache:
        cache.clear()
        cache[key] = (msg.content, received_state(msg.content))
    return cache[key][1]


def _step(node_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed seeded step per node and tensor shape (scaled per round by the caller)."""
    steps = _step.__dict__.setdefault("steps", {})
    if (node_id, shape) not in steps:
        steps[(node_id, shape)] = np.random.default_rng([node_id, *shape]).normal(0, 0.01, shape).astype(np.float32)
    return steps[(node_id, shape)]


def honest_content(
    msg: Message, node_id: int, name: str, examples: int
) -> tuple[RecordDict, dict[str, np.ndarray] | None]:
    """What a site sends: a seeded step from the received weights (packed like the client), metrics, its name."""
    settings = RoundSettings.from_record(dict(msg.content["config"]))
    rng = np.random.default_rng([node_id, settings.server_round])
    if msg.metadata.message_type == MessageType.EVALUATE:
        content = RecordDict({"metrics": MetricRecord(evaluation(node_id, settings.server_round))})
        content["site"] = ConfigRecord({"name": name})
        return content, None
    scale = np.float32(1.0 + 0.1 * (settings.server_round % 7))
    new = {
        k: (v + torch.from_numpy(_step(node_id, tuple(v.shape)) * scale) if v.is_floating_point() else v + 1)
        for k, v in _received(msg).items()
    }
    content = weights_records(new, transport=settings.transport)
    content["metrics"] = MetricRecord(
        {"train-loss": float(rng.uniform(0.2, 1.0)), "train-seconds": 1.5, "num-examples": examples}
    )
    if settings.evaluate_first:
        content[EVALUATION_RECORD] = ConfigRecord(evaluation(node_id, settings.server_round - 1))
    content["site"] = ConfigRecord({"name": name})
    return content, {k: v.numpy() for k, v in new.items()}


# --- the corruptions: each makes a reply the server must reject --------------------------------------------------------


def _index(edit: Callable[[dict], None]) -> Callable:
    def corrupt(content, rng):
        meta = json.loads(content[INDEX_RECORD]["index"])
        edit(meta, rng)
        content[INDEX_RECORD]["index"] = json.dumps(meta)

    return corrupt


def _entry(rng, meta):
    return meta["tensors"][int(rng.integers(len(meta["tensors"])))]


def _buffer(content, rng, change):
    values = content["arrays"]["float32"].numpy().copy()
    content["arrays"]["float32"] = Array(change(values, rng))


def _set_at(values, value, rng):
    values[int(rng.integers(values.size))] = value
    return values


def _metrics(content):
    return content["metrics"]


def _bad_train_values(name):
    return [
        lambda c, r: _metrics(c).__setitem__(name, [0.1, 0.2]),
        lambda c, r: _metrics(c).__setitem__(name, float("inf")),
        lambda c, r: _metrics(c).__setitem__(name, -float("inf")),
        lambda c, r: _metrics(c).__setitem__(name, 1e308),
        lambda c, r: _metrics(c).__setitem__(name, 10**30),
    ]


TRAIN_ONLY = [
    lambda c, r: c.__delitem__("arrays"),
    lambda c, r: c.__delitem__(INDEX_RECORD),
    lambda c, r: c.__setitem__("weights", c.pop("arrays")),
    lambda c, r: c.__setitem__("arrays", ConfigRecord({"float32": [0.0, 1.0]})),
    lambda c, r: c[INDEX_RECORD].__setitem__("arrays-key", "site"),
    lambda c, r: c[INDEX_RECORD].__setitem__("arrays-key", "metrics"),
    lambda c, r: c[INDEX_RECORD].__setitem__("index", c[INDEX_RECORD]["index"][: int(r.integers(1, 200))]),
    lambda c, r: c[INDEX_RECORD].__setitem__("index", 12345),
    lambda c, r: c[INDEX_RECORD].__setitem__("extra", "x"),
    _index(
        lambda m, r: _entry(r, m).__setitem__(1, str(r.choice(["complex256", "object", "float8_e4m3fn", "str", "<U8"])))
    ),
    _index(lambda m, r: _entry(r, m).__setitem__(1, "float64")),
    _index(lambda m, r: _entry(r, m).__setitem__(3, "uint8")),
    _index(lambda m, r: m.__setitem__("transport", str(r.choice(["int4", "float8", "", "float64x"])))),
    _index(lambda m, r: _entry(r, m).__setitem__(2, [int(d) + 1 for d in _entry(r, m)[2]] or [2])),
    _index(lambda m, r: _entry(r, m).__setitem__(2, [-1])),
    _index(lambda m, r: _entry(r, m).__setitem__(4, int(r.integers(-5, 10**6)))),
    _index(lambda m, r: _entry(r, m).__setitem__(5, int(r.integers(0, 10**9)))),
    _index(lambda m, r: _entry(r, m).__setitem__(0, "attacker.weight")),
    _index(lambda m, r: m["tensors"].pop(int(r.integers(len(m["tensors"]))))),
    _index(lambda m, r: m["tensors"].append(list(m["tensors"][0]))),
    _index(lambda m, r: _entry(r, m).__setitem__(4, 1.5)),
    _index(lambda m, r: m.__setitem__("format", "fedct-weights/2")),
    _index(lambda m, r: m.__setitem__("tensors", {"a": 1})),
    lambda c, r: c["arrays"].__setitem__(
        "float32",
        Array(
            dtype="float32",
            shape=(4,),
            stype="numpy.ndarray",
            data=c["arrays"]["float32"].data[: int(r.integers(0, 5000))],
        ),
    ),
    lambda c, r: c["arrays"].__setitem__(
        "float32", Array(dtype="float32", shape=(4,), stype="pickle", data=b"\x80\x04K\x01.")
    ),
    lambda c, r: c["arrays"].__setitem__("float32", Array(c["arrays"]["float32"].numpy().astype(np.float64))),
    lambda c, r: c["arrays"].__setitem__("float32", Array(c["arrays"]["float32"].numpy()[: -int(r.integers(1, 100))])),
    lambda c, r: c["arrays"].__setitem__(
        "float32", Array(np.concatenate([c["arrays"]["float32"].numpy(), np.zeros(3, np.float32)]))
    ),
    lambda c, r: c["arrays"].__setitem__("float32", Array(c["arrays"]["float32"].numpy().reshape(1, -1))),
    lambda c, r: c["arrays"].__setitem__("int64", Array(c["arrays"]["int64"].numpy().astype(np.int32))),
    lambda c, r: c["arrays"].__setitem__("extra", Array(np.zeros(2, np.float32))),
    lambda c, r: _buffer(c, r, lambda v, g: _set_at(v, np.nan, g)),
    lambda c, r: _buffer(c, r, lambda v, g: _set_at(v, np.inf, g)),
    lambda c, r: _buffer(c, r, lambda v, g: _set_at(v, -np.inf, g)),
    lambda c, r: _buffer(c, r, lambda v, g: _set_at(v, np.float32(3e38), g)),
    lambda c, r: _buffer(c, r, lambda v, g: _set_at(v, 1e30, g)),
    lambda c, r: _buffer(c, r, lambda v, g: v * 1e3),
    lambda c, r: _buffer(c, r, lambda v, g: v + g.normal(0, 1.0, v.shape).astype(np.float32)),
    lambda c, r: _metrics(c).__setitem__("num-examples", int(r.choice([-5, 0, -1]))),
    lambda c, r: _metrics(c).__setitem__(
        "num-examples", float(r.choice([2.5, float("nan"), float("inf"), -1e12, 1e-3]))
    ),
    lambda c, r: _metrics(c).__setitem__("num-examples", [5, 6]),
    lambda c, r: _metrics(c).__delitem__("num-examples"),
    *_bad_train_values("train-loss"),
    lambda c, r: c.__setitem__(EVALUATION_RECORD, ConfigRecord({"val-loss": 0.3, "num-examples": 4})),  # not asked for
]

COMMON = [
    lambda c, r: c.__delitem__("metrics"),
    lambda c, r: c.__delitem__("site"),
    lambda c, r: c.__setitem__("metrics", ConfigRecord(dict(c["metrics"].items()))),
    lambda c, r: c.__setitem__("stats", c.pop("metrics")),
    lambda c, r: c.__setitem__("site", MetricRecord({"name": 1.0})),
    lambda c, r: c.__setitem__("site", ConfigRecord({"name": "site-a"})),  # another registered site's name
    lambda c, r: c.__setitem__("site", ConfigRecord({"name": "Anna Müller, born 1950"})),
    lambda c, r: c.__setitem__("site", ConfigRecord({"name": ["site-d"]})),
    lambda c, r: c["site"].__setitem__("comment", "hello"),
    lambda c, r: c.__setitem__("notes", ConfigRecord({"text": "patient 12345"})),
    lambda c, r: c.__setitem__("more", ArrayRecord({"x": Array(np.zeros(2, np.float32))})),
    lambda c, r: _metrics(c).__setitem__("Patient Anna Müller", 1.0),
    lambda c, r: _metrics(c).__setitem__("val-" + "x" * 200, 1.0),
    lambda c, r: _metrics(c).__setitem__("num-examples", float(r.choice([float("nan"), -3.0, 1.25]))),
]

EVALUATE_ONLY = [
    *_bad_train_values("val-loss"),
    lambda c, r: _metrics(c).__setitem__("val-hist-pos-a", [1.0] * int(r.choice([0 + 7, 19, 21, 33]))),
    lambda c, r: _metrics(c).__setitem__("train-hist-risk", [1.0] * int(r.choice([1, 80, 161]))),
    lambda c, r: _metrics(c).__setitem__("val-hist-neg-a", 3.0),
    lambda c, r: _metrics(c).__setitem__("val-hist-neg-a", [1.0] * 19 + [float("nan")]),
    lambda c, r: _metrics(c).__setitem__("val-hist-neg-a", [1.0] * 19 + [-4.0]),
    lambda c, r: _metrics(c).__setitem__("val-hist-neg-a", [1.0] * 5000),
    lambda c, r: _metrics(c).__setitem__("val-n", float(r.choice([-1.0, 2.5, float("inf")]))),
    lambda c, r: c.__setitem__("arrays", ArrayRecord({"x": Array(np.zeros(2, np.float32))})),
    lambda c, r: c.__setitem__(EVALUATION_RECORD, ConfigRecord({"val-loss": 0.3})),
]


def _fused(change: Callable[[ConfigRecord, np.random.Generator], None]) -> Callable:
    def corrupt(content, rng):
        if (
            EVALUATION_RECORD not in content
        ):  # round 1 of a fused run asks for no evaluation: corrupt the metrics instead
            _metrics(content)["train-loss"] = [1.0, 2.0]
            return
        change(content[EVALUATION_RECORD], rng)

    return corrupt


FUSED_ONLY = [
    _fused(lambda e, r: e.__setitem__("val-loss", str(r.choice(["low", "", "0.5"])))),
    _fused(lambda e, r: e.__setitem__("val-loss", b"\x00\x01")),
    _fused(lambda e, r: e.__setitem__("val-loss", bool(r.integers(2)))),
    _fused(lambda e, r: e.__setitem__("val-loss", [0.1, 0.2])),
    _fused(lambda e, r: e.__setitem__("val-loss", float(r.choice([np.inf, -np.inf, 1e300])))),
    _fused(lambda e, r: e.__setitem__("val-hist-pos-a", [1.0] * int(r.choice([3, 40])))),
    _fused(lambda e, r: e.__setitem__("val-hist-pos-a", ["a"] * 20)),
    _fused(lambda e, r: e.__setitem__("num-examples", -2)),
    _fused(lambda e, r: e.__setitem__("Name of the patient", 1.0)),
    lambda c, r: c.__setitem__(EVALUATION_RECORD, MetricRecord({"val-loss": 0.3, "num-examples": 4})),
]


class SiteGrid:
    """A grid whose nodes answer each message at once with real Flower Messages (see the module docstring)."""

    def __init__(self, seed: int, *, fused: bool) -> None:
        self.rng = np.random.default_rng(seed)
        self.fused = fused
        self.ids = count(1)
        self.replies: dict[str, Message] = {}
        #: per exchange: {node id: (arrays, num-examples)} of the honest train replies
        self.honest: list[dict[int, tuple[dict[str, np.ndarray], int]]] = []
        self.corrupted: list[tuple[int, str]] = []  # (node id, message type) of every corrupted reply sent
        self.kinds: set[str] = set()

    def get_node_ids(self) -> list[int]:
        return [*HONEST, *ADVERSARIES, UNREGISTERED]

    def push_messages(self, messages) -> list[str]:
        ids = []
        honest: dict[int, tuple[dict[str, np.ndarray], int]] = {}
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = message_id = f"m{next(self.ids)}"
            ids.append(message_id)
            self.replies[message_id] = self._answer(msg, honest)
        if honest:
            self.honest.append(honest)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _answer(self, msg: Message, honest: dict) -> Message:
        node_id, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        if node_id in HONEST:
            name, examples = HONEST[node_id]
            content, arrays = honest_content(msg, node_id, name, examples)
            if kind == MessageType.TRAIN:
                honest[node_id] = (arrays, examples)
            return self._wire(Message(content, reply_to=msg))
        name = ADVERSARIES.get(node_id, "site-z")
        content, _ = honest_content(msg, node_id, name, 7)
        self.corrupted.append((node_id, kind))
        if node_id == UNREGISTERED:  # a well-formed reply from a node the registry does not know
            return self._wire(Message(content, reply_to=msg))
        if self.rng.random() < 0.04:
            return self._wire(
                Message(
                    Error(code=int(self.rng.integers(0, 10)), reason="Traceback: /data/Anna_Mueller/ct.dcm"),
                    reply_to=msg,
                )
            )
        choices = COMMON + (
            EVALUATE_ONLY if kind == MessageType.EVALUATE else TRAIN_ONLY + (FUSED_ONLY if self.fused else [])
        )
        pick = int(self.rng.integers(len(choices)))
        choices[pick](content, self.rng)
        self.kinds.add(f"{kind}:{pick}")
        return self._wire(Message(content, reply_to=msg))

    @staticmethod
    def _wire(reply: Message) -> Message:
        """The reply as the SuperLink would deliver it (Flower's protobuf), or as it is where protobuf cannot carry it."""
        try:
            back = message_from_proto(message_to_proto(reply))
        except Exception:  # noqa: BLE001 - e.g. an int beyond int64: in-process (simulation) it still arrives
            return reply
        back.metadata.__dict__["_reply_to_message_id"] = reply.metadata.reply_to_message_id
        return back


def expected_aggregate(honest: dict[int, tuple[dict[str, np.ndarray], int]], reference: dict[str, np.ndarray]) -> dict:
    total = sum(n for _, n in honest.values())
    out = {}
    for key, ref in reference.items():
        mean = sum(arrays[key].astype(np.float64) * n for arrays, n in honest.values()) / total
        out[key] = (np.rint(mean) if ref.dtype.kind in "iub" else mean).astype(ref.dtype)
    return out


def run_fuzzed_rounds(tmp_path, *, fused: bool, rounds: int, seed: int):
    config = ServerConfig(
        model_name="smallcnn",
        min_sites=3,
        max_update_norm=50.0,
        round_timeout_s=5.0,
        evaluate_mode="fused" if fused else "separate",
    )
    arrays = initial_arrays(config)
    grid = SiteGrid(seed, fused=fused)
    loop = RoundLoop(
        grid,
        build_strategy(config),
        config=config,
        reference=arrays,
        buffers=buffer_keys(build_model(config.model)),
        poll_s=0.01,
        registry=registry(tmp_path),
    )
    reports = []
    for server_round in range(1, rounds + 1):
        train = ConfigRecord(config.round_settings(server_round, evaluate_first=fused and server_round > 1).to_record())
        report = loop.run_round(
            server_round, arrays, train, ConfigRecord(config.round_settings(server_round).to_record())
        )
        honest = grid.honest[-1]
        assert set(honest) == set(HONEST)
        assert report.aggregated and report.skip_reason is None, (server_round, report.skip_reason, report.rejected)
        expected = expected_aggregate(honest, arrays)
        for key in arrays:
            np.testing.assert_allclose(
                report.arrays[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=f"round {server_round} {key}"
            )
        assert sorted(report.train_sites) == ["site-a", "site-b", "site-c"]
        assert [report.train_sites[HONEST[n][0]]["num-examples"] for n in HONEST] == [HONEST[n][1] for n in HONEST]
        evaluated = report.previous_evaluate_sites if fused else report.evaluate_sites
        if not fused or server_round > 1:
            # a site whose reply passed the gate but whose update failed the update checks (NaN, huge, norm) still
            # evaluated the global model (fused): its evaluation counts, as with a separate evaluate exchange
            update_only = {r["site"] for r in report.rejected if r["code"] in UPDATE_CODES} if fused else set()
            assert set(evaluated) - update_only == {"site-a", "site-b", "site-c"}, (server_round, report.rejected)
        reports.append(report)
        arrays = report.arrays
    if fused:
        reports.append(loop.evaluate_global(rounds, arrays, ConfigRecord(config.round_settings(rounds).to_record())))
        assert sorted(reports[-1].evaluate_sites) == ["site-a", "site-b", "site-c"]
    return grid, reports


def check_every_corrupted_reply_rejected(grid: SiteGrid, reports) -> int:
    rejected = [r for report in reports for r in report.rejected]
    assert len(rejected) == len(grid.corrupted)  # one entry per corrupted reply, none for the honest sites
    names = {**ADVERSARIES, UNREGISTERED: f"node-{UNREGISTERED}"}
    for entry in rejected:
        assert set(entry) == {"node_id", "site", "code", "reason"} and entry["code"] in CODES
        assert entry["site"] == names[entry["node_id"]]  # the registry's name, never the one the reply claimed
        assert (
            "Anna" not in entry["reason"]
            and "Müller" not in entry["reason"]
            and "patient" not in entry["reason"].lower()
        )
    assert all(e["code"] == "unregistered_node" for e in rejected if e["node_id"] == UNREGISTERED)
    assert all(report.missing == [] for report in reports)
    return len(rejected)


def test_fuzzed_replies_never_abort_a_round_nor_change_the_honest_aggregate(tmp_path, server_task_identity):
    grid, reports = run_fuzzed_rounds(tmp_path, fused=False, rounds=50, seed=16)
    total = check_every_corrupted_reply_rejected(grid, reports)
    codes = {r["code"] for report in reports for r in report.rejected}
    assert total >= 300 and len(grid.kinds) >= 60, (total, len(grid.kinds))
    assert codes >= {
        "unregistered_node",
        "site_name_mismatch",
        "bad_site_name",
        "malformed_reply",
        "bad_index",
        "unknown_dtype",
        "shape_mismatch",
        "size_mismatch",
        "dtype_mismatch",
        "malformed_weights",
        "non_finite",
        "huge_value",
        "norm_exceeded",
        "bad_metric",
        "bad_num_examples",
        "bad_histogram",
    }, codes


def test_fuzzed_fused_evaluations_are_rejected_with_their_reply(tmp_path, server_task_identity):
    grid, reports = run_fuzzed_rounds(tmp_path, fused=True, rounds=30, seed=5)
    total = check_every_corrupted_reply_rejected(grid, reports)
    assert total >= 90
    assert any(
        k.startswith(f"{MessageType.TRAIN}:") and int(k.split(":")[1]) >= len(COMMON) + len(TRAIN_ONLY)
        for k in grid.kinds
    )


# --- num-examples cannot take over the aggregate ----------------------------------------------------------------------


class ClaimGrid(SiteGrid):
    """Honest sites, one of which (node 3) claims ``claims[round]`` training studies."""

    def __init__(self, claims: dict[int, float]) -> None:
        super().__init__(0, fused=False)
        self.claims = claims

    def get_node_ids(self) -> list[int]:
        return list(HONEST)

    def _answer(self, msg, honest):
        node_id = msg.metadata.dst_node_id
        name, examples = HONEST[node_id]
        server_round = int(msg.content["config"]["server-round"])
        claimed = self.claims.get(server_round, examples) if node_id == 3 else examples
        content, arrays = honest_content(msg, node_id, name, examples)
        if msg.metadata.message_type == MessageType.TRAIN:
            content["metrics"]["num-examples"] = claimed
            honest[node_id] = (arrays, examples)
        return Message(content, reply_to=msg)


def test_a_site_claiming_huge_counts_is_clipped_and_recorded(tmp_path, server_task_identity):
    config = ServerConfig(model_name="smallcnn", min_sites=3, max_site_examples=40, round_timeout_s=5.0)
    arrays = initial_arrays(config)
    grid = ClaimGrid({1: 10**12, 2: 10**12})
    loop = RoundLoop(grid, build_strategy(config), config=config, reference=arrays, poll_s=0.01)
    settings = [ConfigRecord(config.round_settings(r).to_record()) for r in (1, 2)]
    first = loop.run_round(1, arrays, settings[0], settings[0])
    weights = {n: (a, 40 if n == 3 else e) for n, (a, e) in grid.honest[-1].items()}  # site-c's weight: the bound
    expected = expected_aggregate(weights, arrays)
    assert all(np.allclose(first.arrays[k], expected[k], rtol=1e-5, atol=1e-6) for k in arrays)
    assert first.clipped == [
        {
            "node_id": 3,
            "site": "site-c",
            "metric": "num-examples",
            "claimed": 1e12,
            "used": 40.0,
            "bound": "max-site-examples",
        }
    ]
    assert first.train_sites["site-c"]["num-examples"] == 40.0 and first.rejected == []

    # growth: honest in round 1 (13), then 10x as many: clipped to 2x the first count
    grid = ClaimGrid({2: 130})
    loop = RoundLoop(grid, build_strategy(config), config=config, reference=arrays, poll_s=0.01)
    loop.run_round(1, arrays, settings[0], settings[0])
    second = loop.run_round(2, arrays, settings[1], settings[1])
    assert [(c["claimed"], c["used"]) for c in second.clipped] == [(130, 40.0), (40.0, 26.0)]  # the bound, then growth
    assert second.clipped[-1]["bound"] == "2x the site's first count 13"
    weights = {n: (a, 26 if n == 3 else e) for n, (a, e) in grid.honest[-1].items()}
    expected = expected_aggregate(weights, arrays)
    assert all(np.allclose(second.arrays[k], expected[k], rtol=1e-5, atol=1e-6) for k in arrays)


def test_run_federation_records_rejections_and_clipping_in_metrics_json(tmp_path, server_task_identity):
    config = ServerConfig(
        model_name="smallcnn",
        min_sites=3,
        max_update_norm=50.0,
        round_timeout_s=5.0,
        num_server_rounds=2,
        run_dir=str(tmp_path / "run"),
    )
    grid = SiteGrid(3, fused=False)
    run_federation(grid, config, build_strategy(config), poll_s=0.01, registry=registry(tmp_path))
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [r["skipped"] for r in rounds] == [False, False]
    for entry in rounds:
        assert sorted(entry["train"]["sites"]) == sorted(entry["evaluate"]["sites"]) == ["site-a", "site-b", "site-c"]
        assert {r["node_id"] for r in entry["rejected_updates"]} == {4, 5, UNREGISTERED}
        assert all(r["code"] in CODES for r in entry["rejected_updates"]) and entry["clipped_examples"] == []
        assert len(entry["evaluate"]["aggregate"]["val-hist-pos-a"]) == 20
    card = json.loads((tmp_path / "run" / "model" / "final" / "model.json").read_text())
    assert card["provenance"]["sites"] == ["site-a", "site-b", "site-c"]
    state = json.loads((tmp_path / "run" / "state" / "state.json").read_text())
    assert state["extra"]["first_examples"] == {"site-a": 5.0, "site-b": 9.0, "site-c": 13.0}
    assert state["extra"]["histogram_bins"] == BINS


def test_a_reply_without_registry_keeps_the_name_it_gives_but_only_a_site_name(server_task_identity):
    config = ServerConfig(model_name="smallcnn", min_sites=1, round_timeout_s=5.0)
    arrays = initial_arrays(config)
    loop = RoundLoop(ClaimGrid({}), build_strategy(config), config=config, reference=arrays, poll_s=0.01)
    settings = ConfigRecord(config.round_settings(1).to_record())
    report = loop.run_round(1, arrays, settings, settings)
    assert sorted(report.train_sites) == ["site-a", "site-b", "site-c"] and report.rejected == []
    assert math.isnan(report.evaluate_sites["site-a"]["val-n-events"])

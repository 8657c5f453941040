"""The round loop in real Flower simulations (Ray backend) on tiny synthetic DICOM sites.

Every strategy runs a federation; updates with NaNs or scaled by 1e3 are rejected; a round with too few sites is
skipped without hanging and a site that fails is used again next round; a run stopped after k rounds and resumed
matches an uninterrupted one; resume refuses a state written under another run config. ``evaluate-mode = "fused"``
gives the same run as ``separate`` with fewer messages, resumes, and records a missing evaluation of the previous round.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from federation import TINY_RUN_CONFIG, tiny_federation
from flwr.simulation import run_simulation

from fedct.demo import simulation_backend_config
from fl_client.client_app import build_client_app
from fl_server.checkpoint import RunState, load_run_state, save_run_state
from fl_server.config import STRATEGIES, ServerConfig
from fl_server.privacy import privacy_round_extras, wrap_strategy
from fl_server.rounds import RoundLoop, initial_arrays, run_federation
from fl_server.strategy import build_strategy, load_strategy_state

SPLIT = {"val-fraction": 0.3, "test-fraction": 0.3}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    # 6 validation and 6 test studies per site (SPLIT): at least the sites' privacy floor k = 5, below which a site
    # sends no validation metric (fl_client.metrics)
    tiny_federation(root / "data", sites=4, patients_per_site=20, seed=3)
    return root


class CountingGrid:
    """The ServerApp's grid, counting the messages pushed per run (``counts[name]``), as bench/federation.py does."""

    def __init__(self, grid, counts: dict, name: str) -> None:
        self._grid, self._counts, self._name = grid, counts, name

    def push_messages(self, messages):
        messages = list(messages)
        self._counts[self._name] = self._counts.get(self._name, 0) + len(messages)
        return self._grid.push_messages(messages)

    def __getattr__(self, name):
        return getattr(self._grid, name)


def simulate(federation: Path, steps, *, sites: int, mods=(), counts: dict | None = None) -> None:
    """One Flower simulation (Ray backend) whose ServerApp runs ``steps`` in turn on the same sites: a step is
    ``(name, run config[, round_extras])`` (a whole federation, run folder ``runs/<name>``) or a callable (between runs).
    The strategy is built as the ServerApp builds it (DP wrapper when dp-mode asks); ``counts`` collects the number
    of messages sent per run name.

    Several federations per simulation: Ray and the sites' ClientApps start once (a minute on 2 cores).
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        for step in steps:
            if callable(step):
                step()
                continue
            name, config, *extras = step
            run_config = {
                **TINY_RUN_CONFIG,
                **SPLIT,
                "num-server-rounds": 1,
                "min-sites": sites,
                "run-dir": str(run_dir(federation, name)),
                **config,
            }
            server_config = ServerConfig.from_run_config(run_config)
            strategy = wrap_strategy(
                build_strategy(server_config), server_config.privacy, expected_sites=server_config.min_sites
            )
            run_grid = grid if counts is None else CountingGrid(grid, counts, name)
            round_extras = extras[0] if extras else privacy_round_extras(strategy)
            run_federation(run_grid, server_config, strategy, round_extras=round_extras)

    run_simulation(
        server_app=app,
        client_app=build_client_app(
            {"sim-data-root": str(federation / "data"), "sim-work-root": str(federation / "work")}, mods=list(mods)
        ),
        num_supernodes=sites,
        backend_config=simulation_backend_config(),
    )


def run_dir(federation: Path, name: str) -> Path:
    return federation / "runs" / name


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint(run_dir: Path, server_round: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"round-{server_round:03d}.pt", weights_only=True)


def partition_mod(action, flag: Path):
    """A client mod applying ``action(partition_id, msg, reply)`` to every train reply (in place) before it leaves,
    while the file ``flag`` exists (the ServerApp's steps switch it: the sites run in other processes)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content() and flag.exists():
            action(int(context.node_config["partition-id"]), msg, reply)
        return reply

    return mod


def switch(flag: Path, on: bool):
    return lambda: flag.touch() if on else flag.unlink(missing_ok=True)


# --- every strategy -------------------------------------------------------------------------------------------------

STRATEGY_RUNS = [(name, "float32") for name in STRATEGIES] + [("fedavg", "float16")]


@pytest.fixture(scope="module")
def strategy_runs(federation):
    """One round of every strategy (and of fedavg with float16 transport) on three sites, one simulation."""
    steps = [(f"{s}-{t}", {"strategy": s, "transport": t}) for s, t in STRATEGY_RUNS]
    steps.append(("fedbn", {"bn-mode": "local", "num-server-rounds": 2}))
    simulate(federation, steps, sites=3)
    return {(s, t): run_dir(federation, f"{s}-{t}") for s, t in STRATEGY_RUNS}


@pytest.mark.parametrize(("strategy", "transport"), STRATEGY_RUNS, ids=[f"{s}-{t}" for s, t in STRATEGY_RUNS])
def test_every_strategy_trains_a_federation(strategy_runs, strategy, transport):
    folder = strategy_runs[(strategy, transport)]
    entry = metrics(folder)["rounds"][0]
    assert entry["round"] == 1 and entry["skipped"] is False and entry["rejected_updates"] == []
    assert sorted(entry["train"]["sites"]) == ["site-0", "site-1", "site-2"]
    assert sorted(entry["evaluate"]["sites"]) == ["site-0", "site-1", "site-2"]
    assert math.isfinite(entry["evaluate"]["aggregate"]["val-loss"])
    initial, final = checkpoint(folder, 0), checkpoint(folder, 1)
    assert set(initial) == set(final) and all(final[k].dtype == initial[k].dtype for k in initial)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert any(not torch.equal(initial[k], final[k]) for k in initial if initial[k].is_floating_point())
    # Bytes per round: 3 train + 3 evaluate messages carry the model out, 3 train replies carry it back.
    scale = 0.5 if transport == "float16" else 1.0
    model_bytes = sum(v.numel() * v.element_size() for v in initial.values())
    assert entry["bytes_sent"] >= 6 * model_bytes * scale * 0.99
    assert entry["bytes_received"] >= 3 * model_bytes * scale * 0.99
    meta = json.loads((folder / "model" / "final" / "model.json").read_text())
    assert meta["provenance"]["run_config"]["strategy"] == strategy


def test_float16_transport_halves_the_bytes_of_a_round(strategy_runs):
    rounds = {t: metrics(strategy_runs[("fedavg", t)])["rounds"][0] for t in ("float32", "float16")}
    for key in ("bytes_sent", "bytes_received"):
        assert 0.45 < rounds["float16"][key] / rounds["float32"][key] < 0.55
    losses = [rounds[t]["evaluate"]["aggregate"]["val-loss"] for t in ("float32", "float16")]
    assert abs(losses[0] - losses[1]) < 0.05  # same training, weights rounded on the wire


def test_fedbn_sites_keep_their_norm_layers_and_the_bundle_carries_their_average(federation, strategy_runs):
    from models.factory import build_model, norm_state_keys

    folder = run_dir(federation, "fedbn")
    rounds = metrics(folder)["rounds"]
    assert [r["skipped"] for r in rounds] == [False, False]
    local = {
        site: torch.load(next((federation / "work" / site / "fedbn").glob("*.pt")), weights_only=True)
        for site in ("site-0", "site-1", "site-2")
    }
    keys = norm_state_keys(build_model(ServerConfig(model_name="smallcnn").model))
    assert all(set(state) == keys for state in local.values())
    assert any(not torch.equal(local["site-0"][k], local["site-1"][k]) for k in keys)  # each site has its own
    weights = {site: m["num-examples"] for site, m in rounds[-1]["train"]["sites"].items()}
    final = checkpoint(folder, 2)
    for key in keys:
        if final[key].is_floating_point():
            average = sum(weights[s] * local[s][key].double() for s in local) / sum(weights.values())
            assert torch.allclose(final[key].double(), average, atol=1e-5), key


# --- poisoned updates -------------------------------------------------------------------------------------------------


def poison(partition: int, _msg, reply) -> None:
    """Site 2 sends NaNs, site 3 weights scaled by 1e3 (the reply's packed float32 buffer; 1e6 would already be
    refused by the magnitude bound of fl_server.validation, whatever the z-score)."""
    from flwr.app import Array

    if partition in (2, 3):
        values = reply.content["arrays"]["float32"].numpy().copy()
        values[:] = np.nan if partition == 2 else values * 1e3
        reply.content["arrays"]["float32"] = Array(values)


def test_nan_and_scaled_updates_are_rejected_and_the_model_matches_a_clean_run(federation):
    flag = federation / "poison-on"
    settings = {"num-server-rounds": 2, "update-zscore": 5.0, "min-sites": 2}
    steps = [
        ("clean-4", settings),
        switch(flag, True),
        ("attacked-4", settings),
        ("undefended-4", {**settings, "update-zscore": 0.0}),
        switch(flag, False),
    ]
    simulate(federation, steps, sites=4, mods=[partition_mod(poison, flag)])
    clean, attacked = metrics(run_dir(federation, "clean-4")), metrics(run_dir(federation, "attacked-4"))
    assert all(entry["rejected_updates"] == [] for entry in clean["rounds"])
    for entry in attacked["rounds"]:
        assert entry["skipped"] is False
        reasons = {r["site"]: r["reason"] for r in entry["rejected_updates"]}
        assert set(reasons) == {"site-2", "site-3"}, reasons
        assert "non-finite" in reasons["site-2"] and "robust SDs above" in reasons["site-3"]
        assert {r["site"]: r["code"] for r in entry["rejected_updates"]} == {
            "site-2": "non_finite",
            "site-3": "norm_outlier",
        }
        assert all(isinstance(r["node_id"], int) for r in entry["rejected_updates"])
        assert sorted(entry["train"]["sites"]) == ["site-0", "site-1"]
        assert sorted(entry["evaluate"]["sites"]) == ["site-0", "site-1", "site-2", "site-3"]
    final = checkpoint(run_dir(federation, "attacked-4"), 2)
    assert all(torch.isfinite(v).all() and v.abs().max() < 100 for v in final.values() if v.is_floating_point())

    # Quality on all sites' validation and test studies (~48): cross-entropy of the attacked run's model within noise
    # of the clean run's (an untrained model scores ln 3 = 1.10; run-to-run spread at this size is about 0.2).
    def loss(run):
        agg = run["rounds"][-1]["evaluate"]["aggregate"]
        return (agg["val-loss"] * agg["val-n"] + agg["test-loss"] * agg["test-n"]) / (agg["val-n"] + agg["test-n"])

    assert math.isfinite(loss(attacked)) and abs(loss(attacked) - loss(clean)) < 0.35, (loss(attacked), loss(clean))
    # Without the z-score (NaNs are always refused) the 1e3-scaled update enters the average and ruins the model.
    undefended = checkpoint(run_dir(federation, "undefended-4"), 2)
    assert max(float(v.abs().max()) for v in undefended.values() if v.is_floating_point()) > 1e2


# --- two sites: dropout and resume, one simulation ----------------------------------------------------------------------


def fail_first_round(partition: int, msg, reply) -> None:
    if partition == 1 and int(msg.content["config"]["server-round"]) == 1:
        raise RuntimeError("site-1 lost its GPU")


ADAM = {"strategy": "fedadam", "server-learning-rate": 0.01}


@pytest.fixture(scope="module")
def two_site_runs(federation):
    flag = federation / "fail-on"
    stray = {}

    def crash_leftovers():
        """What a crash in the middle of writing the state leaves behind; the round-1 checkpoint before resuming."""
        state = run_dir(federation, "adam-resumed") / "state"
        (state / "state.json.tmp").write_text('{"round": 99, "half-written')
        (state / "round-003.npz.tmp").write_bytes(b"PK\x03\x04 truncated")
        stray["round_one"] = checkpoint(run_dir(federation, "adam-resumed"), 1)
        stray["saved"] = load_run_state(state)

    steps = [
        (
            "too-few",
            {"min-sites": 3, "round-timeout-s": 2.0, "num-server-rounds": 2},
            lambda report: {"extra-probe": report.server_round * 10},
        ),
        switch(flag, True),
        ("site-fails", {"num-server-rounds": 2}),
        switch(flag, False),
        ("adam-straight", {**ADAM, "num-server-rounds": 3}),
        ("adam-resumed", {**ADAM, "num-server-rounds": 2}),
        crash_leftovers,
        ("adam-resumed", {**ADAM, "num-server-rounds": 3, "resume": True}),
    ]
    simulate(federation, steps, sites=2, mods=[partition_mod(fail_first_round, flag)])
    return stray


def test_rounds_without_enough_sites_are_skipped_without_hanging(federation, two_site_runs):
    folder = run_dir(federation, "too-few")
    rounds = metrics(folder)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert (
            entry["skipped"] is True
            and "only 2 site(s) connected" in entry["skip_reason"]
            and "min-sites=3" in entry["skip_reason"]
        )
        assert entry["train"]["sites"] == {} and entry["bytes_sent"] == 0
        assert entry["extra-probe"] == entry["round"] * 10  # run_federation(round_extras=...) adds fields
    initial, last = checkpoint(folder, 0), checkpoint(folder, 2)
    assert all(torch.equal(initial[k], last[k]) for k in initial)
    assert (folder / "model" / "final" / "model.pt").is_file()


def test_a_failed_site_skips_the_round_and_is_used_again_when_back(federation, two_site_runs):
    folder = run_dir(federation, "site-fails")
    first, second = metrics(folder)["rounds"]
    assert first["skipped"] is True and "1 valid update(s), fewer than min-sites=2" in first["skip_reason"]
    assert len(first["rejected_updates"]) == 1 and "error reply" in first["rejected_updates"][0]["reason"]
    assert all(torch.equal(checkpoint(folder, 0)[k], checkpoint(folder, 1)[k]) for k in checkpoint(folder, 0))
    assert second["skipped"] is False and sorted(second["train"]["sites"]) == ["site-0", "site-1"]


def test_resume_continues_numbering_and_strategy_state_like_an_uninterrupted_run(federation, two_site_runs):
    straight, resumed = run_dir(federation, "adam-straight"), run_dir(federation, "adam-resumed")
    saved = two_site_runs["saved"]  # the state after round 2, read with the crash leftovers beside it
    assert saved.server_round == 2 and set(saved.strategy_arrays) >= {"m_t", "v_t"}
    restored = build_strategy(ServerConfig(strategy="fedadam"))
    load_strategy_state(restored, saved.strategy_scalars, saved.strategy_arrays)
    for attr in ("m_t", "v_t"):
        moments = saved.strategy_arrays[attr]
        assert all(np.array_equal(getattr(restored, attr)[k], moments[k]) for k in moments)
    assert [r["round"] for r in metrics(resumed)["rounds"]] == [1, 2, 3]
    assert [r["round"] for r in metrics(straight)["rounds"]] == [1, 2, 3]
    round_one = two_site_runs["round_one"]
    assert all(torch.equal(round_one[k], checkpoint(resumed, 1)[k]) for k in round_one)  # round 1 not repeated
    a, b = checkpoint(straight, 3), checkpoint(resumed, 3)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-4, worst  # same rounds, same moments: the same model up to summation order
    assert load_run_state(resumed / "state").server_round == 3


def test_resume_refuses_a_state_written_under_another_run_config(tmp_path):
    saved = ServerConfig(strategy="fedadam", model_name="smallcnn", run_dir=str(tmp_path))
    arrays = initial_arrays(saved)
    save_run_state(
        tmp_path / "state",
        RunState(
            server_round=2,
            global_arrays=arrays,
            strategy_scalars={},
            strategy_arrays={},
            run_log={"rounds": [], "best": None},
            run_config=saved.to_run_config(),
            extra={},
        ),
    )
    now = ServerConfig(
        strategy="fedavg", model_name="smallcnn", run_dir=str(tmp_path), resume=True, num_server_rounds=5
    )
    with pytest.raises(ValueError, match=r"cannot resume .*strategy: 'fedadam' \(saved\) vs 'fedavg' \(now\)"):
        run_federation(None, now, build_strategy(now))  # refused before any node is contacted


def test_resume_refuses_a_changed_evaluate_mode(tmp_path):
    saved = ServerConfig(model_name="smallcnn", run_dir=str(tmp_path))
    save_run_state(
        tmp_path / "state",
        RunState(
            server_round=1,
            global_arrays=initial_arrays(saved),
            strategy_scalars={},
            strategy_arrays={},
            run_log={"rounds": [], "best": None},
            run_config=saved.to_run_config(),
            extra={},
        ),
    )
    now = ServerConfig(model_name="smallcnn", run_dir=str(tmp_path), resume=True, evaluate_mode="fused")
    with pytest.raises(ValueError, match=r"evaluate-mode: 'separate' \(saved\) vs 'fused' \(now\)"):
        run_federation(None, now, build_strategy(now))


# --- evaluate-mode = "fused": two sites, one simulation -------------------------------------------------------------------

FUSED = {"evaluate-mode": "fused"}


def drop_evaluation(partition: int, msg, reply) -> None:
    """Site 1 answers round 2's training without the evaluation it was asked for (e.g. an older site)."""
    if partition == 1 and int(msg.content["config"]["server-round"]) == 2:
        del reply.content["evaluate"]


@pytest.fixture(scope="module")
def fused_runs(federation):
    flag = federation / "drop-evaluation-on"
    counts: dict[str, int] = {}
    steps = [
        ("separate-3", {"num-server-rounds": 3}),
        ("fused-3", {**FUSED, "num-server-rounds": 3}),
        ("fused-resumed", {**FUSED, "num-server-rounds": 2}),
        ("fused-resumed", {**FUSED, "num-server-rounds": 3, "resume": True}),
        switch(flag, True),
        ("fused-no-eval", {**FUSED, "num-server-rounds": 2}),
        switch(flag, False),
        (
            "fused-dp",
            {
                **FUSED,
                "num-server-rounds": 2,
                "model-norm": "group",
                "dp-mode": "server-fixed",
                "dp-noise-multiplier": 1.0,
                "dp-clipping-norm": 0.05,
                "dp-delta": 1e-4,
            },
        ),
    ]
    simulate(federation, steps, sites=2, mods=[partition_mod(drop_evaluation, flag)], counts=counts)
    return counts


def _evaluations(folder: Path) -> list[dict]:
    return [entry["evaluate"] for entry in metrics(folder)["rounds"]]


def test_fused_evaluation_gives_the_same_run_with_fewer_messages(federation, fused_runs):
    separate, fused = run_dir(federation, "separate-3"), run_dir(federation, "fused-3")
    a, b = metrics(separate), metrics(fused)
    assert [r["round"] for r in a["rounds"]] == [r["round"] for r in b["rounds"]] == [1, 2, 3]
    for r in range(4):  # same weights after every round: the evaluation before training changes nothing in training
        x, y = checkpoint(separate, r), checkpoint(fused, r)
        assert all(torch.equal(x[k], y[k]) for k in x), r
    # The same evaluation of the same weights (deterministic): identical metrics per site and aggregated, every round
    assert _evaluations(separate) == _evaluations(fused)
    assert all(sorted(e["sites"]) == ["site-0", "site-1"] for e in _evaluations(fused))

    def losses(run):  # training metrics without the wall-clock train-seconds and the campaign's new-study count
        skip = ("train-seconds", "train-new-studies")  # the second run on the same sites has no new studies
        return [
            {site: {k: v for k, v in m.items() if k not in skip} for site, m in r["train"]["sites"].items()}
            for r in run["rounds"]
        ]

    assert losses(a) == losses(b)
    assert all(r["evaluation_missing"] is None for r in b["rounds"])
    assert a["best_round"] == b["best_round"] and a["best_round"]["round"] in (1, 2, 3)
    for bundle in ("best", "final"):
        x = torch.load(separate / "model" / bundle / "model.pt", weights_only=True)
        y = torch.load(fused / "model" / bundle / "model.pt", weights_only=True)
        assert all(torch.equal(x[k], y[k]) for k in x), bundle
    # Messages: separate 2 train + 2 evaluate per round; fused 2 train per round + 2 evaluate after the last round;
    # both then 2 calibration messages per calibrated model (best and final, once when they are the same round),
    calibrated = {
        name: {c["round"] for c in m["calibration"].values() if c.get("temperature")}
        for name, m in (("separate", a), ("fused", b))
    }
    assert calibrated["separate"] == calibrated["fused"] and calibrated["fused"]
    # and 2 out-of-distribution exchanges (moments, distances) of 2 messages per model (fl_server.ood)
    referenced = {c["round"] for c in b["ood"].values() if c.get("threshold")}
    assert referenced == {c["round"] for c in a["ood"].values() if c.get("threshold")} and referenced
    assert fused_runs["separate-3"] == 12 + 2 * len(calibrated["fused"]) + 4 * len(referenced)
    assert fused_runs["fused-3"] == 8 + 2 * len(calibrated["fused"]) + 4 * len(referenced)
    model_bytes = sum(v.numel() * v.element_size() for v in checkpoint(fused, 0).values())
    sent = {name: [r["bytes_sent"] for r in m["rounds"]] for name, m in (("separate", a), ("fused", b))}
    assert sent["separate"][0] >= 4 * model_bytes * 0.99 and sent["fused"][0] < 2.1 * model_bytes
    assert sent["fused"][2] >= 4 * model_bytes * 0.99  # the last round's evaluate exchange counts for round 3
    assert sum(sent["fused"]) < 0.7 * sum(sent["separate"])
    assert load_run_state(fused / "state").server_round == 3


def test_fused_run_resumes_like_an_uninterrupted_one(federation, fused_runs):
    straight, resumed = run_dir(federation, "fused-3"), run_dir(federation, "fused-resumed")
    rounds = metrics(resumed)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # round 2's evaluation came from the evaluate exchange that closed the first (2-round) run
    assert sorted(rounds[1]["evaluate"]["sites"]) == ["site-0", "site-1"] and rounds[1]["evaluation_missing"] is None
    assert _evaluations(resumed) == _evaluations(straight)
    a, b = checkpoint(straight, 3), checkpoint(resumed, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_round_with_too_few_evaluations_marks_the_previous_round(federation, fused_runs):
    first, second = metrics(run_dir(federation, "fused-no-eval"))["rounds"]
    assert first["skipped"] is False and sorted(first["train"]["sites"]) == ["site-0", "site-1"]
    assert first["evaluation_missing"] == "1 evaluation repl(ies) with round 2's training, fewer than min-sites=2"
    assert first["evaluate"]["sites"] == {}
    assert second["evaluation_missing"] is None and sorted(second["evaluate"]["sites"]) == ["site-0", "site-1"]


def test_fused_with_server_side_dp_keeps_each_rounds_privacy_entry(federation, fused_runs):
    rounds = metrics(run_dir(federation, "fused-dp"))["rounds"]
    assert all(r["skipped"] is False and sorted(r["evaluate"]["sites"]) == ["site-0", "site-1"] for r in rounds)
    # the accountant's entry is taken when the round aggregates, not when it is recorded one exchange later
    assert [r["privacy"]["dp-releases"] for r in rounds] == [1, 2]
    assert all(r["privacy"]["dp-released"] for r in rounds)
    assert 0 < rounds[0]["privacy"]["dp-epsilon"] < rounds[1]["privacy"]["dp-epsilon"]


class _Grid:
    """A grid whose sites are gone: no node connects (the loop's skip path needs nothing else)."""

    def get_node_ids(self):
        return []


def test_fused_round_skipped_for_too_few_sites_marks_the_previous_evaluation_missing():
    from flwr.app import ConfigRecord

    config = ServerConfig(model_name="smallcnn", evaluate_mode="fused", round_timeout_s=0.01, min_sites=2)
    arrays = initial_arrays(config)
    loop = RoundLoop(_Grid(), build_strategy(config), config=config, reference=arrays, poll_s=0.01)
    report = loop.run_round(
        3,
        arrays,
        ConfigRecord(config.round_settings(3, evaluate_first=True).to_record()),
        ConfigRecord(config.round_settings(3).to_record()),
    )
    assert report.skip_reason and "only 0 site(s) connected" in report.skip_reason
    assert report.previous_evaluation_missing == report.skip_reason and report.previous_evaluate_sites is None
    first = loop.run_round(
        1,
        arrays,
        ConfigRecord(config.round_settings(1).to_record()),
        ConfigRecord(config.round_settings(1).to_record()),
    )
    assert first.previous_evaluation_missing is None  # not asked for: nothing to report about a round 0


def test_fused_evaluations_in_training_replies_are_collected_and_a_malformed_one_rejected(server_task_identity):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.message_type import MessageType

    from fl_server.rounds import RoundReport
    from fl_server.validation import ReplyRejected, ScreenedReply, plain_metrics

    config = ServerConfig(model_name="smallcnn", evaluate_mode="fused", min_sites=2)
    arrays = initial_arrays(config)
    loop = RoundLoop(_Grid(), build_strategy(config), config=config, reference=arrays)

    def pair(node_id: int, evaluation: dict | None):
        sent = Message(
            RecordDict({"config": ConfigRecord({"server-round": 4})}),
            dst_node_id=node_id,
            message_type=MessageType.TRAIN,
        )
        screened = None if evaluation is None else plain_metrics(evaluation, count_bound=100, train=False)[0]
        return Message(RecordDict(), reply_to=sent), ScreenedReply(
            node_id=node_id, site=f"site-{node_id}", arrays=None, metrics={"num-examples": 4.0}, evaluation=screened
        )

    good = {"val-loss": 0.75, "val-n": 4, "num-examples": 4, "train-hist-risk": [1, 2, 0]}
    report = RoundReport(server_round=4, arrays=arrays)
    loop._previous_evaluation(report, [pair(1, good), pair(2, {**good, "val-loss": 0.25})], minimum=2)
    assert report.previous_evaluation_missing is None
    assert report.previous_evaluate_sites == {
        "site-1": {"val-loss": 0.75, "val-n": 4.0, "num-examples": 4.0, "train-hist-risk": [1.0, 2.0, 0.0]},
        "site-2": {"val-loss": 0.25, "val-n": 4.0, "num-examples": 4.0, "train-hist-risk": [1.0, 2.0, 0.0]},
    }
    report = RoundReport(server_round=4, arrays=arrays)
    loop._previous_evaluation(report, [pair(1, good), pair(3, None)], minimum=2)  # site 3 sent no evaluation
    assert report.previous_evaluate_sites is None
    assert (
        report.previous_evaluation_missing == "1 evaluation repl(ies) with round 4's training, fewer than min-sites=2"
    )
    # a malformed evaluation rejects its whole reply at the gate (tests/test_fl_server_fuzz.py drives it end to end)
    with pytest.raises(ReplyRejected) as info:
        plain_metrics({"val-loss": "low", "num-examples": 4}, count_bound=100, train=False, what="fused evaluation")
    assert info.value.problem.code == "bad_metric"


# --- one skeleton, one hook (#22.6) -----------------------------------------------------------------------------------


class _TwoSites:
    """A grid with two connected sites (the skeleton's wait needs nothing else when the train step is replaced)."""

    def get_node_ids(self):
        return [1, 2]


def _hooked_loop(step):
    """A RoundLoop whose training step is ``step(report)``; everything else is the shared skeleton."""
    from fl_server.rounds import TrainStep  # noqa: F401 - the hook's return type

    class Hooked(RoundLoop):
        def train(self, server_round, nodes, global_arrays, train_config, report):
            assert nodes == [1, 2] and server_round == 5
            return step(global_arrays, report)

    config = ServerConfig(model_name="smallcnn", evaluate_mode="fused", min_sites=2)
    arrays = initial_arrays(config)
    return Hooked(_TwoSites(), build_strategy(config), config=config, reference=arrays), config, arrays


def _run(loop, config, arrays):
    from flwr.app import ConfigRecord

    return loop.run_round(
        5,
        arrays,
        ConfigRecord(config.round_settings(5).to_record()),
        ConfigRecord(config.round_settings(5).to_record()),
    )


def test_a_subclass_replaces_only_the_training_step_and_the_skeleton_does_the_rest():
    from fl_server.rounds import TrainStep

    def step(global_arrays, report):
        return TrainStep(
            arrays={k: v + 1 if v.dtype.kind == "f" else v for k, v in global_arrays.items()},
            sites={"site-a": {"num-examples": 7.0, "train-loss": 0.5}},
        )

    loop, config, arrays = _hooked_loop(step)
    report = _run(loop, config, arrays)
    assert report.aggregated and report.skip_reason is None and report.nodes_connected == 2
    assert report.train_sites == {"site-a": {"num-examples": 7.0, "train-loss": 0.5}}
    key = next(k for k, v in arrays.items() if v.dtype.kind == "f")
    assert np.array_equal(report.arrays[key], arrays[key] + 1)


def test_the_skeleton_keeps_the_global_model_when_the_step_skips_or_returns_non_finite_weights():
    from fl_server.rounds import TrainStep

    def skipping(global_arrays, report):
        report.skip_reason = "the hook said no"
        return None

    loop, config, arrays = _hooked_loop(skipping)
    report = _run(loop, config, arrays)
    assert report.skip_reason == "the hook said no" and not report.aggregated and report.arrays is arrays

    def poisoned(global_arrays, report):
        bad = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in global_arrays.items()}
        return TrainStep(arrays=bad, sites={"site-a": {"num-examples": 7.0}})

    loop, config, arrays = _hooked_loop(poisoned)
    report = _run(loop, config, arrays)
    assert "non-finite" in report.skip_reason and not report.aggregated and report.train_sites == {}
    assert report.arrays is arrays


def test_a_secure_aggregation_run_is_refused_by_the_plain_loop_and_the_server_app_picks_secagg():
    from fl_server.secagg import SecAggRoundLoop
    from fl_server.server_app import round_loop_class

    plain = ServerConfig(model_name="smallcnn")
    secure = ServerConfig.from_run_config({"model-name": "smallcnn", "secure-aggregation": True, "min-sites": 3})
    arrays = initial_arrays(plain)
    with pytest.raises(ValueError, match="secure-aggregation=true but RoundLoop sees every site's update"):
        RoundLoop(_Grid(), build_strategy(secure), config=secure, reference=arrays)
    with pytest.raises(ValueError, match="needs secure-aggregation=true"):
        SecAggRoundLoop(_Grid(), build_strategy(plain), config=plain, reference=arrays)
    assert round_loop_class(secure) is SecAggRoundLoop and round_loop_class(plain) is RoundLoop
    loop = SecAggRoundLoop(_Grid(), build_strategy(secure), config=secure, reference=arrays, registry=None, poll_s=0.01)
    assert type(loop).run_round is RoundLoop.run_round  # the skeleton is shared; only train differs
    assert type(loop).train is not RoundLoop.train

"""fl_server.recorder: what a run leaves in its folder after each round, and where a resumed run starts."""

import json

import numpy as np
import pytest
import torch

from fl_server.checkpoint import load_run_state
from fl_server.config import ServerConfig
from fl_server.recorder import RoundReport, RunRecorder, resume_mismatch, risk_reference
from fl_server.rounds import initial_arrays
from fl_server.strategy import build_strategy, strategy_state

BOUNDS = {"first_examples": {"site-a": 8.0, "site-b": 6.0}, "histogram_bins": {"val-hist-pos-covid": 20}}


def _config(tmp_path, **overrides):
    return ServerConfig(model_name="smallcnn", run_dir=str(tmp_path), num_server_rounds=3, **overrides)


def _report(server_round, arrays, auc, *, aggregated=True):
    report = RoundReport(server_round=server_round, arrays=arrays, aggregated=aggregated)
    if aggregated:
        report.train_sites = {
            "site-a": {"num-examples": 8.0, "train-loss": 1.0},
            "site-b": {"num-examples": 6.0, "train-loss": 2.0},
        }
    report.evaluate_sites = {
        site: {
            "num-examples": 5.0,
            "val-n": 5.0,
            "val-loss": 0.5,
            "val-auc-macro": auc,
            "train-hist-risk": [0.0, 5.0, 5.0, 0.0],
        }
        for site in ("site-a", "site-b")
    }
    return report


def _recorded_rounds(tmp_path, config, aucs):
    strategy = build_strategy(config)
    recorder = RunRecorder(config, strategy)
    start = recorder.start(initial_arrays(config))
    arrays = start.arrays
    for server_round, auc in enumerate(aucs, start=start.first_round):
        arrays = {k: v + server_round if v.dtype.kind == "f" else v for k, v in arrays.items()}
        done = recorder.checkpoint(
            _report(server_round, arrays, auc), {"extra-probe": server_round}, strategy_state(strategy)
        )
        recorder.record(done, BOUNDS)
    return recorder, arrays


def test_a_fresh_run_checkpoints_the_initial_weights_and_records_each_round(tmp_path):
    config = _config(tmp_path)
    recorder, arrays = _recorded_rounds(tmp_path, config, [0.6, 0.9, 0.7])
    for r in range(4):
        assert (tmp_path / "checkpoints" / f"round-{r:03d}.pt").is_file()
    saved = load_run_state(tmp_path / "state")
    assert saved.server_round == 3 and saved.extra["first_examples"] == BOUNDS["first_examples"]
    assert saved.extra["sites"] == ["site-a", "site-b"] and saved.extra["last_aggregated_round"] == 3
    best = json.loads((tmp_path / "model" / "best" / "model.json").read_text())
    assert recorder.run_log.best.round == 2 and best["provenance"]["round_of_weights"] == 2
    assert best["provenance"]["sites"] == ["site-a", "site-b"]
    assert [r["extra-probe"] for r in recorder.run_log.rounds] == [1, 2, 3]
    assert (tmp_path / "learning_curves.png").is_file()
    recorder.close(arrays)
    final = torch.load(tmp_path / "model" / "final" / "model.pt", weights_only=True)
    assert all(np.array_equal(final[k].numpy(), arrays[k]) for k in arrays)
    assert json.loads((tmp_path / "model" / "final" / "model.json").read_text())["provenance"]["round_of_weights"] == 3
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_starts_after_the_saved_round_with_its_weights_bounds_and_sites(tmp_path):
    _recorded_rounds(tmp_path, _config(tmp_path), [0.6, 0.7])
    config = _config(tmp_path, resume=True)
    recorder = RunRecorder(config, build_strategy(config))
    start = recorder.start(initial_arrays(config))
    saved = load_run_state(tmp_path / "state")
    assert start.first_round == 3 and start.loop_bounds == BOUNDS
    assert all(np.array_equal(start.arrays[k], saved.global_arrays[k]) for k in start.arrays)
    assert recorder.sites_seen == {"site-a", "site-b"} and recorder.last_aggregated == 2
    assert [r["round"] for r in recorder.run_log.rounds] == [1, 2]


def test_resume_without_a_saved_state_starts_at_round_one(tmp_path):
    config = _config(tmp_path, resume=True)
    start = RunRecorder(config, build_strategy(config)).start(initial_arrays(config))
    assert start.first_round == 1 and start.loop_bounds == {}
    assert (tmp_path / "checkpoints" / "round-000.pt").is_file()


def test_resume_refuses_another_run_config_or_other_weights_naming_the_difference(tmp_path):
    _recorded_rounds(tmp_path, _config(tmp_path), [0.6])
    changed = _config(tmp_path, resume=True, learning_rate=0.5)
    with pytest.raises(ValueError, match=r"learning-rate: 0.001 \(saved\) vs 0.5 \(now\)"):
        RunRecorder(changed, build_strategy(changed)).start(initial_arrays(changed))
    same = _config(tmp_path, resume=True)
    other_model = {f"other.{k}": v for k, v in initial_arrays(same).items()}
    with pytest.raises(ValueError, match="saved weights do not match the model"):
        RunRecorder(same, build_strategy(same)).start(other_model)
    assert resume_mismatch({"num-server-rounds": 3, "seed": 0}, {"num-server-rounds": 9, "seed": 0}) == []


def test_a_skipped_round_is_recorded_but_the_final_bundle_keeps_the_last_aggregated_weights(tmp_path):
    config = _config(tmp_path)
    strategy = build_strategy(config)
    recorder = RunRecorder(config, strategy)
    arrays = recorder.start(initial_arrays(config)).arrays
    recorder.record(recorder.checkpoint(_report(1, arrays, 0.6), {}, strategy_state(strategy)), BOUNDS)
    skipped = _report(2, arrays, 0.6, aggregated=False)
    skipped.skip_reason = "only 1 site(s) connected"
    recorder.record(recorder.checkpoint(skipped, {}, strategy_state(strategy)), BOUNDS)
    assert recorder.last_aggregated == 1 and recorder.run_log.rounds[-1]["skipped"] is True
    assert recorder.provenance(1)["round_of_weights"] == 1


def test_the_risk_reference_comes_from_the_summed_training_histograms(tmp_path):
    recorder, _ = _recorded_rounds(tmp_path, _config(tmp_path), [0.6])
    reference = risk_reference(recorder.run_log, 1)
    assert reference["studies"] == 20 and reference["groups"] == ["low", "intermediate", "high"]
    assert risk_reference(recorder.run_log, 7) is None  # no such round

"""fl_server.observe: TensorBoard scalars per round (each round once) and the per-round PNG figures."""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_server.observe import LEARNING_CURVES, SITE_METRICS, TENSORBOARD_FOLDER, observe_round
from fl_server.run_log import RunLog


def _site_eval(auc: float, n: float) -> dict:
    return {
        "val-n": n,
        "val-auc-macro": auc,
        "val-loss": 1.0 - auc / 2,
        "val-c-index": 0.6,
        "test-n": n,
        "test-auc-macro": auc - 0.05,
        "val-n-events": 2.0,
        "test-n-events": 2.0,
        "val-balanced-accuracy": 0.5,
        "val-hist-pos-covid": [1.0, 0.0],
        "val-hist-neg-covid": [0.0, 2.0],
        "test-c-index": math.nan,
    }


def _rounds(tmp_path, n_rounds: int) -> list[dict]:
    """Round entries written by the server's own RunLog (the shape observe_round receives)."""
    log = RunLog(tmp_path / "log", run_config={}, emit=lambda _line: None)
    for r in range(1, n_rounds + 1):
        log.site_train(
            {
                "site-0": {"train-loss": 1.0 / r, "num-examples": 4.0},
                "site-1": {"train-loss": 1.2 / r, "num-examples": 6.0},
            }
        )
        log.site_evaluate({"site-0": _site_eval(0.6 + 0.1 * r, 3.0), "site-1": _site_eval(0.5 + 0.1 * r, 4.0)})
        log.end_round(r)
    return log.rounds


def _scalars(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc


def test_each_round_is_written_once_with_aggregate_and_site_scalars(tmp_path):
    run_dir = tmp_path / "run"
    rounds = _rounds(tmp_path, 2)
    observe_round(run_dir, rounds[:1])
    observe_round(run_dir, rounds)
    observe_round(run_dir, rounds)  # nothing new: nothing written twice
    acc = _scalars(run_dir / TENSORBOARD_FOLDER)
    tags = acc.Tags()["scalars"]
    assert "aggregate/val-auc-macro" in tags and "site/site-1/val-auc-macro" in tags and "aggregate/train-loss" in tags
    assert not any("hist" in t for t in tags), "histogram lists are not scalars"
    events = acc.Scalars("aggregate/val-auc-macro")
    assert [e.step for e in events] == [1, 2]
    assert events[1].value == pytest.approx(rounds[1]["evaluate"]["aggregate"]["val-auc-macro"])
    assert [e.value for e in acc.Scalars("site/site-0/train-loss")] == pytest.approx([1.0, 0.5])
    assert "site/site-0/test-c-index" not in tags, "undefined (NaN) metrics are left out"


def test_figures_are_png_files_refreshed_every_round(tmp_path):
    run_dir = tmp_path / "run"
    rounds = _rounds(tmp_path, 2)
    observe_round(run_dir, rounds[:1])
    first = (run_dir / LEARNING_CURVES).read_bytes()
    observe_round(run_dir, rounds)
    for name in (LEARNING_CURVES, SITE_METRICS):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / LEARNING_CURVES).read_bytes() != first


def test_no_round_yet_writes_no_figure(tmp_path):
    observe_round(tmp_path / "run", [])
    assert not (tmp_path / "run" / LEARNING_CURVES).exists()


@pytest.mark.parametrize(
    ("rounds", "needle"),
    [({"round": 1}, "list"), ([{"evaluate": {}}], "rounds\\[0\\]"), ([{"round": 1, "train": 3}], "train")],
)
def test_bad_rounds_are_refused_with_the_reason(tmp_path, rounds, needle):
    with pytest.raises(ValueError, match=needle):
        observe_round(tmp_path / "run", rounds)

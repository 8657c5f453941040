import json
import math

import pytest

from fl_server.run_log import RunLog, aggregate, weighted_mean


def test_weighted_mean_skips_undefined_sites():
    per_site = {"a": {"val-auc-macro": 0.8, "val-n": 10}, "b": {"val-auc-macro": math.nan, "val-n": 30}, "c": {"val-auc-macro": 0.6, "val-n": 30}}
    assert weighted_mean(per_site, "val-auc-macro", "val-n") == pytest.approx((0.8 * 10 + 0.6 * 30) / 40)


def test_aggregate_sums_counts_and_weights_by_the_right_count():
    per_site = {
        "a": {"val-n": 1, "test-n": 3, "val-loss": 1.0, "test-loss": 1.0, "num-examples": 10, "train-loss": 2.0},
        "b": {"val-n": 3, "test-n": 1, "val-loss": 2.0, "test-loss": 2.0, "num-examples": 30, "train-loss": 4.0},
    }
    agg = aggregate(per_site)
    assert agg["val-n"] == 4 and agg["test-n"] == 4 and agg["num-examples"] == 40
    assert agg["val-loss"] == pytest.approx(1.75)
    assert agg["test-loss"] == pytest.approx(1.25)
    assert agg["train-loss"] == pytest.approx(3.5)


def _round(log, r, auc, loss=1.0):
    log.site_train({"s0": {"train-loss": loss, "num-examples": 5}, "s1": {"train-loss": loss, "num-examples": 5}})
    log.site_evaluate({
        "s0": {"val-auc-macro": auc, "val-loss": loss, "val-n": 2, "test-auc-macro": auc, "test-n": 2},
        "s1": {"val-auc-macro": auc, "val-loss": loss, "val-n": 2, "test-auc-macro": math.nan, "test-n": 2},
    })  # fmt: skip
    return log.end_round(r)


def test_rounds_best_round_and_json(tmp_path):
    lines = []
    log = RunLog(tmp_path, run_config={"num-server-rounds": 3}, emit=lines.append)
    assert _round(log, 1, 0.6) is True
    assert _round(log, 2, 0.9) is True
    assert _round(log, 3, 0.7) is False
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    assert data["best_round"]["round"] == 2
    assert data["best_round"]["test"]["test-auc-macro"] == pytest.approx(0.9)
    assert data["rounds"][0]["evaluate"]["sites"]["s1"]["test-auc-macro"] is None  # NaN written as null
    assert len(lines) == 4 and "round" in lines[0] and "s0=0.600" in lines[1]
    png = log.plot()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_round_falls_back_to_validation_loss(tmp_path):
    log = RunLog(tmp_path, run_config={}, emit=lambda _: None)
    _round(log, 1, math.nan, loss=2.0)
    _round(log, 2, math.nan, loss=1.0)
    assert log.best.round == 2 and log.best.metric == "-val-loss"

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fl_client.metrics import classification_metrics, score_histograms
from fl_server.run_log import RunLog, aggregate, pooled_auc_from_histograms, weight_key_for, weighted_mean


def test_weighted_mean_skips_undefined_sites():
    per_site = {
        "a": {"val-auc-macro": 0.8, "val-n": 10},
        "b": {"val-auc-macro": math.nan, "val-n": 30},
        "c": {"val-auc-macro": 0.6, "val-n": 30},
    }
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
    log.site_evaluate(
        {
            "s0": {"val-auc-macro": auc, "val-loss": loss, "val-n": 2, "test-auc-macro": auc, "test-n": 2},
            "s1": {"val-auc-macro": auc, "val-loss": loss, "val-n": 2, "test-auc-macro": math.nan, "test-n": 2},
        }
    )
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


# --- weights of the new metrics -----------------------------------------------------------------------


def test_weight_keys_of_prognosis_and_operating_point_metrics():
    assert weight_key_for("val-c-index") == "val-n-events"
    assert weight_key_for("test-td-auc") == "test-n-events"
    assert weight_key_for("val-sens-covid") == "val-n-pos-covid"
    assert weight_key_for("test-spec-other_pneumonia") == "test-n-neg-other_pneumonia"
    assert weight_key_for("val-auc-macro") == "val-n" and weight_key_for("test-brier") == "test-n"
    assert weight_key_for("train-loss") == "num-examples"


def test_c_index_weighted_by_events_and_event_counts_summed():
    per_site = {
        "a": {"val-n": 100, "val-n-events": 10, "val-c-index": 0.8, "val-td-auc": 0.9},
        "b": {"val-n": 10, "val-n-events": 30, "val-c-index": 0.5, "val-td-auc": math.nan},
        "c": {"val-n": 50, "val-n-events": 0, "val-c-index": math.nan, "val-td-auc": math.nan},
    }
    agg = aggregate(per_site)
    assert agg["val-c-index"] == pytest.approx((0.8 * 10 + 0.5 * 30) / 40)  # 0.575, not the val-n weighting
    assert agg["val-td-auc"] == pytest.approx(0.9)  # only site a defines it
    assert agg["val-n-events"] == 40 and agg["val-n"] == 160


def test_sensitivity_weighted_by_positives_gives_the_pooled_sensitivity():
    # Site a: 3 of 4 covid positives called; site b: 1 of 1 -> pooled 4/5, while the val-n weighting would not give it.
    per_site = {
        "a": {"val-n": 10, "val-n-pos-covid": 4, "val-n-neg-covid": 6, "val-sens-covid": 0.75, "val-spec-covid": 0.5},
        "b": {"val-n": 10, "val-n-pos-covid": 1, "val-n-neg-covid": 9, "val-sens-covid": 1.0, "val-spec-covid": 1.0},
    }
    agg = aggregate(per_site)
    assert agg["val-sens-covid"] == pytest.approx(0.8)
    assert agg["val-spec-covid"] == pytest.approx((3 + 9) / 15)
    assert agg["val-n-pos-covid"] == 5 and agg["val-n-neg-covid"] == 15


# --- pooled AUC from histograms -----------------------------------------------------------------------


def test_pooled_auc_from_histograms_hand_computed():
    # Bins low->high. pos [0,1,1,1], neg [1,1,1,0]: the positive in bin 1 beats 1 negative and ties 1 (1.5),
    # bin 2 beats 2 and ties 1 (2.5), bin 3 beats 3 -> 7 / (3*3).
    assert pooled_auc_from_histograms([0, 1, 1, 1], [1, 1, 1, 0]) == pytest.approx(7 / 9)
    assert pooled_auc_from_histograms([0, 0, 2], [3, 0, 0]) == 1.0
    assert pooled_auc_from_histograms([2, 0, 0], [0, 0, 3]) == 0.0
    assert pooled_auc_from_histograms([0, 4, 0], [0, 5, 0]) == 0.5  # all in one bin: every pair a tie
    assert math.isnan(pooled_auc_from_histograms([0, 0], [1, 2]))
    assert math.isnan(pooled_auc_from_histograms([], []))


def test_pooled_auc_from_histograms_checks_its_input():
    with pytest.raises(ValueError, match="same number of bins, got 2 and 3"):
        pooled_auc_from_histograms([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"neg counts must be finite and >= 0, got -1\.0"):
        pooled_auc_from_histograms([1, 2], [1, -1])


def test_pooled_auc_is_sklearns_when_every_score_has_its_own_bin():
    rng = np.random.default_rng(0)
    bins = 50
    for _ in range(5):
        scores = (rng.permutation(bins)[:30] + 0.5) / bins  # 30 distinct bins
        labels = rng.permutation(np.r_[np.ones(12, dtype=bool), np.zeros(18, dtype=bool)])
        pos, _ = np.histogram(scores[labels], bins=bins, range=(0, 1))
        neg, _ = np.histogram(scores[~labels], bins=bins, range=(0, 1))
        assert pooled_auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(labels, scores))


def _site_records(rng, n, shift, class_names, bins):
    """One site's ``val-`` metrics and its raw (labels, probs), with a site-specific score shift."""
    labels = rng.integers(0, len(class_names), n)
    logits = rng.normal(size=(n, len(class_names))) + 1.5 * np.eye(len(class_names))[labels] + shift
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = {
        **classification_metrics(probs, labels, class_names),
        **score_histograms(probs, labels, class_names, bins=bins),
    }
    return {f"val-{k}": v for k, v in metrics.items()}, labels, probs


@pytest.mark.parametrize("bins", [20, 100_000])
def test_aggregate_pooled_auc_matches_pooled_raw_scores_within_binning_error(bins):
    names = ("covid", "other_pneumonia", "normal")
    rng = np.random.default_rng(1)
    per_site, all_labels, all_probs = {}, [], []
    for i, (n, shift) in enumerate([(40, 0.0), (25, np.array([1.0, 0.0, -1.0])), (60, np.array([-0.5, 0.5, 0.0]))]):
        per_site[f"s{i}"], labels, probs = _site_records(rng, n, shift, names, bins)
        all_labels.append(labels)
        all_probs.append(probs)
    labels, probs = np.concatenate(all_labels), np.concatenate(all_probs)
    agg = aggregate(per_site)
    exact = []
    for k, name in enumerate(names):
        pos, neg = agg[f"val-hist-pos-{name}"], agg[f"val-hist-neg-{name}"]
        assert len(pos) == bins and sum(pos) == np.sum(labels == k) and sum(neg) == np.sum(labels != k)
        truth = roc_auc_score(labels == k, probs[:, k])
        exact.append(truth)
        bound = 0.5 * float(np.dot(pos, neg)) / (sum(pos) * sum(neg))  # pairs sharing a bin
        assert abs(agg[f"val-pooled-auc-{name}"] - truth) <= bound + 1e-12
        if bins > 1000:
            assert agg[f"val-pooled-auc-{name}"] == pytest.approx(truth, abs=1e-3)
    assert agg["val-pooled-auc-macro"] == pytest.approx(np.mean([agg[f"val-pooled-auc-{n}"] for n in names]))
    assert agg["val-n"] == len(labels)


def test_aggregate_sums_histograms_and_adds_pooled_aucs():
    per_site = {
        "a": {
            "val-n": 4,
            "val-auc-macro": 0.7,
            "val-hist-pos-covid": [0, 1, 1, 1],
            "val-hist-neg-covid": [1, 1, 1, 0],
            "val-hist-pos-normal": [0, 1, 0, 0],
            "val-hist-neg-normal": [0, 1, 0, 0],
            "val-hist-pos-flu": [0, 0, 0, 0],
            "val-hist-neg-flu": [1, 0, 0, 0],
            "test-n": 2,
            "test-hist-pos-covid": [0, 0, 0, 1],
            "test-hist-neg-covid": [1, 0, 0, 0],
        },
        "b": {
            "val-n": 2,
            "val-auc-macro": 1.0,
            "val-hist-pos-covid": [0, 0, 0, 2],
            "val-hist-neg-covid": [2, 0, 0, 0],
            "val-hist-pos-normal": [0, 0, 0, 0],
            "val-hist-neg-normal": [0, 0, 0, 0],
            "val-hist-pos-flu": [0, 0, 0, 0],
            "val-hist-neg-flu": [0, 0, 1, 0],
        },
    }
    agg = aggregate(per_site)
    assert agg["val-hist-pos-covid"] == [0, 1, 1, 3] and agg["val-hist-neg-covid"] == [3, 1, 1, 0]
    # pos [0,1,1,3] vs neg [3,1,1,0]: 1*(3+.5) + 1*(4+.5) + 3*5 = 23 wins of 5*5 pairs.
    assert agg["val-pooled-auc-covid"] == pytest.approx(23 / 25)
    assert agg["val-pooled-auc-normal"] == 0.5  # one positive and one negative in the same bin
    assert math.isnan(agg["val-pooled-auc-flu"])  # no positive anywhere: left out of the macro
    assert agg["val-pooled-auc-macro"] == pytest.approx((23 / 25 + 0.5) / 2)
    assert agg["val-auc-macro"] == pytest.approx((0.7 * 4 + 1.0 * 2) / 6)  # site AUCs: still the weighted mean
    assert agg["test-hist-pos-covid"] == [0, 0, 0, 1] and agg["test-pooled-auc-covid"] == 1.0  # only site a sent test
    assert agg["test-pooled-auc-macro"] == 1.0


def test_aggregate_rejects_inconsistent_lists():
    with pytest.raises(ValueError, match=r"'val-hist-pos-covid' has different numbers of bins across sites: \[2, 3\]"):
        aggregate({"a": {"val-hist-pos-covid": [1, 2]}, "b": {"val-hist-pos-covid": [1, 2, 3]}})
    with pytest.raises(ValueError, match="'val-hist-pos-covid' must be a list of counts at every site, got 3.0"):
        aggregate({"a": {"val-hist-pos-covid": [1, 2]}, "b": {"val-hist-pos-covid": 3.0}})
    with pytest.raises(ValueError, match="'val-loss' is a list"):
        aggregate({"a": {"val-loss": [1.0]}})


def test_aggregate_without_histograms_adds_no_pooled_keys():
    agg = aggregate({"a": {"val-n": 2, "val-auc-macro": 0.6}})
    assert not any("pooled" in k for k in agg)


def _round_with_histograms(log, r, auc):
    log.site_train({"s0": {"train-loss": 1.0, "num-examples": 5}, "s1": {"train-loss": 1.0, "num-examples": 5}})
    log.site_evaluate(
        {
            "s0": {
                "val-auc-macro": auc,
                "val-loss": 1.0,
                "val-n": 4,
                "val-c-index": 0.6,
                "val-n-events": 1,
                "val-hist-pos-covid": [0, 1, 1, 1],
                "val-hist-neg-covid": [1, 1, 1, 0],
                "test-n": 0,
            },
            "s1": {
                "val-auc-macro": auc,
                "val-loss": 1.0,
                "val-n": 4,
                "val-c-index": 0.9,
                "val-n-events": 2,
                "val-hist-pos-covid": [0, 0, 0, 2],
                "val-hist-neg-covid": [2, 0, 0, 0],
                "test-n": 0,
            },
        }
    )
    return log.end_round(r)


def test_metrics_json_keeps_histograms_compact_and_apart(tmp_path):
    lines = []
    log = RunLog(tmp_path, run_config={}, emit=lines.append)
    assert _round_with_histograms(log, 1, 0.6) is True
    assert _round_with_histograms(log, 2, 0.5) is False  # selection stays on val-auc-macro, not the pooled AUC
    assert log.best.metric == "val-auc-macro" and log.best.round == 1
    text = (tmp_path / "metrics.json").read_text()
    data = json.loads(text)
    evaluate = data["rounds"][0]["evaluate"]
    assert evaluate["aggregate"]["val-hist-pos-covid"] == [0, 1, 1, 3]
    assert evaluate["aggregate"]["val-pooled-auc-covid"] == pytest.approx(23 / 25)
    assert evaluate["aggregate"]["val-c-index"] == pytest.approx((0.6 * 1 + 0.9 * 2) / 3)
    assert not any("hist" in k for m in evaluate["sites"].values() for k in m)
    assert evaluate["site_histograms"]["s1"] == {"val-hist-pos-covid": [0, 0, 0, 2], "val-hist-neg-covid": [2, 0, 0, 0]}
    assert "site_histograms" not in data["rounds"][0]["train"]
    assert '"val-hist-pos-covid": [0.0, 1.0, 1.0, 3.0]' in text  # one line per list
    assert data["best_round"]["validation"]["val-pooled-auc-macro"] == pytest.approx(23 / 25)
    assert "pooled-auc-macro" in data["aggregation_note"] and "auc-macro" in data["aggregation_note"]
    header, row = lines[0].split(), lines[1]
    assert header.index("pooled") == header.index("AUC") + 1 and "C" in header
    assert lines[0].index("pooled AUC") < lines[0].index("val C") < lines[0].index("test AUC")
    assert " 0.920 " in row and " 0.800 " in row  # pooled AUC, val C
    assert log.plot().exists()


def test_compact_number_lists_touches_only_lists_of_numbers():
    from fl_server.run_log import _compact_number_lists

    text = json.dumps(
        {"h": [0.0, -1.5e-07, None, 3], "s": ["a", "b"], "nested": [[1, 2], {"x": [4]}], "e": []}, indent=2
    )
    compact = _compact_number_lists(text)
    assert json.loads(compact) == json.loads(text)
    assert '"h": [0.0, -1.5e-07, null, 3]' in compact and '"x": [4]' in compact and "[1, 2]" in compact
    assert '"a",\n' in compact  # strings stay one per line


def test_histogram_quantiles_interpolate_within_bins():
    from fl_server.run_log import histogram_quantiles

    # 4 bins over [0, 4): one study each -> uniform; tertiles at 4/3 and 8/3.
    assert histogram_quantiles([1, 1, 1, 1], (0.0, 4.0), (1 / 3, 2 / 3)) == pytest.approx([4 / 3, 8 / 3])
    # all mass in bin 2 ([2, 3)): the median is in the middle of that bin.
    assert histogram_quantiles([0, 0, 10, 0], (0.0, 4.0), (0.5,)) == pytest.approx([2.5])
    assert all(math.isnan(q) for q in histogram_quantiles([0, 0], (0.0, 1.0), (0.5,)))


def test_round_extras_and_state_restore_continue_the_log(tmp_path):
    log = RunLog(tmp_path, run_config={}, emit=lambda _line: None)
    _round(log, 1, 0.6)
    log.end_round(2, extra={"skipped": True, "skip_reason": "only 1 site(s) connected", "seconds": 3.0})
    _round(log, 3, 0.8)
    state = json.loads(json.dumps(log.state()))  # what the resume state stores
    resumed = RunLog(tmp_path, run_config={}, emit=lambda _line: None)
    resumed.restore(state)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3] and resumed.best.round == 3
    assert resumed.rounds[1]["skipped"] is True and resumed.rounds[1]["seconds"] == 3.0
    assert math.isnan(resumed.rounds[0]["evaluate"]["sites"]["s1"]["test-auc-macro"])  # null back to NaN
    assert not _round(resumed, 4, 0.7)  # 0.7 < best 0.8
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in written["rounds"]] == [1, 2, 3, 4] and written["best_round"]["round"] == 3
    assert written["rounds"][1]["evaluate"] == {"aggregate": {}, "sites": {}}


# --- what the privacy floor costs the pooled AUC -------------------------------------------------------------------


def pooled_auc_error(per_site: int, *, sites: int = 3, k: int = 5, seed: int = 0) -> tuple[float, float]:
    """Pooled AUC of class 0 from the sites' exact scores vs from their floored histograms (README "Privacy").

    Demo-like data: three classes in equal shares, logits = 1.5 * one-hot + N(0, 1) (AUC about 0.85). Returns
    (exact, from histograms); the latter NaN when no site may send the class's histograms.
    """
    from fl_client.metrics import floor_evaluation

    rng = np.random.default_rng(seed)
    names = ("covid", "other", "normal")
    all_scores, all_labels, per_site_metrics = [], [], {}
    for s in range(sites):
        labels = rng.permutation(np.arange(per_site) % 3)
        logits = 1.5 * np.eye(3)[labels] + rng.normal(size=(per_site, 3)) + 0.3 * s  # sites' scores slightly shifted
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        all_scores.append(probs[:, 0])
        all_labels.append(labels == 0)
        raw = {
            f"val-{key}": v
            for key, v in {
                **classification_metrics(probs, labels, names),
                **score_histograms(probs, labels, names),
            }.items()
        }
        per_site_metrics[f"site-{s}"] = floor_evaluation(raw, min_count=k)
    exact = roc_auc_score(np.concatenate(all_labels), np.concatenate(all_scores))
    return exact, aggregate(per_site_metrics).get("val-pooled-auc-covid", math.nan)


@pytest.mark.parametrize(("per_site", "bound"), [(30, 0.12), (60, 0.025), (150, 0.01)])
def test_pooled_auc_from_floored_histograms_stays_close_to_the_exact_pooled_auc(per_site, bound):
    errors = [abs(a - b) for a, b in (pooled_auc_error(per_site, seed=seed) for seed in range(5))]
    assert all(math.isfinite(e) for e in errors) and max(errors) <= bound


def test_sites_of_demo_size_send_no_pooled_auc():
    # The demo's 40 patients per site leave 8 validation studies: fewer than 5 per class, so nothing to pool.
    _, pooled = pooled_auc_error(8)
    assert math.isnan(pooled)


def test_sites_that_send_no_histogram_are_left_out_of_the_pooled_auc():
    full = {"val-hist-pos-covid": [0.0, 5.0, 0.0], "val-hist-neg-covid": [6.0, 0.0, 0.0], "val-n": 11.0}
    empty = {"val-hist-pos-covid": [], "val-hist-neg-covid": [], "val-n": 3.0}
    agg = aggregate({"site-a": full, "site-b": empty})
    assert agg["val-hist-pos-covid"] == [0.0, 5.0, 0.0] and agg["val-pooled-auc-covid"] == 1.0
    nothing = aggregate({"site-b": empty})
    assert nothing["val-hist-pos-covid"] == [] and math.isnan(nothing["val-pooled-auc-covid"])


def test_a_count_a_site_withheld_is_summed_over_the_others():
    agg = aggregate({"site-a": {"val-n-pos-covid": 7.0}, "site-b": {"val-n-pos-covid": math.nan}})
    assert agg["val-n-pos-covid"] == 7.0
    assert math.isnan(aggregate({"site-b": {"val-n-pos-covid": math.nan}})["val-n-pos-covid"])


def test_the_end_of_run_curves_are_the_observability_plotters_figure(tmp_path):
    """One learning-curve plotter: RunLog.plot's curves.png is fl_server.observe's figure of the same rounds."""
    from fl_server.observe import plot_learning_curves

    log = RunLog(tmp_path, run_config={}, emit=lambda _: None)
    _round(log, 1, 0.6)
    _round(log, 2, 0.8)
    curves = log.plot()
    assert curves.name == "curves.png"
    assert curves.read_bytes() == plot_learning_curves(tmp_path, log.rounds, name="same.png").read_bytes()
    with pytest.raises(ValueError):  # a malformed round list is refused by the one plotter's caller, not drawn
        from fl_server.observe import observe_round

        observe_round(tmp_path, {"round": 1})


# --- calibration ----------------------------------------------------------------------------------------------------

from fedct.protocol import CALIBRATION_TEMPERATURES, reliability_key  # noqa: E402
from fl_server.run_log import calibration_outcome, temperature_fit  # noqa: E402
from models.calibration import apply_temperature, ece_from_bins, fit_temperature, nll_grid, reliability_bins  # noqa: E402


def _site_logits(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 1.0
    return 4 * logits, labels


def test_the_temperature_of_a_round_is_the_fit_of_the_summed_site_sums_and_names_the_sites(tmp_path):
    (za, ya), (zb, yb) = _site_logits(200, 1), _site_logits(300, 2)
    sites = {
        "site-a": {"val-n": 200.0, "val-calib-nll": nll_grid(za, ya)},
        "site-b": {"val-n": 300.0, "val-calib-nll": nll_grid(zb, yb)},
        "site-c": {"val-n": 3.0, "val-calib-nll": []},
    }  # below the floor: no sums
    agg = aggregate(sites)
    assert len(agg["val-calib-nll"]) == len(CALIBRATION_TEMPERATURES) and "val-calib-nll" not in _section_scalars(sites)
    fit = temperature_fit(agg, sites)
    pooled = fit_temperature(nll_grid(np.concatenate([za, zb]), np.concatenate([ya, yb])))
    assert fit["temperature"] == pytest.approx(pooled) and fit["temperature"] > 1.5
    assert fit["sites"] == ["site-a", "site-b"] and fit["validation_studies"] == 500
    assert temperature_fit(aggregate({"site-c": sites["site-c"]})) is None


def _section_scalars(sites):
    from fl_server.run_log import _section

    return {k for m in _section(sites)["sites"].values() for k in m}


def test_the_ece_before_and_after_is_read_from_the_summed_reliability_bins():
    per_site, pooled = {}, {"before": [], "after": []}
    for name, seed in (("site-a", 3), ("site-b", 4)):
        logits, labels = _site_logits(150, seed)
        reply = {"test-n": 150.0, "test-brier": 0.3}
        for stage, t in (("before", 1.0), ("after", 3.0)):
            probs = apply_temperature(logits, t)
            pooled[stage].append((probs, labels))
            for field, values in zip(("count", "confidence", "correct"), reliability_bins(probs, labels), strict=True):
                reply[reliability_key(stage, field)] = values
        per_site[name] = reply
    out = calibration_outcome(per_site)
    for stage in ("before", "after"):
        probs = np.concatenate([p for p, _ in pooled[stage]])
        labels = np.concatenate([y for _, y in pooled[stage]])
        assert out[f"ece_{stage}"] == pytest.approx(ece_from_bins(*reliability_bins(probs, labels)))
    assert out["ece_after"] < out["ece_before"] and out["test_studies"] == 300 and out["brier_after"] == 0.3
    assert out["sites"] == ["site-a", "site-b"]
    # the sampling floor: what a calibrated model reads on the same 300 studies' bins
    assert 0 < out["ece_floor_expected"] < out["ece_floor_upper95"] < 0.1
    empty = calibration_outcome(
        {"site-a": {reliability_key(s, f): [] for s in ("before", "after") for f in ("count", "confidence", "correct")}}
    )
    assert math.isnan(empty["ece_before"]) and empty["test_studies"] == 0 and empty["sites"] == []


def test_metrics_json_carries_the_calibration_once_set(tmp_path):
    log = RunLog(tmp_path, run_config={}, emit=lambda _: None)
    _round(log, 1, 0.7)
    assert "calibration" not in json.loads((tmp_path / "metrics.json").read_text())
    log.calibration = {"best": {"round": 1, "temperature": 1.8, "ece_before": 0.2, "ece_after": 0.04}}
    log.write()
    assert json.loads((tmp_path / "metrics.json").read_text())["calibration"]["best"]["ece_after"] == 0.04

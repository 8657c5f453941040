import math

import numpy as np
import pytest

from fl_client.metrics import classification_metrics

NAMES = ("covid", "other_pneumonia", "normal")


def test_perfect_predictions():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[labels] * 0.9 + 0.1 / 3
    m = classification_metrics(probs, labels, NAMES)
    assert m["accuracy"] == 1.0
    assert m["balanced-accuracy"] == 1.0
    assert m["auc-macro"] == 1.0
    assert m["n"] == 6
    assert m["loss"] < 0.2


def test_uninformative_predictions_give_chance_auc():
    labels = np.array([0, 1, 2] * 10)
    probs = np.full((30, 3), 1 / 3)
    m = classification_metrics(probs, labels, NAMES)
    assert m["auc-macro"] == pytest.approx(0.5)
    assert m["loss"] == pytest.approx(math.log(3))


def test_absent_class_gives_nan_not_a_number_made_up():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(probs, labels, NAMES)
    assert math.isnan(m["auc-normal"])
    assert m["auc-covid"] == 1.0
    assert m["auc-macro"] == 1.0


def test_empty_split_has_all_keys():
    full = classification_metrics(np.eye(3)[[0, 1, 2]], np.array([0, 1, 2]), NAMES)
    empty = classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), NAMES)
    assert set(empty) == set(full)
    assert empty["n"] == 0 and math.isnan(empty["auc-macro"])


def test_shape_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        classification_metrics(np.zeros((4, 2)), np.zeros(4, dtype=int), NAMES)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(np.zeros((4, 3)), np.zeros(3, dtype=int), NAMES)


# --- operating points, sensitivity/specificity, Brier, ECE ---------------------------------------------

from fl_client.metrics import choose_operating_points, score_histograms, survival_metrics  # noqa: E402

BINARY = ("covid", "normal")
# Validation set for two classes: p(covid) of the 3 covid studies 0.9, 0.6, 0.4; of the 3 normal ones 0.5, 0.3, 0.1.
VAL_LABELS = np.array([0, 0, 0, 1, 1, 1])
VAL_P_COVID = np.array([0.9, 0.6, 0.4, 0.5, 0.3, 0.1])
VAL_PROBS = np.column_stack([VAL_P_COVID, 1 - VAL_P_COVID])


def test_operating_points_maximise_youden_j_highest_threshold_on_ties():
    # covid, "positive if p >= t": t=0.9 J=1/3-0; t=0.6 J=2/3-0; t=0.5 J=2/3-1/3; t=0.4 J=1-1/3; t=0.3 J=1-2/3; t=0.1 J=0.
    # Best J = 2/3 at t=0.6 and t=0.4 -> the higher (more specific) 0.6.
    # normal, p(normal) = 1 - p(covid): positives 0.5, 0.7, 0.9; negatives 0.1, 0.4, 0.6 -> J=2/3 at 0.7 and 0.5 -> 0.7.
    t = choose_operating_points(VAL_PROBS, VAL_LABELS, BINARY)
    assert set(t) == set(BINARY)
    assert t["covid"] == pytest.approx(0.6)
    assert t["normal"] == pytest.approx(0.7)


def test_operating_points_nan_for_absent_class_and_uninformative_scores_stay_finite():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    t = choose_operating_points(probs, labels, NAMES)
    assert math.isnan(t["normal"])
    assert t["covid"] == pytest.approx(0.6) and t["other_pneumonia"] == pytest.approx(0.6)
    # All scores tied: J = 0 everywhere; the threshold is the tied score, never roc_curve's +inf.
    flat = choose_operating_points(np.full((4, 3), 1 / 3), np.array([0, 1, 2, 0]), NAMES)
    assert all(v == pytest.approx(1 / 3) for v in flat.values())
    assert all(math.isnan(v) for v in choose_operating_points(np.zeros((0, 3)), np.zeros(0, dtype=int), NAMES).values())


def test_sensitivity_specificity_at_given_thresholds():
    m = classification_metrics(VAL_PROBS, VAL_LABELS, BINARY, thresholds={"covid": 0.6, "normal": 0.7})
    # covid: positives 0.9, 0.6, 0.4 -> 2 of 3 >= 0.6; negatives 0.5, 0.3, 0.1 -> 3 of 3 below.
    assert m["sens-covid"] == pytest.approx(2 / 3) and m["spec-covid"] == 1.0
    # normal: positives 0.5, 0.7, 0.9 -> 2 of 3 >= 0.7; negatives 0.1, 0.4, 0.6 -> all below.
    assert m["sens-normal"] == pytest.approx(2 / 3) and m["spec-normal"] == 1.0
    assert (m["n-pos-covid"], m["n-neg-covid"], m["n-pos-normal"], m["n-neg-normal"]) == (3, 3, 3, 3)
    # The validation thresholds applied unchanged to another (test) split: p(covid) 0.7, 0.55 for covid; 0.65 for normal.
    test_probs = np.array([[0.7, 0.3], [0.55, 0.45], [0.65, 0.35]])
    mt = classification_metrics(test_probs, np.array([0, 0, 1]), BINARY, thresholds={"covid": 0.6, "normal": 0.7})
    assert mt["sens-covid"] == 0.5 and mt["spec-covid"] == 0.0  # 0.7 >= 0.6, 0.55 not; the normal's 0.65 >= 0.6
    assert mt["sens-normal"] == 0.0 and mt["spec-normal"] == 1.0  # p(normal) 0.35 < 0.7; covid's 0.3, 0.45 < 0.7


def test_sensitivity_specificity_nan_without_thresholds_or_when_undefined():
    m = classification_metrics(VAL_PROBS, VAL_LABELS, BINARY)
    assert all(math.isnan(m[f"{s}-{c}"]) for s in ("sens", "spec") for c in BINARY)
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(probs, labels, NAMES, thresholds=choose_operating_points(probs, labels, NAMES))
    assert math.isnan(m["sens-normal"]) and math.isnan(m["spec-normal"])  # no normal study: no threshold, no positive
    assert m["sens-covid"] == 1.0 and m["spec-covid"] == 1.0
    # A finite threshold for a class without positives still gives its specificity.
    m = classification_metrics(probs, labels, NAMES, thresholds={"covid": 0.5, "other_pneumonia": 0.5, "normal": 0.05})
    assert math.isnan(m["sens-normal"]) and m["spec-normal"] == 0.0


def test_thresholds_must_name_exactly_the_classes():
    with pytest.raises(ValueError, match=r"unknown \['flu'\]"):
        classification_metrics(VAL_PROBS, VAL_LABELS, BINARY, thresholds={"covid": 0.5, "normal": 0.5, "flu": 0.5})
    with pytest.raises(ValueError, match=r"missing \['normal'\]"):
        classification_metrics(VAL_PROBS, VAL_LABELS, BINARY, thresholds={"covid": 0.5})


def test_brier_score_hand_computed():
    # Study 1, label 0: (0.7-1)^2 + 0.2^2 + 0.1^2 = 0.14; study 2, label 2: 0.2^2 + 0.2^2 + (0.6-1)^2 = 0.24 -> mean 0.19.
    m = classification_metrics(np.array([[0.7, 0.2, 0.1], [0.2, 0.2, 0.6]]), np.array([0, 2]), NAMES)
    assert m["brier"] == pytest.approx(0.19)
    perfect = classification_metrics(np.eye(3), np.array([0, 1, 2]), NAMES)
    assert perfect["brier"] == 0.0
    # Binary: summed over both columns (not halved): (0.3^2 + 0.3^2 + 0.4^2 + 0.4^2) / 2 = 0.25.
    assert classification_metrics(np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 1]), BINARY)[
        "brier"
    ] == pytest.approx(0.25)


def test_expected_calibration_error_hand_computed():
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.15, 0.85], [0.35, 0.65]])
    labels = np.array([0, 1, 1, 0])  # right (conf .95), wrong (.85), right (.85), wrong (.65)
    # 10 bins: [0.9,1.0] 1 study acc 1 conf .95 -> 1/4*.05; [0.8,0.9) 2 studies acc .5 conf .85 -> 2/4*.35;
    # [0.6,0.7) 1 study acc 0 conf .65 -> 1/4*.65. ECE = .0125 + .175 + .1625 = .35
    assert classification_metrics(probs, labels, BINARY)["ece"] == pytest.approx(0.35)
    # One bin: |accuracy 0.5 - mean confidence 0.825| = 0.325.
    assert classification_metrics(probs, labels, BINARY, n_bins=1)["ece"] == pytest.approx(0.325)
    # Uniform probabilities, balanced labels: confidence 1/3, accuracy 1/3 -> calibrated.
    assert classification_metrics(np.full((30, 3), 1 / 3), np.array([0, 1, 2] * 10), NAMES)["ece"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="n_bins.*0"):
        classification_metrics(probs, labels, BINARY, n_bins=0)


def test_every_site_sends_the_same_keys():
    full = classification_metrics(VAL_PROBS, VAL_LABELS, BINARY, thresholds={"covid": 0.6, "normal": 0.7})
    one_class = classification_metrics(
        VAL_PROBS[:3], VAL_LABELS[:3], BINARY, thresholds={"covid": math.nan, "normal": math.nan}
    )
    empty = classification_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int), BINARY)
    assert set(full) == set(one_class) == set(empty)
    for key in ("brier", "ece", "sens-covid", "spec-normal", "n-pos-covid", "n-neg-normal"):
        assert key in full
    assert math.isnan(empty["brier"]) and math.isnan(empty["ece"]) and empty["n-pos-covid"] == 0
    assert math.isnan(one_class["auc-covid"]) and one_class["ece"] >= 0


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[0, 3\]"):
        classification_metrics(VAL_PROBS[:2], np.array([0, 3]), BINARY)


# --- score histograms ---------------------------------------------------------------------------------


def test_score_histograms_hand_computed():
    # 4 bins [0,.25) [.25,.5) [.5,.75) [.75,1]: covid positives .9 .6 .4 -> bins 3 2 1; negatives .5 .3 .1 -> bins 2 1 0.
    h = score_histograms(VAL_PROBS, VAL_LABELS, BINARY, bins=4)
    assert set(h) == {"hist-pos-covid", "hist-neg-covid", "hist-pos-normal", "hist-neg-normal"}
    assert h["hist-pos-covid"] == [0.0, 1.0, 1.0, 1.0]
    assert h["hist-neg-covid"] == [1.0, 1.0, 1.0, 0.0]
    # normal positives p = .5 .7 .9 -> bins 2 2 3; negatives .1 .4 .6 -> bins 0 1 2.
    assert h["hist-pos-normal"] == [0.0, 0.0, 2.0, 1.0]
    assert h["hist-neg-normal"] == [1.0, 1.0, 1.0, 0.0]
    assert all(isinstance(c, float) for v in h.values() for c in v)


def test_score_histograms_edges_empty_and_one_class():
    # 0 goes to the first bin, 1 (and rounding just above 1) to the last.
    h = score_histograms(np.array([[1.0 + 1e-12, 0.0], [0.0, 1.0]]), np.array([0, 1]), BINARY, bins=2)
    assert h["hist-pos-covid"] == [0.0, 1.0] and h["hist-neg-covid"] == [1.0, 0.0]
    empty = score_histograms(np.zeros((0, 3)), np.zeros(0, dtype=int), NAMES, bins=5)
    assert len(empty) == 6 and all(v == [0.0] * 5 for v in empty.values())
    only_covid = score_histograms(np.array([[0.9, 0.05, 0.05]]), np.array([0]), NAMES, bins=2)
    assert only_covid["hist-pos-covid"] == [0.0, 1.0] and only_covid["hist-neg-covid"] == [0.0, 0.0]
    assert only_covid["hist-pos-normal"] == [0.0, 0.0] and only_covid["hist-neg-normal"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="bins must be a positive integer, got 0"):
        score_histograms(VAL_PROBS, VAL_LABELS, BINARY, bins=0)


# --- survival -----------------------------------------------------------------------------------------

RISK = np.array([2.0, 2.0, 0.0, 1.0])
TIME = np.array([1.0, 2.0, 3.0, 4.0])
EVENT = np.array([1.0, 0.0, 1.0, 0.0])


def test_survival_metrics_hand_computed():
    # Comparable pairs (i had the event, j lasted longer): (0,1) tie in risk 0.5; (0,2) 2>0 1; (0,3) 2>1 1; (2,3) 0<1 0.
    # C = 2.5 / 4.
    # Horizon 2.5: case = study 0 (event at day 1); study 1 censored at day 2 excluded; controls = studies 2, 3
    # (risks 0 and 1, both below the case's 2) -> td-AUC 1.
    m = survival_metrics(RISK, TIME, EVENT, horizon_days=2.5)
    assert m == {
        "c-index": pytest.approx(0.625),
        "td-auc": 1.0,
        "n-events": 2.0,
        "n-known": 4.0,
        "n-td-cases": 1.0,
        "n-td-controls": 2.0,
    }
    # Horizon 3: cases = studies 0 (risk 2) and 2 (risk 0); control = study 3 (risk 1) -> 1 of 2 pairs right.
    assert survival_metrics(RISK, TIME, EVENT, horizon_days=3)["td-auc"] == pytest.approx(0.5)


def test_survival_equal_times_are_not_comparable():
    # Studies 0 and 1 both die on day 1: not a comparable pair. Pairs (0,2), (1,2): risks 3 > 1 and 0 < 1 -> C = 1/2.
    m = survival_metrics(np.array([3.0, 0.0, 1.0]), np.array([1.0, 1.0, 2.0]), np.array([1, 1, 0]), horizon_days=1.5)
    assert m["c-index"] == pytest.approx(0.5)
    assert m["td-auc"] == pytest.approx(0.5)  # cases risks 3, 0 vs control risk 1


def test_survival_nan_rows_are_masked():
    risk = np.concatenate([RISK, [5.0, np.nan, -3.0]])
    time = np.concatenate([TIME, [np.nan, np.nan, 0.5]])
    event = np.concatenate([EVENT, [1.0, np.nan, np.nan]])
    assert survival_metrics(risk, time, event, horizon_days=2.5) == survival_metrics(
        RISK, TIME, EVENT, horizon_days=2.5
    )


def test_survival_undefined_cases_give_nan():
    censored = survival_metrics(RISK, TIME, np.zeros(4), horizon_days=2.5)
    assert math.isnan(censored["c-index"]) and math.isnan(censored["td-auc"]) and censored["n-events"] == 0
    empty = survival_metrics(np.zeros(0), np.zeros(0), np.zeros(0), horizon_days=30)
    assert math.isnan(empty["c-index"]) and math.isnan(empty["td-auc"]) and empty["n-events"] == 0
    unknown = survival_metrics(RISK, np.full(4, np.nan), EVENT, horizon_days=30)
    assert math.isnan(unknown["c-index"]) and unknown["n-events"] == 0
    # Only event is the last one: no comparable pair; everyone followed past the horizon: no case.
    last = survival_metrics(RISK, TIME, np.array([0, 0, 0, 1]), horizon_days=0.5)
    assert math.isnan(last["c-index"]) and math.isnan(last["td-auc"]) and last["n-events"] == 1
    # Everyone's outcome known before the horizon: no control.
    assert math.isnan(survival_metrics(RISK, TIME, EVENT, horizon_days=10)["td-auc"])


def test_survival_risks_equal_up_to_float_noise_are_ties():
    """A model that predicts one risk for everyone scores C = 0.5 and td-AUC 0.5 even when float32 arithmetic left its
    outputs differing in the last bits (batches of different sizes); risks apart by more than the tolerance keep their
    order."""
    from fl_client.metrics import RISK_TIE_ATOL, RISK_TIE_RTOL, tie_float_noise

    base = np.float32(0.1234567)
    noisy = np.array([base, np.nextafter(base, np.float32(1)), np.nextafter(base, np.float32(0)), base], np.float32)
    assert len(set(noisy.tolist())) == 3
    m = survival_metrics(noisy.astype(np.float64), TIME, EVENT, horizon_days=2.5)
    assert m["c-index"] == 0.5 and m["td-auc"] == 0.5
    # the same noise on a real ordering changes nothing
    apart = RISK + noisy.astype(np.float64) * 1e-6
    assert survival_metrics(apart, TIME, EVENT, horizon_days=2.5) == survival_metrics(
        RISK, TIME, EVENT, horizon_days=2.5
    )
    # a run is anchored at its smallest value: a chain of small steps is not one wide tie
    step = 0.6 * (RISK_TIE_ATOL + RISK_TIE_RTOL * 1.0)
    chain = 1.0 + step * np.arange(4)
    assert tie_float_noise(chain).tolist() == [chain[0], chain[0], chain[2], chain[2]]
    assert tie_float_noise(np.array([2.0, np.nan, 1.0])).tolist()[::2] == [2.0, 1.0]


def test_survival_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"event must be 0 or 1.*2\.0"):
        survival_metrics(RISK, TIME, np.array([1, 2, 0, 0]), horizon_days=3)
    with pytest.raises(ValueError, match="horizon_days.*0"):
        survival_metrics(RISK, TIME, EVENT, horizon_days=0)
    with pytest.raises(ValueError, match=r"time must have the shape of risk \(4,\), got \(3,\)"):
        survival_metrics(RISK, TIME[:3], EVENT, horizon_days=3)
    with pytest.raises(ValueError, match="time must be finite and >= 0"):
        survival_metrics(RISK, -TIME, EVENT, horizon_days=3)
    with pytest.raises(ValueError, match="risk must be finite"):
        survival_metrics(np.array([np.nan, 1, 2, 3]), TIME, EVENT, horizon_days=3)


def test_risk_histogram_counts_every_finite_score_and_clips_the_tails():
    from fl_client.metrics import RISK_BINS, RISK_RANGE, risk_histogram

    hist = risk_histogram(np.array([0.01, 0.02, -100.0, 100.0, np.nan]))["hist-risk"]
    assert len(hist) == RISK_BINS and sum(hist) == 4
    assert hist[0] == 1 and hist[-1] == 1  # clipped into the first and last bins
    middle = int((0.015 - RISK_RANGE[0]) / (RISK_RANGE[1] - RISK_RANGE[0]) * RISK_BINS)
    assert hist[middle] == 2


# --- the privacy floor (no metric sent depends on fewer than k studies) -------------------------------------------

from fl_client.metrics import (  # noqa: E402
    MIN_COUNT,
    coarsen_histogram,
    floor_evaluation,
    floor_training,
    risk_histogram,
)


def _split(n: int, seed: int) -> dict:
    """An evaluated split the way fl_client.train builds it: n studies, three classes, outcomes for every study."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    logits = 1.5 * np.eye(3)[labels] + rng.normal(size=(n, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    risk, time, event = rng.normal(size=n), rng.uniform(1, 30, size=n), (labels == 0).astype(float)
    m = classification_metrics(probs, labels, NAMES, thresholds=choose_operating_points(probs, labels, NAMES))
    m.update(survival_metrics(risk, time, event, horizon_days=14.0))
    m.update(score_histograms(probs, labels, NAMES))
    return m


def _evaluation(val_n: int, test_n: int, train_n: int = 40) -> dict:
    metrics = {f"val-{k}": v for k, v in _split(val_n, 1).items()}
    metrics.update({f"test-{k}": v for k, v in _split(test_n, 2).items()})
    metrics.update({f"train-{k}": v for k, v in risk_histogram(np.random.default_rng(3).normal(size=train_n)).items()})
    metrics["num-examples"] = val_n
    return metrics


def test_a_site_with_three_studies_in_a_split_sends_no_histogram_and_no_score_of_it():
    sent = floor_evaluation(_evaluation(val_n=3, test_n=60))
    val_hists = [k for k in sent if k.startswith("val-hist-")]
    assert len(val_hists) == 6 and all(sent[k] == [] for k in val_hists)  # keys kept (Flower needs them), no counts
    assert sent["val-n"] == 3  # the split's size stays (the weight); nothing computed from its studies does
    for key, value in sent.items():
        if key.startswith("val-") and key != "val-n" and "-hist-" not in key:
            assert math.isnan(value), key
    # The 60-study test split (20 per class) is sent, histograms coarsened.
    assert math.isfinite(sent["test-auc-macro"]) and math.isfinite(sent["test-loss"])
    assert {f"test-hist-pos-{c}" for c in NAMES} <= set(sent)


def test_coarsened_histograms_keep_length_and_total_and_every_group_holds_k_studies():
    raw = _evaluation(val_n=30, test_n=30)
    sent = floor_evaluation(raw)
    hist_keys = [k for k in sent if "-hist-" in k and sent[k]]
    assert "train-hist-risk" in hist_keys and len(hist_keys) == 13
    for key in hist_keys:
        assert len(sent[key]) == len(raw[key]) and sum(sent[key]) == pytest.approx(sum(raw[key]))
        assert sent[key] != raw[key]  # 10 studies in 20 bins cannot all be in groups of >= 5 without merging
        assert all(c == 0 or c >= MIN_COUNT for c in sent[key]), key
        assert all(float(c).is_integer() for c in sent[key])


@pytest.mark.parametrize("counts", [[0, 3, 0, 1, 0], [1, 1, 1, 1], [4, 0, 0, 0]])
def test_a_histogram_of_fewer_than_k_studies_is_not_sent(counts):
    assert coarsen_histogram(counts, 5) is None


def test_coarsening_by_hand():
    # The running count reaches 5 at bin 2 (group 0-2, mean bin (0*2 + 2*3)/5 = 1.2 -> 1) and again at bin 4
    # (group 3-4); the remainder 5-6 (1 study) joins it: 6 studies, mean bin (3*4 + 4 + 6)/6 = 3.67 -> 4.
    assert coarsen_histogram([2, 0, 3, 4, 1, 0, 1], 5) == [0, 5, 0, 0, 6, 0, 0]
    assert coarsen_histogram([9, 7], 5) == [9.0, 7.0]  # already fine: unchanged
    with pytest.raises(ValueError, match="min_count"):
        coarsen_histogram([9, 7], 0)
    with pytest.raises(ValueError, match="counts"):
        coarsen_histogram([9, -1], 5)


def test_a_class_with_fewer_than_k_positives_sends_no_auc_sensitivity_histogram_or_count():
    sent = floor_evaluation(_evaluation(val_n=12, test_n=12))  # 4 studies per class
    for c in NAMES:
        for name in ("auc", "sens", "n-pos"):
            assert math.isnan(sent[f"val-{name}-{c}"]), name
        assert sent[f"val-hist-pos-{c}"] == [] and sent[f"val-hist-neg-{c}"] == []
        assert sent[f"val-spec-{c}"] == pytest.approx(_evaluation(12, 12)[f"val-spec-{c}"])  # 8 negatives: fine
    assert math.isnan(sent["val-auc-macro"]) and math.isnan(sent["val-balanced-accuracy"])
    assert math.isfinite(sent["val-accuracy"])  # over all 12 studies
    assert math.isnan(sent["val-c-index"]) and math.isnan(sent["val-n-events"])  # 4 events


def test_k_can_be_raised_but_never_lowered():
    raw = _evaluation(val_n=24, test_n=24)  # 8 per class
    assert floor_evaluation(raw, min_count=2) == floor_evaluation(raw, min_count=MIN_COUNT)
    assert math.isfinite(floor_evaluation(raw)["val-auc-covid"])
    raised = floor_evaluation(raw, min_count=10)
    assert math.isnan(raised["val-auc-covid"]) and not [k for k in raised if k.startswith("val-hist") and raised[k]]
    with pytest.raises(ValueError, match="min_count"):
        floor_evaluation(raw, min_count=0)


def test_a_metric_the_floor_does_not_know_is_not_sent(caplog):
    raw = {**_evaluation(val_n=30, test_n=30), "val-scores": [0.1, 0.9], "val-risk-study-3": 2.5}
    sent = floor_evaluation(raw)
    assert "val-scores" not in sent and "val-risk-study-3" not in sent
    assert "val-scores" in caplog.text


def test_training_losses_need_k_training_studies():
    result = {
        "train-loss": 0.5,
        "train-loss-diagnosis": 0.4,
        "train-loss-prognosis": 0.2,
        "train-seconds": 3.0,
        "num-examples": 3,
        "train-per-study-loss": 1.0,
    }
    small = floor_training(result)
    assert math.isnan(small["train-loss"]) and small["num-examples"] == 3 and small["train-seconds"] == 3.0
    assert "train-per-study-loss" not in small
    assert floor_training({**result, "num-examples": 5})["train-loss"] == 0.5


def test_campaign_counts_are_sent_when_zero_or_at_least_k():
    counts = {"train-new-studies": 3, "train-feedback-labels": 0, "train-feedback-conflicts": 7}
    sent = floor_training({"num-examples": 20, "train-seconds": 1.0, **counts})
    assert math.isnan(sent["train-new-studies"]) and sent["train-feedback-labels"] == 0.0
    assert sent["train-feedback-conflicts"] == 7.0
    assert math.isnan(floor_training({"num-examples": 20, **counts}, min_count=8)["train-feedback-conflicts"])


# --- calibration statistics under the floor -------------------------------------------------------------------------

from fedct.protocol import CALIBRATION_BINS, CALIBRATION_TEMPERATURES, reliability_key  # noqa: E402
from fl_client.metrics import floor_calibration  # noqa: E402
from models.calibration import apply_temperature, reliability_bins  # noqa: E402


def test_validation_nll_sums_are_sent_only_from_k_labelled_validation_studies(caplog):
    sums = [float(i) for i in range(len(CALIBRATION_TEMPERATURES))]
    enough = floor_evaluation({**_evaluation(val_n=6, test_n=6), "val-calib-nll": sums})
    assert enough["val-calib-nll"] == sums
    # a key the floor covers is not logged as dropped (the site's log would say it was not sent)
    assert "not covered by the privacy floor" not in caplog.text
    few = floor_evaluation({**_evaluation(val_n=3, test_n=6), "val-calib-nll": sums})
    assert few["val-calib-nll"] == []  # the key stays, nothing computed from 3 studies leaves
    assert (
        floor_evaluation({**_evaluation(val_n=6, test_n=6), "val-calib-nll": sums}, min_count=7)["val-calib-nll"] == []
    )


def _calibration_reply(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) * 4
    out = {}
    for stage, t in (("before", 1.0), ("after", 2.5)):
        for field, values in zip(
            ("count", "confidence", "correct"), reliability_bins(apply_temperature(logits, t), labels), strict=True
        ):
            out[reliability_key(stage, field)] = values
    out.update({"test-n": float(n), "test-loss": 0.9, "test-brier": 0.5, "test-accuracy": 0.6, "num-examples": n})
    return out


def test_calibration_bins_leave_a_site_only_in_groups_of_k_studies():
    sent = floor_calibration(_calibration_reply(12))
    for stage in ("before", "after"):
        count = sent[reliability_key(stage, "count")]
        assert len(count) == CALIBRATION_BINS and sum(count) == 12
        assert all(c == 0 or c >= 5 for c in count)
        conf, correct = sent[reliability_key(stage, "confidence")], sent[reliability_key(stage, "correct")]
        assert all((n == 0) == (c == 0) and h <= n for n, c, h in zip(count, conf, correct, strict=True))
    assert sent["test-brier"] == 0.5 and sent["num-examples"] == 12


def test_a_site_with_too_few_test_studies_sends_no_calibration_bins_and_unknown_keys_are_dropped(caplog):
    sent = floor_calibration({**_calibration_reply(4), "test-study-uid": 1.0})
    assert all(
        sent[reliability_key(s, f)] == [] for s in ("before", "after") for f in ("count", "confidence", "correct")
    )
    assert math.isnan(sent["test-brier"]) and sent["test-n"] == 4  # the split's size stays, as in an evaluation
    assert "test-study-uid" not in sent and "not covered by the privacy floor" in caplog.text

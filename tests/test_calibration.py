"""Temperature scaling fitted from summed statistics (models.calibration): the fit, the federated sums, the ECE."""

import math

import numpy as np
import pytest

from fedct.protocol import CALIBRATION_BINS, CALIBRATION_TEMPERATURES
from models.calibration import (
    apply_temperature,
    bundle_temperature,
    coarsen_reliability,
    ece_from_bins,
    ece_sampling_floor,
    fit_temperature,
    nll_grid,
    reliability_bins,
)


def overconfident(n: int, *, seed: int, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a three-class model that is right more often than chance but far too sure of itself."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), labels] += 1.0
    return logits * scale, labels


def test_the_grid_is_log_spaced_from_a_quarter_to_eight_and_holds_one():
    assert CALIBRATION_TEMPERATURES[0] == pytest.approx(0.25) and CALIBRATION_TEMPERATURES[-1] == pytest.approx(8.0)
    ratios = np.diff(np.log(CALIBRATION_TEMPERATURES))
    assert np.allclose(ratios, ratios[0])
    assert min(abs(t - 1.0) for t in CALIBRATION_TEMPERATURES) < 1e-12


def test_an_overconfident_model_gets_a_temperature_above_one_and_its_ece_drops():
    logits, labels = overconfident(3000, seed=0)
    t = fit_temperature(nll_grid(logits, labels))
    assert t > 2.0
    before = ece_from_bins(*reliability_bins(apply_temperature(logits, 1.0), labels))
    after = ece_from_bins(*reliability_bins(apply_temperature(logits, t), labels))
    assert before > 0.15 and after < 0.05
    # the argmax (the call) never changes
    assert np.array_equal(apply_temperature(logits, t).argmax(1), logits.argmax(1))


def test_an_underconfident_model_gets_a_temperature_below_one():
    logits, labels = overconfident(3000, seed=1, scale=0.3)
    assert fit_temperature(nll_grid(logits, labels)) < 1.0


def test_the_refined_fit_is_close_to_a_fine_search():
    logits, labels = overconfident(2000, seed=2)
    fine = np.geomspace(0.25, 8, 2001)
    best = fine[int(np.argmin(nll_grid(logits, labels, fine)))]
    assert fit_temperature(nll_grid(logits, labels)) == pytest.approx(best, rel=0.01)


def test_the_federated_fit_from_two_sites_sums_equals_the_fit_on_the_pooled_logits():
    a, ya = overconfident(300, seed=3)
    b, yb = overconfident(500, seed=4, scale=2.0)
    summed = np.add(nll_grid(a, ya), nll_grid(b, yb))
    pooled = nll_grid(np.concatenate([a, b]), np.concatenate([ya, yb]))
    assert np.allclose(summed, pooled)
    assert fit_temperature(summed) == pytest.approx(fit_temperature(pooled), rel=1e-9)
    # and the pooled ECE is the ECE of the summed bins
    probs_a, probs_b = apply_temperature(a, 2.0), apply_temperature(b, 2.0)
    bins = [np.add(x, y) for x, y in zip(reliability_bins(probs_a, ya), reliability_bins(probs_b, yb), strict=True)]
    pooled_bins = reliability_bins(np.concatenate([probs_a, probs_b]), np.concatenate([ya, yb]))
    assert ece_from_bins(*bins) == pytest.approx(ece_from_bins(*pooled_bins))


def test_the_ece_of_the_bins_matches_a_hand_computed_case():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    count, conf, correct = reliability_bins(probs, labels, n_bins=10)
    assert len(count) == 10 and sum(count) == 4
    # bins: 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (right): |1-.9| + |0-.8| + |1-.7| + |1-.6| = 1.6, over 4
    assert ece_from_bins(count, conf, correct) == pytest.approx(0.4)
    assert math.isnan(ece_from_bins([0.0] * 3, [0.0] * 3, [0.0] * 3))
    assert len(reliability_bins(probs, labels)[0]) == CALIBRATION_BINS


def test_coarsened_bins_hold_k_studies_each_keep_the_totals_and_never_raise_the_ece():
    logits, labels = overconfident(23, seed=5)
    bins = reliability_bins(apply_temperature(logits, 1.0), labels)
    coarse = coarsen_reliability(*bins, 5)
    assert coarse is not None
    assert all(len(x) == CALIBRATION_BINS for x in coarse)
    assert all(c == 0 or c >= 5 for c in coarse[0])
    for fine, merged in zip(bins, coarse, strict=True):
        assert sum(merged) == pytest.approx(sum(fine))
    assert ece_from_bins(*coarse) <= ece_from_bins(*bins) + 1e-12
    # each group sits in the bin of its mean confidence
    for i, (n, c) in enumerate(zip(coarse[0], coarse[1], strict=True)):
        if n:
            assert int(c / n * CALIBRATION_BINS) in (i, CALIBRATION_BINS) and (i < CALIBRATION_BINS)
    assert coarsen_reliability(*reliability_bins(apply_temperature(logits[:4], 1.0), labels[:4]), 5) is None


def test_bad_inputs_are_named():
    logits, labels = overconfident(10, seed=6)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        nll_grid(logits, labels, [1.0, math.inf])
    with pytest.raises(ValueError, match="logits"):
        nll_grid(logits[:, :1], labels)
    with pytest.raises(ValueError, match="labels"):
        nll_grid(logits, labels + 5)
    with pytest.raises(ValueError, match="one NLL sum per grid temperature"):
        fit_temperature([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        fit_temperature([math.nan] * len(CALIBRATION_TEMPERATURES))
    with pytest.raises(ValueError, match="same length"):
        coarsen_reliability([1.0], [0.5, 0.5], [1.0], 5)


def test_the_fit_stays_at_the_end_of_the_grid_when_the_minimum_is_there():
    increasing = [float(i) for i in range(len(CALIBRATION_TEMPERATURES))]
    assert fit_temperature(increasing) == CALIBRATION_TEMPERATURES[0]
    assert fit_temperature(increasing[::-1]) == CALIBRATION_TEMPERATURES[-1]


def test_bundle_temperature_defaults_to_one_and_refuses_a_bad_value():
    assert bundle_temperature({}) == 1.0
    assert bundle_temperature({"calibration": None}) == 1.0
    assert bundle_temperature({"calibration": {"temperature": None, "reason": "no sums"}}) == 1.0
    assert bundle_temperature({"calibration": {"temperature": 1.7}}) == 1.7
    with pytest.raises(ValueError, match="x/model.json: calibration.temperature"):
        bundle_temperature({"calibration": {"temperature": -1}}, source="x/model.json")


def test_the_sampling_floor_matches_calibrated_models_drawn_at_that_size():
    # 60 test studies of a perfectly calibrated model: its ECE is not 0, and the floor says how large it reads
    rng = np.random.default_rng(5)
    eces, floors = [], []
    for _ in range(300):
        confidence = rng.uniform(0.4, 1.0, 60)
        correct = rng.random(60) < confidence
        probs = np.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], axis=1)
        labels = np.where(correct, 0, 1)
        bins = reliability_bins(probs, labels)
        eces.append(ece_from_bins(*bins))
        floors.append(ece_sampling_floor(bins[0], bins[1]))
    assert np.mean(eces) == pytest.approx(np.mean([f["expected"] for f in floors]), rel=0.1)
    assert 0.05 < np.mean(eces) < 0.2  # the 60-study floor is above a 0.05 goal
    assert np.mean([e <= f["upper"] for e, f in zip(eces, floors)]) >= 0.9


def test_the_sampling_floor_shrinks_with_the_test_size_and_is_exact_for_one_bin():
    small = ece_sampling_floor([10], [7.0])
    large = ece_sampling_floor([1000], [700.0])
    assert large["expected"] < small["expected"] / 5
    # one bin of 2 studies at p = 0.5: K in {0, 1, 2} with P 1/4, 1/2, 1/4; |K - 1| / 2 -> 0.25
    assert ece_sampling_floor([2], [1.0])["expected"] == pytest.approx(0.25)
    assert ece_sampling_floor([2], [1.0])["upper"] >= 0.25


@pytest.mark.parametrize(
    ("count", "confidence", "kwargs", "message"),
    [
        ([2, 3], [1.0], {}, "same length"),
        ([2.5], [1.0], {}, "whole numbers"),
        ([-1], [0.0], {}, "whole numbers"),
        ([2], [1.0], {"quantile": 1.0}, "quantile"),
        ([2], [1.0], {"draws": 0}, "draws"),
    ],
)
def test_the_sampling_floor_refuses_bad_bins(count, confidence, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ece_sampling_floor(count, confidence, **kwargs)


def test_the_sampling_floor_of_no_study_is_nan():
    assert math.isnan(ece_sampling_floor([0, 0], [0.0, 0.0])["expected"])

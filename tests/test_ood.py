"""The out-of-distribution reference (models.ood): pooled moments equal the pooled data's, the distance, the
log-normal threshold and the studies expected above it, the bundle's reference read back or refused."""

import math

import numpy as np
import pytest

from models.ood import (
    OodReference,
    bundle_ood,
    expected_above,
    feature_distance,
    feature_moments,
    log_moments,
    pooled_moments,
    threshold_from_moments,
)


def test_pooled_moments_equal_the_moments_of_all_sites_studies_pooled():
    rng = np.random.default_rng(0)
    sites = [rng.normal(loc=i, scale=1 + i, size=(n, 8)) for i, n in enumerate((7, 12, 30))]
    n, mean, var = pooled_moments([feature_moments(f) for f in sites] + [(0, [], [])])
    everything = np.concatenate(sites)
    assert n == 49
    np.testing.assert_allclose(mean, everything.mean(0))
    np.testing.assert_allclose(var, everything.var(0))
    with pytest.raises(ValueError, match="no site"):
        pooled_moments([(0, [], [])])
    with pytest.raises(ValueError, match="different lengths"):
        pooled_moments([feature_moments(sites[0]), feature_moments(sites[1][:, :4])])


def test_the_distance_is_about_one_in_distribution_and_large_far_from_it():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(2000, 32)) * np.linspace(0.1, 3, 32)
    _, mean, var = pooled_moments([feature_moments(train)])
    new = rng.normal(size=(200, 32)) * np.linspace(0.1, 3, 32)
    d_in = feature_distance(new, mean, var)
    assert 0.8 < float(np.median(d_in)) < 1.1
    far = new + 3 * np.sqrt(var)  # every feature three SDs off
    assert float(feature_distance(far, mean, var).min()) > 5
    # a feature that never varied in training (a dead channel) does not make every study infinitely far
    var0 = var.copy()
    var0[0] = 0.0
    assert math.isfinite(float(feature_distance(new[:1], mean, var0)[0]))
    with pytest.raises(ValueError, match="shape"):
        feature_distance(new, mean[:5], var[:5])
    with pytest.raises(ValueError, match="finite"):
        feature_distance(np.full((1, 32), np.nan), mean, var)


def test_threshold_is_the_prediction_bound_of_a_log_normal_fitted_to_pooled_sums():
    rng = np.random.default_rng(2)
    sites = [rng.lognormal(0.0, 0.5, size=n) for n in (300, 700)]
    pooled = np.sum([log_moments(d) for d in sites], axis=0)
    t = threshold_from_moments(pooled, 0.99)
    everything = np.concatenate(sites)
    assert pooled[0] == 1000 and 0.003 <= (everything > t).mean() <= 0.02
    # at n = 1000 the prediction bound is barely above the plug-in 99th percentile: just under 1 % of 1000 above it
    assert 9.5 < expected_above(pooled, t) < 10
    assert expected_above(log_moments(everything * 100), t) > 990
    assert expected_above([3.0, 0.0, 0.0], 2.0) == 0.0  # no spread: all at 1, none above 2
    with pytest.raises(ValueError, match="at least 2"):
        threshold_from_moments([1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="quantile"):
        threshold_from_moments(pooled, 1.0)
    with pytest.raises(ValueError, match="> 0"):
        log_moments([0.0, 1.0])


def test_the_bundle_reference_round_trips_and_bad_ones_are_refused():
    ref = OodReference(mean=(0.0, 1.0), var=(1.0, 4.0), threshold=2.5)
    again = bundle_ood({"ood": {**ref.to_dict(), "validation_above": 1}})
    assert again == ref and again.distance([0.0, 1.0]) == 0.0
    assert (
        bundle_ood({}) is None
        and bundle_ood({"ood": None}) is None
        and bundle_ood({"ood": {"threshold": None}}) is None
    )
    for bad in ({"feature_mean": [0.0], "feature_var": [-1.0], "threshold": 1.0}, {"threshold": 1.0}):
        with pytest.raises(ValueError, match="x/model.json: ood"):
            bundle_ood({"ood": bad}, source="x/model.json")
    with pytest.raises(ValueError, match="threshold"):
        OodReference(mean=(0.0,), var=(1.0,), threshold=math.inf)


def test_few_validation_studies_still_flag_about_one_in_a_hundred_like_them():
    """The threshold is a prediction bound: fitted to 14 validation studies (the test federation's), a new study like
    them lies above it 1 % of the time; the plug-in quantile mean + z * SD would flag about 2 %."""
    rng = np.random.default_rng(0)
    above_bound, above_plug_in = [], []
    for _ in range(2000):
        validation = rng.lognormal(0.0, 0.5, size=14)
        moments = log_moments(validation)
        new = rng.lognormal(0.0, 0.5, size=50)
        above_bound.append((new > threshold_from_moments(moments, 0.99)).mean())
        logs = np.log10(validation)
        plug_in = 10 ** (logs.mean() + 2.3263 * logs.std(ddof=1))
        above_plug_in.append((new > plug_in).mean())
    assert 0.007 < np.mean(above_bound) < 0.013
    assert np.mean(above_plug_in) > 0.017

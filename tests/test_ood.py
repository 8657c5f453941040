"""The out-of-distribution reference (models.ood): pooled moments equal the pooled data's, the distance, the
histogram threshold and the counts above it, the bundle's reference read back or refused."""

import math

import numpy as np
import pytest

from fedct.protocol import OOD_BINS
from models.ood import (
    OodReference,
    bin_edges,
    bundle_ood,
    count_above,
    distance_histogram,
    feature_distance,
    feature_moments,
    pooled_moments,
    threshold_from_histogram,
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


def test_threshold_is_a_bin_edge_at_the_quantile_and_counts_above_are_exact():
    rng = np.random.default_rng(2)
    d = rng.lognormal(0.0, 0.3, size=1000)
    counts = distance_histogram(d)
    assert len(counts) == OOD_BINS and sum(counts) == 1000
    t = threshold_from_histogram(counts, 0.99)
    assert t in bin_edges()
    assert (d <= t).mean() >= 0.99 and count_above(counts, t) == (d > t).sum() <= 10
    assert count_above(distance_histogram(d * 100), t) == 1000
    assert distance_histogram([0.0, 1e9])[0] == 1 and distance_histogram([1e9])[-1] == 1  # clipped into the ends
    assert math.isnan(threshold_from_histogram([0.0] * OOD_BINS))
    with pytest.raises(ValueError, match="finite counts"):
        threshold_from_histogram([1.0] * 3)
    with pytest.raises(ValueError, match="quantile"):
        threshold_from_histogram(counts, 0.0)


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

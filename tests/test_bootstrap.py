"""eval.bootstrap: seeded identity resamples, percentile intervals, paired differences."""

import numpy as np
import pytest

from eval.bootstrap import identity_resamples, interval, paired_difference, weighted_means, weights_for


def test_identity_resamples_are_seeded_draws_with_replacement():
    counts = identity_resamples(60, 1000, seed=0)
    assert counts.shape == (1000, 60) and counts.min() >= 0
    assert np.all(counts.sum(1) == 60)  # each resample draws as many identities as there are
    assert np.array_equal(counts, identity_resamples(60, 1000, seed=0))
    assert not np.array_equal(counts, identity_resamples(60, 1000, seed=1))
    # each identity is missing from about (1 - 1/n)^n = 36.5 % of resamples
    assert (counts == 0).mean() == pytest.approx((1 - 1 / 60) ** 60, abs=0.01)
    with pytest.raises(ValueError):
        identity_resamples(0, 10, 0)


def test_weights_and_weighted_means_follow_the_identity():
    counts = np.array([[2, 0, 1], [0, 3, 0]])
    identity = np.array([0, 0, 1, 2])  # four samples of three identities
    w = weights_for(counts, identity)
    np.testing.assert_array_equal(w, [[2, 2, 0, 1], [0, 0, 3, 0]])
    np.testing.assert_allclose(weighted_means(np.array([1.0, 3.0, 10.0, 4.0]), w), [(2 + 6 + 4) / 5, 10.0])


def test_interval_and_paired_difference():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 1, 100_000)
    lo, hi = interval(s)
    assert lo == pytest.approx(-1.96, abs=0.03) and hi == pytest.approx(1.96, abs=0.03)
    assert interval([np.nan, np.nan]) is None and interval([np.nan, 1.0, 3.0]) == [1.05, 2.95]
    a = rng.normal(0.90, 0.01, 1000)
    b = a - 0.005 + rng.normal(0, 0.001, 1000)  # correlated with a: the paired difference is clear
    d = paired_difference(a, b, 0.90, 0.895)
    assert d["verdict"] == "better" and d["diff"] == pytest.approx(0.005) and d["ci95"][0] > 0
    assert paired_difference(b, a, 0.895, 0.90)["verdict"] == "worse"
    assert paired_difference(b, a, 0.895, 0.90, higher_is_better=False)["verdict"] == "better"  # e.g. EER
    noisy = paired_difference(a, a + rng.normal(0, 0.01, 1000), 0.90, 0.90)
    assert noisy["verdict"] == "within noise"
    assert paired_difference(a, b, float("nan"), 0.9) is None

"""Shared statistics: the pooled FVU of resampled groups against the FVU of the resampled rows themselves."""

from __future__ import annotations

import numpy as np
import pytest

from darkmatter.analysis.stats import (
    basic_interval,
    cluster_multiplicities,
    multiplicities,
    percentile_interval,
    pooled_fvu,
)


def test_pooled_fvu_of_a_resample_equals_the_fvu_of_its_rows(rng):
    groups = np.repeat(np.arange(7), rng.integers(3, 9, 7))
    x = rng.normal(size=(len(groups), 5)) * 3 + rng.normal(size=5) * 10  # a mean far from 0: the centring matters
    errors = rng.normal(size=(len(groups), 2)) ** 2  # two per-token squared errors
    sums = lambda v: np.stack([np.bincount(groups, v[:, j]) for j in range(v.shape[1])], 1)  # noqa: E731
    n = np.bincount(groups).astype(float)
    weights = multiplicities(7, 5, seed=0)
    got = pooled_fvu(sums(errors), n, sums(x), np.bincount(groups, (x * x).sum(1)), weights)
    for b, w in enumerate(weights):
        rows = np.concatenate([np.flatnonzero(groups == g) for g in range(7) for _ in range(w[g])])
        total_ss = ((x[rows] - x[rows].mean(0)) ** 2).sum()
        np.testing.assert_allclose(got[b], errors[rows].sum(0) / total_ss, rtol=1e-10)
    point = pooled_fvu(sums(errors), n, sums(x), np.bincount(groups, (x * x).sum(1)))
    np.testing.assert_allclose(point[0], errors.sum(0) / ((x - x.mean(0)) ** 2).sum(), rtol=1e-10)


def test_percentile_interval_matches_numpy_and_ignores_nan():
    draws = np.arange(101, dtype=float)[:, None] * [1.0, -1.0]
    draws[5, 0] = np.nan
    low, high = percentile_interval(draws, 0.9)
    assert low[1] == pytest.approx(-95.0) and high[1] == pytest.approx(-5.0)
    ok = draws[:, 0][np.isfinite(draws[:, 0])]
    assert (low[0], high[0]) == pytest.approx(tuple(np.quantile(ok, [0.05, 0.95])))
    low, high = percentile_interval(np.empty((0, 3)), 0.9)
    assert low.shape == (3,) and np.isnan(low).all() and np.isnan(high).all()


def test_document_resampling_covers_where_context_resampling_does_not(rng):
    """Planted within-document correlation: 40 documents of 4 contexts each, a context's value = its document's
    effect + its own noise. A 90% interval for the mean from resampling contexts treats the 160 contexts as
    independent and under-covers badly; resampling documents covers at close to the nominal rate."""
    n_docs, per_doc, reps, n_boot = 40, 4, 400, 400
    documents = np.repeat(np.arange(n_docs), per_doc)
    covered = {"context": 0, "document": 0}
    for rep in range(reps):
        y = rng.normal(size=n_docs)[documents] + 0.3 * rng.normal(size=len(documents))  # the true mean is 0
        for unit, weights in (("context", multiplicities(len(y), n_boot, rep)),
                              ("document", cluster_multiplicities(documents, n_boot, rep))):
            low, high = percentile_interval((weights @ y) / weights.sum(1), 0.9)
            covered[unit] += bool(low <= 0 <= high)
    coverage = {unit: hits / reps for unit, hits in covered.items()}
    assert coverage["context"] < 0.75, coverage  # expected ≈ 0.59 (its standard error is ~1.9× too small)
    assert 0.84 <= coverage["document"] <= 0.95, coverage  # nominal 0.90; a percentile bootstrap runs slightly low


def test_cluster_multiplicities_weight_each_group_by_its_cluster():
    clusters = np.array(["b", "a", "b", "c", "a"])
    w = cluster_multiplicities(clusters, 50, seed=3)
    assert w.shape == (50, 5)
    assert (w[:, 0] == w[:, 2]).all() and (w[:, 1] == w[:, 4]).all()  # groups of one cluster move together
    assert (w[:, [0, 1, 3]].sum(1) == 3).all()  # 3 clusters drawn per resample
    assert np.array_equal(w, cluster_multiplicities(clusters, 50, seed=3))


def test_r2_on_fit_flag_matches_scikit_learn_and_resamples_by_group(rng):
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    from darkmatter.analysis.stats import r2_interval_on_fit_flag, r2_on_fit_flag

    n = 3000
    x = rng.normal(size=(n, 3))
    x[:, 2] = 7.0  # constant on every row: dropped from the fit
    y = x[:, :2] @ [1.5, -0.5] + rng.normal(size=n)
    fit = rng.random(n) < 0.6
    want = r2_score(y[~fit], LinearRegression().fit(x[fit, :2], y[fit]).predict(x[~fit, :2]))
    assert r2_on_fit_flag(x, y, fit) == pytest.approx(want, rel=1e-10)
    # nothing varies: the prediction is the fit-row mean
    assert r2_on_fit_flag(x[:, 2], y, fit) == pytest.approx(1 - ((y[~fit] - y[fit].mean()) ** 2).sum()
                                                            / ((y[~fit] - y[~fit].mean()) ** 2).sum(), rel=1e-10)
    groups = np.arange(n) // 100  # 30 groups
    r2, low, high = r2_interval_on_fit_flag(x, y, fit, groups, lambda g: multiplicities(len(g), 200, 0), 0.9)
    assert r2 == pytest.approx(want, rel=1e-10) and low < r2 < high and high - low < 0.1
    r2, low, high = r2_interval_on_fit_flag(x, y, fit, groups, lambda g: np.zeros((0, len(g))), 0.9)
    assert r2 == pytest.approx(want, rel=1e-10) and np.isnan(low) and np.isnan(high)  # no resamples, no interval


def test_basic_interval_reflects_a_resampling_bias_about_the_estimate():
    rng = np.random.default_rng(0)
    centred = rng.standard_normal((4000, 2))
    low, high = basic_interval(np.zeros(2), centred, 0.9)  # draws symmetric about the estimate: the percentile one
    p_low, p_high = percentile_interval(centred, 0.9)
    np.testing.assert_allclose(low, -p_high)
    np.testing.assert_allclose(high, -p_low)
    low, high = basic_interval(np.array([0.3]), 0.27 + 0.01 * rng.standard_normal((4000, 1)), 0.9)
    # draws 0.03 below the estimate: the interval sits 0.03 above it, its width kept
    assert 0.3 + 0.03 - 0.0170 < low[0] < 0.3 + 0.03 - 0.0160 and 0.3 + 0.03 + 0.0160 < high[0] < 0.3 + 0.03 + 0.0170

"""Scaling law FVU(W) = c + a·W^(−m): recovery, interval coverage and calibration, bootstrap, the Figure-1
decomposition, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from darkmatter.errors.scaling import fit_power_law, power_law, scaling_decomposition

WIDTHS = 1024 * 2.0 ** np.arange(8)  # 1k … 128k, like a Gemma-Scope-style family
A, C, M = 6.4, 0.05, 0.5  # FVU(1k) = 0.25, FVU(128k) ≈ 0.068: asymptote well inside the range of the data
SIGMA = 0.003  # ≈ 1–5 % of the FVU: what seed-to-seed variation of SAE training gives


def noisy(seed: int, sigma: float = SIGMA) -> np.ndarray:
    return power_law(WIDTHS, A, C, M) + sigma * np.random.default_rng(seed).standard_normal(WIDTHS.size)


def test_exact_data_is_recovered():
    f = fit_power_law(WIDTHS, power_law(WIDTHS, A, C, M))
    assert abs(f.a - A) <= 1e-6 * A and abs(f.c - C) <= 1e-8 and abs(f.m - M) <= 1e-7
    assert np.abs(f.predict(WIDTHS) - power_law(WIDTHS, A, C, M)).max() <= 1e-10
    assert f.residual_std <= 1e-9 and f.dof == WIDTHS.size - 3


def test_t_intervals_cover_the_truth_and_are_calibrated():
    """50 noisy families: the 95 % t intervals must contain (a, c, m) in ≥ 80 % of them.

    With exact 95 % coverage, P(fewer than 40 of 50) ≈ 1e-4 (binomial), so 80 % fails only if the intervals are
    badly too narrow; linearised intervals of a 3-parameter nonlinear fit with 5 residual dof under-cover a
    little (≈ 93–95 % measured). Calibration the other way: the reported standard error of ĉ must be within a
    factor 2 of its actual spread across the 50 fits (too-wide intervals would pass coverage alone).
    """
    hits = {"a": 0, "c": 0, "m": 0}
    c_hat, c_se = [], []
    for seed in range(50):
        f = fit_power_law(WIDTHS, noisy(seed))
        for name, truth in (("a", A), ("c", C), ("m", M)):
            lo, hi = getattr(f, f"{name}_ci")
            hits[name] += lo <= truth <= hi
        c_hat.append(f.c)
        c_se.append(np.sqrt(f.cov[1, 1]))
    for name, h in hits.items():
        assert 40 <= h <= 50, (name, h)
    assert abs(np.mean(c_hat) - C) <= 3 * np.std(c_hat) / np.sqrt(50)  # ĉ unbiased to within its standard error
    assert 0.5 <= np.mean(c_se) / np.std(c_hat) <= 2.0


def test_bootstrap_intervals_agree_with_t_and_are_seeded():
    y = noisy(1)
    t = fit_power_law(WIDTHS, y)
    b = fit_power_law(WIDTHS, y, ci="bootstrap", n_boot=100, seed=0)
    assert b.ci_method == "bootstrap" and b.n_boot_failed <= 5
    assert b.c_ci[0] <= C <= b.c_ci[1]
    ratio = (b.c_ci[1] - b.c_ci[0]) / (t.c_ci[1] - t.c_ci[0])
    assert 0.3 <= ratio <= 3.0  # same order as the linearised interval (Davison & Hinkley: both first-order)
    assert b.c_ci == fit_power_law(WIDTHS, y, ci="bootstrap", n_boot=100, seed=0).c_ci
    assert (b.a, b.c, b.m) == (t.a, t.c, t.m)  # the point estimate does not depend on the interval method


def test_figure1_decomposition_adds_up():
    f = fit_power_law(WIDTHS, noisy(2))
    nl = np.linspace(0.030, 0.034, WIDTHS.size)
    table = scaling_decomposition(f, WIDTHS, nl)
    curve = table["fvu_total_fit"].to_numpy()
    assert np.allclose(table["absent_features"].to_numpy(), curve - f.c, rtol=0, atol=1e-15)
    assert np.allclose(table["linear_error"].to_numpy(), f.c - nl.mean(), rtol=0, atol=1e-15)
    # stacked regions reach the curve: absent + linear + mean nonlinear = c + a·W^(−m)
    stacked = table["absent_features"] + table["linear_error"] + table["fvu_nonlinear_mean"]
    assert np.allclose(stacked.to_numpy(), curve, rtol=0, atol=1e-14)
    assert np.array_equal(table["nonlinear_error"].to_numpy(), nl)
    assert set(f.summary()) >= {"a", "c", "m", "c_ci_low", "c_ci_high"}


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="at least 4"):
        fit_power_law([1024, 2048, 4096], [0.3, 0.2, 0.15])
    with pytest.raises(ValueError, match="widths must be finite and > 0"):
        fit_power_law([0, 1024, 2048, 4096], [0.3, 0.2, 0.15, 0.1])
    with pytest.raises(ValueError, match="widths must be finite and > 0"):
        fit_power_law([-1, 1024, 2048, 4096], [0.3, 0.2, 0.15, 0.1])
    with pytest.raises(ValueError, match="one FVU per width"):
        fit_power_law(WIDTHS, [0.1, 0.2])
    with pytest.raises(ValueError, match="fvu_total must be finite"):
        fit_power_law(WIDTHS[:4], [0.3, np.nan, 0.15, 0.1])
    with pytest.raises(ValueError, match="distinct widths"):
        fit_power_law([1024, 1024, 2048, 4096], [0.3, 0.29, 0.2, 0.15])
    with pytest.raises(ValueError, match="confidence"):
        fit_power_law(WIDTHS, noisy(0), confidence=1.5)
    with pytest.raises(ValueError, match="ci must be"):
        fit_power_law(WIDTHS, noisy(0), ci="profile")

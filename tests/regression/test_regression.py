"""Streaming least squares: agreement with numpy/scikit-learn (random, ill-conditioned, rank-deficient, ridge),
streaming = one shot, statistics-based R² = direct R², planted truths, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import r2_score

from darkmatter.regression import (
    Design,
    fit_linear,
    heldout_r2,
    r2_scores,
    residual_ss,
    split_mask,
    stream_moments,
)


def null_r2_tolerance(d: int, n_fit: int, n_test: int) -> float:
    """Bound on |test R²| when y is independent of x [·, d] (5× the size of both effects below).

    OLS on n_fit rows fits noise: the fitted map's error adds ≈ σ²·d/n_fit to the test MSE, so E[R²] ≈ −d/n_fit;
    the test-set cross term Σ(y − ȳ)(ŷ − ȳ) of independent y and ŷ (‖ŷ‖² ≈ σ²·d/n_fit per row) fluctuates with a
    relative standard deviation ≈ 2·√(d/(n_fit·n_test)).
    """
    return 5 * (d / n_fit + 2 * math.sqrt(d / (n_fit * n_test)))


def correlated(n: int, d: int, seed: int, mean: float = 50.0, spectrum: tuple[float, float] = (0, -1)) -> np.ndarray:
    """float64 [n, d] with singular values logspace(*spectrum) and a large common mean (|mean| ≫ spread)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return rng.standard_normal((n, d)) @ (np.logspace(*spectrum, d)[:, None] * q) + mean + rng.standard_normal(d)


def with_ones(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((x.shape[0], 1))])


@pytest.mark.parametrize("intercept", [True, False])
def test_matches_numpy_lstsq_and_sklearn(intercept):
    rng = np.random.default_rng(0)
    x = correlated(3000, 24, 0).astype(np.float32)  # float32 input as stored; every sum is float64
    y = x @ rng.standard_normal((24, 6)) + 0.5 * rng.standard_normal((3000, 6)) + 7.0
    fit = fit_linear(x, y, intercept=intercept, chunk_rows=700)
    x64 = x.astype(np.float64)
    sol = np.linalg.lstsq(with_ones(x64) if intercept else x64, y, rcond=None)[0]
    coef_np, b0_np = (sol[:-1], sol[-1]) if intercept else (sol, np.zeros(6))
    sk = LinearRegression(fit_intercept=intercept).fit(x64, y)
    scale = np.abs(coef_np).max()
    # κ(centred Gram) ≈ 1e2 after Jacobi scaling (spectrum 1..0.1), so ≈ 1e-14 relative error is expected: 1e-9 is
    # a wide, deliberate margin that still catches any dropped direction or centring bug.
    assert np.abs(fit.coef - coef_np).max() <= 1e-9 * scale
    assert np.abs(fit.coef - sk.coef_.T).max() <= 1e-9 * scale
    # b0 = ȳ − x̄·B inherits B's error amplified by |x̄| (≈ 50 per dimension here)
    assert np.abs(fit.intercept - b0_np).max() <= 1e-9 * (np.abs(b0_np).max() + np.abs(x64.mean(0)).sum() * scale)
    assert fit.method == "cholesky" and fit.rank == 24


def test_ill_conditioned_with_large_mean():
    """Singular values 1 … 1e-4 (κ(X) = 1e4, κ(XᵀX) = 1e8) on top of a mean of 1000 (κ of the uncentred problem ≈ 1e14)."""
    rng = np.random.default_rng(1)
    x = correlated(4000, 16, 1, mean=1000.0, spectrum=(0, -4))
    y = x @ rng.standard_normal((16, 3)) + 1e-3 * rng.standard_normal((4000, 3))
    mask = split_mask(4000, 3000, 0)
    h = heldout_r2(x, y, fit_tokens=3000, seed=0)
    sk = LinearRegression().fit(x[mask], y[mask])
    pred_sk = sk.predict(x[~mask])
    pred = h.fit.predict(x[~mask])
    # normal equations lose ≈ log10 κ(scaled Gram) ≈ 8 digits of 16: predictions still agree to ~1e-8 of their spread
    assert np.abs(pred - pred_sk).max() <= 1e-6 * pred_sk.std()
    assert abs(h.r2.r2_mean_dims - r2_score(y[~mask], pred_sk)) <= 1e-9
    c = x[mask] - x[mask].mean(0)
    g = c.T @ c
    s = 1 / np.sqrt(np.diag(g))
    ref_cond = np.linalg.cond(s[:, None] * g * s[None, :])
    assert 0.99 <= h.fit.condition_number / ref_cond <= 1.01
    assert 1e6 <= h.fit.condition_number <= 1e10  # the planted spectrum, squared


def test_rank_deficient_falls_back_to_minimum_norm_with_warning():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 6))
    x = np.hstack([x, x[:, :2] * 2.0 + 1.0])  # two columns are affine copies: rank 6 of 8 with intercept
    y = x[:, :3] @ np.array([[1.0], [2.0], [-1.0]]) + 0.1 * rng.standard_normal((500, 1))
    with pytest.warns(RuntimeWarning, match="minimum-norm"):
        fit = fit_linear(x, y)
    assert fit.method == "eigh-pinv" and fit.rank == 6
    xc = x - x.mean(0)
    ref = np.linalg.lstsq(xc, y - y.mean(0), rcond=None)[0]  # gelsd: the minimum-norm solution
    assert np.abs(fit.coef - ref).max() <= 1e-8
    assert np.abs(fit.predict(x) - (xc @ ref + y.mean(0))).max() <= 1e-8


@pytest.mark.parametrize("intercept", [True, False])
def test_ridge_matches_sklearn_ridge(intercept):
    rng = np.random.default_rng(3)
    x = correlated(800, 12, 3, mean=3.0)
    y = x @ rng.standard_normal((12, 4)) + rng.standard_normal((800, 4))
    for lam in (0.5, 50.0):
        fit = fit_linear(x, y, intercept=intercept, ridge=lam)
        sk = Ridge(alpha=lam, fit_intercept=intercept, solver="cholesky").fit(x, y)
        assert np.abs(fit.coef - sk.coef_.T).max() <= 1e-9 * np.abs(sk.coef_).max()
        assert np.abs(fit.intercept - (sk.intercept_ if intercept else 0)).max() <= 1e-8 * (1 + np.abs(y).max())
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        fit_linear(x, y, ridge=-1.0)


def test_streaming_in_chunks_equals_one_shot():
    rng = np.random.default_rng(4)
    x = correlated(5000, 10, 4).astype(np.float32)
    y = rng.standard_normal((5000, 3)) + x[:, :3]
    mask = split_mask(5000, 3000, 7)
    one = stream_moments(x, y, mask, chunk_rows=10**6)
    many = stream_moments(x, y, mask, chunk_rows=333)
    for xa, xb, ya, yb in zip(one.x, many.x, one.y, many.y, strict=True):
        assert xa.n == xb.n and ya.n == yb.n
        # different shifts (first-chunk means differ) must give the same centred statistics
        assert np.abs(xa.centred_gram - xb.centred_gram).max() <= 1e-9 * np.abs(xa.centred_gram).max()
        assert np.abs(xa.mean - xb.mean).max() <= 1e-10 * np.abs(xa.mean).max()
        assert np.abs(ya.ss_tot - yb.ss_tot).max() <= 1e-9 * ya.ss_tot.max()
    f1 = fit_linear(x, y, chunk_rows=10**6)
    f2 = fit_linear(x, y, chunk_rows=333)
    assert np.abs(f1.coef - f2.coef).max() <= 1e-9 * np.abs(f1.coef).max()
    assert np.abs(f1.intercept - f2.intercept).max() <= 1e-9 * np.abs(f1.intercept).max()


@pytest.mark.parametrize("intercept", [True, False])
def test_statistics_r2_equals_direct_r2(intercept):
    rng = np.random.default_rng(5)
    x = correlated(6000, 20, 5, mean=10.0).astype(np.float32)
    y = (x @ rng.standard_normal((20, 7)) * 0.2 + rng.standard_normal((6000, 7)) * np.arange(1, 8) + 100.0)
    h = heldout_r2(x, y, fit_tokens=4000, seed=3, intercept=intercept, chunk_rows=1000)
    mask = split_mask(6000, 4000, 3)
    pred = h.fit.predict(x[~mask])
    direct = r2_scores(y[~mask], pred)
    assert np.abs(h.r2.per_dim - direct.per_dim).max() <= 1e-10
    assert abs(h.r2.r2_pooled - direct.r2_pooled) <= 1e-10
    assert abs(h.r2.r2_mean_dims - r2_score(y[~mask], pred)) <= 1e-10
    assert abs(h.r2.r2_pooled - r2_score(y[~mask], pred, multioutput="variance_weighted")) <= 1e-10
    per_dim, mean_dims, pooled = direct  # tuple-unpacking API
    assert abs(mean_dims - float(np.mean(per_dim))) <= 1e-15 and -1 < pooled < 1
    assert (h.n_fit, h.n_test) == (4000, 2000)


def test_residual_ss_from_statistics_equals_direct_on_any_rows():
    rng = np.random.default_rng(6)
    x = correlated(3000, 8, 6, mean=-20.0)
    y = rng.standard_normal((3000, 2)) + x[:, :2] ** 2 / 100  # nonlinear: large residuals
    m = stream_moments(x, y, chunk_rows=512)
    design = Design(m.x[0])
    fit = design.solve(m.y[0])
    direct = ((y - fit.predict(x)) ** 2).sum(0)
    stats = residual_ss(fit, m.x[0], m.y[0])
    assert np.abs(stats - direct).max() <= 1e-9 * direct.max()


def test_planted_exact_linear_map_gives_r2_one():
    rng = np.random.default_rng(7)
    x = correlated(5000, 30, 7)
    a, b = rng.standard_normal((30, 5)), rng.standard_normal(5)
    h = heldout_r2(x, x @ a + b, fit_tokens=3000)
    assert np.abs(h.fit.coef - a).max() <= 1e-8 and np.abs(h.fit.intercept - b).max() <= 1e-6
    assert 1 - 1e-9 <= h.r2.r2_mean_dims <= 1 and 1 - 1e-9 <= h.r2.r2_pooled <= 1


def test_independent_noise_gives_r2_near_zero():
    rng = np.random.default_rng(8)
    d, n_fit, n_test = 20, 4000, 4000
    x = correlated(n_fit + n_test, d, 8)
    h = heldout_r2(x, rng.standard_normal((n_fit + n_test, 6)), fit_tokens=n_fit)
    tol = null_r2_tolerance(d, n_fit, n_test)  # ≈ 0.036
    assert abs(h.r2.r2_mean_dims) <= tol and abs(h.r2.r2_pooled) <= tol


def test_constant_target_dimension_is_nan_and_left_out():
    x = correlated(400, 3, 9)
    y = np.stack([x[:, 0], np.full(400, 2.0)], axis=1)
    with pytest.warns(RuntimeWarning, match="constant"):
        h = heldout_r2(x, y, fit_tokens=300)
    assert math.isnan(h.r2.per_dim[1]) and abs(h.r2.r2_mean_dims - 1) <= 1e-9


def test_split_mask_is_seeded_and_sized():
    m = split_mask(1000, 600, 3)
    assert m.sum() == 600 and np.array_equal(m, split_mask(1000, 600, 3))
    assert not np.array_equal(m, split_mask(1000, 600, 4))
    expected = np.zeros(1000, bool)
    expected[np.random.default_rng(3).permutation(1000)[:600]] = True  # "shuffle, first fit_tokens rows"
    assert np.array_equal(m, expected)
    with pytest.raises(ValueError, match="fit_tokens=1000"):
        split_mask(1000, 1000)


def test_accepts_torch_and_scalar_targets():
    rng = np.random.default_rng(10)
    x = correlated(2000, 5, 10)
    y = x @ rng.standard_normal(5) + rng.standard_normal(2000)
    h_np = heldout_r2(x, y, fit_tokens=1500)
    h_t = heldout_r2(torch.from_numpy(x).float(), torch.from_numpy(y).float(), fit_tokens=1500)
    assert h_np.fit.coef.shape == (5, 1) and h_np.r2.per_dim.shape == (1,)
    assert abs(h_np.r2.r2_mean_dims - h_t.r2.r2_mean_dims) <= 1e-5  # float32 rounding of the torch inputs only


def test_bad_input_is_one_clear_error():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="x has 10 rows but y has 9"):
        fit_linear(x, np.zeros((9, 1)))
    with pytest.raises(ValueError, match="shape"):
        r2_scores(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        fit_linear(x, np.zeros((10, 1)), chunk_rows=0)


def test_streams_from_memmaps(tmp_path):
    """Activations live in memmapped .npy stores (darkmatter.data.activations): read-only chunks must stream as is."""
    rng = np.random.default_rng(11)
    x = correlated(3000, 8, 11).astype(np.float32)
    y = (x[:, :2] + rng.standard_normal((3000, 2))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    xm, ym = np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    a = heldout_r2(xm, ym, fit_tokens=2000, chunk_rows=256)
    b = heldout_r2(x, y, fit_tokens=2000, chunk_rows=256)
    assert np.array_equal(a.fit.coef, b.fit.coef) and np.array_equal(a.r2.per_dim, b.r2.per_dim)
    assert a.fit.predict(xm).shape == (3000, 2)


@pytest.mark.parametrize("intercept", [True, False])
def test_heldout_group_sums_equal_sklearn_per_group_and_pooled(intercept):
    """The fit of heldout_group_sums is sklearn's on the fit rows; its per-group test sums give the held-out R² of
    every group, of all test rows, and of any resampling of groups (checked on one weighted resample)."""
    from darkmatter.regression import heldout_group_sums

    rng = np.random.default_rng(3)
    n, d, p = 3000, 6, 3
    x = correlated(n, d, seed=3).astype(np.float32).astype(np.float64)  # float32 values, as stored
    y = x @ rng.standard_normal((d, p)) + 0.5 * rng.standard_normal((n, p)) + 2.0
    mask = split_mask(n, 1800, seed=1)
    groups = rng.integers(0, 7, n)
    lin, sums = heldout_group_sums(x.astype(np.float32), y, mask, groups, intercept=intercept, chunk_rows=700)
    ref = LinearRegression(fit_intercept=intercept).fit(x[mask], y[mask])
    np.testing.assert_allclose(lin.coef, ref.coef_.T, rtol=1e-9, atol=1e-9)
    pred = ref.predict(x[~mask])
    want = r2_score(y[~mask], pred, multioutput="raw_values")
    np.testing.assert_allclose(sums.r2()[0].per_dim, want, rtol=1e-9)
    g = groups[~mask]
    w = np.array([[2, 0, 1, 3, 1, 0, 1]])  # a resample: group j counted w[j] times
    rows = np.repeat(np.arange(len(g)), w[0][g])
    yw, pw = y[~mask][rows], pred[rows]
    np.testing.assert_allclose(sums.r2(weights=w)[0].per_dim, r2_score(yw, pw, multioutput="raw_values"),
                               rtol=1e-9)

"""Linear/nonlinear error decomposition: the identity, planted truths, FVU against darkmatter.errors.metrics, the sparse-code
route against the dense one and scikit-learn, the norm-prediction property, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

import darkmatter.errors.family_fit as family_fit
from darkmatter.errors.decompose import decompose, error_components
from darkmatter.errors.family_fit import SparseCodes, choose_method, decompose_family, sae_error_moments
from darkmatter.errors.metrics import fvu
from darkmatter.regression.solve import Design, heldout_r2, split_mask
from tests.test_regression import correlated, null_r2_tolerance

N, D, FIT = 6000, 32, 4000


def topk_sae(x: np.ndarray, width: int, k: int, seed: int) -> SparseCodes:
    """A random TopK SAE (unit decoder rows, W_enc = W_decᵀ, b_dec = mean x) and its codes on x."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((width, x.shape[1])).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = x.mean(0).astype(np.float32)
    vals, idx = (torch.from_numpy(x.astype(np.float32) - b_dec) @ torch.from_numpy(W_dec).T).topk(k, dim=1)
    return SparseCodes(idx.numpy(), vals.relu().numpy(), W_dec, b_dec)


@pytest.fixture(scope="module")
def data():
    x = correlated(N, D, 0, mean=5.0, spectrum=(0.5, -1)).astype(np.float32)
    saes = [topk_sae(x, w, 4, i) for i, w in enumerate((64, 256))]
    return x, saes, split_mask(N, FIT, 0)


def test_identity_x_equals_x_hat_plus_linear_plus_nonlinear(data):
    x, saes, mask = data
    x_hat = saes[0].x_hat(slice(None)).numpy()
    dec = decompose(x, x_hat, mask=mask)
    lin, nonlin = error_components(x, x_hat, dec.fit.linear_map)
    assert np.abs(x_hat + lin + nonlin - x).max() <= 1e-5 * np.abs(x).max()
    # and the per-token norms are those of the parts
    assert np.allclose(dec.linear_error_norm, np.linalg.norm(lin, axis=1), rtol=1e-5, atol=0)
    assert np.allclose(dec.nonlinear_error_norm, np.linalg.norm(nonlin, axis=1), rtol=1e-5, atol=0)
    assert np.allclose(dec.error_norm, np.linalg.norm(x - x_hat, axis=1), rtol=1e-5, atol=0)


def test_fvus_match_darkmatter_metrics(data):
    x, saes, mask = data
    x_hat = saes[1].x_hat(slice(None)).numpy().astype(np.float64)
    dec = decompose(x, x_hat, mask=mask)
    lin, _ = error_components(x, x_hat, dec.fit.linear_map)
    f = dec.fit
    assert abs(f.fvu_total - fvu(x, x_hat)) <= 1e-10 * f.fvu_total
    assert abs(f.fvu_nonlinear - fvu(x, x_hat + lin)) <= 1e-10 * f.fvu_total
    assert abs(f.fvu_linear - (f.fvu_total - f.fvu_nonlinear)) <= 1e-15
    assert 0 < f.fvu_nonlinear < f.fvu_total  # b* is fitted on 2/3 of the rows: it can only help there


def test_planted_linear_error_is_fully_linear():
    rng = np.random.default_rng(1)
    x = correlated(N, D, 1, mean=3.0)
    error = x @ (0.1 * rng.standard_normal((D, D))) + rng.standard_normal(D)  # an exact affine map of x
    dec = decompose(x, x - error, fit_tokens=FIT)
    assert 1 - 1e-9 <= dec.fit.r2_vector.r2_mean_dims <= 1
    assert 0 <= dec.fit.fvu_nonlinear <= 1e-10 * dec.fit.fvu_total
    assert abs(dec.fit.fvu_linear - dec.fit.fvu_total) <= 1e-10 * dec.fit.fvu_total


def test_independent_error_is_nonlinear():
    rng = np.random.default_rng(2)
    x = correlated(N, D, 2)
    error = rng.standard_normal((N, D))
    dec = decompose(x, error=error, fit_tokens=FIT)
    tol = null_r2_tolerance(D, FIT, N - FIT)  # ≈ 0.08
    assert abs(dec.fit.r2_vector.r2_mean_dims) <= tol and abs(dec.fit.r2_vector.r2_pooled) <= tol
    # b* fits noise on the fit rows only: it removes ≈ D/N_fit of the fit rows' error (a χ² with D² dof)
    assert 0 <= dec.fit.fvu_linear / dec.fit.fvu_total <= 5 * D / FIT


def test_sparse_cross_moments_equal_dense(data):
    x, saes, mask = data
    design = Design.from_rows(x, mask, chunk_rows=1000)  # moments do not depend on the intercept setting
    for codes in saes:
        sparse = sae_error_moments(x, codes, design, mask, method="sparse", chunk_rows=1000)
        dense = sae_error_moments(x, codes, design, mask, method="dense", chunk_rows=1000)
        for s_split, d_split in zip(sparse, dense, strict=True):  # vector, norm_sq
            for s, d in zip(s_split, d_split, strict=True):  # fit, test
                # the dense route uses the float32-decoded error, the sparse one exact products: ≈ 1e-7 relative
                assert np.abs(s.cross - d.cross).max() <= 1e-5 * np.abs(d.cross).max()
                assert np.array_equal(s.sum_sq, d.sum_sq) and s.n == d.n
        # and directly against Σ x̃ᵀ(e − t) with an explicit dense error
        e = codes.error(x, slice(None)).double().numpy()
        xt = x.astype(np.float64) - design.shift
        ref = xt[mask].T @ (e[mask] - sparse[0][0].shift)
        assert np.abs(sparse[0][0].cross - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("method", ["sparse", "dense", "auto"])
def test_family_matches_dense_route_and_sklearn(data, method):
    x, saes, mask = data
    fits = decompose_family(x, saes, mask=mask, method=method, chunk_rows=1500)
    x64 = x.astype(np.float64)
    for codes, f in zip(saes, fits, strict=True):
        e = codes.error(x, slice(None)).double().numpy()
        dense = decompose(x, error=e, mask=mask, per_token=False).fit
        for name in ("fvu_total", "fvu_nonlinear"):
            assert abs(getattr(f, name) - getattr(dense, name)) <= 1e-6 * dense.fvu_total
        sk = LinearRegression().fit(x64[mask], e[mask])
        pred = sk.predict(x64[~mask])
        assert abs(f.r2_vector.r2_mean_dims - r2_score(e[~mask], pred)) <= 1e-6
        assert np.abs(f.r2_vector.per_dim - r2_score(e[~mask], pred, multioutput="raw_values")).max() <= 1e-6
        assert np.abs(f.linear_map.coef - sk.coef_.T).max() <= 1e-5 * np.abs(sk.coef_).max()
        sk0 = LinearRegression(fit_intercept=False).fit(x64[mask], e[mask])
        assert abs(f.r2_vector_no_intercept.r2_mean_dims - r2_score(e[~mask], sk0.predict(x64[~mask]))) <= 1e-6
        nsq = (e**2).sum(1)
        pred_n = LinearRegression().fit(x64[mask], nsq[mask]).predict(x64[~mask])
        assert abs(f.r2_norm_sq.r2_mean_dims - r2_score(nsq[~mask], pred_n)) <= 1e-6
        assert (f.n_fit, f.n_test) == (FIT, N - FIT)


def test_tiles_within_a_chunk_give_the_same_fit(data, monkeypatch):
    """Chunks of 6000 rows cut into 256-row tiles (and at the fit/test boundary) vs one tile per split: the same
    fit up to float32 rounding (another shift and blocking), well inside the 1e-6 held against scikit-learn."""
    x, saes, mask = data
    whole = decompose_family(x, saes, mask=mask, chunk_rows=1500)
    monkeypatch.setattr(family_fit, "CROSS_BLOCK_ROWS", 256)
    tiled = decompose_family(x, saes, mask=mask, chunk_rows=6000)
    for a, b in zip(whole, tiled, strict=True):
        assert abs(a.fvu_nonlinear - b.fvu_nonlinear) <= 1e-7 * a.fvu_total
        assert np.abs(a.r2_vector.per_dim - b.r2_vector.per_dim).max() <= 1e-6
        assert abs(a.r2_norm_sq.r2_mean_dims - b.r2_norm_sq.r2_mean_dims) <= 1e-6
        assert (a.n_fit, a.n_test) == (b.n_fit, b.n_test)


def test_shared_design_is_reused_and_checked(data):
    x, saes, mask = data
    design = Design.from_rows(x, mask)
    a = decompose_family(x, saes, design=design, mask=mask)
    b = decompose_family(x, saes, mask=mask)
    assert all(abs(p.fvu_nonlinear - q.fvu_nonlinear) <= 1e-12 for p, q in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="the design was built on 4000 fit rows"):
        decompose_family(x, saes, design=design, mask=split_mask(N, 3000, 0))


def test_norm_prediction_property():
    """Squared norm of a sparse sum of nearly orthogonal features with fixed magnitudes is ≈ linear in x; of
    isotropic Gaussian noise it is not (SCIENCE.md §3.4; Engels et al. §5)."""
    rng = np.random.default_rng(3)
    d, n_feat, n, n_fit = 128, 128, 12_000, 8000  # n_feat = d: x spans every dimension
    feats = rng.standard_normal((n_feat, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)  # |cos| ≈ 1/√d ≈ 0.09
    magnitude = rng.uniform(1, 3, n_feat)  # one fixed magnitude per feature
    active = rng.random((n, n_feat)) < 4 / n_feat
    x = (active * magnitude) @ feats
    r2_sparse = heldout_r2(x, (x**2).sum(1), fit_tokens=n_fit).r2.r2_mean_dims
    # ‖x‖² = Σ_active m_i² + cross terms of size m²/√d; Σ m_i² = ⟨x, Σ m_i·dual_i⟩ is exactly linear
    assert 0.9 <= r2_sparse <= 1.0
    g = rng.standard_normal((n, d))
    r2_noise = heldout_r2(g, (g**2).sum(1), fit_tokens=n_fit).r2.r2_mean_dims
    assert abs(r2_noise) <= null_r2_tolerance(d, n_fit, n - n_fit)  # ≈ 0.1: ‖g‖² is even in g


def test_choose_method_rule():
    assert choose_method("auto", 32, 1024, 576) == "dense"  # d/k = 18: the GEMM is ~3x faster on a CPU
    assert choose_method("auto", 32, 4096, 2304) == "sparse"  # d/k = 72, accumulator 72 MiB
    assert choose_method("auto", 48, 4096, 2304) == "dense"  # d/k = 48 < 64
    assert choose_method("auto", 32, 16384, 2304) == "dense"  # accumulator 288 MiB > 128 MiB
    assert choose_method("sparse", 128, 16384, 576) == "sparse" and choose_method("dense", 1, 8, 576) == "dense"


def test_bad_input(data):
    x, saes, mask = data
    with pytest.raises(ValueError, match="exactly one of x_hat and error"):
        decompose(x)
    with pytest.raises(ValueError, match="x has shape"):
        decompose(x, x[:, :5])
    short = SparseCodes(saes[0].top_indices[:10], saes[0].top_values[:10], saes[0].W_dec, saes[0].b_dec)
    with pytest.raises(ValueError, match="codes for 10 tokens"):
        decompose_family(x, [short], mask=mask)

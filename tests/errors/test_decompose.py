"""The linear/nonlinear error decomposition (the one route): the identity, planted truths, FVU against
darkmatter.errors.metrics, codes against dense reconstructions and scikit-learn, the second pass's per-token parts,
metrics and per-context test sums, the norm-prediction property, bad input.

Tolerances. A float64 reconstruction keeps float64 moments: agreement to ~1e-12 is expected and 1e-10 is held. Codes
(and float32 reconstructions) are decoded in float32 and their target moments summed in float32 within tiles of
TILE_ROWS rows and in float64 across tiles; the relative error of a tile sum is of order √TILE_ROWS·u (u = float32
unit roundoff, ≈ 3e-6 for 2048 rows), so FVUs and R² are held to TOL32 = 4·√TILE_ROWS·u against float64 references.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from darkmatter.errors.decompose import DenseReconstruction, choose_method, decompose_family, sparse_pays
from darkmatter.errors.metrics import ReconstructionAccumulator, fvu
from darkmatter.errors.parts import decompose_error, error_components, error_parts
from darkmatter.regression import TILE_ROWS, Design, heldout_r2, moments, split_mask
from darkmatter.sae.codes import SparseCodes
from tests.regression.test_regression import correlated, null_r2_tolerance

N, D, FIT = 6000, 32, 4000
TOL32 = 4 * math.sqrt(TILE_ROWS) * np.finfo(np.float32).eps / 2  # ≈ 1.1e-5 (module docstring)


def topk_codes(x: np.ndarray, width: int, k: int, seed: int) -> SparseCodes:
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
    saes = [topk_codes(x, w, 4, i) for i, w in enumerate((64, 256))]
    return x, saes, split_mask(N, FIT, 0), np.repeat(np.arange(N // 200), 200)


def test_identity_x_equals_x_hat_plus_linear_plus_nonlinear(data):
    x, saes, mask, _ = data
    x_hat = saes[0].x_hat(slice(None)).numpy()
    dec = decompose_error(x, x_hat, mask=mask)
    lin, nonlin = error_components(x, x_hat, dec.fit.linear_map)
    assert np.abs(x_hat + lin + nonlin - x).max() <= 1e-5 * np.abs(x).max()
    # the second pass's per-token norms are those of the parts (float32 GEMM: ~1e-6 relative, held to 1e-5)
    tokens = dec.parts.tokens
    for name, ref in (("linear_error_norm", lin), ("nonlinear_error_norm", nonlin), ("error_norm", x - x_hat),
                      ("x_norm", x), ("x_hat_norm", x_hat)):
        np.testing.assert_allclose(tokens[name], np.linalg.norm(ref.astype(np.float64), axis=1), rtol=1e-5, atol=0)
    assert tokens["l0"] is None  # a dense reconstruction has no codes


def test_fvus_match_darkmatter_metrics(data):
    x, saes, mask, _ = data
    x_hat = saes[1].x_hat(slice(None)).numpy().astype(np.float64)  # float64: exact moments
    f = decompose_error(x, x_hat, mask=mask).fit
    lin, _ = error_components(x, x_hat, f.linear_map)
    assert abs(f.fvu_total - fvu(x, x_hat)) <= 1e-10 * f.fvu_total
    assert abs(f.fvu_nonlinear - fvu(x, x_hat + lin)) <= 1e-10 * f.fvu_total
    assert abs(f.fvu_linear - (f.fvu_total - f.fvu_nonlinear)) <= 1e-15
    assert 0 < f.fvu_nonlinear < f.fvu_total  # b* is fitted on 2/3 of the rows: it can only help there


def test_planted_linear_error_is_fully_linear():
    rng = np.random.default_rng(1)
    x = correlated(N, D, 1, mean=3.0)
    error = x @ (0.1 * rng.standard_normal((D, D))) + rng.standard_normal(D)  # an exact affine map of x
    f = decompose_error(x, x - error, fit_tokens=FIT).fit
    assert 1 - 1e-9 <= f.r2_vector.r2_mean_dims <= 1
    assert 0 <= f.fvu_nonlinear <= 1e-10 * f.fvu_total
    assert abs(f.fvu_linear - f.fvu_total) <= 1e-10 * f.fvu_total


def test_independent_error_is_nonlinear():
    rng = np.random.default_rng(2)
    x = correlated(N, D, 2)
    f = decompose_error(x, x - rng.standard_normal((N, D)), fit_tokens=FIT).fit
    tol = null_r2_tolerance(D, FIT, N - FIT)  # ≈ 0.08
    assert abs(f.r2_vector.r2_mean_dims) <= tol and abs(f.r2_vector.r2_pooled) <= tol
    # b* fits noise on the fit rows only: it removes ≈ D/N_fit of the fit rows' error (a χ² with D² dof)
    assert 0 <= f.fvu_linear / f.fvu_total <= 5 * D / FIT


def test_sparse_cross_moments_equal_dense(data):
    x, saes, mask, _ = data
    sparse = decompose_family(x, saes, mask=mask, method="sparse", chunk_rows=1000).fits
    dense = decompose_family(x, saes, mask=mask, method="dense", chunk_rows=1000).fits
    for s, d in zip(sparse, dense, strict=True):
        # the dense route uses the float32-decoded error, the sparse one exact float64 products
        assert abs(s.fvu_nonlinear - d.fvu_nonlinear) <= TOL32 * d.fvu_total
        assert np.abs(s.linear_map.coef - d.linear_map.coef).max() <= TOL32 * np.abs(d.linear_map.coef).max()
        assert abs(s.r2_norm_sq.r2_pooled - d.r2_norm_sq.r2_pooled) <= TOL32


@pytest.mark.parametrize("method", ["sparse", "dense", "auto"])
def test_family_matches_float64_route_and_sklearn(data, method):
    x, saes, mask, _ = data
    fits = decompose_family(x, saes, mask=mask, method=method, chunk_rows=1500).fits
    x64 = x.astype(np.float64)
    for codes, f in zip(saes, fits, strict=True):
        x_hat = codes.x_hat(slice(None)).double().numpy()
        e = x64 - x_hat
        exact = decompose_error(x64, x_hat, mask=mask).fit  # float64 moments throughout
        for name in ("fvu_total", "fvu_nonlinear"):
            assert abs(getattr(f, name) - getattr(exact, name)) <= TOL32 * exact.fvu_total
        sk = LinearRegression().fit(x64[mask], e[mask])
        pred = sk.predict(x64[~mask])
        assert abs(f.r2_vector.r2_mean_dims - r2_score(e[~mask], pred)) <= TOL32
        assert np.abs(f.r2_vector.per_dim - r2_score(e[~mask], pred, multioutput="raw_values")).max() <= TOL32
        assert np.abs(f.linear_map.coef - sk.coef_.T).max() <= TOL32 * np.abs(sk.coef_).max()
        sk0 = LinearRegression(fit_intercept=False).fit(x64[mask], e[mask])
        assert abs(f.r2_vector_no_intercept.r2_mean_dims - r2_score(e[~mask], sk0.predict(x64[~mask]))) <= TOL32
        nsq = (e**2).sum(1)
        sk_n = LinearRegression().fit(x64[mask], nsq[mask])
        assert abs(f.r2_norm_sq.r2_pooled - r2_score(nsq[~mask], sk_n.predict(x64[~mask]))) <= TOL32
        assert np.abs(f.norm_map.coef[:, 0] - sk_n.coef_).max() <= TOL32 * np.abs(sk_n.coef_).max()
        assert (f.n_fit, f.n_test) == (FIT, N - FIT)


def test_tiles_within_a_chunk_give_the_same_fit(data, monkeypatch):
    """Chunks of 6000 rows cut into 256-row tiles (and at the fit/test boundary) vs the default tiles: the same
    fit up to float32 rounding (another shift and blocking)."""
    x, saes, mask, _ = data
    whole = decompose_family(x, saes, mask=mask, chunk_rows=1500).fits
    monkeypatch.setattr(moments, "TILE_ROWS", 256)
    tiled = decompose_family(x, saes, mask=mask, chunk_rows=6000).fits
    for a, b in zip(whole, tiled, strict=True):
        assert abs(a.fvu_nonlinear - b.fvu_nonlinear) <= TOL32 * a.fvu_total
        assert np.abs(a.r2_vector.per_dim - b.r2_vector.per_dim).max() <= TOL32
        assert abs(a.r2_norm_sq.r2_pooled - b.r2_norm_sq.r2_pooled) <= TOL32
        assert (a.n_fit, a.n_test) == (b.n_fit, b.n_test)


def test_shared_design_is_reused_and_checked(data):
    x, saes, mask, _ = data
    design = Design.from_rows(x, mask)
    a = decompose_family(x, saes, design=design, mask=mask).fits
    b = decompose_family(x, saes, mask=mask).fits
    assert all(abs(p.fvu_nonlinear - q.fvu_nonlinear) <= 1e-12 for p, q in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="the design was built on 4000 fit rows"):
        decompose_family(x, saes, design=design, mask=split_mask(N, 3000, 0))


def test_second_pass_metrics_equal_a_one_shot_reference(data):
    x, saes, mask, groups = data
    family = decompose_family(x, saes, mask=mask)
    parts = error_parts(x, saes, family, groups=groups, chunk_rows=1000)
    for codes, part in zip(saes, parts, strict=True):
        idx, val = codes.rows(slice(None))
        latents = torch.zeros(N, codes.d_sae).scatter_add_(1, idx, val)
        ref = ReconstructionAccumulator(codes.d_sae)
        ref.update(x, codes.x_hat(slice(None)), latents=latents)
        ref = ref.summary()
        for key, value in ref.items():  # float32 row dots (≲ 2e-7 of Σ|a_i b_i| each) summed in float64
            assert part.metrics[key] == pytest.approx(value, rel=1e-6, abs=0), key
        assert part.tokens["l0"].tolist() == (val != 0).sum(1).tolist()


def test_per_context_test_sums_give_the_held_out_r2(data):
    x, saes, mask, groups = data
    family = decompose_family(x, saes, mask=mask)
    for fit, part in zip(family.fits, error_parts(x, saes, family, groups=groups), strict=True):
        sums = part.test_sums
        assert sums.n.sum() == N - FIT and np.array_equal(sums.groups, np.unique(groups[~mask]))
        np.testing.assert_array_equal(sums.n, np.bincount(groups[~mask]))
        vector, norm = sums.r2(slice(0, D))[0], sums.r2(slice(D, D + 1))[0]
        # residuals from the float32 prediction pass vs R² from float64 moments
        assert abs(vector.r2_mean_dims - fit.r2_vector.r2_mean_dims) <= TOL32
        assert abs(vector.r2_pooled - fit.r2_vector.r2_pooled) <= TOL32
        assert abs(norm.r2_pooled - fit.r2_norm_sq.r2_pooled) <= TOL32


def test_norm_prediction_property():
    """Squared norm of a sparse sum of nearly orthogonal features with fixed magnitudes is ≈ linear in x; of
    isotropic Gaussian noise it is not (docs/science.md, experiment 4)."""
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


def test_choose_method_rule(data):
    assert not sparse_pays(32, 1024, 576)  # d/k = 18: the GEMM is ~3x faster on a CPU
    assert sparse_pays(32, 4096, 2304)  # d/k = 72, accumulator 72 MiB
    assert not sparse_pays(48, 4096, 2304)  # d/k = 48 < 64
    assert not sparse_pays(32, 16384, 2304)  # accumulator 288 MiB > 128 MiB
    x, saes, _, _ = data
    assert choose_method("auto", saes[0], D) == ("sparse" if sparse_pays(4, 64, D) else "dense")
    assert choose_method("sparse", saes[0], D) == "sparse" and choose_method("dense", saes[0], D) == "dense"
    assert choose_method("auto", DenseReconstruction(x), D) == "dense"
    with pytest.raises(ValueError, match="needs sparse codes"):
        choose_method("sparse", DenseReconstruction(x), D)


def test_bad_input(data):
    x, saes, mask, _ = data
    with pytest.raises(ValueError, match=r"has shape \(6000, 5\) but x has \(6000, 32\)"):
        decompose_error(x, x[:, :5])
    short = SparseCodes(saes[0].top_indices[:10], saes[0].top_values[:10], saes[0].W_dec, saes[0].b_dec)
    with pytest.raises(ValueError, match=r"has shape \(10, 32\)"):
        decompose_family(x, [short], mask=mask)
    family = decompose_family(x, saes, mask=mask)
    with pytest.raises(ValueError, match="2 reconstructions but 1 fits"):
        error_parts(x, saes, decompose_family(x, saes[:1], mask=mask))
    with pytest.raises(ValueError, match=r"groups has shape \(5,\)"):
        error_parts(x, saes, family, groups=np.zeros(5))

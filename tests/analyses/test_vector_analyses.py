"""The vector analyses (error_predictability, norm_test, synthetic_validation, probe_mechanism) through the real
runner on synthetic experiments made by the real pipeline steps (tests/helpers.py), each against a planted ground
truth or an independent computation."""

from __future__ import annotations

import importlib
import math

import numpy as np
import polars as pl
import pytest
import torch

from analyses.synthetic_validation import combine
from darkmatter.analysis import AnalysisContext, load_outputs, run
from darkmatter.analysis.eval import EvalSplit, heldout_by_context
from darkmatter.errors.measure import METRICS
from darkmatter.errors.metrics import LatentAccumulator
from darkmatter.io import read_json
from darkmatter.regression import Design, stream_moments
from darkmatter.sae.families import SaeSpec
from tests.helpers import Experiment, linear_sae, make_experiment, torch_threads

LINEAR_ID = "relu-w96-k1-s0"  # the planted SAE whose error is exactly x·M (d_in = 48, width 2·d_in)
HEADLINES = {
    "error_predictability": ("r2_vector_mean_dims_median", "r2_vector_pooled_median", "r2_norm_sq_median",
                             "r2_norm_sq_min"),
    "norm_test": tuple(f"r2_norm_sq_median_{v}" for v in ("x", "sae", "error", "linear_error", "nonlinear_error")),
    "synthetic_validation": ("corr_activation_noise_vs_linear", "corr_reconstruction_noise_vs_nonlinear",
                             "corr_activation_noise_vs_nonlinear", "corr_reconstruction_noise_vs_linear"),
    "probe_mechanism": ("pearson_r", "spearman_r", "probe_r2_heldout"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Experiment:
    """The default synthetic sweep (4 widths, 3 ks) plus one SAE whose error is the planted linear map x·M."""
    M = 0.3 * np.random.default_rng(1).standard_normal((48, 48)) / math.sqrt(48)
    extra = {SaeSpec("relu", 96, 1, 0): ("planted", linear_sae(np.eye(48) - M))}
    with torch_threads(1):
        return make_experiment(tmp_path_factory.mktemp("realistic"), extra=extra)


@pytest.fixture(scope="module")
def realistic_outputs(realistic, tmp_path_factory):
    """``realistic_outputs(name)``: the outputs of one analysis on ``realistic``, run once per module."""
    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = realistic.run(name, tmp_path_factory.mktemp(name) / "out")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def orthogonal(tmp_path_factory) -> Experiment:
    """Exactly 3 of 32 orthonormal features active per token at fixed per-feature magnitudes, isotropic noise
    σ = 0.02, and one TopK SAE (k = 3) that decodes with the true features."""
    with torch_threads(1):
        return make_experiment(tmp_path_factory.mktemp("orthogonal"), n_features=32, k_true=3, magnitude_jitter=0.0,
                               noise=0.02, context_shift=0.0, widths=(32,), width_k=3, ks=(3,), k_width=32)


@pytest.mark.parametrize("name", sorted(HEADLINES))
def test_every_module_runs_and_writes_finite_headlines(realistic_outputs, name):
    out = realistic_outputs(name)
    assert out["meta"]["question"].endswith("?") and len(out["meta"]["method"]) > 80
    assert out["meta"]["paper_claim"] and out["figures"] and out["table"].height > 0
    for key in HEADLINES[name]:
        assert math.isfinite(out["summary"][key]), (key, out["summary"][key])


def test_error_predictability_matches_the_stored_decomposition_and_recovers_a_planted_linear_error(
        realistic, realistic_outputs):
    out = realistic_outputs("error_predictability")
    table = out["table"]
    # Two routes to the same R²: the stored decomposition scores it from float64 moments of float32 tile sums, this
    # module resamples per-context residual sums of the float32 prediction pass; both are float32 rounding apart
    # (≈ √2048·u ≈ 3e-6 of the sums: 1e-5 held). The no-intercept map's point estimate is the stored one itself.
    for sae_id in realistic.sae_ids:
        stored = read_json(realistic.paths.sae_errors(realistic.hook, sae_id) / METRICS)
        for name, suffix, tol in (("affine", "", 1e-5), ("linear", "_no_intercept", 0.0)):
            row = table.filter((pl.col("sae_id") == sae_id) & (pl.col("map") == name)).row(0, named=True)
            for col in ("r2_vector_mean_dims", "r2_vector_pooled", "r2_norm_sq"):
                assert row[col] == pytest.approx(stored[col + suffix], abs=tol, rel=0), (sae_id, name, col)
    planted = table.filter(pl.col("sae_id") == LINEAR_ID)
    assert planted.height == 2  # both maps
    for row in planted.filter(pl.col("default")).iter_rows(named=True):
        # error = x·M exactly up to float32 rounding of x_hat (relative 1e-7): R² = 1 to ~1e-12, CI degenerate
        for col in ("r2_vector_mean_dims", "r2_vector_pooled"):
            assert 1 - 1e-6 < row[col] <= 1 + 1e-12
            assert row[f"{col}_low"] <= row[col] + 1e-12 and row[col] <= row[f"{col}_high"] + 1e-12
            assert row[f"{col}_high"] - row[f"{col}_low"] < 1e-6
    assert 1 - 1e-6 < planted.filter(~pl.col("default"))["r2_vector_mean_dims"][0] <= 1 + 1e-12
    real = table.filter((pl.col("families") != "planted") & pl.col("default"))
    width = real["r2_vector_mean_dims_high"] - real["r2_vector_mean_dims_low"]
    # the intervals of the imperfect SAEs bracket their estimate and are neither degenerate nor vacuous
    assert ((real["r2_vector_mean_dims_low"] < real["r2_vector_mean_dims"])
            & (real["r2_vector_mean_dims"] < real["r2_vector_mean_dims_high"])).all()
    assert width.min() > 1e-4 and width.max() < 0.2
    assert out["summary"]["n_saes"] == 7 and out["summary"]["map"] == "affine"


def test_norm_test_planted_orthogonal_features_and_isotropic_noise(orthogonal, tmp_path):
    out = orthogonal.run("norm_test", tmp_path / "nt")
    r2 = {row["vector"]: row for row in out["table"].iter_rows(named=True)}
    # Sae(x) − b_dec = Σ_active (m_i + n·d_i)·d_i, so ‖·‖² = Σ_i m_i⟨d_i, x − b⟩ + O(σ·m): linear in x up to the
    # noise terms (Var ≈ 4σ²Σm² against Var(Σ m_i²) ≈ 3): R² ≈ 0.998; x adds ‖noise‖² (tiny).
    assert 0.99 < r2["sae"]["r2_norm_sq"] <= 1.0 and 0.99 < r2["x"]["r2_norm_sq"] <= 1.0
    # SaeError = the noise off the 3 active directions: isotropic, its squared norm has no linear part. The held-out
    # R² of a target independent of the regressors is ≈ −(d + 1)/n_fit = −0.034 with sd ≈ 0.03 (n_test = 960).
    assert -0.13 < r2["error"]["r2_norm_sq"] < 0.05
    assert r2["error"]["r2_norm_sq_low"] < r2["error"]["r2_norm_sq"] < r2["error"]["r2_norm_sq_high"]
    s = out["summary"]
    # b* fits isotropic noise only (≈ d/n_fit = 3% of it): NonlinearError is still noise, with no linear part either
    assert -0.2 < r2["nonlinear_error"]["r2_norm_sq"] < 0.05
    med = {v: float(out["table"].filter(pl.col("vector") == v)["r2_norm_sq"].median()) for v in r2}
    lowest = min(med, key=med.get)
    assert s["nonlinear_lowest"] == ("yes" if lowest == "nonlinear_error" else "no")
    assert s["x_sae_above_errors"] == "yes" and s["measured_order"].startswith("x > Sae(x)")


def test_synthetic_validation_recovers_the_injected_errors(tmp_path):
    # x′ lives in a 12-dim subspace of 48 dims: activation noise in the 36 empty dims is perfectly linear and in the
    # 12 signal dims mostly not, so at most 12/48 = 25% of it leaks into the nonlinear estimate:
    # r(act, nonlinear) ≈ 0.25/√(1 + 0.25²) ≈ 0.24. Reconstruction noise is independent of x_noisy: r(rec, linear)
    # ≈ 0 up to overfitting noise. The diagonal is then ≥ 0.96 in theory; 0.9 leaves room for sampling.
    exp = make_experiment(tmp_path / "exp", n_features=24, k_true=2, signal_rank=12, noise=0.0, context_shift=0.0,
                          widths=(24,), width_k=2, ks=(2,), k_width=24)
    out = exp.run("synthetic_validation", tmp_path / "sv")
    s, table = out["summary"], out["table"]
    assert 0.9 < s["corr_activation_noise_vs_linear"] <= 1 and 0.9 < s["corr_reconstruction_noise_vs_nonlinear"] <= 1
    assert 0.0 < s["corr_activation_noise_vs_nonlinear"] < 0.35 and abs(s["corr_reconstruction_noise_vs_linear"]) < 0.15
    assert s["grid_points"] == 6 * 5 * 5 and table.height == 150
    # Not only correlated: reconstruction noise is added to the nonlinear estimate in full. At σ_act = 0, p = 0 the
    # increase over σ_rec = 0 equals the injected variance up to the fit's overfitting of the noise, of order
    # d/n_test ≈ 5% (48 regressors, 960 test rows): 10% tolerance.
    base = table.filter((pl.col("act_level") == 0) & (pl.col("ablate_percent") == 0)).sort("rec_level")
    gain = base["est_nonlinear"] - base["est_nonlinear"][0]
    np.testing.assert_allclose(gain[1:], base["true_reconstruction_noise"][1:], rtol=0.10)
    # ablation removes variance monotonically (the smallest-mean latents first)
    abl = table.filter((pl.col("act_level") == 0) & (pl.col("rec_level") == 0)).sort("ablate_percent")
    assert abl["true_ablation"][0] == 0 and (np.diff(abl["true_ablation"].to_numpy()) >= 0).all()
    assert abl["true_ablation"][-1] > 0.01


def test_combine_equals_the_moments_of_the_combined_target():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    e0, z = rng.standard_normal((200, 3)) + 5.0, rng.standard_normal((200, 3)) - 2.0
    mask = np.arange(200) < 120
    design = Design.from_rows(x, mask)
    m0, mz = design.target_moments(x, e0, mask)[0], design.target_moments(x, z, mask)[0]
    direct = design.target_moments(x, e0 - 0.7 * z, mask)[0]
    got = combine(m0, mz, np.einsum("ij,ij->j", e0[mask], z[mask]), 0.7)
    # TargetMoments are about different shifts; compare what the solver and R² use (shift-invariant quantities)
    np.testing.assert_allclose(got.ss_tot, direct.ss_tot, rtol=1e-10)
    np.testing.assert_allclose(design.solve(got).coef, design.solve(direct).coef, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.norm_sq_sum, direct.norm_sq_sum, rtol=1e-12)


def test_probe_mechanism_tracks_planted_magnitudes(orthogonal, tmp_path):
    out = orthogonal.run("probe_mechanism", tmp_path / "pm")
    s = out["summary"]
    # Orthonormal decoder rows and fixed magnitudes: a* = Σ m_i d_i exactly up to the noise, so d_i·a* = m_i.
    assert 0.99 < s["pearson_r"] <= 1 and 0.98 < s["spearman_r"] <= 1
    assert 0.97 < s["median_projection_over_mean_activation"] < 1.03
    assert s["latents_used"] == s["latents_total"] == 32 and 0.99 < s["probe_r2_heldout"] <= 1
    # resampled documents: tight around the planted exact tracking, so the verdict (ρ > 0.5) agrees
    assert 0.95 < s["spearman_r_ci_low"] <= s["spearman_r"] <= s["spearman_r_ci_high"] <= 1
    assert s["verdict"] == "agrees" and s["resampling_unit"] == "document"


def test_probe_intervals_reproduce_the_point_estimate_when_every_document_counts_once(realistic, tmp_path):
    """The resampled refit (weighted moments, the used latents' weighted means) equals the point estimate's
    route (heldout_r2, LatentAccumulator) when each resample weights every row 1; real resamples bracket it."""

    class Unresampled(AnalysisContext):
        def resample_weights(self, contexts):
            return np.ones((3, len(contexts)), dtype=np.int64)

    ctx = Unresampled(realistic.paths, realistic.params, "probe_mechanism").with_options(all_saes=False)
    with torch_threads(1):
        run(importlib.import_module("analyses.probe_mechanism"), ctx, tmp_path / "ones")
    s = load_outputs(tmp_path / "ones")["summary"]
    for c in ("pearson", "spearman"):
        assert s[f"{c}_r_ci_low"] == pytest.approx(s[f"{c}_r"], abs=1e-9)
        assert s[f"{c}_r_ci_high"] == pytest.approx(s[f"{c}_r"], abs=1e-9)
    real = realistic.run("probe_mechanism", tmp_path / "real", all_saes=False)["summary"]
    assert real["spearman_r_ci_low"] < real["spearman_r"] < real["spearman_r_ci_high"]


def test_probe_and_synthetic_choose_the_widest_width_sae_and_reject_bad_options(realistic, tmp_path):
    out = realistic.run("probe_mechanism", tmp_path / "pm", all_saes=False)
    assert out["summary"]["sae_id"] == "topk-w96-k4-s0" and out["summary"]["n_saes"] == 1
    with pytest.raises(ValueError, match="unknown key 'analysis.synthetic_validation.token'"):
        realistic.run("synthetic_validation", tmp_path / "sv", token=5)
    with pytest.raises(ValueError, match="sae_id 'nope' is not in the saes table"):
        realistic.run("synthetic_validation", tmp_path / "sv", sae_id="nope")
    assert not (tmp_path / "sv").exists()  # nothing half-written


def test_held_out_fit_by_context_equals_a_direct_fit():
    """heldout_by_context (fit rows gathered by id, x moments from a design) equals streaming the masked rows, and
    its per-context test sums are those of the test rows' residuals."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((500, 6)), rng.standard_normal((500, 2)) + 3.0
    mask = rng.random(500) < 0.6
    contexts = np.repeat(np.arange(10), 50)
    design = Design.from_rows(x, mask)
    fit, sums = heldout_by_context(design, EvalSplit(x, contexts, mask), y.__getitem__, 2, chunk_rows=37)
    ref = stream_moments(x, y, mask, shift_x=design.shift, gram=False).y[0]
    np.testing.assert_allclose(fit.coef, design.solve(ref).coef, rtol=1e-10)
    resid = y[~mask] - fit.predict(x[~mask])
    np.testing.assert_allclose(sums.res_sq.sum(0), (resid**2).sum(0), rtol=1e-10)
    np.testing.assert_array_equal(sums.n, np.bincount(contexts[~mask]))


def test_stored_codes_give_the_dense_latent_statistics(realistic):
    """The latent statistics an analysis takes from stored codes equal darkmatter.errors.metrics.LatentAccumulator
    on the dense forward pass's latents."""
    x = realistic.planted.x[:500]
    rows = np.arange(500)
    for sae_id in ("topk-w64-k4-s0", LINEAR_ID):
        sae = realistic.saes[sae_id]
        idx, val = realistic.context().codes(realistic.hook, sae_id, sae).rows(rows)
        with torch.inference_mode():
            out = sae(torch.from_numpy(x))
        acc = LatentAccumulator(sae.d_sae).update(out.latents)
        stats = LatentAccumulator(sae.d_sae).update_codes(idx, val)
        np.testing.assert_array_equal(stats.fire_count, acc.fire_count)
        np.testing.assert_array_equal(stats.l0_hist, acc.l0_hist)
        np.testing.assert_allclose(stats.activation_sum, acc.activation_sum, rtol=1e-6)
        assert stats.n_tokens == 500 and 0 < stats.fire_count.sum() <= 500 * sae.d_sae


def test_the_fixture_is_a_realistic_sweep(realistic):
    """What other tests rely on: wider SAEs miss fewer planted features (FVU falls with width), TopK L0 = k, and
    the stored tables cover every eval row once per SAE."""
    with realistic.context().connect() as con:
        saes = con.sql("SELECT * FROM saes ORDER BY width").pl()
        rows = con.sql("SELECT sae_id, count(*) AS n FROM token_errors GROUP BY sae_id").pl()
    widths = saes.filter(pl.col("families").str.contains("width"))
    assert widths["width"].to_list() == [16, 32, 64, 96]
    assert (np.diff(widths["fvu"].to_numpy()) < 0).all() and 0.05 < widths["fvu"][-1] < widths["fvu"][0] < 1.0
    topk = saes.filter(pl.col("architecture") == "topk")
    np.testing.assert_allclose(topk["l0_mean"], topk["k"], atol=0.01)  # a ReLU may zero a selected latent, rarely
    assert set(rows["n"]) == {realistic.planted.x.shape[0]} and rows.height == len(realistic.sae_ids) == 7


def test_fvu_nonlinear_without_intercept_equals_a_direct_fit(realistic, tmp_path):
    """scaling_decomposition's FVU_nonlinear of b* fitted without intercept, against numpy least squares on the
    error vectors: the ratio of the two maps' test residual sums, times the stored (all-token) FVU_nonlinear."""
    table = realistic.run("scaling_decomposition", tmp_path / "scaling")["table"]
    ctx = realistic.context()
    fit = ctx.fit_mask(realistic.hook)
    x = realistic.planted.x.astype(np.float64)
    for row in table.iter_rows(named=True):
        with torch.no_grad():
            e = x - realistic.saes[row["sae_id"]](torch.from_numpy(realistic.planted.x)).x_hat.double().numpy()
        sse = {}
        for name, design in (("affine", np.hstack([x, np.ones((len(x), 1))])), ("linear", x)):
            b = np.linalg.lstsq(design[fit], e[fit], rcond=None)[0]
            sse[name] = float(((e[~fit] - design[~fit] @ b) ** 2).sum())
        expected = row["fvu_nonlinear"] * sse["linear"] / sse["affine"]
        assert row["fvu_nonlinear_no_intercept"] == pytest.approx(expected, rel=1e-4), row["sae_id"]

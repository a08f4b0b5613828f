"""Metrics: hand-computed values, agreement with naive numpy, identities, streaming = one shot, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from darkmatter.errors.metrics import (
    FvuAccumulator,
    LatentAccumulator,
    ReconstructionAccumulator,
    cosine_per_token,
    error_norm_sq,
    fvu,
    l0_per_token,
    l2_ratio_per_token,
    nmse_per_token,
)

# Two tokens, two dims; every expected number below was worked out by hand.
X = np.array([[1.0, 0.0], [3.0, 2.0]])
X_HAT = np.array([[1.0, 1.0], [2.0, 2.0]])
# errors [0,-1], [1,0] → ‖e‖² = 1, 1 (Σ = 2); mean x = [2,1]; centred x [-1,-1], [1,1] → Σ‖x−μ‖² = 4
LATENTS = np.array([[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, 0.5]])


def close(a: float, b: float, tol: float) -> bool:
    """Two-sided absolute tolerance, stated at every call."""
    return abs(a - b) <= tol


def test_hand_computed_per_token_values():
    assert np.allclose(error_norm_sq(X, X_HAT).numpy(), [1.0, 1.0], rtol=0, atol=1e-15)
    assert np.allclose(nmse_per_token(X, X_HAT).numpy(), [1.0, 1.0 / 13.0], rtol=0, atol=1e-15)
    assert np.allclose(cosine_per_token(X, X_HAT).numpy(), [1 / math.sqrt(2), 10 / math.sqrt(104)],
                       rtol=0, atol=1e-15)
    assert np.allclose(l2_ratio_per_token(X, X_HAT).numpy(), [math.sqrt(2), math.sqrt(8 / 13)], rtol=0, atol=1e-15)
    assert close(fvu(X, X_HAT), 0.5, 1e-15)


def test_hand_computed_summary():
    acc = ReconstructionAccumulator(d_sae=4).update(X, X_HAT, LATENTS[:2])
    s = acc.summary()
    assert s["n_tokens"] == 2
    assert close(s["fvu"], 0.5, 1e-15)
    assert close(s["error_norm_sq_mean"], 1.0, 1e-15)
    assert close(s["total_variance_per_token"], 2.0, 1e-15)
    assert close(s["nmse_per_token_mean"], (1 + 1 / 13) / 2, 1e-15)
    assert close(s["cosine_mean"], (1 / math.sqrt(2) + 10 / math.sqrt(104)) / 2, 1e-15)
    assert close(s["l2_ratio_mean"], (math.sqrt(2) + math.sqrt(8 / 13)) / 2, 1e-15)
    assert close(s["relative_reconstruction_bias"], 10 / 11, 1e-15)  # Σ‖x̂‖² = 2 + 8, Σ⟨x,x̂⟩ = 1 + 10
    assert close(s["l0_mean"], 1.5, 1e-15)  # L0 = 2, 1
    assert s["dead_count"] == 2 and close(s["dead_fraction"], 0.5, 0)
    assert s["dense_count"] == 2 and close(s["dense_fraction"], 0.5, 0)


def test_hand_computed_latent_statistics():
    acc = LatentAccumulator(4).update(LATENTS)
    assert l0_per_token(LATENTS).tolist() == [2, 1, 2]
    assert close(acc.l0_mean, 5 / 3, 1e-15)
    assert acc.dead.tolist() == [True, False, True, False]
    assert np.allclose(acc.feature_density, [0, 2 / 3, 0, 1], rtol=0, atol=1e-15)
    assert np.allclose(acc.mean_activation, [0, 1.0, 0, 1.5], rtol=0, atol=1e-15)
    assert acc.dense(0.1).tolist() == [False, True, False, True]
    assert acc.dense(0.7).tolist() == [False, False, False, True]
    # sorted L0 = [1, 2, 2]; inverted-CDF ranks ceil(3q): q=.01 → 1st, q=.5 → 2nd, q=.99 → 3rd
    assert acc.l0_quantiles((0.01, 0.5, 0.99)) == {0.01: 1, 0.5: 2, 0.99: 2}


def test_fvu_identities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) * 3 + 5
    assert fvu(x, x) == 0.0
    mean = np.broadcast_to(x.mean(0), x.shape)
    assert close(fvu(x, mean), 1.0, 1e-12)
    # FVU is about the mean, not about zero: a reconstruction equal to 0 has FVU ≫ 1 for data with a mean.
    assert fvu(x, np.zeros_like(x)) > 2.0


def _naive_numpy(x: np.ndarray, x_hat: np.ndarray) -> dict[str, float]:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    e2 = ((x - x_hat) ** 2).sum(1)
    x2 = (x**2).sum(1)
    cos = (x * x_hat).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1))
    return {
        "fvu": e2.sum() / ((x - x.mean(0)) ** 2).sum(),
        "nmse_per_token_mean": (e2 / x2).mean(),
        "cosine_mean": cos.mean(),
        "l2_ratio_mean": (np.linalg.norm(x_hat, axis=1) / np.linalg.norm(x, axis=1)).mean(),
        "relative_reconstruction_bias": (x_hat**2).sum() / (x * x_hat).sum(),
    }


def test_streaming_equals_one_shot_and_naive_numpy():
    rng = np.random.default_rng(1)
    n, d, d_sae = 3001, 12, 40
    x = (rng.normal(size=(n, d)) + rng.normal(size=d) * 4).astype(np.float32)
    x_hat = (x + rng.normal(size=(n, d)) * 0.5).astype(np.float32)
    latents = np.maximum(rng.normal(size=(n, d_sae)) - 1.0, 0).astype(np.float32)
    latents[:, 3] = 0  # one dead latent
    one = ReconstructionAccumulator(d_sae).update(x, x_hat, latents).summary()
    streamed = ReconstructionAccumulator(d_sae)
    bounds = [0, 1, 2, 500, 501, 1777, n]  # uneven chunks, including single tokens
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        streamed.update(torch.from_numpy(x[a:b]), torch.from_numpy(x_hat[a:b]), torch.from_numpy(latents[a:b]))
    many = streamed.summary()
    assert one.keys() == many.keys()
    for key in one:
        assert close(float(one[key]), float(many[key]), 1e-12 * max(1.0, abs(float(one[key])))), key
    for key, want in _naive_numpy(x, x_hat).items():
        assert close(one[key], want, 1e-12), key
    l0 = (latents != 0).sum(1)
    assert close(one["l0_mean"], l0.mean(), 1e-12)
    assert one["dead_count"] == int(((latents != 0).sum(0) == 0).sum()) == 1
    assert one["dense_count"] == int(((latents != 0).mean(0) > 0.1).sum())
    for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99):
        assert one[f"l0_p{100 * q:g}"] == int(np.quantile(l0, q, method="inverted_cdf")), q


def test_fvu_merge_of_two_accumulators():
    rng = np.random.default_rng(2)
    x, x_hat = rng.normal(size=(400, 5)) + 7, rng.normal(size=(400, 5)) + 7
    merged = FvuAccumulator().update(x[:150], x_hat[:150]).merge(FvuAccumulator().update(x[150:], x_hat[150:]))
    assert close(merged.fvu, fvu(x, x_hat), 1e-13)
    assert merged.n_tokens == 400


def test_fvu_stable_on_data_with_a_large_mean():
    # Activations like a residual stream with a huge shared direction: mean 1e4, spread 1, stored in float32.
    rng = np.random.default_rng(3)
    n, d = 20_000, 16
    x = (1e4 + rng.normal(size=(n, d))).astype(np.float32)
    x_hat = (x + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    x64 = x.astype(np.float64)
    reference = ((x64 - x_hat) ** 2).sum() / ((x64 - x64.mean(0)) ** 2).sum()  # two-pass, float64
    # The naive single-pass float32 formula Σ‖x‖² − N‖μ‖² is useless here (shows this test has teeth).
    naive_total = (x**2).sum(dtype=np.float32) - n * (x.mean(0, dtype=np.float32) ** 2).sum(dtype=np.float32)
    naive = ((x - x_hat) ** 2).sum(dtype=np.float32) / naive_total
    assert not close(float(naive), reference, 0.1 * reference)
    acc = FvuAccumulator()
    for start in range(0, n, 997):
        acc.update(x[start : start + 997], x_hat[start : start + 997])
    assert close(acc.fvu, reference, 1e-10 * reference)
    assert close(fvu(x, x_hat), reference, 1e-10 * reference)
    assert 0.08 < reference < 0.1  # 0.3² / 1² = 0.09 up to sampling noise


def test_read_only_memmap_input(tmp_path):
    x = np.random.default_rng(4).normal(size=(64, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert close(fvu(mm, mm * 0.5), fvu(x, x * 0.5), 1e-15)


def test_cosine_of_zero_reconstruction_is_zero():
    assert cosine_per_token(X, np.zeros_like(X)).tolist() == [0.0, 0.0]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"shape \[N, d_in\]"):
        fvu(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="zero variance"):
        fvu(np.ones((3, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no tokens"):
        _ = FvuAccumulator().fvu
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        LatentAccumulator(4).update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="d_in=3"):
        FvuAccumulator().update(np.ones((2, 2)), np.ones((2, 2))).update(np.ones((2, 3)), np.ones((2, 3)))

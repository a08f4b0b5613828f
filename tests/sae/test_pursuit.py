"""Gradient pursuit (darkmatter.sae.pursuit): the fast route gives the literal loop's iterates; the algorithm's own
properties (per-token L0, w ≥ 0, planted supports recovered); bad input gets a clear error."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from darkmatter import gradient_pursuit
from darkmatter.sae import pursuit
from darkmatter.sae.pursuit import gradient_pursuit_reference
from tests.helpers import torch_threads

EPS32 = torch.finfo(torch.float32).eps


def unit_dictionary(n: int, d: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    D = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return D / D.norm(dim=1, keepdim=True)


def dense(result, n: int) -> torch.Tensor:
    """The weights [N, n] of a PursuitResult (padding and clipped slots carry 0)."""
    return torch.zeros(result.values.shape[0], n, dtype=result.values.dtype).scatter_add_(
        1, result.indices, result.values)


def problem(dtype, n=300, d=48, N=200, max_l0=16):
    D = unit_dictionary(n, d, dtype)
    b_dec = 0.1 * torch.randn(d, dtype=dtype)
    x = torch.randn(N, d, dtype=dtype) + b_dec
    return x, D, b_dec, torch.randint(0, max_l0 + 1, (N,))


@pytest.mark.parametrize("gram", ["computed", "given", "rows-on-demand"])
def test_float64_gives_the_reference_iterates(gram, monkeypatch):
    x, D, b_dec, l0 = problem(torch.float64)
    w_ref = gradient_pursuit_reference(x, D, b_dec, l0)
    options = {"computed": {}, "given": {"gram": D @ D.T}, "rows-on-demand": {"gram_bytes": 0}}[gram]
    monkeypatch.setattr(pursuit, "GRADIENT_BYTES", 2**16)  # many chunks of tokens: chunking changes no token
    out = gradient_pursuit(x, D, b_dec, l0, **options)
    w = dense(out, D.shape[0])
    assert torch.equal(w != 0, w_ref != 0)  # the same supports (no exact ties in continuous random data)
    # the two routes differ only by rounding: relative 1e-12 is ~4500 float64 ulps, far above a 16-step loop's
    # accumulated rounding and far below any real difference in the iterates
    scale = (x - b_dec).norm(dim=1, keepdim=True)
    assert ((w - w_ref).abs() <= 1e-12 * scale).all()
    torch.testing.assert_close(out.x_hat, w_ref @ D + b_dec, rtol=0, atol=1e-12 * float(scale.max()))


def test_coherent_decoders_like_trained_ones_give_the_reference_iterates():
    """Trained decoders are far from incoherent: latents split into near-duplicates and share directions. Here 40
    clusters of 8 atoms at cosine ≈ 0.95, the clusters sharing a common direction: the supports and weights still
    follow the literal loop (the default run's real decoders are compared in bench/pursuit.py: the same supports on
    every token)."""
    g = torch.Generator().manual_seed(3)
    centres = torch.nn.functional.normalize(torch.randn(40, 32, generator=g, dtype=torch.float64) + 0.5, dim=1)
    D = torch.nn.functional.normalize(centres.repeat_interleave(8, 0)
                                      + 0.04 * torch.randn(320, 32, generator=g, dtype=torch.float64), dim=1)
    within = torch.stack([(D[i * 8:(i + 1) * 8] @ D[i * 8:(i + 1) * 8].T).triu(1).sum() / 28 for i in range(40)])
    assert within.min() > 0.9  # coherent indeed: every cluster's atoms at cosine > 0.9 on average
    x = torch.randn(300, 32, generator=g, dtype=torch.float64) * 3
    b_dec = torch.zeros(32, dtype=torch.float64)
    w_ref = gradient_pursuit_reference(x, D, b_dec, 24)
    w = dense(gradient_pursuit(x, D, b_dec, 24), D.shape[0])
    assert torch.equal(w != 0, w_ref != 0)
    assert ((w - w_ref).abs() <= 1e-12 * (x - b_dec).norm(dim=1)[:, None]).all()


def test_clipping_at_zero_is_reproduced():
    # Few atoms in few dimensions and more steps than dimensions: here about 1.4% of tokens have a weight that a step
    # drives below 0 and the clip w ← max(w + αĝ, 0) removes from the support (on the problem above, almost none do)
    x, D, b_dec, _ = problem(torch.float64, n=12, d=4, N=3000)
    w_ref = gradient_pursuit_reference(x, D, b_dec, 8)
    w = dense(gradient_pursuit(x, D, b_dec, 8), D.shape[0])
    assert torch.equal(w != 0, w_ref != 0) and ((w - w_ref).abs() <= 1e-12 * (x - b_dec).norm(dim=1)[:, None]).all()


def test_float32_computes_in_float32_and_matches_the_reference():
    x, D, b_dec, l0 = problem(torch.float32)
    w_ref = gradient_pursuit_reference(x, D, b_dec, l0)
    out = gradient_pursuit(x, D, b_dec, l0)
    assert out.x_hat.dtype == out.values.dtype == torch.float32
    w = dense(out, D.shape[0])
    same = (w != 0).eq(w_ref != 0).all(1)
    assert same.float().mean() >= 0.99  # a support may differ only where two gradients tie to float32 rounding
    # Derived bound: the routes form g in different orders, each iteration's g differs by a few eps·‖s‖ (unit atoms),
    # and L0 iterations accumulate it: ‖Δx̂‖ ≤ 4·L0·√d·eps·‖s‖ per token
    bound = 4 * l0[same].double() * x.shape[1] ** 0.5 * EPS32 * (x - b_dec)[same].norm(dim=1).double()
    gap = (out.x_hat[same] - (w_ref @ D + b_dec)[same]).norm(dim=1).double()
    assert (gap <= bound).all() and gap.max() > 0  # rounding differs, so the bound is what is being tested


def test_each_token_runs_its_own_l0_and_weights_stay_nonnegative():
    x, D, b_dec, l0 = problem(torch.float64, N=40)
    out = gradient_pursuit(x, D, b_dec, l0)
    assert out.indices.shape == out.values.shape == (40, int(l0.max()))
    assert (out.values >= 0).all() and ((out.values != 0).sum(1) <= l0).all()
    for t in torch.unique(l0).tolist():  # per-token L0 = running each token alone with a fixed L0
        rows = l0 == t
        alone = gradient_pursuit(x[rows], D, b_dec, t)
        torch.testing.assert_close(alone.x_hat, out.x_hat[rows], rtol=0, atol=1e-12)
    zero = l0 == 0
    assert zero.any() and torch.equal(out.x_hat[zero], b_dec.expand(int(zero.sum()), -1))  # L0 = 0: b_dec


def test_the_result_does_not_depend_on_the_number_of_threads():
    x, D, b_dec, l0 = problem(torch.float32, N=101)
    with torch_threads(1):
        one = gradient_pursuit(x, D, b_dec, l0)
    with torch_threads(2):
        two = gradient_pursuit(x, D, b_dec, l0)
    assert torch.equal(one.indices, two.indices) and torch.equal(one.values, two.values)


def test_planted_sparse_signals_are_recovered_on_an_incoherent_dictionary():
    n, d, k, N = 1024, 512, 32, 48
    D = unit_dictionary(n, d)  # mutual coherence ≈ 0.2: incoherent enough for 32-sparse recovery
    g = torch.Generator().manual_seed(1)
    planted = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(N)])
    weights = torch.zeros(N, n, dtype=torch.float64).scatter_(1, planted, 1 + torch.rand(N, k, generator=g,
                                                                                          dtype=torch.float64))
    x = weights @ D
    b_dec = torch.zeros(d, dtype=torch.float64)
    found = dense(gradient_pursuit(x, D, b_dec, k), n).topk(k, dim=1).indices
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(found, planted, strict=True))  # recall 1.0
    # one gradient step per atom does not finish the fit on that support; twice as many steps do
    twice = gradient_pursuit(x, D, b_dec, 2 * k)
    assert torch.equal(dense(twice, n) != 0, weights != 0)
    assert ((twice.x_hat - x).norm(dim=1) / x.norm(dim=1)).max() < 1e-9


def test_exact_ties_give_the_same_reconstruction():
    D = unit_dictionary(60, 16)
    D = torch.cat([D, D[:10]])  # atoms 60..69 repeat 0..9: their gradients tie exactly
    x, b_dec = torch.randn(50, 16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    w_ref = gradient_pursuit_reference(x, D, b_dec, 8)
    out = gradient_pursuit(x, D, b_dec, 8)
    torch.testing.assert_close(out.x_hat, w_ref @ D, rtol=0, atol=1e-12 * float(x.norm(dim=1).max()))


@pytest.mark.parametrize(("change", "message"), [
    (lambda x, D, b, l0: (x[:, :-1], D, b, l0), "x has d = 15 but W_dec has d = 16"),
    (lambda x, D, b, l0: (x, D, b[:-1], l0), "expected x [N, d], W_dec [n, d] and b_dec [d]"),
    (lambda x, D, b, l0: (x, D, b, 61), "l0 must lie in [0, n = 60]"),
    (lambda x, D, b, l0: (x, D, b, torch.tensor([3, 4])), "one value per token"),
    (lambda x, D, b, l0: (x.index_fill(0, torch.tensor([2]), float("nan")), D, b, l0), "NaN"),
], ids=["d", "b_dec", "l0-above-n", "l0-shape", "nan"])
def test_bad_input_gets_one_clear_error(change, message):
    args = change(torch.randn(5, 16), unit_dictionary(60, 16, torch.float32), torch.zeros(16), 4)
    with pytest.raises(ValueError, match=re.escape(message)):
        gradient_pursuit(*args)


def test_a_given_gram_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=re.escape("gram must be W_dec·W_decᵀ [60, 60]; got (16, 16)")):
        gradient_pursuit(torch.randn(5, 16), unit_dictionary(60, 16, torch.float32), torch.zeros(16), 4,
                         gram=torch.eye(16))


def test_compiled_argmax_is_numpys_first_maximum(rng):
    """The kernel's argmax (eight running maxima, then the first index of the largest) against np.argmax on random
    vectors of every length mod 8, on heavy ties and on all-negative values; its inputs never hold NaN (x is checked),
    and a NaN that hides the maximum still ends in numpy's answer instead of a read past the end."""
    from darkmatter.sae.pursuit import _argmax

    for n in list(range(1, 40)) + [16384]:
        for values in (rng.normal(size=n), rng.integers(-2, 2, size=n).astype(float), -np.abs(rng.normal(size=n))):
            for dtype in (np.float32, np.float64):
                g = values.astype(dtype)
                assert _argmax(g) == np.argmax(g), (n, g)
    g = np.array([np.nan, 1.0, 3.0], dtype=np.float32)
    assert _argmax(g) == np.argmax(g) == 0

"""The sparse training kernels equal a dense autograd reference (values and gradients)."""

from __future__ import annotations

import pytest
import torch

from darkmatter.sae.kernels import (
    JumpReLU,
    Step,
    batch_topk_select,
    sparse_encode,
    sparse_squared_error,
    topk_rows,
    topk_select,
)
from darkmatter.sae.model import Sae
from darkmatter.sae.objectives import auxk_sse
from tests.helpers import random_sae

N, D_IN, D_SAE, K = 48, 16, 96, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def sae_and_batch(dtype: torch.dtype, seed: int = 0) -> tuple[Sae, torch.Tensor]:
    """A random TopK SAE in ``dtype`` and a batch x [N, d_in] of the same dtype."""
    sae = random_sae("topk", D_IN, D_SAE, K, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    return sae, torch.randn(N, D_IN, generator=gen, dtype=torch.float64).to(dtype)


def topk_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(pre).scatter_(1, pre.topk(k, dim=1).indices, 1.0)


def batch_mask(pre: torch.Tensor, k: int) -> torch.Tensor:
    m = torch.zeros(pre.numel(), dtype=pre.dtype)
    m[pre.reshape(-1).topk(k * pre.shape[0]).indices] = 1.0
    return m.view_as(pre)


DEAD = torch.tensor([3, 7, 20, 50, 51, 90])


def dead_mask(pre: torch.Tensor, k_aux: int) -> torch.Tensor:
    masked = torch.full_like(pre, -torch.inf)
    masked[:, DEAD] = pre[:, DEAD]
    return topk_mask(masked, k_aux)


# name: (sparse selection, AuxK on the DEAD latents?, dense reference masks)
CASES = {
    "topk": (lambda p: topk_select(p, K), False, lambda p: (topk_mask(p, K), None)),
    "batchtopk": (lambda p: batch_topk_select(p, K), False, lambda p: (batch_mask(p, K), None)),
    # candidates=1 makes some token need more than k winners: exercises the exact fallback
    "batchtopk_fallback": (lambda p: batch_topk_select(p, K, candidates=1), False, lambda p: (batch_mask(p, K), None)),
    "topk+auxk": (lambda p: topk_select(p, K), True, lambda p: (topk_mask(p, K), dead_mask(p, 3))),
}


def fast_loss(sae: Sae, x: torch.Tensor, select, aux: bool, bf16: bool = False) -> torch.Tensor:
    sel, vals, dead_pre = sparse_encode(x, sae.b_dec, sae.W_enc, sae.b_enc, select, bf16=bf16,
                                        dense_cols=DEAD if aux else None)
    loss, err = sparse_squared_error(vals.relu(), sel, sae.W_dec, sae.b_dec, x)
    if aux:  # AuxK: reconstruct the (detached) residual from the top-3 dead latents, no b_dec
        loss = loss + auxk_sse(dead_pre, DEAD, 3, sae.W_dec, err)
    return loss


def dense_loss(sae: Sae, x: torch.Tensor, masks) -> torch.Tensor:
    pre = sae.pre_acts(x)
    main, aux = masks(pre.detach())
    x_hat = (pre.relu() * main) @ sae.W_dec + sae.b_dec
    loss = (x - x_hat).pow(2).sum()
    if aux is not None:
        loss = loss + ((pre.relu() * aux) @ sae.W_dec - (x - x_hat).detach()).pow(2).sum()
    return loss


def grads(sae: Sae, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_kernels_equal_dense_autograd_in_float64(case):
    # float64: the two computations sum the same terms in different orders, so they agree to ~1e-15
    # relative; 1e-10 leaves room for that and fails on any missing or extra gradient term.
    select, aux, masks = CASES[case]
    sae, x = sae_and_batch(torch.float64)
    x.requires_grad_(True)  # training never needs ∂x, but the kernels provide it
    fast = fast_loss(sae, x, select, aux)
    g_fast = grads(sae, fast) | {"x": x.grad.clone()}
    x.grad = None
    dense = dense_loss(sae, x, masks)
    g_dense = grads(sae, dense) | {"x": x.grad.clone()}
    assert float(fast.detach()) == pytest.approx(float(dense.detach()), rel=1e-10)
    for name in ("W_enc_T", "b_enc", "W_dec", "b_dec", "x"):
        err = (g_fast[name] - g_dense[name]).abs().max() / g_dense[name].abs().max()
        assert 0 <= err <= 1e-10, name


def test_sparse_kernels_equal_dense_autograd_in_float32():
    # float32 (what training runs): each gradient entry sums ≤ N·K = 192 products; with unit eps 6e-8 the
    # rounding difference stays below ~1e-5 of the largest entry. 1e-4 is tight enough to catch a wrong term.
    select, aux, masks = CASES["topk+auxk"]
    sae, x = sae_and_batch(torch.float32)
    g_fast = grads(sae, fast_loss(sae, x, select, aux))
    g_dense = grads(sae, dense_loss(sae, x, masks))
    for name, g in g_dense.items():
        assert (g_fast[name] - g).abs().max() / g.abs().max() <= 1e-4, name


def test_bf16_mode_changes_loss_and_gradients_only_by_rounding():
    # bf16 keeps 8 mantissa bits: pre-activations and the encoder-gradient inputs move by ~2^-9 relative, the
    # loss and gradients by about as much; 2% (loss) and 5% (gradient norm) allow a tie-broken top-k swap or
    # two. They must not be identical either (bf16 really ran).
    sae, x = sae_and_batch(torch.float32)
    select, aux, _ = CASES["topk+auxk"]
    exact = fast_loss(sae, x, select, aux)
    g_exact = grads(sae, exact)
    approx = fast_loss(sae, x, select, aux, bf16=True)
    g_approx = grads(sae, approx)
    assert 0 < abs(float(approx.detach()) / float(exact.detach()) - 1) < 0.02
    for name, g in g_exact.items():
        assert 0 < float((g_approx[name] - g).norm() / g.norm()) < 0.05, name
    assert g_approx["W_enc_T"].dtype == torch.float32 and g_approx["W_enc_T"].is_contiguous()


@pytest.mark.parametrize("shape,k", [((64, 9216), 32), ((7, 4096), 128), ((5, 1000), 3), ((3, 40), 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_rows_returns_exactly_torch_topk_values(shape, k, dtype):
    gen = torch.Generator().manual_seed(shape[1])
    x = torch.randint(-50, 50, shape, generator=gen).to(dtype)  # small integers: many ties
    vals, idx = topk_rows(x, k)
    assert torch.equal(vals.sort(dim=1).values, x.topk(k, dim=1).values.sort(dim=1).values)
    assert torch.equal(x.gather(1, idx), vals)
    assert all(len(set(row.tolist())) == k for row in idx)  # k distinct latents per token


def test_batch_topk_selection_has_k_per_token_on_average_and_csr_layout():
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(32, 200, generator=gen) * torch.linspace(0.1, 3, 32)[:, None]  # uneven tokens
    sel, vals = batch_topk_select(pre, 5)
    assert sel.nnz == 5 * 32
    assert torch.equal(vals.sort().values, pre.reshape(-1).topk(160).values.sort().values)
    assert bool((sel.rows[1:] >= sel.rows[:-1]).all())  # CSR: tokens in order
    counts = torch.bincount(sel.rows, minlength=32)
    assert torch.equal(sel.offsets, torch.cumsum(counts, 0) - counts)
    assert counts.min() < 5 < counts.max()  # the budget really moves between tokens


def test_jumprelu_and_step_straight_through_gradients():
    # Rajamanoharan et al. 2024: ∂f/∂z = 1[z > θ], ∂f/∂θ = −(θ/ε)·K((z−θ)/ε), ∂H/∂θ = −(1/ε)·K((z−θ)/ε)
    z = torch.tensor([[0.10, 0.52, 0.70], [0.46, 0.30, 0.90]], dtype=torch.float64, requires_grad=True)
    th = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    eps = 0.1
    f = JumpReLU.apply(z, th, eps)
    assert torch.equal(f.detach(), torch.tensor([[0.0, 0.52, 0.70], [0.0, 0.0, 0.90]], dtype=torch.float64))
    f.sum().backward()
    assert torch.equal(z.grad, torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64))
    # inside the window |z − θ| < ε/2: 0.52 (latent 1) and 0.46 (latent 0)
    assert torch.allclose(th.grad, torch.tensor([-5.0, -5.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    th.grad = None
    Step.apply(z, th, eps).sum().backward()
    assert torch.allclose(th.grad, torch.tensor([-10.0, -10.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_encoder_weight_gradient_comes_in_the_weights_own_layout():
    # Sae.W_enc is a view of the contiguous W_enc_T (no transposing copy); a plain contiguous [d_in, d_sae]
    # weight gets a contiguous gradient. Both must hold the same numbers.
    sae, x = sae_and_batch(torch.float32)
    select = CASES["topk"][0]
    W_plain = sae.W_enc.detach().contiguous().requires_grad_(True)
    out = {}
    for name, W in (("view", sae.W_enc), ("plain", W_plain)):
        _, vals, _ = sparse_encode(x, sae.b_dec, W, sae.b_enc, select)
        (g,) = torch.autograd.grad(vals.pow(2).sum(), W)
        assert g.stride() == W.stride() and g.shape == (D_IN, D_SAE), name
        out[name] = g
    assert torch.equal(out["view"], out["plain"])
    assert sae.W_enc.stride() == (1, D_IN) and W_plain.stride() == (D_SAE, 1)

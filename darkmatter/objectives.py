"""Training forward passes and losses, one per architecture (the recipes of darkmatter.train).

Every loss starts from the normalised MSE of the batch, FVU_batch = Σ‖x − x_hat‖² / Σ‖x − mean_batch(x)‖²
(sparsify's ``fvu`` loss; OpenAI normalises its MSE by the data variance alike), so coefficients do not depend
on the activation scale. Sparsity:

- topk / batchtopk: none in the loss (it is the selection). AuxK (Gao et al. 2024, App. B.1; dictionary_learning):
  the top ``k_aux`` pre-activations among dead latents, ReLU'd, reconstruct the detached residual
  r = x − x_hat; its MSE is normalised by the residual's own variance (dictionary_learning PR #36) and weighted
  by ``auxk_coef`` (1/32, OpenAI).
- relu: L1 of f_i·‖W_dec[i]‖ (Anthropic, April 2024 update; SAELens ``standard``), per token, divided by
  √(Σ‖x − mean‖²/N) to be scale-free, times a coefficient the trainer adapts towards the target L0 = k.
- jumprelu: L0 through the Step straight-through estimator (Rajamanoharan et al. 2024): ``l0`` mode adds
  l0_coef·L0; ``target_l0`` mode adds l0_coef·(L0/k − 1)² (dictionary_learning ``JumpReluTrainer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from darkmatter.kernels import (
    JumpReLU,
    Selection,
    Step,
    batch_topk_select,
    sparse_encode,
    sparse_squared_error,
    topk_rows,
    topk_select,
)
from darkmatter.precision import autocast
from darkmatter.sae import Sae


@dataclass(frozen=True)
class LossSpec:
    """Per-step inputs of a loss besides the SAE and the batch."""

    k: int  # target L0 (exact for topk)
    dead: Tensor | None = None  # [n_dead] int64 latents dead for AuxK
    k_aux: int = 0
    auxk_coef: float = 0.0
    sparsity_coef: float = 0.0  # relu: current L1 coefficient; jumprelu: l0_coef
    jumprelu_mode: str = "target_l0"
    bandwidth: float = 0.05  # jumprelu STE bandwidth in input units
    bf16: bool = False


@dataclass
class StepOutput:
    loss: Tensor  # scalar to backpropagate
    fvu: Tensor  # scalar, batch FVU (detached)
    l0: Tensor  # scalar, mean active latents per token (detached)
    aux: Tensor  # scalar, auxiliary / sparsity term before its coefficient (detached)
    fired: Tensor  # [d_sae] bool, latents active on some token of the batch
    min_act: Tensor | None = None  # batchtopk: smallest positive selected activation (threshold EMA input)


def batch_variance(x: Tensor) -> Tensor:
    """Σ_tokens ‖x − mean_batch(x)‖² (the FVU denominator; x [N, d] without gradient)."""
    centered = (x - x.mean(0)).reshape(-1)
    return torch.dot(centered, centered)  # ~8x faster than x.var(0).sum() on CPU


def _fired(sel: Selection, acts: Tensor, d_sae: int) -> Tensor:
    """[d_sae] bool: latents with a positive activation in the batch (numpy: single-threaded bookkeeping)."""
    return torch.from_numpy(np.bincount(sel.cols.numpy()[acts.numpy() > 0], minlength=d_sae) > 0)


def auxk_sse(dead_pre: Tensor, dead: Tensor, k_aux: int, W_dec: Tensor, residual: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024, App. B.1): Σ‖residual − Σ_{top k_aux dead latents} ReLU(pre)·W_dec‖².

    dead_pre [N, m] pre-activations of the dead latents ``dead`` [m]; residual [N, d_in] without gradient.
    """
    acts = dead_pre.relu()
    if dead.numel() > k_aux:  # keep each token's k_aux largest
        keep = topk_rows(dead_pre.detach(), k_aux)[1]
        acts = acts * torch.zeros_like(acts).scatter_(1, keep, 1.0)
    diff = acts @ W_dec.index_select(0, dead) - residual
    return (diff.float() if diff.dtype == torch.bfloat16 else diff).pow(2).sum()


def topk_step(sae: Sae, x: Tensor, spec: LossSpec) -> StepOutput:
    """TopK / BatchTopK with the sparse kernels (darkmatter.kernels) and optional AuxK."""
    batch = sae.architecture == "batchtopk"
    use_aux = spec.dead is not None and spec.dead.numel() > 0 and spec.auxk_coef > 0 and spec.k_aux > 0

    def select(pre: Tensor) -> tuple[Selection, Tensor]:
        return batch_topk_select(pre, spec.k) if batch else topk_select(pre, spec.k)

    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    sel, vals, dead_pre = sparse_encode(x, b_dec, sae.W_enc, sae.b_enc, select, bf16=spec.bf16,
                                        dense_cols=spec.dead if use_aux else None)
    acts = vals.relu()  # OpenAI: ReLU on the selected values only
    sse, err = sparse_squared_error(acts, sel, sae.W_dec, sae.b_dec, x)
    fvu = sse / batch_variance(x)
    loss = fvu
    aux = torch.zeros(())
    if use_aux:  # err carries no gradient: the residual target is detached (SAELens, OpenAI)
        assert spec.dead is not None
        with autocast(spec.bf16):  # its GEMMs grow with the number of dead latents
            aux = auxk_sse(dead_pre, spec.dead, spec.k_aux, sae.W_dec, err) / batch_variance(err)
        loss = loss + spec.auxk_coef * aux
    acts = acts.detach()
    positive = acts > 0
    min_act = acts[positive].min() if batch and bool(positive.any()) else None
    return StepOutput(loss, fvu.detach(), positive.sum() / x.shape[0], aux.detach(), _fired(sel, acts, sae.d_sae),
                      min_act)


def relu_step(sae: Sae, x: Tensor, spec: LossSpec) -> StepOutput:
    """ReLU SAE, dense autograd; L1 weighted by decoder row norms."""
    with autocast(spec.bf16):
        f = sae.pre_acts(x).relu()
        x_hat = sae.decode(f)
    f, x_hat = f.float(), x_hat.float()
    var = batch_variance(x)
    fvu = (x - x_hat).pow(2).sum() / var
    l1 = (f * sae.W_dec.norm(dim=1)).sum(1).mean() / (var / x.shape[0]).sqrt()
    active = f.detach() > 0
    return StepOutput(fvu + spec.sparsity_coef * l1, fvu.detach(), active.sum(1).float().mean(), l1.detach(),
                      active.any(0))


def jumprelu_step(sae: Sae, x: Tensor, spec: LossSpec) -> StepOutput:
    """JumpReLU SAE, dense autograd with straight-through estimators for the threshold."""
    assert sae.threshold is not None
    with autocast(spec.bf16):
        z = sae.pre_acts(x).float().relu()
    f = JumpReLU.apply(z, sae.threshold, spec.bandwidth)
    with autocast(spec.bf16):
        x_hat = sae.decode(f).float()
    var = batch_variance(x)
    fvu = (x - x_hat).pow(2).sum() / var
    l0 = Step.apply(z, sae.threshold, spec.bandwidth).sum(1).mean()
    sparsity = (l0 / spec.k - 1).pow(2) if spec.jumprelu_mode == "target_l0" else l0
    active = f.detach() > 0
    return StepOutput(fvu + spec.sparsity_coef * sparsity, fvu.detach(), l0.detach(), sparsity.detach(),
                      active.any(0))


STEPS = {"topk": topk_step, "batchtopk": topk_step, "relu": relu_step, "jumprelu": jumprelu_step}


def training_step(sae: Sae, x: Tensor, spec: LossSpec) -> StepOutput:
    """The training forward pass and loss of ``sae.architecture`` on a batch x [N, d_in]."""
    return STEPS[sae.architecture](sae, x, spec)

"""The pieces every training loss is built from (each architecture's step is in darkmatter.sae.architectures).

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

from darkmatter.sae import kernels
from darkmatter.sae.kernels import Selection, topk_rows


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


def fired(sel: Selection, acts: Tensor, d_sae: int) -> Tensor:
    """[d_sae] bool: latents with a positive activation in the batch (numpy on the CPU: single-threaded
    bookkeeping; torch ops where the tensors are on a GPU)."""
    if not kernels.on_host(acts):
        return torch.bincount(sel.cols[acts > 0], minlength=d_sae) > 0
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

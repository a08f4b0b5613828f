"""The SAE architectures, in one registry: everything that differs between them lives here.

Every architecture shares the affine encoder and decoder of :class:`darkmatter.sae.model.Sae`::

    pre   = (x − b_dec·[apply_b_dec_to_input]) · W_enc + b_enc        [N, d_sae]
    f     = σ(pre)                                                    [N, d_sae]  (the latents)
    x_hat = f · W_dec + b_dec                                         [N, d_in]

An :class:`Architecture` gives σ at inference, the training step (forward pass and loss, from the shared pieces of
:mod:`darkmatter.sae.objectives`), whether it has a per-latent threshold, and what the trainer does around a step.
``k`` is each family member's sparsity target: exact L0 for ``topk``, mean L0 for ``batchtopk``, the target of the
L0 loss for ``jumprelu`` and of the L1 coefficient controller for ``relu``. Adding an architecture means adding one
entry here (and its tests).

- ``topk``      ReLU of the k largest pre-activations, zero elsewhere (Gao et al. 2024; OpenAI applies the ReLU to
  the selected values only). L0 ≤ k, = k unless a selected pre-activation is ≤ 0.
- ``batchtopk`` trained with the top k·N pre-activations of the whole batch (Bussmann et al. 2024); at inference a
  learned global threshold replaces the batch: f = ReLU(pre)·1[pre > threshold] (as SAELens saves it); the
  threshold is an EMA of the batch's smallest positive selected activation (dictionary_learning, SAELens).
- ``relu``      f = ReLU(pre) (SAELens calls it ``standard``); L1 of f_i·‖W_dec[i]‖ with a coefficient adapted
  towards the target L0 by dual ascent.
- ``jumprelu``  f = ReLU(pre)·1[pre > threshold], one trained threshold per latent (Rajamanoharan et al. 2024,
  Gemma Scope); straight-through estimators for the threshold, an L0 penalty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from darkmatter.precision import autocast
from darkmatter.sae.kernels import (
    JumpReLU,
    Step,
    batch_topk_select,
    sparse_encode,
    sparse_squared_error,
    topk_select,
)
from darkmatter.sae.objectives import LossSpec, StepOutput, auxk_sse, batch_variance, fired

if TYPE_CHECKING:
    from darkmatter.sae.model import Sae
    from darkmatter.sae.train import Trainer


@dataclass(frozen=True)
class Architecture:
    """One SAE architecture (module docstring).

    threshold: ``none``, a trained ``parameter`` or a ``buffer`` statistic; selects_top_k: latents are chosen by
    ranking pre-activations — not invariant to per-latent decoder norms (kept at 1 in training, never folded) and
    prone to dead latents, which AuxK revives; sparsity_coef, init and after_step: the trainer's hooks.
    """

    name: str
    activate: Callable[[Sae, Tensor], Tensor]
    train_step: Callable[[Sae, Tensor, LossSpec], StepOutput]
    threshold: Literal["none", "parameter", "buffer"] = "none"
    selects_top_k: bool = False
    aliases: tuple[str, ...] = ()
    sparsity_coef: Callable[[Trainer], float] = lambda trainer: 0.0
    init: Callable[[Trainer], None] = lambda trainer: None
    after_step: Callable[[Trainer, StepOutput], None] = lambda trainer, out: None


# --------------------------------------------------------------------------------------------- inference


def _topk(sae: Sae, pre: Tensor) -> Tensor:
    vals, idx = pre.topk(sae.k, dim=-1, sorted=False)  # type: ignore[arg-type]
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


def _relu(sae: Sae, pre: Tensor) -> Tensor:
    return pre.relu()


def _thresholded(sae: Sae, pre: Tensor) -> Tensor:
    assert sae.threshold is not None
    return pre.relu() * (pre > sae.threshold)


# --------------------------------------------------------------------------------------------- training steps


def _topk_step(sae: Sae, x: Tensor, spec: LossSpec, batch: bool = False) -> StepOutput:
    """TopK / BatchTopK with the sparse kernels (darkmatter.sae.kernels) and optional AuxK."""
    use_aux = spec.dead is not None and spec.dead.numel() > 0 and spec.auxk_coef > 0 and spec.k_aux > 0

    def select(pre: Tensor):
        return batch_topk_select(pre, spec.k) if batch else topk_select(pre, spec.k)

    b_dec = sae.b_dec if sae.apply_b_dec_to_input else None
    sel, vals, dead_pre = sparse_encode(x, b_dec, sae.W_enc, sae.b_enc, select, bf16=spec.bf16,
                                        dense_cols=spec.dead if use_aux else None)
    acts = vals.relu()  # OpenAI: ReLU on the selected values only
    sse, err = sparse_squared_error(acts, sel, sae.W_dec, sae.b_dec, x)
    fvu = sse / batch_variance(x)
    loss = fvu
    aux = torch.zeros((), device=x.device)
    if use_aux:  # err carries no gradient: the residual target is detached (SAELens, OpenAI)
        assert spec.dead is not None
        with autocast(spec.bf16, x.device.type):  # its GEMMs grow with the number of dead latents
            aux = auxk_sse(dead_pre, spec.dead, spec.k_aux, sae.W_dec, err) / batch_variance(err)
        loss = loss + spec.auxk_coef * aux
    acts = acts.detach()
    positive = acts > 0
    min_act = acts[positive].min() if batch and bool(positive.any()) else None
    return StepOutput(loss, fvu.detach(), positive.sum() / x.shape[0], aux.detach(), fired(sel, acts, sae.d_sae),
                      min_act)


def _relu_step(sae: Sae, x: Tensor, spec: LossSpec) -> StepOutput:
    """ReLU SAE, dense autograd; L1 weighted by decoder row norms, divided by the batch's RMS norm (scale-free)."""
    with autocast(spec.bf16, x.device.type):
        f = sae.pre_acts(x).relu()
        x_hat = sae.decode(f)
    f, x_hat = f.float(), x_hat.float()
    var = batch_variance(x)
    fvu = (x - x_hat).pow(2).sum() / var
    l1 = (f * sae.W_dec.norm(dim=1)).sum(1).mean() / (var / x.shape[0]).sqrt()
    active = f.detach() > 0
    return StepOutput(fvu + spec.sparsity_coef * l1, fvu.detach(), active.sum(1).float().mean(), l1.detach(),
                      active.any(0))


def _jumprelu_step(sae: Sae, x: Tensor, spec: LossSpec) -> StepOutput:
    """JumpReLU SAE, dense autograd with straight-through estimators for the threshold: ``l0`` mode adds
    l0_coef·L0, ``target_l0`` mode l0_coef·(L0/k − 1)² (dictionary_learning's JumpReluTrainer)."""
    assert sae.threshold is not None
    with autocast(spec.bf16, x.device.type):
        z = sae.pre_acts(x).float().relu()
    f = JumpReLU.apply(z, sae.threshold, spec.bandwidth)
    with autocast(spec.bf16, x.device.type):
        x_hat = sae.decode(f).float()
    var = batch_variance(x)
    fvu = (x - x_hat).pow(2).sum() / var
    l0 = Step.apply(z, sae.threshold, spec.bandwidth).sum(1).mean()
    sparsity = (l0 / spec.k - 1).pow(2) if spec.jumprelu_mode == "target_l0" else l0
    active = f.detach() > 0
    return StepOutput(fvu + spec.sparsity_coef * sparsity, fvu.detach(), l0.detach(), sparsity.detach(),
                      active.any(0))


# --------------------------------------------------------------------------------------------- trainer hooks


def _batchtopk_threshold(trainer: Trainer, out: StepOutput) -> None:
    """EMA (β = batchtopk_threshold_beta, started at the first step's value) of the smallest selected activation."""
    sae = trainer.sae
    if out.min_act is not None and sae.threshold is not None:
        beta = 0.0 if trainer.step == 0 else trainer.cfg.batchtopk_threshold_beta
        sae.threshold.mul_(beta).add_((1 - beta) * out.min_act)


def _relu_l1_controller(trainer: Trainer, out: StepOutput) -> None:
    """Dual ascent of the L1 coefficient's log-scale towards mean L0 = k."""
    if trainer.cfg.l1_adapt_rate:
        trainer.l1_log_scale += trainer.cfg.l1_adapt_rate * math.log((float(out.l0) + 1) / (trainer.spec.k + 1))


def _jumprelu_init(trainer: Trainer) -> None:
    """θ = jumprelu_init_threshold·ρ, ρ the per-dimension RMS of the training input (SAELens assumes ρ = 1)."""
    assert trainer.sae.threshold is not None
    trainer.sae.threshold.fill_(trainer.cfg.jumprelu_init_threshold * trainer.rms)


def _jumprelu_clamp(trainer: Trainer, out: StepOutput) -> None:
    assert trainer.sae.threshold is not None
    trainer.sae.threshold.clamp_(min=0.0)


# --------------------------------------------------------------------------------------------- the registry

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("topk", _topk, _topk_step, selects_top_k=True),
    Architecture("batchtopk", _thresholded, lambda sae, x, spec: _topk_step(sae, x, spec, batch=True),
                 threshold="buffer", selects_top_k=True, after_step=_batchtopk_threshold),
    Architecture("relu", _relu, _relu_step, aliases=("standard",), after_step=_relu_l1_controller,
                 sparsity_coef=lambda t: t.cfg.l1_coef * math.exp(t.l1_log_scale)),
    Architecture("jumprelu", _thresholded, _jumprelu_step, threshold="parameter", init=_jumprelu_init,
                 after_step=_jumprelu_clamp, sparsity_coef=lambda t: t.cfg.l0_coef),
)}
ALIASES: dict[str, str] = {alias: a.name for a in ARCHITECTURES.values() for alias in a.aliases}


def architecture(name: Any) -> Architecture:
    """The registered architecture called ``name`` (or one of its aliases); ValueError naming the choices."""
    canonical = ALIASES.get(name, name)
    if canonical not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}.")
    return ARCHITECTURES[canonical]

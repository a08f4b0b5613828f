"""Downstream cost of a reconstruction: next-token CE and KL with the hooked activation replaced.

A *replacement* maps the activation at positions ≥ ``min_pos`` (``x [B, T - min_pos, d]``) to what the model
should see instead (e.g. ``Sae(x)``, ``Sae(x) + LinearError(x)``); earlier positions always keep the original
``x`` — the replacement never sees them, so it cannot change them (SCIENCE.md §3.9).

Prefix reuse: the clean pass records the input of the hooked block and the keyword arguments every later
block receives (attention masks, rotary embeddings — whatever the architecture passes), so each condition
re-runs only the blocks from the hook onwards, and the LM head only on the scored positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from darkmatter.config import hook_layer
from darkmatter.models import blocks, hook_module, logits_from_hidden, output_tensor

Replacement = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SpliceLosses:
    """Per-token losses of one batch: ``ce[name]`` and ``kl[name]`` are float32 [B, T - 1 - min_pos].

    Position j of the arrays scores the prediction made at position ``min_pos + j`` (of token ``min_pos + j + 1``).
    """

    ce: dict[str, Tensor]
    kl: dict[str, Tensor]


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation applied after the last block (Llama/Gemma ``norm``, GPT-2 ``ln_f``)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layernorm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ValueError(f"unsupported architecture {type(model).__name__}: no final norm found.")


def _replace_hook(min_pos: int, fn: Replacement):
    def hook(_module, _inputs, output):
        x = output_tensor(output)
        new = x.clone()
        new[:, min_pos:] = fn(x[:, min_pos:]).to(x.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _scores(model: nn.Module, hidden: Tensor, ids: Tensor, min_pos: int) -> Tensor:
    """Log-probabilities [B, T - 1 - min_pos, V] of the positions that have a next token."""
    return torch.log_softmax(logits_from_hidden(model, hidden[:, min_pos:-1]), dim=-1)


def _ce(logp: Tensor, ids: Tensor, min_pos: int) -> Tensor:
    return -logp.gather(-1, ids[:, min_pos + 1 :, None].long()).squeeze(-1)


def splice_losses(model: nn.Module, input_ids: Tensor, hook: str, min_pos: int,
                  replacements: Mapping[str, Replacement], reuse_prefix: bool = True) -> SpliceLosses:
    """CE and KL(clean ‖ spliced) per token for the clean model and each replacement at ``hook``.

    ``reuse_prefix=False`` recomputes the whole forward pass per condition (the reference the prefix-reuse
    path is tested and benchmarked against).
    """
    layer = hook_layer(hook)
    blks = blocks(model)
    target = hook_module(model, hook)
    captured: dict[int, tuple[tuple, dict]] = {}

    def record(i: int):
        def pre_hook(_module, args, kwargs):
            captured[i] = (args, kwargs)

        return pre_hook

    handles = [blks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(layer, len(blks))]
    try:
        clean_hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    clean_logp = _scores(model, clean_hidden, input_ids, min_pos)
    ce = {"clean": _ce(clean_logp, input_ids, min_pos)}
    kl = {"clean": torch.zeros_like(ce["clean"])}
    for name, fn in replacements.items():
        handle = target.register_forward_hook(_replace_hook(min_pos, fn))
        try:
            if reuse_prefix:
                args, kwargs = captured[layer]
                hidden = args[0] if args else kwargs["hidden_states"]
                for i in range(layer, len(blks)):
                    args, kwargs = captured[i]
                    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                    hidden = output_tensor(blks[i](hidden, *args[1:], **kwargs))
                hidden = final_norm(model)(hidden)
            else:
                hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        finally:
            handle.remove()
        logp = _scores(model, hidden, input_ids, min_pos)
        ce[name] = _ce(logp, input_ids, min_pos)
        kl[name] = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
        del logp
    return SpliceLosses(ce=ce, kl=kl)


def zero_ablation(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def mean_ablation(mean: Tensor) -> Replacement:
    """Replace every token's activation by a fixed mean vector [d]."""
    return lambda x: mean.to(x.dtype).expand_as(x)


def percent_recovered(l_sae: float, l_setting: float, l_clean: float) -> float:
    """100·(L_sae − L_setting)/(L_sae − L_clean): the share of the SAE's CE gap a setting closes (SCIENCE §3.9)."""
    gap = l_sae - l_clean
    return 100.0 * (l_sae - l_setting) / gap if gap != 0 else float("nan")


def ce_loss_score(l_zero: float, l_sae: float, l_clean: float) -> float:
    """The ecosystem's CE-loss score (zero-ablation baseline): (L_zero − L_sae)/(L_zero − L_clean)."""
    gap = l_zero - l_clean
    return (l_zero - l_sae) / gap if gap != 0 else float("nan")

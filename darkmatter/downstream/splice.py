"""Downstream cost of a reconstruction: next-token CE and KL with the hooked activation replaced.

A *replacement* maps the activation at positions ≥ ``min_pos`` (``x [B, T - min_pos, d]``) to what the model
should see instead (e.g. ``Sae(x)``, ``Sae(x) + LinearError(x)``); earlier positions always keep the original
``x`` — the replacement never sees them, so it cannot change them (docs/science.md, experiment 9).

Prefix reuse, in two directions. Depth: the clean pass records the input of the hooked block and the arguments
every later block receives (attention masks, rotary embeddings — whatever the architecture passes), so each
condition re-runs only the blocks from the hook onwards, and the LM head only on the scored positions. Time:
attention is causal and positions < ``min_pos`` keep the original x, so their keys and values in every later block
are the clean ones; each condition runs those blocks on positions ≥ ``min_pos`` only, attending to the clean
pass's cached keys and values of the earlier positions through an explicit causal mask (:func:`_suffix_calls`).
Architectures whose block arguments cannot be narrowed that way (an unknown attention implementation, a
sliding window shorter than the context, an unrecognised per-position argument) re-run the later blocks on every
position instead — slower, same result.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache

from darkmatter.config import hook_layer
from darkmatter.data.harvest import capture
from darkmatter.data.models import blocks, final_norm, hook_module, logits_from_hidden, output_tensor

log = logging.getLogger(__name__)

Replacement = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Conditioned:
    """A replacement that also reads the clean pass's activations at other ``hooks`` (positions ≥ ``min_pos``):
    ``fn(x, *[clean activation at h for h in hooks])``, e.g. Sae(x) plus what an earlier layer's SAE predicts of
    the error. Those activations are captured once, in the clean pass, and are the same for every condition."""

    fn: Callable[..., Tensor]
    hooks: tuple[str, ...]


@dataclass(frozen=True)
class SpliceLosses:
    """Per-token losses of one batch: ``ce[name]`` and ``kl[name]`` are float32 [B, T - 1 - min_pos].

    Position j of the arrays scores the prediction made at position ``min_pos + j`` (of token ``min_pos + j + 1``).
    """

    ce: dict[str, Tensor]
    kl: dict[str, Tensor]


def _replace_hook(min_pos: int, fn: Replacement):
    """Forward hook: positions ≥ ``min_pos`` of the module's output go through ``fn`` (0 on a suffix-only run)."""
    def hook(_module, _inputs, output):
        x = output_tensor(output)
        new = x.clone()
        new[:, min_pos:] = fn(x[:, min_pos:]).to(x.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _scores(model: nn.Module, suffix_hidden: Tensor) -> Tensor:
    """Log-probabilities [B, T - 1 - min_pos, V] from the final hidden states of positions ≥ min_pos (the last
    position has no next token)."""
    return torch.log_softmax(logits_from_hidden(model, suffix_hidden[:, :-1]), dim=-1)


def _causal_mask(model: nn.Module, q_len: int, kv_len: int, dtype: torch.dtype,
                 device: torch.device | None = None) -> Tensor | None:
    """The mask [1, 1, q_len, kv_len] of queries at positions kv_len − q_len … kv_len − 1 over all keys, in the
    format of the model's attention implementation (SDPA: True = attend; eager: additive), or None if unknown.

    Why explicit: with no mask, SDPA's ``is_causal`` aligns a non-square mask top-left (query 0 would see key 0
    only), which is wrong for queries that follow cached keys."""
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)[None, None]
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return None


def _narrow(name: str, value: Any, min_pos: int, seq_len: int, mask: Tensor) -> tuple[bool, Any]:
    """(ok, value) of one block argument restricted to queries at positions ≥ ``min_pos``."""
    if name == "attention_mask":
        if value is None:
            return True, mask
        ok = isinstance(value, Tensor) and tuple(value.shape[-2:]) == (seq_len, seq_len)
        return ok, value[..., min_pos:, :] if ok else value
    if name == "position_embeddings" and isinstance(value, tuple):
        return True, tuple(t[..., min_pos:, :] for t in value)
    if name in ("position_ids", "cache_position") and isinstance(value, Tensor):
        return True, value[..., min_pos:]
    return not (isinstance(value, Tensor) and seq_len in value.shape), value  # unknown per-position: give up


def _suffix_calls(model: nn.Module, blks: nn.ModuleList, captured: dict[int, tuple[tuple, dict]], first: int,
                  min_pos: int, seq_len: int, dtype: torch.dtype, device: torch.device | None = None
                  ) -> tuple[list[dict[str, Any]], str, Cache] | None:
    """Per block from ``first`` on, its clean-pass keyword arguments narrowed to positions ≥ ``min_pos`` (hidden
    states and cache left out), the cache argument's name and the clean pass's cache; None if some argument cannot
    be narrowed."""
    window = getattr(model.config, "sliding_window", None)
    mask = _causal_mask(model, seq_len - min_pos, seq_len, dtype, device)
    if mask is None or (window is not None and window < seq_len):
        return None
    calls, caches = [], {}
    for i in range(first, len(blks)):
        args, kwargs = captured[i]
        sig = inspect.signature(blks[i].forward)
        bound = sig.bind(*args, **kwargs).arguments
        hidden_name = next(iter(sig.parameters))
        flat: dict[str, Any] = {}
        for name, value in bound.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                flat |= value
            elif name != hidden_name:
                flat[name] = value
        call = {}
        for name, value in flat.items():
            if isinstance(value, Cache):
                caches[name] = value
                continue
            ok, call[name] = _narrow(name, value, min_pos, seq_len, mask)
            if not ok:
                return None
        calls.append(call)
    if len(caches) != 1:
        return None  # the clean pass cached no keys and values (or in more than one place)
    (name, cache), = caches.items()
    return calls, name, cache


def _ce(logp: Tensor, ids: Tensor, min_pos: int) -> Tensor:
    return -logp.gather(-1, ids[:, min_pos + 1 :, None].long()).squeeze(-1)


def _block_input(block: nn.Module, call: tuple[tuple, dict]) -> Tensor:
    """The hidden states a block was called with (first positional argument or its keyword)."""
    args, kwargs = call
    return args[0] if args else kwargs[next(iter(inspect.signature(block.forward).parameters))]


def splice_losses(model: nn.Module, input_ids: Tensor, hook: str, min_pos: int,
                  replacements: Mapping[str, Replacement | Conditioned], reuse_prefix: bool = True) -> SpliceLosses:
    """CE and KL(clean ‖ spliced) per token for the clean model and each replacement at ``hook``.

    ``reuse_prefix=False`` recomputes the whole forward pass per condition: the reference the prefix-reuse path
    is tested and benchmarked against, and the fallback where the later blocks' arguments cannot be narrowed.
    """
    layer = hook_layer(hook)
    blks = blocks(model)
    target = hook_module(model, hook)
    # a resid_post hook is the block's output: conditions start after that block, from its clean output
    first = layer + 1 if target is blks[layer] else layer
    captured: dict[int, tuple[tuple, dict]] = {}
    clean_x: list[Tensor] = []

    def record(i: int):
        def pre_hook(_module, args, kwargs):
            captured[i] = (args, kwargs)

        return pre_hook

    handles = [blks[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(layer, len(blks))]
    if first > layer:  # the clean x, where conditions start from it
        handles.append(target.register_forward_hook(lambda _m, _i, out: clean_x.append(output_tensor(out))))
    read = list(dict.fromkeys(h for r in replacements.values() if isinstance(r, Conditioned) for h in r.hooks))
    try:
        with capture(model, read, min_pos) as others:
            clean = model.base_model(input_ids=input_ids, use_cache=reuse_prefix)
    finally:
        for h in handles:
            h.remove()
    replacements = {name: (lambda x, r=r: r.fn(x, *[others[h] for h in r.hooks])) if isinstance(r, Conditioned) else r
                    for name, r in replacements.items()}
    dtype = clean.last_hidden_state.dtype
    suffix = None
    if reuse_prefix:
        suffix = _suffix_calls(model, blks, captured, first, min_pos, input_ids.shape[1], dtype, input_ids.device)
        if suffix is None:
            log.warning("splice: %s's block arguments cannot be narrowed to positions >= min_pos; recomputing "
                        "the whole forward pass per condition instead.", type(model).__name__)
        else:  # keep the clean keys and values of positions < min_pos, every block (crop(-n) drops the last n)
            suffix[2].crop(min_pos - input_ids.shape[1])
    clean_logp = _scores(model, clean.last_hidden_state[:, min_pos:])
    ce = {"clean": _ce(clean_logp, input_ids, min_pos)}
    # KL(p ‖ q) = Σ p·log p − Σ p·log q: the first sum once, then one fused dot per condition (no [B, T, V]
    # temporaries); the identity gives exactly 0, as both sums are the same call on the same tensors
    clean_p = clean_logp.exp()
    # in float32 also under a bf16 autocast (which would run vecdot in bf16: KL is a small difference of two large
    # sums, which bf16 rounding swamps, and a bf16 result cannot even be written out)
    no_autocast = torch.autocast(input_ids.device.type, enabled=False)
    with no_autocast:
        neg_entropy = torch.linalg.vecdot(clean_p, clean_logp)
    del clean_logp
    kl = {"clean": torch.zeros_like(ce["clean"])}
    for name, fn in replacements.items():
        handle = None
        try:
            if suffix is None:
                handle = target.register_forward_hook(_replace_hook(min_pos, fn))
                hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, min_pos:]
            else:
                calls, cache_name, prefix_cache = suffix
                cache = copy.deepcopy(prefix_cache)  # each condition appends its own keys and values
                if first > layer:
                    hidden = fn(clean_x[0][:, min_pos:]).to(dtype)
                else:
                    hidden = _block_input(blks[layer], captured[layer])[:, min_pos:]
                    handle = target.register_forward_hook(_replace_hook(0, fn))
                for block, call in zip(blks[first:], calls, strict=True):
                    hidden = output_tensor(block(hidden, **call, **{cache_name: cache}))
                hidden = final_norm(model)(hidden)
        finally:
            if handle is not None:
                handle.remove()
        logp = _scores(model, hidden)
        ce[name] = _ce(logp, input_ids, min_pos)
        with no_autocast:
            kl[name] = neg_entropy - torch.linalg.vecdot(clean_p, logp)
        del logp
    return SpliceLosses(ce=ce, kl=kl)


def zero_ablation(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def mean_ablation(mean: Tensor) -> Replacement:
    """Replace every token's activation by a fixed mean vector [d]."""
    return lambda x: mean.to(x.dtype).expand_as(x)


def percent_recovered(l_sae: float, l_setting: float, l_clean: float) -> float:
    """100·(L_sae − L_setting)/(L_sae − L_clean): the share of the SAE's CE gap a setting closes (docs/science.md, experiment 9)."""
    gap = l_sae - l_clean
    return 100.0 * (l_sae - l_setting) / gap if gap != 0 else float("nan")


def ce_loss_score(l_zero: float, l_sae: float, l_clean: float) -> float:
    """The ecosystem's CE-loss score (zero-ablation baseline): (L_zero − L_sae)/(L_zero − L_clean)."""
    gap = l_zero - l_clean
    return (l_zero - l_sae) / gap if gap != 0 else float("nan")

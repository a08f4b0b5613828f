"""Splicing: identity = clean, prefix reuse = full recomputation, early positions untouched, % recovered."""

from __future__ import annotations

import pytest
import torch

from darkmatter.data.harvest import capture
from darkmatter.downstream import splice
from darkmatter.downstream.splice import (
    Conditioned,
    ce_loss_score,
    mean_ablation,
    percent_recovered,
    splice_losses,
    zero_ablation,
)

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"]


def _ids(seed=0):
    return torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("hook", HOOKS)
def test_identity_is_clean_and_prefix_reuse_equals_full_recompute(request, name, hook, attn, monkeypatch):
    model, _ = request.getfixturevalue(name)
    monkeypatch.setattr(model.config, "_attn_implementation", attn)
    suffix_paths = []
    real = splice._suffix_calls
    monkeypatch.setattr(splice, "_suffix_calls", lambda *a, **k: suffix_paths.append(real(*a, **k)) or suffix_paths[-1])
    ids = _ids()
    noise = torch.randn(2, 24 - 8, 32, generator=torch.Generator().manual_seed(1))
    reps = {"identity": lambda x: x, "noisy": lambda x: x + noise, "zero": zero_ablation,
            "mean": mean_ablation(torch.ones(32))}
    with torch.no_grad():
        fast = splice_losses(model, ids, hook, 8, reps, reuse_prefix=True)
        full = splice_losses(model, ids, hook, 8, reps, reuse_prefix=False)
        ref = model(ids).logits.float()
    assert len(suffix_paths) == 1 and suffix_paths[0] is not None  # the fast path ran: later positions only
    # Clean CE equals the model's own per-token loss (positions 8..22 predict tokens 9..23).
    ref_ce = torch.nn.functional.cross_entropy(ref[:, 8:-1].transpose(1, 2), ids[:, 9:], reduction="none")
    torch.testing.assert_close(fast.ce["clean"], ref_ce, rtol=1e-5, atol=1e-5)
    # Splicing the identity into the full pass reproduces the clean loss exactly (same ops, same order).
    assert torch.equal(full.ce["identity"], full.ce["clean"])
    assert torch.equal(full.kl["identity"], torch.zeros_like(full.kl["identity"]))
    # Prefix reuse runs the later blocks on positions >= min_pos over the cached clean keys and values: the same
    # arithmetic up to float32 summation order (bitwise equal on these tiny models). CE and KL are sums of
    # log-probabilities of magnitude ≈ CE, so both are held to 64 float32 roundings of the largest clean CE.
    tol = 64 * torch.finfo(torch.float32).eps * float(full.ce["clean"].abs().max())
    for key in reps:
        torch.testing.assert_close(fast.ce[key], full.ce[key], rtol=0, atol=tol, msg=key)
        torch.testing.assert_close(fast.kl[key], full.kl[key], rtol=0, atol=tol, msg=key)
    assert fast.kl["noisy"].mean() > 1e-4  # a real perturbation is visible
    assert (fast.kl["noisy"] >= -1e-6).all()  # KL is non-negative up to float error


def test_sliding_window_shorter_than_the_context_falls_back_to_full_recompute(llama, monkeypatch, caplog):
    model, _ = llama
    monkeypatch.setattr(model.config, "sliding_window", 12, raising=False)
    ids = _ids()
    reps = {"noisy": lambda x: x + 0.5}
    with torch.no_grad():
        fast = splice_losses(model, ids, "blocks.1.hook_resid_post", 8, reps)
        full = splice_losses(model, ids, "blocks.1.hook_resid_post", 8, reps, reuse_prefix=False)
    assert "recomputing the whole forward pass" in caplog.text
    assert torch.equal(fast.ce["noisy"], full.ce["noisy"])


def test_replacement_cannot_touch_positions_before_min_pos(llama):
    model, _ = llama
    ids = _ids()
    seen = {}

    def garbage(x):
        seen["shape"] = tuple(x.shape)
        return torch.full_like(x, 1e3)

    hook = "blocks.1.hook_resid_post"
    with torch.no_grad(), capture(model, ["blocks.2.hook_resid_post"]) as clean:
        model(ids)
    clean_next = clean["blocks.2.hook_resid_post"].clone()
    with torch.no_grad(), capture(model, ["blocks.2.hook_resid_post"]) as spliced:
        splice_losses(model, ids, hook, 8, {"garbage": garbage}, reuse_prefix=False)
    assert seen["shape"] == (2, 16, 32)  # the replacement only ever sees positions >= min_pos
    after = spliced["blocks.2.hook_resid_post"]
    assert torch.equal(after[:, :8], clean_next[:, :8])  # causal: earlier positions keep their values
    assert (after[:, 8:] - clean_next[:, 8:]).abs().max() > 1.0


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_a_conditioned_replacement_reads_other_hooks_of_the_clean_pass(llama, reuse_prefix):
    """Replacing block 1's output by block 0's (read through Conditioned) skips block 1 on positions >= 8: the CE
    equals a naive forward pass with that block bypassed there."""
    model, _ = llama
    ids = _ids(4)
    bypass = Conditioned(lambda x, previous: previous + 0.0 * x, ("blocks.0.hook_resid_post",))

    def skip(_module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[:, 8:] = args[0][:, 8:]
        return (out, *output[1:]) if isinstance(output, tuple) else out

    with torch.no_grad():
        res = splice_losses(model, ids, "blocks.1.hook_resid_post", 8, {"bypass": bypass}, reuse_prefix=reuse_prefix)
        handle = model.model.layers[1].register_forward_hook(skip)
        try:
            logits = model(ids).logits.float()
        finally:
            handle.remove()
    ref = torch.nn.functional.cross_entropy(logits[:, 8:-1].transpose(1, 2), ids[:, 9:], reduction="none")
    tol = 64 * torch.finfo(torch.float32).eps * float(ref.abs().max())
    torch.testing.assert_close(res.ce["bypass"], ref, rtol=0, atol=tol)
    assert (res.ce["bypass"] - res.ce["clean"]).abs().max() > 1e-3  # skipping a block is visible


def test_percent_recovered_and_ce_score_on_a_tiny_model(llama):
    """Restoring x recovers 100% of a (fake) SAE's CE gap; the SAE itself recovers 0%."""
    model, _ = llama
    ids = _ids(3)
    noise = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5))
    fake_sae = lambda x: x + noise  # noqa: E731 - a stand-in reconstruction with a real CE gap
    with torch.no_grad():
        res = splice_losses(model, ids, "blocks.1.hook_resid_post", 8,
                            {"sae": fake_sae, "restored": lambda x: fake_sae(x) + (x - fake_sae(x)),
                             "zero": zero_ablation})
    mean = {k: v.mean().item() for k, v in res.ce.items()}
    assert mean["sae"] != mean["clean"]
    assert percent_recovered(mean["sae"], mean["restored"], mean["clean"]) == pytest.approx(100.0, abs=1e-3)
    assert percent_recovered(mean["sae"], mean["sae"], mean["clean"]) == 0.0
    assert ce_loss_score(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert ce_loss_score(mean["zero"], mean["clean"], mean["clean"]) == pytest.approx(1.0)

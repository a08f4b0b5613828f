"""Harvesting: stored activations equal a fresh hooked forward pass; early stop, determinism, resume, errors."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from darkmatter.data import harvest as harvest_module
from darkmatter.data.activations import ActivationStore
from darkmatter.data.harvest import HarvestSpec, capture, harvest

HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out")


def _tokens(n_ctx: int = 6, ctx: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, 250, size=(n_ctx, ctx), dtype=np.int32)
    toks[:, 0] = 1
    return toks


def _spec(**kw) -> HarvestSpec:
    base = dict(hooks=HOOKS, min_pos=5, batch_contexts=4, autocast_bf16=False, with_loss=True)
    return HarvestSpec(**(base | kw))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_stored_activations_and_loss_equal_a_fresh_forward(request, name, tmp_path):
    model, _ = request.getfixturevalue(name)
    toks = _tokens()
    store = ActivationStore(harvest(model, toks, _spec(), tmp_path / "eval", progress=False))
    ids = torch.from_numpy(toks.astype(np.int64))
    with torch.no_grad(), capture(model, list(HOOKS)) as acts:
        out = model(ids)
    for hook in HOOKS:
        ref = acts[hook][:, 5:].reshape(-1, acts[hook].shape[-1]).numpy()
        # Batching 4+2 contexts vs 6 at once changes float32 summation order only: 1e-5 relative is ample.
        np.testing.assert_allclose(store.activations(hook), ref, rtol=1e-5, atol=1e-6)
    index = store.index()
    assert store.rows == 6 * 35 and index.height == store.rows
    assert index["position"].min() == 5 and index["position"].max() == 39
    np.testing.assert_array_equal(index["token_id"].to_numpy(), toks[:, 5:].reshape(-1))
    logp = torch.log_softmax(out.logits.float(), -1)
    ref_loss = -logp[:, 5:-1].gather(-1, ids[:, 6:, None]).squeeze(-1)
    loss = index["loss"].to_numpy().reshape(6, 35)
    np.testing.assert_allclose(loss[:, :-1], ref_loss.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isnan(loss[:, -1]).all()  # the last position has no next token
    assert (store.folder / "provenance.json").is_file()


def test_early_stop_gives_the_same_activations_as_a_full_pass(llama, tmp_path):
    model, _ = llama
    toks = _tokens()
    full = ActivationStore(harvest(model, toks, _spec(), tmp_path / "full", progress=False))
    early = ActivationStore(harvest(model, toks, _spec(with_loss=False), tmp_path / "early", progress=False))
    for hook in HOOKS:  # identical ops up to the hook: bitwise equal
        np.testing.assert_array_equal(full.activations(hook), early.activations(hook))
    assert np.isnan(early.index()["loss"].to_numpy()).all()


@pytest.mark.parametrize("with_loss", [False, True])
def test_several_hooks_in_one_pass_equal_each_hook_harvested_alone(llama, tmp_path, with_loss):
    """The residual stream of two blocks and one block's MLP and attention outputs, recorded in one (early-stopped)
    pass, are bitwise the arrays of four single-hook harvests."""
    model, _ = llama
    toks = _tokens()
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out",
             "blocks.1.hook_attn_out")
    together = ActivationStore(harvest(model, toks, _spec(hooks=hooks, with_loss=with_loss), tmp_path / "all",
                                       progress=False))
    assert together.meta["hooks"] == list(hooks)
    for i, hook in enumerate(hooks):
        alone = ActivationStore(harvest(model, toks, _spec(hooks=(hook,), with_loss=with_loss), tmp_path / str(i),
                                        progress=False))
        np.testing.assert_array_equal(together.activations(hook), alone.activations(hook))


def test_two_harvests_are_bitwise_identical_and_bf16_stays_close(llama, tmp_path):
    model, _ = llama
    toks = _tokens()
    a = ActivationStore(harvest(model, toks, _spec(), tmp_path / "a", progress=False))
    b = ActivationStore(harvest(model, toks, _spec(), tmp_path / "b", progress=False))
    c = ActivationStore(harvest(model, toks, _spec(autocast_bf16=True), tmp_path / "c", progress=False))
    for hook in HOOKS:
        np.testing.assert_array_equal(a.activations(hook), b.activations(hook))
        rel = np.linalg.norm(c.activations(hook) - a.activations(hook)) / np.linalg.norm(a.activations(hook))
        # bf16 keeps 8 mantissa bits (~0.4% per op); through 3 blocks a few % at most, but never exact.
        assert 1e-5 < rel < 0.05


def test_interrupted_harvest_resumes_to_the_same_result(llama, tmp_path, monkeypatch):
    model, _ = llama
    toks = _tokens(n_ctx=10)
    ref = ActivationStore(harvest(model, toks, _spec(batch_contexts=2), tmp_path / "ref", progress=False))
    calls = {"n": 0}
    original = harvest_module.next_token_loss

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "next_token_loss", crash_on_third_batch)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        harvest(model, toks, _spec(batch_contexts=2), out, params={"x": 1}, progress=False)
    assert not out.exists()  # nothing half-written under the final name
    calls["n"] = 10  # no more crashes
    resumed = ActivationStore(harvest(model, toks, _spec(batch_contexts=2), out, params={"x": 1}, progress=False))
    assert calls["n"] == 10 + 3  # only the 3 remaining batches ran (2 were kept)
    for hook in HOOKS:
        np.testing.assert_array_equal(resumed.activations(hook), ref.activations(hook))
    np.testing.assert_array_equal(resumed.index()["loss"].to_numpy(), ref.index()["loss"].to_numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "run"]  # no partial folder or progress record


def test_harvest_killed_at_its_final_rename_resumes_without_recomputing(llama, tmp_path, monkeypatch):
    """Killed after its last batch, just before the partial folder becomes the output: the rerun runs no batch."""
    model, _ = llama
    toks = _tokens(n_ctx=10)
    ref = ActivationStore(harvest(model, toks, _spec(batch_contexts=2), tmp_path / "ref", progress=False))
    rename = harvest_module.Path.rename

    def killed(self, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(harvest_module.Path, "rename", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        harvest(model, toks, _spec(batch_contexts=2), out, params={"x": 1}, progress=False)
    monkeypatch.setattr(harvest_module.Path, "rename", rename)
    assert not out.exists()
    calls = {"n": 0}
    original = harvest_module.next_token_loss

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "next_token_loss", counted)
    resumed = ActivationStore(harvest(model, toks, _spec(batch_contexts=2), out, params={"x": 1}, progress=False))
    assert calls["n"] == 0
    for hook in HOOKS:
        np.testing.assert_array_equal(resumed.activations(hook), ref.activations(hook))
    np.testing.assert_array_equal(resumed.index()["loss"].to_numpy(), ref.index()["loss"].to_numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "run"]


def test_harvest_killed_while_saving_its_losses_resumes(llama, tmp_path, monkeypatch):
    """A kill in the middle of saving the per-token losses must not spoil the losses of the batches recorded."""
    model, _ = llama
    toks = _tokens(n_ctx=10)
    ref = ActivationStore(harvest(model, toks, _spec(batch_contexts=2), tmp_path / "ref", progress=False))
    saves = {"n": 0}
    save = np.save

    def half_written_then_killed(file, arr, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 3:  # the third batch: half the bytes reach the file, then the process dies
            buf = io.BytesIO()
            save(buf, arr)
            data = buf.getvalue()
            with contextlib.ExitStack() as stack:
                f = file if hasattr(file, "write") else stack.enter_context(open(file, "wb"))
                f.write(data[: len(data) // 2])
            raise KeyboardInterrupt
        return save(file, arr, *args, **kwargs)

    monkeypatch.setattr(harvest_module.np, "save", half_written_then_killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        harvest(model, toks, _spec(batch_contexts=2), out, params={"x": 1}, progress=False)
    monkeypatch.setattr(harvest_module.np, "save", save)
    resumed = ActivationStore(harvest(model, toks, _spec(batch_contexts=2), out, params={"x": 1}, progress=False))
    np.testing.assert_array_equal(resumed.index()["loss"].to_numpy(), ref.index()["loss"].to_numpy())
    for hook in HOOKS:
        np.testing.assert_array_equal(resumed.activations(hook), ref.activations(hook))


def test_store_errors(tmp_path, llama):
    with pytest.raises(FileNotFoundError, match="is not an activation store"):
        ActivationStore(tmp_path)
    model, _ = llama
    store = ActivationStore(harvest(model, _tokens(n_ctx=2), _spec(), tmp_path / "s", progress=False))
    with pytest.raises(KeyError, match="no activations for hook 'blocks.0.hook_attn_out'"):
        store.activations("blocks.0.hook_attn_out")

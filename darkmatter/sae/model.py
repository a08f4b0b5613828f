"""The SAE module (inference semantics) and its native save/load in the SAELens layout.

The affine encoder and decoder are shared by every architecture; what differs (the nonlinearity, thresholds,
training) is in the registry :mod:`darkmatter.sae.architectures`. ``error = x − x_hat``.

A saved SAE always works on raw activations: the training code folds any input scaling and decoder row norms
into the weights before saving (:func:`fold`). Files (SAELens layout): ``cfg.json`` and
``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]`` and ``threshold [d_sae]`` (architectures with a threshold).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from darkmatter.io import atomic_dir, load_safetensors, read_json, write_json
from darkmatter.sae.architectures import architecture

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class SaeOutput(NamedTuple):
    """What :meth:`Sae.forward` returns (all dense)."""

    latents: Tensor  # [N, d_sae] f, inference semantics
    x_hat: Tensor  # [N, d_in] reconstruction
    pre: Tensor  # [N, d_sae] pre-activations


def default_cfg(name: str, d_in: int, d_sae: int, k: int | None = None, **extra: Any) -> dict[str, Any]:
    """A complete SAELens-style cfg dict for architecture ``name`` (unknown SAELens keys are kept as given in
    ``extra``)."""
    cfg: dict[str, Any] = {
        "architecture": name,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "hook_name": None,
        "model_name": None,
        "context_size": None,
        "metadata": {},
    }
    if architecture(name).selects_top_k:
        cfg["k"] = int(k) if k is not None else None
    cfg.update(extra)
    return cfg


class Sae(nn.Module):
    """A sparse autoencoder with the dense inference forward pass shared by all architectures.

    Tensors (SAELens names and shapes): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
    and threshold [d_sae] (a parameter for jumprelu, a buffer for batchtopk, None otherwise).

    ``W_enc`` is a view of the parameter ``W_enc_T`` [d_sae, d_in] (nn.Linear's layout): the sparse training
    kernels read and write whole rows of it (one latent's encoder vector), so its gradient needs no transposing
    copy and fused Adam sees a contiguous tensor. Read and modify it in place as ``sae.W_enc`` (shape
    [d_in, d_sae]); ``named_parameters()`` lists it as ``W_enc_T``.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        cfg = copy.deepcopy(cfg)
        self.arch = architecture(cfg.get("architecture"))
        arch = cfg["architecture"] = self.arch.name
        for key in ("d_in", "d_sae"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise ValueError(f"SAE cfg key {key!r} must be a positive integer, got {cfg.get(key)!r}.")
        if self.arch.selects_top_k and not (isinstance(cfg.get("k"), int) and 1 <= cfg["k"] <= cfg["d_sae"]):
            raise ValueError(f"SAE cfg key 'k' must be an integer in [1, d_sae={cfg['d_sae']}] for {arch}, "
                             f"got {cfg.get('k')!r}.")
        self.cfg: dict[str, Any] = default_cfg(arch, cfg["d_in"], cfg["d_sae"], cfg.get("k")) | cfg
        self.architecture: str = arch
        self.d_in: int = cfg["d_in"]
        self.d_sae: int = cfg["d_sae"]
        self.k: int | None = cfg.get("k") if self.arch.selects_top_k else None
        dtype = DTYPES[self.cfg["dtype"]]
        self.W_enc_T = nn.Parameter(torch.zeros(self.d_sae, self.d_in, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(self.d_sae, self.d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in, dtype=dtype))
        self.threshold: Tensor | None
        if arch == "jumprelu":  # trained directly (not log-parameterised: see darkmatter.sae.kernels.JumpReLU)
            self.threshold = nn.Parameter(torch.zeros(self.d_sae, dtype=dtype))
        elif arch == "batchtopk":  # an EMA statistic, not a gradient-trained parameter
            self.register_buffer("threshold", torch.zeros(self.d_sae, dtype=dtype))
        else:
            self.threshold = None

    @property
    def W_enc(self) -> Tensor:
        """[d_in, d_sae], a view of ``W_enc_T`` (in-place changes reach the parameter)."""
        return self.W_enc_T.t()

    @property
    def apply_b_dec_to_input(self) -> bool:
        return bool(self.cfg["apply_b_dec_to_input"])

    def tensors(self) -> dict[str, Tensor]:
        """The SAELens tensors (contiguous copies): W_enc, b_enc, W_dec, b_dec and threshold where defined."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, cfg: dict[str, Any], tensors: dict[str, Tensor]) -> Sae:
        """Build an SAE from a cfg dict and SAELens-named tensors (shapes checked, values copied exactly)."""
        sae = cls(cfg)
        expected = {"W_enc": (sae.d_in, sae.d_sae), "b_enc": (sae.d_sae,), "W_dec": (sae.d_sae, sae.d_in),
                    "b_dec": (sae.d_in,)}
        if sae.threshold is not None:
            expected["threshold"] = (sae.d_sae,)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(f"SAE tensors lack {missing} (architecture {sae.architecture}, "
                             f"got {sorted(tensors)}).")
        with torch.no_grad():
            for name, shape in expected.items():
                t = tensors[name]
                if name == "threshold" and t.ndim == 0:  # a single global threshold (BatchTopK)
                    t = t.expand(sae.d_sae)
                if tuple(t.shape) != shape:
                    raise ValueError(f"SAE tensor {name!r} has shape {tuple(t.shape)}; expected {shape} "
                                     f"for d_in={sae.d_in}, d_sae={sae.d_sae}.")
                getattr(sae, name).copy_(t)
        return sae

    # ------------------------------------------------------------------------------------------ forward

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension, but this SAE expects "
                             f"d_in = {self.d_in}.")

    def pre_acts(self, x: Tensor) -> Tensor:
        """Pre-activations [..., d_sae] of inputs x [..., d_in]."""
        self.check_input(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """σ(pre) with inference semantics (dense [..., d_sae])."""
        return self.arch.activate(self, pre)

    def encode(self, x: Tensor) -> Tensor:
        """Latents f [..., d_sae] of x [..., d_in] (raises ValueError when the last size is not d_in)."""
        return self.activate(self.pre_acts(x))

    def decode(self, latents: Tensor) -> Tensor:
        """x_hat [..., d_in] = latents · W_dec + b_dec."""
        return latents @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> SaeOutput:
        pre = self.pre_acts(x)
        latents = self.activate(pre)
        return SaeOutput(latents=latents, x_hat=self.decode(latents), pre=pre)


# ---------------------------------------------------------------------------------------------- folding


@torch.no_grad()
def fold(sae: Sae, input_scale: float = 1.0) -> Sae:
    """A copy of ``sae`` that works on raw inputs, with unit-norm decoder rows.

    ``sae`` was trained on x / input_scale. With s = input_scale and n_i = ‖W_dec[i]‖, σ positively homogeneous
    (ReLU, TopK-ReLU, JumpReLU with its threshold scaled alike), the copy computes s·sae(x/s) exactly in real
    arithmetic: pre'_i = s·n_i·pre_i, so W_enc[:, i] ·= n_i, b_enc_i ·= s·n_i, threshold_i ·= s·n_i,
    W_dec[i] /= n_i, b_dec ·= s (SAELens folds W_dec norms and its activation scaler the same way).
    TopK selection is only invariant when every n_i is equal; training keeps them at 1 for top-k variants.
    """
    out = Sae.from_tensors(sae.cfg, sae.tensors())
    norms = out.W_dec.norm(dim=1).clamp_min(torch.finfo(out.W_dec.dtype).tiny)
    out.W_dec.div_(norms[:, None])
    out.W_enc.mul_(norms[None, :])
    out.b_enc.mul_(norms * input_scale)
    out.b_dec.mul_(input_scale)
    if out.threshold is not None:
        out.threshold.mul_(norms * input_scale)
    return out


# ---------------------------------------------------------------------------------------------- save / load


SAELENS_NAMES = {"relu": "standard"}


def write_sae_files(sae: Sae, folder: str | Path) -> None:
    """Write cfg.json + sae_weights.safetensors into an existing folder (non-atomic; see :func:`save_sae`)."""
    folder = Path(folder)
    # the architecture under SAELens' own name ("standard" for relu) so that SAELens opens the folder too; reading
    # it back gives ours (darkmatter.sae.architectures aliases)
    write_json(folder / CFG_FILE, sae.cfg | {"architecture": SAELENS_NAMES.get(sae.architecture, sae.architecture)})
    save_file({k: v.cpu() for k, v in sae.tensors().items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def save_sae(sae: Sae, folder: str | Path) -> None:
    """Save in the SAELens layout, atomically (a crash leaves the previous folder or nothing)."""
    with atomic_dir(Path(folder)) as tmp:
        write_sae_files(sae, tmp)


def read_sae(folder: str | Path, device: str | torch.device = "cpu") -> Sae:
    """Read an SAE written by :func:`save_sae` exactly as saved (cfg and dtypes intact); for SAEs written by other
    libraries, or in other formats, use :func:`darkmatter.sae.formats.load_sae`."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; expected an SAE folder with {CFG_FILE} and {WEIGHTS_FILE}.")
    return Sae.from_tensors(read_json(cfg_path), load_safetensors(weights_path, device=str(device))).to(device)

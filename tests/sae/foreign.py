"""Write SAEs in the formats of other libraries (SAELens, sparsify, Gemma Scope), as those libraries lay them out,
from numpy weights (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec``, ``threshold``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def random_weights(d_in: int, d_sae: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": (0.1 * rng.normal(size=d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),  # rows deliberately not unit norm
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": rng.uniform(0.2, 1.0, size=d_sae).astype(np.float32),
    }


def write_saelens(folder: Path, cfg: dict, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


def write_sparsify(folder: Path, w: dict[str, np.ndarray], k: int, **cfg_overrides) -> Path:
    folder.mkdir(parents=True)
    d_in, d_sae = w["W_enc"].shape
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": d_sae,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in, **cfg_overrides}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"], "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    return folder


def write_gemma_scope(folder: Path, w: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **w)
    return folder

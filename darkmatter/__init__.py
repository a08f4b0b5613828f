"""darkmatter: measure, decompose and explain the dark matter of sparse autoencoders.

The public API is imported lazily, so ``import darkmatter.config`` (what the Snakefile does) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    # metrics: the one definition of each
    "fvu": "darkmatter.metrics",
    "nmse_per_token": "darkmatter.metrics",
    "cosine_per_token": "darkmatter.metrics",
    "FvuAccumulator": "darkmatter.metrics",
    # regression and the linear / nonlinear error decomposition
    "fit_linear": "darkmatter.regression",
    "heldout_r2": "darkmatter.regression",
    "r2_scores": "darkmatter.regression",
    "split_mask": "darkmatter.regression",
    "Design": "darkmatter.regression",
    "decompose_error": ("darkmatter.decompose", "decompose"),
    "decompose_family": "darkmatter.family_fit",
    "error_components": "darkmatter.decompose",
    # scaling laws
    "fit_power_law": "darkmatter.scaling",
    "scaling_decomposition": "darkmatter.scaling",
    # SAEs
    "Sae": "darkmatter.sae",
    "save_sae": "darkmatter.sae",
    "load_sae": "darkmatter.sae",
    "load_sae_any": ("darkmatter.sae_formats", "load_any"),
    # splicing into the model
    "splice_losses": "darkmatter.splice",
    "percent_recovered": "darkmatter.splice",
    "ce_loss_score": "darkmatter.splice",
    # data
    "ActivationStore": "darkmatter.activations",
    "load_config": "darkmatter.config",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'darkmatter' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

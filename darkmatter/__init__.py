"""darkmatter: measure, decompose and explain the dark matter of sparse autoencoders.

The public API is imported lazily, so ``import darkmatter.config`` (what the Snakefile does) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    # metrics: the one definition of each
    "fvu": "darkmatter.errors.metrics",
    "nmse_per_token": "darkmatter.errors.metrics",
    "cosine_per_token": "darkmatter.errors.metrics",
    "FvuAccumulator": "darkmatter.errors.metrics",
    # regression and the linear / nonlinear error decomposition
    "fit_linear": "darkmatter.regression.solve",
    "heldout_r2": "darkmatter.regression.solve",
    "r2_scores": "darkmatter.regression.solve",
    "split_mask": "darkmatter.regression.solve",
    "Design": "darkmatter.regression.solve",
    "decompose_error": ("darkmatter.errors.decompose", "decompose"),
    "decompose_family": "darkmatter.errors.family_fit",
    "error_components": "darkmatter.errors.decompose",
    # scaling laws
    "fit_power_law": "darkmatter.errors.scaling",
    "scaling_decomposition": "darkmatter.errors.scaling",
    # SAEs
    "Sae": "darkmatter.sae.model",
    "save_sae": "darkmatter.sae.model",
    "load_sae": "darkmatter.sae.model",
    "load_sae_any": ("darkmatter.sae.formats", "load_any"),
    # splicing into the model
    "splice_losses": "darkmatter.downstream.splice",
    "percent_recovered": "darkmatter.downstream.splice",
    "ce_loss_score": "darkmatter.downstream.splice",
    # data
    "ActivationStore": "darkmatter.data.activations",
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

"""darkmatter: measure, decompose and explain the dark matter of sparse autoencoders.

The public API is imported lazily, so ``import darkmatter.config`` (what the Snakefile does) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    # metrics: the one definition of each
    **dict.fromkeys(("fvu", "nmse_per_token", "cosine_per_token", "l2_ratio_per_token", "token_sums",
                     "FvuAccumulator", "LatentAccumulator", "ReconstructionAccumulator"), "darkmatter.errors.metrics"),
    # least squares and held-out R²
    **dict.fromkeys(("fit_linear", "heldout_r2", "r2_scores", "split_mask", "stream_moments", "Design"),
                    "darkmatter.regression"),
    # the linear / nonlinear error decomposition (one route, for one SAE or a family)
    **dict.fromkeys(("decompose_error", "error_parts", "error_components"), "darkmatter.errors.parts"),
    **dict.fromkeys(("decompose_family", "ErrorFit", "DenseReconstruction"), "darkmatter.errors.decompose"),
    # scaling laws
    **dict.fromkeys(("fit_power_law", "scaling_decomposition"), "darkmatter.errors.scaling"),
    # SAEs
    **dict.fromkeys(("Sae", "save_sae", "load_sae", "ARCHITECTURES", "SparseCodes", "encode", "sparse_codes"),
                    "darkmatter.sae"),
    # inference-time refinement of an SAE's codes
    "gradient_pursuit": "darkmatter.sae.pursuit",
    # splicing into the model
    **dict.fromkeys(("splice_losses", "percent_recovered", "ce_loss_score"), "darkmatter.downstream"),
    # data, configuration, result paths
    "ActivationStore": "darkmatter.data.activations",
    "load_config": "darkmatter.config",
    "ExperimentPaths": "darkmatter.paths",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'darkmatter' has no attribute {name!r}")
    return getattr(importlib.import_module(target), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

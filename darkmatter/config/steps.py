"""What each workflow step reads of the configuration, declared once.

A rule passes exactly its step's slice as ``--params`` (so editing any other key does not rerun the step), and the
step reads it through :class:`darkmatter.config.ConfigSlice` (so reading a key it was not given fails instead of
silently taking the default).
"""

from __future__ import annotations

import json
from typing import Any

from darkmatter.config.parse import to_dict
from darkmatter.config.sections import ExperimentConfig

ALL = None  # every key of a section
STEP_KEYS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "prepare-model": {"model": ALL},
    "prepare-corpus": {"corpus": ALL, "harvest": ("context_size", "eval_contexts", "train_tokens", "train_min_pos")},
    "harvest-eval": {"harvest": ("batch_contexts", "hooks", "min_pos", "precision")},
    "harvest-train": {"harvest": ("batch_contexts", "hooks", "precision", "train_min_pos")},
    "train-sae": {"training": ALL},
    "encode-sae": {},  # only its inputs: the SAE and the eval activations
    "measure-errors": {"decomposition": ALL},
    "measure-ce": {"downstream": ALL, "harvest": ("min_pos",)},
    "pursue": {"pursuit": ("contexts", "seed", "l0_multiple", "l0")},
    "measure-pursuit": {"decomposition": ALL},
    "measure-pursuit-ce": {"downstream": ALL, "harvest": ("min_pos",), "pursuit": ("l0_multiple", "l0")},
    "measure-sources-ce": {"downstream": ALL, "harvest": ("min_pos",)},
    "train-error-saes": {"training": ALL, "error_saes": ("expansion", "k", "seed")},
    "build-database": {"families": ALL, "harvest": ("hooks",)},
    # plus the analysis's own options, analysis.<name> (see step_params)
    "run-analysis": {"analysis": ("bootstrap", "confidence"), "decomposition": ALL, "families": ALL,
                     "harvest": ("hooks", "min_pos"), "seed": ALL},
    "render-report": {"name": ALL, "seed": ALL, "model": ALL, "corpus": ALL, "harvest": ALL, "training": ALL,
                      "families": ALL, "decomposition": ALL, "downstream": ALL, "pursuit": ALL,
                      "error_saes": ALL,
                      "analysis": ALL},
}

# an analysis that runs others (analyses/training_budget.py) also reads their options
READS_OPTIONS_OF: dict[str, tuple[str, ...]] = {"training_budget": ("scaling_decomposition",)}


def step_slice(cfg: ExperimentConfig, step: str, analysis: str | None = None) -> dict[str, Any]:
    """The config slice of a workflow step (:data:`STEP_KEYS`); ``analysis``: for ``run-analysis``, the name of
    the analysis, whose own options (the field ``analysis.<name>``, when it has one) are added."""
    out: dict[str, Any] = {}
    for section, keys in STEP_KEYS[step].items():
        data = to_dict(getattr(cfg, section))
        out[section] = data if keys is ALL else {k: data[k] for k in keys}
    for name in (analysis, *READS_OPTIONS_OF.get(analysis, ())) if analysis is not None else ():
        if hasattr(cfg.analysis, name) and name not in STEP_KEYS[step]["analysis"]:
            out["analysis"][name] = to_dict(getattr(cfg.analysis, name))
    return out


def step_params(cfg: ExperimentConfig, step: str, analysis: str | None = None) -> str:
    """:func:`step_slice` as the JSON ``--params`` of the step's command (keys sorted: a stable rerun trigger)."""
    return json.dumps(step_slice(cfg, step, analysis), sort_keys=True)

"""Experiment configuration: typed sections (the only source of defaults), parsing, validation, step slices.

A YAML experiment file becomes an :class:`ExperimentConfig` through :func:`load_config`, which rejects unknown keys,
wrong types and impossible values with one sentence naming the key and what was expected. The Snakefile calls it
when it loads, so a typo fails in a second rather than after an hour of compute.
"""

from darkmatter.config.parse import ConfigError, ConfigSlice, from_dict, stable_hash, to_dict
from darkmatter.config.sections import (
    ANALYSES,
    AnalysisConfig,
    CorpusConfig,
    DecompositionConfig,
    DownstreamConfig,
    ErrorComponentSaesOptions,
    ErrorSaesConfig,
    ExperimentConfig,
    HarvestConfig,
    JudgeOptions,
    ModelConfig,
    PerTokenScalingOptions,
    ProbeMechanismOptions,
    PursuitConfig,
    RandomModelConfig,
    SaeFamilyConfig,
    SaeTrainingConfig,
    ScalingDecompositionOptions,
    SyntheticValidationOptions,
)
from darkmatter.config.steps import STEP_KEYS, step_params, step_slice
from darkmatter.config.validate import hook_layer, load_config, model_n_layers, previous_residual, validate

__all__ = [
    "ANALYSES", "STEP_KEYS", "AnalysisConfig", "ConfigError", "ConfigSlice", "CorpusConfig", "DecompositionConfig",
    "DownstreamConfig", "ErrorComponentSaesOptions", "ErrorSaesConfig", "ExperimentConfig", "HarvestConfig", "JudgeOptions", "ModelConfig", "PerTokenScalingOptions",
    "ProbeMechanismOptions", "PursuitConfig", "RandomModelConfig", "SaeFamilyConfig", "SaeTrainingConfig", "ScalingDecompositionOptions",
    "SyntheticValidationOptions", "from_dict", "hook_layer", "load_config", "model_n_layers", "previous_residual", "stable_hash",
    "step_params", "step_slice", "to_dict", "validate",
]

"""The SAE error: metrics (each defined once), its split into a linear and a nonlinear part, how FVU scales."""

from darkmatter.errors.decompose import DenseReconstruction, ErrorFit, FamilyFit, decompose_family
from darkmatter.errors.metrics import (
    FvuAccumulator,
    LatentAccumulator,
    ReconstructionAccumulator,
    TokenSums,
    cosine_per_token,
    error_norm_sq,
    fvu,
    l2_ratio_per_token,
    nmse_per_token,
    token_sums,
)
from darkmatter.errors.parts import (
    ErrorDecomposition,
    ErrorParts,
    decompose_error,
    error_components,
    error_parts,
)
from darkmatter.errors.scaling import PowerLawFit, fit_power_law, power_law, scaling_decomposition

__all__ = [
    "DenseReconstruction", "ErrorDecomposition", "ErrorFit", "ErrorParts", "FamilyFit", "FvuAccumulator",
    "LatentAccumulator", "PowerLawFit", "ReconstructionAccumulator", "TokenSums", "cosine_per_token",
    "decompose_error", "decompose_family", "error_components", "error_norm_sq", "error_parts", "fit_power_law",
    "fvu", "l2_ratio_per_token", "nmse_per_token", "power_law", "scaling_decomposition", "token_sums",
]

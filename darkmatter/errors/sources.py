"""The part of one SAE's error that another SAE's reconstruction predicts linearly (docs/science.md, experiment 11).

The base SAE's error splits as SaeError = LinearError + NonlinearError with its b* (darkmatter.errors.measure).
A *source* is another SAE (on the same or another hook) whose reconstruction, mapped affinely, predicts part of one
of those components. Both the error_sources analysis (R² of many sources, with intervals) and the CE step that
splices Sae(x) plus the predicted NonlinearError back into the model (darkmatter.downstream.ce) build their rows
here and fit by the one least-squares engine (darkmatter.regression), on the decomposition's fit rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from darkmatter.regression import Design, LazyRows, LinearFit, stream_moments
from darkmatter.sae.codes import SparseCodes

COMPONENTS = ("sae_error", "linear_error", "nonlinear_error")
SOURCE_K = 32  # the paper's k for the SAEs compared: each hook's widest SAE with this many active latents


def split_error(x: Tensor, x_hat: Tensor, coef: Tensor, intercept: Tensor) -> dict[str, Tensor]:
    """SaeError = x − x_hat, LinearError = x·b* + b0, NonlinearError = SaeError − LinearError (float32 [N, d] each)."""
    error = x - x_hat
    linear = torch.addmm(intercept, x, coef)
    return {"sae_error": error, "linear_error": linear, "nonlinear_error": error - linear}


def _rows(a: np.ndarray, sl: slice) -> Tensor:
    return torch.from_numpy(np.array(a[sl], dtype=np.float32))


def component_rows(x: np.ndarray, codes: SparseCodes, coef: Tensor, intercept: Tensor,
                   components: Sequence[str] = COMPONENTS) -> LazyRows:
    """The base SAE's error ``components`` side by side, float32 [N, len(components)·d], from its stored ``codes``
    of the activations ``x`` [N, d] and its linear map, computed when a slice of rows is read."""
    def get(sl: slice) -> Tensor:
        xs = _rows(x, sl)
        parts = split_error(xs, codes.x_hat(sl), coef, intercept)
        return torch.cat([parts[c] for c in components], dim=1)

    return LazyRows(x.shape[0], len(components) * x.shape[1], get)


def reconstruction_rows(codes: SparseCodes, n_rows: int) -> LazyRows:
    """An SAE's reconstructions of the ``n_rows`` eval tokens, from its stored codes."""
    return LazyRows(n_rows, int(codes.W_dec.shape[1]), codes.x_hat)


def fit_on(predictor: LazyRows, target: LazyRows, fit: np.ndarray, intercept: bool = True) -> LinearFit:
    """Least squares ``target ≈ predictor·coef (+ intercept)`` on the ``fit`` rows (bool [N])."""
    m = stream_moments(predictor, target, fit)
    assert m.x is not None and m.y is not None
    return Design(m.x[0], intercept=intercept).solve(m.y[0])

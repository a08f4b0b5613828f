"""Split an SAE's error into the part that is linear in x and the rest (SCIENCE.md §1; Engels et al. §3).

    error = x − x_hat (SaeError)                       b* = argmin_B Σ_fit ‖x·B (+ b0) − error‖²  [d, d]
    LinearError = x·b* (+ b0)                          NonlinearError = error − LinearError
    so x = x_hat + LinearError + NonlinearError exactly.
    FVU_total = Σ‖error‖² / Σ‖x − x̄‖²                 FVU_nonlinear = FVU(x, x_hat + LinearError)
    FVU_linear = FVU_total − FVU_nonlinear

b* is fitted on the fit split (:func:`darkmatter.regression.split_mask`) and applied to every token; the FVUs are
pooled over all tokens (the definition of :class:`darkmatter.metrics.FvuAccumulator`, here evaluated from the
regression's float64 sums: Σ‖error‖², the residual sums of squares of both splits and Σ‖x − x̄‖²).

Two routes to the error's statistics:

- :func:`decompose` — any dense error (``x_hat`` or ``error`` arrays); one streaming pass for the statistics and,
  optionally, one for per-token norms.
- :func:`darkmatter.family_fit.decompose_family` — SAEs given by sparse codes: one pass over x for a whole family,
  with the x statistics and the factorisation shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from darkmatter.regression import (
    _DEFAULTS,
    CHUNK_ROWS,
    ArrayLike,
    Design,
    LinearFit,
    R2Scores,
    TargetMoments,
    as_f64,
    residual_ss,
    row_chunks,
    split_mask,
    stream_moments,
)

log = logging.getLogger(__name__)

Split = tuple[TargetMoments, TargetMoments | None]  # (fit, test) moments of one target


class _Rows:
    """A lazily computed [n_rows, width] array: ``rows[sl]`` calls ``get(sl)``, so targets can be streamed."""

    def __init__(self, n_rows: int, width: int, get):
        self.shape = (n_rows, width)
        self._get = get

    def __getitem__(self, sl: slice) -> Tensor:
        return self._get(sl)


def _with_norm_sq(e: Tensor) -> Tensor:
    """[e, ‖e‖²] [n, d + 1] float64 for a float64 error chunk e [n, d]."""
    return torch.cat([e, torch.bmm(e[:, None, :], e[:, :, None]).view(-1, 1)], dim=1)


def error_rows(x: ArrayLike, x_hat: ArrayLike) -> _Rows:
    """A lazy row-sliceable SaeError = x − x_hat (float64 per chunk) for the streaming functions."""
    if tuple(x.shape) != tuple(x_hat.shape):
        raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}.")
    return _Rows(x.shape[0], x.shape[1], lambda sl: as_f64(x[sl]) - as_f64(x_hat[sl]))


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ErrorFit:
    """The linear error predictor of one SAE and what it explains.

    linear_map: b* (coef [d, d]) and intercept [d]; r2_vector: test-split R² of the error vector from x;
    r2_norm_sq: test-split R² of ‖error‖² from x (None when not computed); *_no_intercept: the same without
    intercept, beside the affine default (None when the design itself has none). FVUs pooled over all tokens.
    """

    linear_map: LinearFit
    r2_vector: R2Scores | None
    r2_norm_sq: R2Scores | None
    r2_vector_no_intercept: R2Scores | None
    r2_norm_sq_no_intercept: R2Scores | None
    fvu_total: float
    fvu_nonlinear: float
    fvu_linear: float
    n_fit: int
    n_test: int


@dataclass(frozen=True)
class ErrorDecomposition:
    """:class:`ErrorFit` plus per-token norms [N] float32 (None unless requested)."""

    fit: ErrorFit
    error_norm: np.ndarray | None
    linear_error_norm: np.ndarray | None
    nonlinear_error_norm: np.ndarray | None


def error_fit(design: Design, vector: Split, norm_sq: Split | None = None,
              no_intercept: Design | None = None) -> ErrorFit:
    """:class:`ErrorFit` from moments alone (no pass over the rows): b* from the fit split of ``vector`` (the
    error's (fit, test) :class:`TargetMoments`), test R², and the FVUs pooled over both splits; ``norm_sq``: the
    (fit, test) moments of ‖error‖²; ``no_intercept``: a design without intercept on the same x moments."""
    fit_v, test_v = vector
    lin = design.solve(fit_v)
    all_x = design.all_rows
    total_ss = all_x.total_ss  # Σ‖x − x̄‖² over all tokens
    sse_nonlinear = float(residual_ss(lin, design.fit, fit_v).sum())
    sse_total = fit_v.norm_sq_sum
    if test_v is not None:
        assert design.test is not None
        sse_nonlinear += float(residual_ss(lin, design.test, test_v).sum())
        sse_total += test_v.norm_sq_sum

    def r2(d: Design | None, moments: Split | None) -> R2Scores | None:
        if d is None or moments is None or moments[1] is None:
            return None
        return d.heldout_r2(d.solve(moments[0]), moments[1])

    fvu_total, fvu_nonlinear = sse_total / total_ss, sse_nonlinear / total_ss
    return ErrorFit(
        linear_map=lin,
        r2_vector=None if test_v is None else design.heldout_r2(lin, test_v),
        r2_norm_sq=r2(design, norm_sq),
        r2_vector_no_intercept=r2(no_intercept, vector),
        r2_norm_sq_no_intercept=r2(no_intercept, norm_sq),
        fvu_total=fvu_total, fvu_nonlinear=fvu_nonlinear, fvu_linear=fvu_total - fvu_nonlinear,
        n_fit=fit_v.n, n_test=0 if test_v is None else test_v.n,
    )


def _sibling_without_intercept(design: Design) -> Design | None:
    """The same moments factorised without intercept (cheap: one d×d factorisation), or None."""
    if not design.intercept:
        return None
    return Design(design.fit, design.test, intercept=False, ridge=design.ridge)


def _check_mask(design: Design, mask: np.ndarray) -> None:
    if design.fit.n != int(mask.sum()):
        raise ValueError(f"the design was built on {design.fit.n} fit rows but the mask selects {int(mask.sum())}; "
                         "pass the mask the design was built with.")


# --------------------------------------------------------------------------------------------- dense route


def linear_error(x: ArrayLike, linear_map: LinearFit, chunk_rows: int = CHUNK_ROWS,
                 dtype: type = np.float64) -> np.ndarray:
    """LinearError = x·b* + b0, [N, d]."""
    return linear_map.predict(x, chunk_rows, dtype)


def error_components(x: ArrayLike, x_hat: ArrayLike, linear_map: LinearFit, chunk_rows: int = CHUNK_ROWS,
                     dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(LinearError, NonlinearError) [N, d] each; x = x_hat + LinearError + NonlinearError."""
    err = error_rows(x, x_hat)
    lin = linear_error(x, linear_map, chunk_rows, np.float64)
    nonlin = np.empty_like(lin, dtype=dtype)
    for sl in row_chunks(x.shape[0], chunk_rows):
        nonlin[sl] = (err[sl] - torch.from_numpy(lin[sl])).numpy()
    return lin.astype(dtype, copy=False), nonlin


def decompose(x: ArrayLike, x_hat: ArrayLike | None = None, *, error: ArrayLike | None = None,
              design: Design | None = None, mask: np.ndarray | None = None,
              fit_tokens: int = _DEFAULTS.fit_tokens, seed: int = _DEFAULTS.seed,
              intercept: bool = _DEFAULTS.intercept, ridge: float = _DEFAULTS.ridge, norm_sq: bool = True,
              per_token: bool = True, chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> ErrorDecomposition:
    """Linear/nonlinear decomposition of a dense SAE error (give ``x_hat`` or ``error``, [N, d] each).

    ``design``/``mask``: reuse a family's shared x statistics (built on the same ``x`` and mask). ``norm_sq``:
    also regress ‖error‖² on x. ``per_token``: also return ‖error‖, ‖LinearError‖, ‖NonlinearError‖ per token
    (one more pass, N·d² for x·b*).
    """
    if (x_hat is None) == (error is None):
        raise ValueError("give exactly one of x_hat and error.")
    err = error_rows(x, x_hat) if x_hat is not None else _Rows(x.shape[0], x.shape[1], lambda sl: as_f64(error[sl]))
    if tuple(err.shape) != tuple(x.shape):
        raise ValueError(f"x has shape {tuple(x.shape)} but the error has {tuple(err.shape)}.")
    n, d = x.shape
    # one pass: the target row is [e, ‖e‖²] (d + 1 columns), and the x moments come along when no design is given
    target = err if not norm_sq else _Rows(n, d + 1, lambda sl: _with_norm_sq(err[sl]))
    if mask is None:
        mask = split_mask(n, fit_tokens, seed)
    if design is None:
        fit_s, test_s = stream_moments(x, target, mask, chunk_rows=chunk_rows, progress=progress, desc="decompose")
        assert test_s is not None
        design = Design(fit_s.x_moments(), test_s.x_moments(), intercept=intercept, ridge=ridge)
        moments = (fit_s.target_moments(), test_s.target_moments())
    else:
        _check_mask(design, mask)
        moments = design.target_moments(x, target, mask, chunk_rows=chunk_rows, progress=progress)
    vector = (moments[0].select(slice(0, d)), moments[1].select(slice(0, d)))  # type: ignore[union-attr]
    norms = None
    if norm_sq:
        norms = (moments[0].select(slice(d, d + 1)), moments[1].select(slice(d, d + 1)))  # type: ignore[union-attr]
    result = error_fit(design, vector, norms, _sibling_without_intercept(design))
    if not per_token:
        return ErrorDecomposition(result, None, None, None)
    e_norm, l_norm, nl_norm = (np.empty(n, dtype=np.float32) for _ in range(3))
    coef, b0 = torch.from_numpy(result.linear_map.coef), torch.from_numpy(result.linear_map.intercept)
    for sl in row_chunks(n, chunk_rows):
        e = err[sl]
        lin = torch.addmm(b0, as_f64(x[sl]), coef)
        e_norm[sl], l_norm[sl], nl_norm[sl] = e.norm(dim=1), lin.norm(dim=1), (e - lin).norm(dim=1)
    return ErrorDecomposition(result, e_norm, l_norm, nl_norm)



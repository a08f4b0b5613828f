"""Least squares from moments: one factorised design shared by any number of targets.

``intercept=True`` (affine, the default) or ``False`` (b0 = 0), optionally with a ridge penalty λ‖B‖²_F on B only
(never on b0, as scikit-learn's Ridge). The system is Jacobi-equilibrated (unit diagonal) and factorised by Cholesky;
its condition number κ (of the equilibrated matrix, from its eigenvalues) is reported: the normal equations lose
about log10(κ) of float64's 16 digits. A failed Cholesky or κ > 1/rcond falls back, with a warning, to an
eigendecomposition pseudo-inverse of the unscaled matrix: the minimum-norm solution, as LAPACK gelsd /
``numpy.linalg.lstsq`` give for a rank-deficient design. (``torch.linalg.lstsq`` on uncentred float32 rows with an
intercept column silently drops directions.)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from darkmatter.regression.moments import (
    CHUNK_ROWS,
    DEFAULTS,
    ArrayLike,
    TargetMoments,
    XMoments,
    as_f64,
    row_chunks,
    split_mask,
    stream_moments,
)
from darkmatter.regression.r2 import GroupSums, GroupSumsAccumulator, R2Scores, r2_from_ss

log = logging.getLogger(__name__)

RCOND = 1e-12  # eigenvalue cutoff relative to the largest: 1/κ above which Cholesky is trusted


@dataclass(frozen=True)
class LinearFit:
    """A fitted map ŷ = x·coef + intercept: coef [d_in, d_out], intercept [d_out] (float64).

    condition_number: κ of the (equilibrated) normal matrix that was factorised; method: ``cholesky`` or
    ``eigh-pinv`` (rank-deficient fallback); rank: its numerical rank.
    """

    coef: np.ndarray
    intercept: np.ndarray
    condition_number: float
    method: str
    rank: int

    def predict(self, x: ArrayLike, chunk_rows: int = CHUNK_ROWS, dtype: type = np.float64) -> np.ndarray:
        """ŷ [N, d_out] = x·coef + intercept for x [N, d_in], computed in float64 chunk by chunk."""
        out = np.empty((x.shape[0], self.coef.shape[1]), dtype=dtype)
        coef, b0 = torch.from_numpy(self.coef), torch.from_numpy(self.intercept)
        for sl in row_chunks(x.shape[0], chunk_rows):
            out[sl] = torch.addmm(b0, as_f64(x[sl]), coef).numpy()
        return out


@dataclass(frozen=True)
class _Factor:
    solve: Callable[[Tensor], Tensor]
    condition_number: float
    method: str
    rank: int


def _factorise(a: Tensor, rcond: float) -> _Factor:
    """Factorise the symmetric normal matrix ``a`` [d, d] (float64) once, for any number of right-hand sides."""
    d = a.shape[0]
    diag = a.diagonal()
    # Jacobi scaling: activations' dimensions differ in scale by orders of magnitude; unit diagonal removes that
    # part of the ill-conditioning before Cholesky (and from the reported κ).
    scale = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), torch.ones_like(diag))
    a_s = scale[:, None] * a * scale[None, :]
    evals = torch.linalg.eigvalsh(a_s)
    lo, hi = float(evals[0]), float(evals[-1])
    cond = hi / lo if lo > 0 else math.inf
    if cond * rcond < 1:
        chol, info = torch.linalg.cholesky_ex(a_s)
        if int(info) == 0:
            return _Factor(lambda rhs: scale[:, None] * torch.cholesky_solve(scale[:, None] * rhs, chol), cond,
                           "cholesky", d)
    w, v = torch.linalg.eigh(a)
    keep = w > rcond * max(float(w[-1]), 0.0)
    inv = torch.where(keep, 1 / torch.where(keep, w, 1.0), 0.0)
    rank = int(keep.sum())
    warnings.warn(f"the normal matrix is singular or nearly so (condition number {cond:.3g} > 1/rcond = "
                  f"{1 / rcond:.3g}); using the minimum-norm solution on its {rank} of {d} well-determined "
                  "directions.", RuntimeWarning, stacklevel=3)
    return _Factor(lambda rhs: v @ (inv[:, None] * (v.T @ rhs)), cond, "eigh-pinv", rank)


class Design:
    """The x side of many regressions: moments of the fit (and test) split and one factorisation of
    A = Σ(x − x̄)ᵀ(x − x̄) + λI (intercept) or Σxᵀx + λI (no intercept), shared by every target.

    Build with :meth:`from_rows` (streams x once) or from :class:`XMoments`; then, per target,
    ``fit = design.solve(target_fit_moments)`` and ``design.heldout_r2(fit, target_test_moments)``.
    """

    def __init__(self, fit: XMoments, test: XMoments | None = None, *, intercept: bool = DEFAULTS.intercept,
                 ridge: float = DEFAULTS.ridge, rcond: float = RCOND):
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}.")
        self.fit, self.test, self.intercept, self.ridge = fit, test, intercept, ridge
        a = torch.from_numpy(fit.centred_gram if intercept else fit.raw_gram).clone()
        a.diagonal().add_(ridge)
        self._factor = _factorise(a, rcond)
        log.debug("design: n_fit=%d d=%d intercept=%s ridge=%g condition=%.3g (%s)", fit.n, a.shape[0],
                  intercept, ridge, self.condition_number, self._factor.method)

    @classmethod
    def from_rows(cls, x: ArrayLike, mask: np.ndarray | None = None, *, intercept: bool = DEFAULTS.intercept,
                  ridge: float = DEFAULTS.ridge, rcond: float = RCOND, chunk_rows: int = CHUNK_ROWS,
                  progress: bool = False) -> Design:
        """Stream ``x [N, d]`` once; ``mask`` [N] bool marks the fit rows (None: all rows, no test split)."""
        xm = stream_moments(x, mask=mask, chunk_rows=chunk_rows, progress=progress, desc="design").x
        assert xm is not None
        return cls(xm[0], xm[1] if len(xm) > 1 else None, intercept=intercept, ridge=ridge, rcond=rcond)

    def without_intercept(self) -> Design | None:
        """The same moments factorised without intercept (one d×d factorisation), or None when this design has
        none already."""
        return Design(self.fit, self.test, intercept=False, ridge=self.ridge) if self.intercept else None

    @property
    def shift(self) -> np.ndarray:
        return self.fit.shift

    @property
    def condition_number(self) -> float:
        return self._factor.condition_number

    @property
    def all_rows(self) -> XMoments:
        """Moments of fit ∪ test."""
        return self.fit if self.test is None else self.fit + self.test

    def target_moments(self, x: ArrayLike, y: ArrayLike, mask: np.ndarray | None = None, *,
                       chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> tuple[TargetMoments,
                                                                                       TargetMoments | None]:
        """(fit, test) :class:`TargetMoments` of a dense target ``y [N, p]`` (same rows and mask as the design)."""
        ym = stream_moments(x, y, mask, shift_x=self.shift, gram=False, chunk_rows=chunk_rows, progress=progress,
                            desc="target").y
        assert ym is not None
        return ym[0], ym[1] if len(ym) > 1 else None

    def solve(self, target: TargetMoments) -> LinearFit:
        """The least-squares map for a target with moments over the design's fit rows.

        Intercept: B = (C_xx + λI)⁻¹ C_xy with C the centred (co)variations, b0 = ȳ − x̄·B.
        No intercept: B = (Σxᵀx + λI)⁻¹ Σxᵀy, b0 = 0.
        """
        xm = self.fit
        _check_rows(xm, target)
        if self.intercept:
            rhs = target.cross - np.outer(xm.sum, target.sum) / xm.n
        else:  # Σxᵀy = Σ(x̃ + s)ᵀ(ỹ + t)
            s, t = xm.shift, target.shift
            rhs = target.cross + np.outer(xm.sum, t) + np.outer(s, target.sum) + xm.n * np.outer(s, t)
        coef = self._factor.solve(torch.from_numpy(rhs)).numpy()
        if self.intercept:
            y_mean = target.shift + target.sum / target.n
            b0 = y_mean - xm.mean @ coef
        else:
            b0 = np.zeros(coef.shape[1])
        return LinearFit(coef, b0, self.condition_number, self._factor.method, self._factor.rank)

    def heldout_r2(self, fit: LinearFit, target_test: TargetMoments) -> R2Scores:
        """Test-split R² of ``fit`` from the test moments (no second pass over the rows)."""
        if self.test is None:
            raise ValueError("this design has no test split; build it with a split mask.")
        return r2_from_ss(residual_ss(fit, self.test, target_test), target_test.ss_tot)


def _check_rows(xm: XMoments, target: TargetMoments) -> None:
    if xm.n != target.n or xm.sum.shape[0] != target.cross.shape[0]:
        raise ValueError(f"the target moments cover {target.n} rows × {target.cross.shape[0]} inputs but the "
                         f"design's cover {xm.n} rows × {xm.sum.shape[0]}; accumulate both over the same rows.")


def residual_ss(fit: LinearFit, xm: XMoments, target: TargetMoments) -> np.ndarray:
    """Σ_rows (y_j − ŷ_j)² per output dimension [p], from the moments of those rows alone.

    With x̃ = x − s, ỹ = y − t, the residual is ỹ − x̃B − c with c = s·B + b0 − t [p], so
        SS_j = Σỹ_j² − 2(Bᵀ Σx̃ᵀỹ)_jj − 2c_j Σỹ_j + (Bᵀ Σx̃ᵀx̃ B)_jj + 2c_j (Σx̃·B)_j + n·c_j².
    Cost d²·p. Clipped at 0 (an exact fit can round to −1e-12).
    """
    _check_rows(xm, target)
    B = fit.coef
    c = xm.shift @ B + fit.intercept - target.shift
    ss = (target.sum_sq - 2 * np.einsum("ij,ij->j", B, target.cross) - 2 * c * target.sum
          + np.einsum("ij,ij->j", B, xm.gram @ B) + 2 * c * (xm.sum @ B) + xm.n * c**2)
    return np.maximum(ss, 0.0)


# --------------------------------------------------------------------------------------------- one-call API


@dataclass(frozen=True)
class HeldoutFit:
    """A map fitted on the fit split and its R² on the test split (n_fit, n_test rows)."""

    fit: LinearFit
    r2: R2Scores
    n_fit: int
    n_test: int


def fit_linear(x: ArrayLike, y: ArrayLike, *, intercept: bool = DEFAULTS.intercept, ridge: float = DEFAULTS.ridge,
               chunk_rows: int = CHUNK_ROWS):
    """Least squares ``y [N, p] ≈ x [N, d]·coef + intercept`` on all rows (ridge λ on coef only)."""
    m = stream_moments(x, y, chunk_rows=chunk_rows)
    assert m.x is not None and m.y is not None
    return Design(m.x[0], intercept=intercept, ridge=ridge).solve(m.y[0])


def heldout_r2(x: ArrayLike, y: ArrayLike, *, fit_tokens: int = DEFAULTS.fit_tokens, seed: int = DEFAULTS.seed,
               intercept: bool = DEFAULTS.intercept, ridge: float = DEFAULTS.ridge, chunk_rows: int = CHUNK_ROWS,
               progress: bool = False) -> HeldoutFit:
    """Fit ``y ≈ x·B + b0`` on ``fit_tokens`` shuffled rows (:func:`split_mask`), score R² on the rest.

    One pass over the rows. ``y`` may be a vector target [N, p] or a scalar one [N] (e.g. ‖error‖²).
    """
    mask = split_mask(x.shape[0], fit_tokens, seed)
    m = stream_moments(x, y, mask, chunk_rows=chunk_rows, progress=progress, desc="regression")
    assert m.x is not None and m.y is not None
    design = Design(m.x[0], m.x[1], intercept=intercept, ridge=ridge)
    lin = design.solve(m.y[0])
    return HeldoutFit(lin, design.heldout_r2(lin, m.y[1]), m.x[0].n, m.x[1].n)


def heldout_group_sums(x: ArrayLike, y: ArrayLike, mask: np.ndarray, groups: np.ndarray, *,
                       intercept: bool = DEFAULTS.intercept, ridge: float = DEFAULTS.ridge,
                       chunk_rows: int = CHUNK_ROWS, progress: bool = False,
                       desc: str = "regression") -> tuple[LinearFit, GroupSums]:
    """Fit ``y ≈ x·B (+ b0)`` on the rows ``mask`` selects and return the fit with the per-group sums of the other
    rows (:class:`GroupSums`: their held-out R² under any resampling of ``groups`` [N], e.g. eval contexts).

    Two passes over the rows (moments, then :func:`group_test_sums`); x and y may be memmaps or
    :class:`~darkmatter.regression.LazyRows`, only one chunk of each is in memory at a time. To fit several designs
    (with and without intercept) on one pass of moments, call :func:`stream_moments` and :func:`group_test_sums`.
    """
    m = stream_moments(x, y, mask, chunk_rows=chunk_rows, progress=progress, desc=f"{desc}: moments")
    assert m.x is not None and m.y is not None
    lin = Design(m.x[0], m.x[1], intercept=intercept, ridge=ridge).solve(m.y[0])
    return lin, group_test_sums(x, y, mask, groups, lin, chunk_rows=chunk_rows)


def group_test_sums(x: ArrayLike, y: ArrayLike, mask: np.ndarray, groups: np.ndarray, fit: LinearFit, *,
                    chunk_rows: int = CHUNK_ROWS) -> GroupSums:
    """Per-group sums of y and of its residual under ``fit`` over the rows ``mask`` leaves out (float64)."""
    return group_test_sums_of(x, y, mask, groups, [(None, fit)], chunk_rows=chunk_rows)[0]


def group_test_sums_of(x: ArrayLike, y: ArrayLike, mask: np.ndarray, groups: np.ndarray,
                       fits: Sequence[tuple[np.ndarray | None, LinearFit]], *,
                       chunk_rows: int = CHUNK_ROWS) -> list[GroupSums]:
    """:func:`group_test_sums` of several fits in one pass, each on its design columns of x (None: all of them;
    with :meth:`XMoments.columns`, several designs cost one pass of x and y each way)."""
    mask, groups = np.asarray(mask, dtype=bool), np.asarray(groups)
    maps = [(cols if cols is None else torch.from_numpy(np.asarray(cols)), torch.from_numpy(fit.coef),
             torch.from_numpy(fit.intercept)) for cols, fit in fits]
    accs = [GroupSumsAccumulator(groups[~mask]) for _ in fits]
    for sl in row_chunks(x.shape[0], chunk_rows):
        test = ~mask[sl]
        if test.any():
            keep = torch.from_numpy(test)
            yt = as_f64(y[sl])[keep]
            yt = yt[:, None] if yt.ndim == 1 else yt
            xt = as_f64(x[sl])[keep]
            for acc, (cols, coef, b0) in zip(accs, maps, strict=True):
                acc.add(groups[sl][test], yt, yt - torch.addmm(b0, xt if cols is None else xt[:, cols], coef))
    return [acc.result() for acc in accs]

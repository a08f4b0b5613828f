"""Streaming least squares from float64 sufficient statistics, with held-out R².

Model (SCIENCE.md §1): ``y ≈ x·B + b0`` with ``x [N, d_in]``, ``y [N, d_out]``, ``B [d_in, d_out]``, ``b0 [d_out]``;
``intercept=True`` (affine, the paper's text and our default) or ``False`` (b0 = 0, what the reference code fits
for the error vector), optionally with a ridge penalty λ‖B‖²_F on B only (never on b0, as scikit-learn's Ridge).

Why the normal equations. They need only n, Σx, Σxᵀx, Σy, Σxᵀy (and Σy² for R²), so memory is O(d_in·(d_in +
d_out)) whatever the token count and rows can be streamed from a memmap. The activations x are shared by every SAE of
a family: :class:`Design` holds the x statistics of both splits and one factorisation, and each target only adds
its cross moments (:class:`TargetMoments`) — which for SAE errors can even be formed from the sparse codes
(darkmatter.decompose). ECOSYSTEM.md §5 asks for exactly this instead of a 150k-row ``lstsq`` per SAE.

Numerics. Sums are float64 and taken about shifts (x̃ = x − s, ỹ = y − t; s, t = means of the first chunk), so the
centred Gram Σx̃ᵀx̃ − n·m̃m̃ᵀ (m̃ = mean of x̃) does not cancel catastrophically when |mean| ≫ spread (residual streams
have such dimensions; Chan, Golub & LeVeque 1983). The system is Jacobi-equilibrated (unit diagonal) and factorised
by Cholesky; its condition number κ (of the equilibrated matrix, from its eigenvalues) is reported: the normal
equations lose about log10(κ) of float64's 16 digits. A failed Cholesky or κ > 1/rcond falls back, with a
warning, to an eigendecomposition pseudo-inverse of the unscaled matrix: the minimum-norm solution, as LAPACK
gelsd / ``numpy.linalg.lstsq`` give for a rank-deficient design. (``torch.linalg.lstsq`` on uncentred float32
rows with an intercept column, the reference code's route, silently drops directions.)

R² (SCIENCE.md §1), on the held-out split: R²_j = 1 − SS_res,j / SS_tot,j per output dimension j, SS_tot about the
*test-set* mean; ``r2_mean_dims`` = mean over dimensions (the paper's number; scikit-learn
``multioutput="uniform_average"``); ``r2_pooled`` = 1 − Σ_j SS_res,j / Σ_j SS_tot,j (one sum of squares over
all entries about the per-dimension mean vector, like FVU; scikit-learn ``"variance_weighted"``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.config import DecompositionConfig

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | Tensor

_DEFAULTS = DecompositionConfig()  # the one source of defaults (fit_tokens, intercept, ridge, seed)
CHUNK_ROWS = 16_384  # rows per streamed chunk: a float64 chunk of 576-dim rows is 75 MB
RCOND = 1e-12  # eigenvalue cutoff relative to the largest: 1/κ above which Cholesky is trusted


# --------------------------------------------------------------------------------------------- streaming helpers


def row_chunks(n_rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_rows`` rows covering ``range(n_rows)``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def as_f64(a: ArrayLike) -> Tensor:
    """A chunk (numpy array, memmap or tensor) as a float64 CPU tensor; a vector becomes a column [n, 1]."""
    if isinstance(a, Tensor):
        t = a.detach().to(device="cpu", dtype=torch.float64)
    else:  # np.array copies: a read-only memmap slice cannot be wrapped by torch without a warning
        t = torch.from_numpy(np.array(a, dtype=np.float64))
    return t[:, None] if t.ndim == 1 else t


def split_mask(n_rows: int, fit_tokens: int = _DEFAULTS.fit_tokens, seed: int = _DEFAULTS.seed) -> np.ndarray:
    """Boolean ``[n_rows]``, True on the fit rows of the paper's protocol (SCIENCE.md §2).

    Rows are shuffled by ``np.random.default_rng(seed).permutation(n_rows)``; the first ``fit_tokens`` rows of the
    permutation are the fit split, the rest the test split. Least squares ignores row order, so fitting on the
    masked rows is fitting on the shuffled prefix. This mask (1 byte per token) is the only per-token object.
    """
    if not 0 < fit_tokens < n_rows:
        raise ValueError(f"fit_tokens={fit_tokens} must be between 1 and n_rows - 1 = {n_rows - 1} so that both "
                         "the fit split and the test split are non-empty.")
    mask = np.zeros(n_rows, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_rows)[:fit_tokens]] = True
    return mask


# --------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class XMoments:
    """Float64 sums over one set of rows of x about the shift s: the design side of a regression.

    n; shift [d] = s; sum [d] = Σ(x − s); gram [d, d] = Σ(x − s)ᵀ(x − s).
    """

    n: int
    shift: np.ndarray
    sum: np.ndarray
    gram: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """x̄ [d]."""
        return self.shift + self.sum / self.n

    @property
    def centred_gram(self) -> np.ndarray:
        """Σ(x − x̄)ᵀ(x − x̄) [d, d]."""
        return self.gram - np.outer(self.sum, self.sum) / self.n

    @property
    def raw_gram(self) -> np.ndarray:
        """Σxᵀx [d, d] (about zero: the no-intercept normal matrix)."""
        s, m = self.shift, self.sum
        return self.gram + np.outer(m, s) + np.outer(s, m) + self.n * np.outer(s, s)

    @property
    def total_ss(self) -> float:
        """Σ‖x − x̄‖² (the FVU denominator of darkmatter.metrics, from these sums)."""
        return float(np.trace(self.gram) - self.sum @ self.sum / self.n)

    def __add__(self, other: XMoments) -> XMoments:
        """The moments of the union of two disjoint row sets (same shift)."""
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cannot add XMoments taken about different shifts.")
        return XMoments(self.n + other.n, self.shift, self.sum + other.sum, self.gram + other.gram)


@dataclass(frozen=True)
class TargetMoments:
    """Float64 sums over one set of rows of a target y, about the shift t (x about the design's shift s).

    n; shift [p] = t; sum [p] = Σ(y − t); sum_sq [p] = Σ(y − t)² per output dimension;
    cross [d, p] = Σ(x − s)ᵀ(y − t).
    """

    n: int
    shift: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    cross: np.ndarray

    @property
    def ss_tot(self) -> np.ndarray:
        """Σ(y_j − ȳ_j)² per output dimension [p] (ȳ = the mean over these rows)."""
        return np.maximum(self.sum_sq - self.sum**2 / self.n, 0.0)

    @property
    def norm_sq_sum(self) -> float:
        """Σ‖y‖² over the rows (about zero)."""
        t = self.shift
        return float(np.sum(self.sum_sq + 2 * t * self.sum + self.n * t**2))

    def select(self, cols: slice) -> TargetMoments:
        """The moments of the output columns ``cols`` only (targets stacked side by side share one pass)."""
        return TargetMoments(self.n, self.shift[cols], self.sum[cols], self.sum_sq[cols],
                             np.ascontiguousarray(self.cross[:, cols]))

    def __add__(self, other: TargetMoments) -> TargetMoments:
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cannot add TargetMoments taken about different shifts.")
        return TargetMoments(self.n + other.n, self.shift, self.sum + other.sum, self.sum_sq + other.sum_sq,
                             self.cross + other.cross)


class MomentStream:
    """Accumulates :class:`XMoments` (``gram=True``) and/or :class:`TargetMoments` of one row set from chunks.

    ``update(x̃, y)`` takes x already shifted (x̃ = x − s, float64 [n, d]) and y float64 [n, p]; y's shift is
    the mean of the first rows seen unless given. Cost per row: d² (gram) + d·p (cross) multiply-adds.
    """

    def __init__(self, shift_x: np.ndarray, gram: bool = True, shift_y: np.ndarray | None = None):
        self.shift_x, self.gram, self.shift_y = shift_x, gram, shift_y
        self.n = 0
        self._sum_x: Tensor | None = None
        self._gram: Tensor | None = None
        self._y: list[Tensor] | None = None  # [sum, sum_sq, cross]

    def update(self, xt: Tensor, y: Tensor | None = None) -> None:
        if xt.shape[0] == 0:
            return
        self.n += xt.shape[0]
        if self.gram:
            if self._gram is None:
                self._sum_x, self._gram = xt.sum(0), xt.T @ xt
            else:
                self._sum_x += xt.sum(0)
                self._gram.addmm_(xt.T, xt)
        if y is not None:
            if self.shift_y is None:
                self.shift_y = y.mean(0).numpy()
            yt = y - torch.from_numpy(self.shift_y)
            parts = [yt.sum(0), yt.pow(2).sum(0), xt.T @ yt]
            if self._y is None:
                self._y = parts
            else:
                for acc, part in zip(self._y, parts, strict=True):
                    acc += part

    def x_moments(self) -> XMoments:
        if self._gram is None or self._sum_x is None:
            raise ValueError("no rows were streamed into this split (or gram=False).")
        return XMoments(self.n, self.shift_x, self._sum_x.numpy(), self._gram.numpy())

    def target_moments(self) -> TargetMoments:
        if self._y is None or self.shift_y is None:
            raise ValueError("no target rows were streamed into this split.")
        s, sq, cross = (t.numpy() for t in self._y)
        return TargetMoments(self.n, self.shift_y, s, sq, cross)


def stream_moments(x: ArrayLike, y: ArrayLike | None = None, mask: np.ndarray | None = None, *,
                   shift_x: np.ndarray | None = None, gram: bool = True, chunk_rows: int = CHUNK_ROWS,
                   progress: bool = False, desc: str = "moments") -> tuple[MomentStream, MomentStream | None]:
    """Stream ``x [N, d]`` (and ``y [N, p]``) in chunks into (fit, test) :class:`MomentStream`\\ s.

    ``mask`` [N] bool selects the fit rows (None: every row is a fit row and test is None). Both splits use the
    same shifts — s given or the mean of x's first chunk, t the mean of y's first chunk — so their moments add up
    to those of all rows.
    """
    n = x.shape[0]
    if y is not None and y.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}; they must be aligned row by row.")
    if mask is not None and mask.shape != (n,):
        raise ValueError(f"the split mask has shape {mask.shape}, expected ({n},).")
    fit = test = None
    bar = tqdm(total=n, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    for sl in row_chunks(n, chunk_rows):
        xc = as_f64(x[sl])
        yc = None if y is None else as_f64(y[sl])
        if fit is None:
            shift_x = xc.mean(0).numpy() if shift_x is None else np.asarray(shift_x, dtype=np.float64)
            shift_y = None if yc is None else yc.mean(0).numpy()
            fit = MomentStream(shift_x, gram, shift_y)
            test = None if mask is None else MomentStream(shift_x, gram, shift_y)
        xt = xc - torch.from_numpy(fit.shift_x)
        if mask is None:
            fit.update(xt, yc)
        else:
            m = torch.from_numpy(np.asarray(mask[sl]))
            fit.update(xt[m], None if yc is None else yc[m])
            test.update(xt[~m], None if yc is None else yc[~m])  # type: ignore[union-attr]
        bar.update(sl.stop - sl.start)
    bar.close()
    if fit is None:
        raise ValueError("x has no rows.")
    return fit, test


# --------------------------------------------------------------------------------------------- solving


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

    def __init__(self, fit: XMoments, test: XMoments | None = None, *, intercept: bool = _DEFAULTS.intercept,
                 ridge: float = _DEFAULTS.ridge, rcond: float = RCOND):
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}.")
        self.fit, self.test, self.intercept, self.ridge = fit, test, intercept, ridge
        a = torch.from_numpy(fit.centred_gram if intercept else fit.raw_gram).clone()
        a.diagonal().add_(ridge)
        self._factor = _factorise(a, rcond)
        log.debug("design: n_fit=%d d=%d intercept=%s ridge=%g condition=%.3g (%s)", fit.n, a.shape[0],
                  intercept, ridge, self.condition_number, self._factor.method)

    @classmethod
    def from_rows(cls, x: ArrayLike, mask: np.ndarray | None = None, *, intercept: bool = _DEFAULTS.intercept,
                  ridge: float = _DEFAULTS.ridge, rcond: float = RCOND, chunk_rows: int = CHUNK_ROWS,
                  progress: bool = False) -> Design:
        """Stream ``x [N, d]`` once; ``mask`` [N] bool marks the fit rows (None: all rows, no test split)."""
        fit, test = stream_moments(x, mask=mask, chunk_rows=chunk_rows, progress=progress, desc="design")
        return cls(fit.x_moments(), None if test is None else test.x_moments(), intercept=intercept,
                   ridge=ridge, rcond=rcond)

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
        fit, test = stream_moments(x, y, mask, shift_x=self.shift, gram=False, chunk_rows=chunk_rows,
                                   progress=progress, desc="target")
        return fit.target_moments(), None if test is None else test.target_moments()

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


# --------------------------------------------------------------------------------------------- R²


@dataclass(frozen=True)
class R2Scores:
    """Coefficient of determination of a vector target (see the module docstring for the conventions).

    per_dim [p]: 1 − SS_res,j/SS_tot,j (NaN where SS_tot,j = 0); r2_mean_dims: their mean over finite dims (the
    paper's number); r2_pooled: 1 − ΣSS_res/ΣSS_tot.
    """

    per_dim: np.ndarray
    r2_mean_dims: float
    r2_pooled: float

    def __iter__(self):  # allows ``per_dim, mean_dims, pooled = r2_scores(...)``
        return iter((self.per_dim, self.r2_mean_dims, self.r2_pooled))


def r2_from_ss(ss_res: np.ndarray, ss_tot: np.ndarray) -> R2Scores:
    """R² from per-dimension residual and total sums of squares (both [p], float64)."""
    ss_res, ss_tot = np.atleast_1d(ss_res), np.atleast_1d(ss_tot)
    ok = ss_tot > 0
    per_dim = np.full(ss_tot.shape, np.nan)
    per_dim[ok] = 1 - ss_res[ok] / ss_tot[ok]
    if not ok.all():
        warnings.warn(f"{int((~ok).sum())} of {ok.size} target dimensions are constant on the scored rows; their "
                      "R² is NaN and left out of the mean over dimensions.", RuntimeWarning, stacklevel=2)
    tot = float(ss_tot.sum())
    pooled = 1 - float(ss_res.sum()) / tot if tot > 0 else math.nan
    return R2Scores(per_dim, float(np.mean(per_dim[ok])) if ok.any() else math.nan, pooled)


def r2_scores(y_true: ArrayLike, y_pred: ArrayLike, chunk_rows: int = CHUNK_ROWS) -> R2Scores:
    """R² of predictions ``y_pred`` for ``y_true`` (both [N, p] or [N]), computed directly in float64.

    SS_tot is about the mean of ``y_true`` over these N rows (so on a test split: the test-set mean).
    """
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {tuple(y_true.shape)} but y_pred has {tuple(y_pred.shape)}.")
    ss_res = shift = s = sq = None
    for sl in row_chunks(y_true.shape[0], chunk_rows):
        yc, pc = as_f64(y_true[sl]), as_f64(y_pred[sl])
        if shift is None:
            shift = yc.mean(0)
            ss_res, s, sq = torch.zeros_like(shift), torch.zeros_like(shift), torch.zeros_like(shift)
        ss_res += (yc - pc).pow(2).sum(0)
        s += (yc - shift).sum(0)
        sq += (yc - shift).pow(2).sum(0)
    if shift is None:
        raise ValueError("y_true has no rows.")
    ss_tot = torch.clamp(sq - s**2 / y_true.shape[0], min=0)
    return r2_from_ss(ss_res.numpy(), ss_tot.numpy())  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------- one-call API


@dataclass(frozen=True)
class HeldoutFit:
    """A map fitted on the fit split and its R² on the test split (n_fit, n_test rows)."""

    fit: LinearFit
    r2: R2Scores
    n_fit: int
    n_test: int


def fit_linear(x: ArrayLike, y: ArrayLike, *, intercept: bool = _DEFAULTS.intercept, ridge: float = _DEFAULTS.ridge,
               chunk_rows: int = CHUNK_ROWS) -> LinearFit:
    """Least squares ``y [N, p] ≈ x [N, d]·coef + intercept`` on all rows (ridge λ on coef only)."""
    fit, _ = stream_moments(x, y, chunk_rows=chunk_rows)
    design = Design(fit.x_moments(), intercept=intercept, ridge=ridge)
    return design.solve(fit.target_moments())


def heldout_r2(x: ArrayLike, y: ArrayLike, *, fit_tokens: int = _DEFAULTS.fit_tokens, seed: int = _DEFAULTS.seed,
               intercept: bool = _DEFAULTS.intercept, ridge: float = _DEFAULTS.ridge,
               chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> HeldoutFit:
    """Fit ``y ≈ x·B + b0`` on ``fit_tokens`` shuffled rows (:func:`split_mask`), score R² on the rest.

    One pass over the rows. ``y`` may be a vector target [N, p] or a scalar one [N] (e.g. ‖error‖²).
    """
    mask = split_mask(x.shape[0], fit_tokens, seed)
    fit_s, test_s = stream_moments(x, y, mask, chunk_rows=chunk_rows, progress=progress, desc="regression")
    assert test_s is not None
    design = Design(fit_s.x_moments(), test_s.x_moments(), intercept=intercept, ridge=ridge)
    lin = design.solve(fit_s.target_moments())
    return HeldoutFit(lin, design.heldout_r2(lin, test_s.target_moments()), fit_s.n, test_s.n)

r"""Split SAE errors into the part linear in x and the rest, for a whole family at once (the one route): the fit.

    error = x − x_hat (SaeError)              b* = argmin_B Σ_fit ‖x·B (+ b0) − error‖²  [d, d]
    LinearError = x·b* (+ b0)                 NonlinearError = error − LinearError
    so x = x_hat + LinearError + NonlinearError exactly.
    FVU_total = Σ‖error‖² / Σ‖x − x̄‖²        FVU_nonlinear = FVU(x, x_hat + LinearError)
    FVU_linear = FVU_total − FVU_nonlinear

b* is fitted on the fit split (:func:`darkmatter.regression.split_mask`) and applied to every token; ‖error‖² is
regressed on x alongside (its map a, a0 shares the pass). Reconstructions are :class:`~darkmatter.sae.codes.SparseCodes`
(what the workflow stores) or dense arrays (:class:`DenseReconstruction`); both go through the same two passes:

1. :func:`decompose_family` — one pass over x for the family (:mod:`darkmatter.regression.moments`): the x statistics and
   their factorisation are shared; per SAE the target row [e, ‖e‖²] is decoded tile by tile and its sums and cross
   moments accumulated (float32 within a tile, float64 across). For sparse codes the cross moment can instead come
   from Σx̃ᵀz [d_sae, d] (N·k·d multiply-adds instead of N·d²: Σx̃ᵀe = Σx̃ᵀx̃ + Σx̃·(s − b_dec − t)ᵀ − (Σx̃ᵀz)·W_dec);
   on a CPU that scatter is memory-bound and wins only when d/k is large (:func:`choose_method`). Result: an
   :class:`ErrorFit` per SAE from moments alone.
2. :func:`darkmatter.errors.parts.error_parts` — a second pass, now that b* is known: per token ‖x‖, ‖x_hat‖, ‖error‖, ‖LinearError‖,
   ‖NonlinearError‖, cosine and L0; the reconstruction and sparsity metrics (:mod:`darkmatter.errors.metrics`);
   and, per eval context, the test rows' sums that let analyses resample the held-out R²
   (:class:`darkmatter.regression.GroupSums`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from darkmatter.regression import (
    CHUNK_ROWS,
    DEFAULTS,
    ArrayLike,
    Design,
    LinearFit,
    R2Scores,
    TargetMoments,
    TargetSums,
    XMoments,
    XSums,
    as_tensor,
    chunks,
    residual_ss,
    split_mask,
)
from darkmatter.sae.codes import SparseCodes

log = logging.getLogger(__name__)

Split = tuple[TargetMoments, TargetMoments | None]  # (fit, test) moments of one target
Method = Literal["auto", "sparse", "dense"]
# "auto" rule, measured on 2 AVX-512 cores (bench/regression.py, d = 576, k = 32): the sparse product does d/k
# times fewer multiply-adds than the dense GEMM, but scipy's single-threaded scatter into random rows of a
# [d_sae, d] float64 accumulator is far less efficient than the 2-thread float32 GEMM: at d/k = 18 the sparse
# route fits the family about 3× slower, so it could only break even near d/k ≈ 50. "auto" takes it only from
# d ≥ 64·k (e.g. d = 2304 and k ≤ 36), and while its two accumulators stay within memory reason.
SPARSE_MIN_D_OVER_K = 64
SPARSE_MAX_ACCUMULATOR_BYTES = 128 * 2**20


class DenseReconstruction:
    """A dense reconstruction x_hat [N, d] (array, memmap or tensor) with the interface of
    :class:`~darkmatter.sae.codes.SparseCodes` that the two passes use. A float64 x_hat keeps float64 errors (and
    float64 moments); anything else is float32, like decoded codes."""

    def __init__(self, x_hat: ArrayLike):
        if x_hat.ndim != 2:
            raise ValueError(f"x_hat must be a matrix [N, d], got shape {tuple(x_hat.shape)}.")
        self.x_hat_rows = x_hat

    @property
    def n_rows(self) -> int:
        return int(self.x_hat_rows.shape[0])

    @property
    def d(self) -> int:
        return int(self.x_hat_rows.shape[1])

    def rows(self, rows: slice | np.ndarray) -> tuple[Tensor]:
        return (as_tensor(self.x_hat_rows[rows]),)

    def x_hat_of(self, state: tuple[Tensor]) -> Tensor:
        return state[0]

    def error_of(self, x: Tensor, state: tuple[Tensor]) -> Tensor:
        return x.to(state[0].dtype) - state[0]

    def l0(self, state: tuple[Tensor]) -> None:
        return None


Reconstruction = SparseCodes | DenseReconstruction


def as_reconstruction(r: Reconstruction | ArrayLike) -> Reconstruction:
    """Codes pass through; an array is a dense x_hat."""
    return r if isinstance(r, (SparseCodes, DenseReconstruction)) else DenseReconstruction(r)


def _take(state: tuple[Tensor, ...], rows: Tensor | slice | None) -> tuple[Tensor, ...]:
    return state if rows is None else tuple(t[rows] for t in state)


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ErrorFit:
    """The linear error predictor of one SAE and what it explains.

    linear_map: b* (coef [d, d]) and intercept [d] — LinearError = x·coef + intercept; norm_map: the same fit of
    ‖error‖² (coef [d, 1]); r2_vector / r2_norm_sq: their test-split R²; *_no_intercept: the same without
    intercept beside the affine default (None when the design itself has none). FVUs pooled over all tokens.
    """

    linear_map: LinearFit
    norm_map: LinearFit | None
    r2_vector: R2Scores | None
    r2_norm_sq: R2Scores | None
    r2_vector_no_intercept: R2Scores | None
    r2_norm_sq_no_intercept: R2Scores | None
    fvu_total: float
    fvu_nonlinear: float
    fvu_linear: float
    n_fit: int
    n_test: int

    def summary(self) -> dict[str, float | int | str | None]:
        """Flat JSON-able numbers (R² of the vector: mean over dims and pooled; of ‖error‖²: pooled)."""

        def r2(scores: R2Scores | None, attr: str) -> float | None:
            return None if scores is None else float(getattr(scores, attr))

        lin = self.linear_map
        return {
            "fvu": self.fvu_total, "fvu_nonlinear": self.fvu_nonlinear, "fvu_linear": self.fvu_linear,
            "r2_vector_mean_dims": r2(self.r2_vector, "r2_mean_dims"), "r2_vector_pooled": r2(self.r2_vector,
                                                                                             "r2_pooled"),
            "r2_norm_sq": r2(self.r2_norm_sq, "r2_pooled"),
            "r2_vector_mean_dims_no_intercept": r2(self.r2_vector_no_intercept, "r2_mean_dims"),
            "r2_vector_pooled_no_intercept": r2(self.r2_vector_no_intercept, "r2_pooled"),
            "r2_norm_sq_no_intercept": r2(self.r2_norm_sq_no_intercept, "r2_pooled"),
            "condition_number": float(lin.condition_number), "solver": lin.method, "rank": int(lin.rank),
            "fit_tokens": self.n_fit, "test_tokens": self.n_test,
        }


def error_fit(design: Design, vector: Split, norm_sq: Split | None = None,
              no_intercept: Design | None = None) -> ErrorFit:
    """:class:`ErrorFit` from moments alone (no pass over the rows): b* from the fit split of ``vector`` (the
    error's (fit, test) :class:`TargetMoments`), test R², and the FVUs pooled over both splits; ``norm_sq``: the
    (fit, test) moments of ‖error‖²; ``no_intercept``: a design without intercept on the same x moments."""
    fit_v, test_v = vector
    lin = design.solve(fit_v)
    total_ss = design.all_rows.total_ss  # Σ‖x − x̄‖² over all tokens
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
        norm_map=None if norm_sq is None else design.solve(norm_sq[0]),
        r2_vector=None if test_v is None else design.heldout_r2(lin, test_v),
        r2_norm_sq=r2(design, norm_sq),
        r2_vector_no_intercept=r2(no_intercept, vector),
        r2_norm_sq_no_intercept=r2(no_intercept, norm_sq),
        fvu_total=fvu_total, fvu_nonlinear=fvu_nonlinear, fvu_linear=fvu_total - fvu_nonlinear,
        n_fit=fit_v.n, n_test=0 if test_v is None else test_v.n,
    )


# --------------------------------------------------------------------------------------------- pass 1: moments


def sparse_pays(k: int, d_sae: int, d: int) -> bool:
    """The ``auto`` rule (see :data:`SPARSE_MIN_D_OVER_K`): d ≥ 64·k and a float64 [d_sae, d] accumulator of at most
    128 MiB."""
    return d >= SPARSE_MIN_D_OVER_K * k and d_sae * d * 8 <= SPARSE_MAX_ACCUMULATOR_BYTES


def choose_method(method: Method, recon: Reconstruction, d: int) -> Literal["sparse", "dense"]:
    """Resolve ``auto`` by :func:`sparse_pays` for codes; dense reconstructions are always dense."""
    if not isinstance(recon, SparseCodes):
        if method == "sparse":
            raise ValueError("method='sparse' needs sparse codes, not a dense reconstruction.")
        return "dense"
    if method != "auto":
        return method
    return "sparse" if sparse_pays(int(recon.top_indices.shape[1]), recon.d_sae, d) else "dense"


class _ErrorSums:
    """One SAE's sums over each split of the target row [e, ‖e‖²] ∈ R^(d+1), fed chunk by chunk: the error vector
    and the scalar norm target share every pass (one GEMM gives both cross moments, one reduction both sums)."""

    def __init__(self, recon: Reconstruction, use: Literal["sparse", "dense"], n_splits: int, d: int):
        self.recon, self.sparse, self.d = recon, use == "sparse", d
        # the sparse route forms only the norm column's cross moment by GEMM; the error's comes from Σx̃ᵀz
        self.target = TargetSums(n_splits, cross_cols=slice(d, d + 1) if self.sparse else slice(None))
        self.zx: list[Tensor | None] = [None] * n_splits
        self._buf: Tensor | None = None

    def _scratch(self, n: int, dtype: torch.dtype) -> Tensor:
        """A reused [n, d + 1] buffer for one tile's target (a fresh one per tile page-faults)."""
        if self._buf is None or self._buf.dtype != dtype or self._buf.shape[0] < n:
            self._buf = torch.empty(n, self.d + 1, dtype=dtype)
        return self._buf[:n]

    def add_chunk(self, chunk) -> None:
        state = _take(self.recon.rows(chunk.sl), chunk.order)
        for split in range(len(chunk.splits)):
            for rows in chunk.tiles(split):
                tile = _take(state, rows)
                x_hat = self.recon.x_hat_of(tile)
                x = chunk.x[rows].to(x_hat.dtype)  # float32 for codes; a float64 dense x_hat keeps float64
                target = self._scratch(x.shape[0], x_hat.dtype)  # [e, ‖e‖²], built in place
                e = torch.sub(x, x_hat, out=target[:, : self.d])
                target[:, self.d] = torch.linalg.vector_norm(e, dim=1).square_()  # in e's dtype
                self.target.add_tile(split, chunk, rows, target, owned=True)
                if self.sparse:  # Σ_rows z_rowᵀ x̃_row [d_sae, d]: scipy's CSC product touches only the nonzeros
                    idx, val = tile
                    z = scipy.sparse.csr_matrix((val.double().reshape(-1).numpy(), idx.reshape(-1).numpy(),
                                                 np.arange(0, idx.numel() + 1, idx.shape[1])),
                                                shape=(idx.shape[0], self.recon.d_sae))
                    zx = torch.from_numpy(z.T @ chunk.xt[rows].numpy())
                    self.zx[split] = zx if self.zx[split] is None else self.zx[split].add_(zx)

    def moments(self, xms: list[XMoments]) -> tuple[Split, Split]:
        """(vector, norm_sq) moments, each (fit, test); ``xms`` = the x moments of the same splits."""
        both = self.target.moments()
        d = self.d
        if self.sparse:  # Σx̃ᵀ(e − t) with e = x̃ + s − z·W_dec − b_dec (x̃ = x − s), every term from statistics
            assert isinstance(self.recon, SparseCodes)
            W_dec = torch.as_tensor(self.recon.W_dec).double()
            b_dec = torch.as_tensor(self.recon.b_dec).double()
            filled = []
            for m, xm, zx in zip(both, xms, self.zx, strict=True):
                t = torch.from_numpy(m.shift[:d])
                cross = (torch.from_numpy(xm.gram) + torch.outer(torch.from_numpy(xm.sum),
                                                                 torch.from_numpy(xm.shift) - b_dec - t)
                         - zx.T @ W_dec)  # type: ignore[union-attr]
                filled.append(TargetMoments(m.n, m.shift, m.sum, m.sum_sq,
                                            np.concatenate([cross.numpy(), m.cross], axis=1)))
            both = filled
        vector = [m.select(slice(0, d)) for m in both]
        norm_sq = [m.select(slice(d, d + 1)) for m in both]
        if len(both) == 1:
            return (vector[0], None), (norm_sq[0], None)
        return (vector[0], vector[1]), (norm_sq[0], norm_sq[1])


@dataclass(frozen=True)
class FamilyFit:
    """What :func:`decompose_family` returns: the shared design (x moments and factorisation), the split mask, and one
    :class:`ErrorFit` per reconstruction."""

    design: Design
    mask: np.ndarray
    fits: list[ErrorFit]


def decompose_family(x: ArrayLike, reconstructions: Sequence[Reconstruction | ArrayLike], *, design: Design | None = None,
              mask: np.ndarray | None = None, fit_tokens: int = DEFAULTS.fit_tokens, seed: int = DEFAULTS.seed,
              intercept: bool = DEFAULTS.intercept, ridge: float = DEFAULTS.ridge, method: Method = "auto",
              chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> FamilyFit:
    """:class:`ErrorFit` (b*, R² of the error and of ‖error‖², FVUs) of every reconstruction of x [N, d] in one pass.

    ``reconstructions``: sparse codes or dense x_hat arrays [N, d]; ``mask``: the fit rows (default
    :func:`split_mask` of ``fit_tokens`` and ``seed``); ``design``: x moments already accumulated on the same rows
    and mask (they are then not accumulated again). ``method``: how cross moments of codes are formed
    (:func:`choose_method`). Memory O(d² + d·d_sae) per SAE, independent of N.
    """
    n, d = x.shape
    recons = [as_reconstruction(r) for r in reconstructions]
    for i, r in enumerate(recons):
        if r.n_rows != n or (isinstance(r, DenseReconstruction) and r.d != d):
            shape = (r.n_rows, r.d if isinstance(r, DenseReconstruction) else r.W_dec.shape[1])
            raise ValueError(f"reconstruction {i} has shape {shape} but x has {tuple(x.shape)}; they must match.")
    if mask is None:
        mask = split_mask(n, fit_tokens, seed)
    if design is not None and design.fit.n != int(mask.sum()):
        raise ValueError(f"the design was built on {design.fit.n} fit rows but the mask selects {int(mask.sum())}; "
                         "pass the mask the design was built with.")
    accs = [_ErrorSums(r, choose_method(method, r, d), 2, d) for r in recons]
    xs = XSums() if design is None else None
    for chunk in chunks(x, mask, None if design is None else design.shift, chunk_rows=chunk_rows,
                        progress=progress, desc=f"decompose ({len(recons)} SAEs)"):
        if xs is not None:
            xs.add(chunk)
        for acc in accs:
            acc.add_chunk(chunk)
    if design is None:
        assert xs is not None
        fit_x, test_x = xs.moments()
        design = Design(fit_x, test_x, intercept=intercept, ridge=ridge)
    xms = [design.fit, design.test]  # type: ignore[list-item]
    no_intercept = design.without_intercept()
    fits = []
    for i, acc in enumerate(accs):
        vector, norms = acc.moments(xms)
        fits.append(error_fit(design, vector, norms, no_intercept))
        log.info("SAE %d/%d: FVU %.4f, nonlinear %.4f, R² vector %.4f", i + 1, len(accs), fits[-1].fvu_total,
                 fits[-1].fvu_nonlinear, fits[-1].r2_vector.r2_mean_dims if fits[-1].r2_vector else float("nan"))
    return FamilyFit(design, mask, fits)

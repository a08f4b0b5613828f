"""The second pass of the error decomposition (:mod:`darkmatter.errors.decompose` is the first): with b* known,
per token ‖x‖, ‖x_hat‖, ‖error‖, ‖LinearError‖, ‖NonlinearError‖, cosine and L0; the reconstruction and sparsity
metrics (:mod:`darkmatter.errors.metrics`); and, per eval context, the test rows' sums that let analyses resample
the held-out R² (:class:`darkmatter.regression.GroupSums`). Also both passes for one reconstruction
(:func:`decompose_error`) and the dense error components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from darkmatter.errors.decompose import (
    ErrorFit,
    FamilyFit,
    Reconstruction,
    as_reconstruction,
    decompose_family,
)
from darkmatter.errors.metrics import ReconstructionAccumulator, TokenSums, row_dot
from darkmatter.regression import (
    CHUNK_ROWS,
    ArrayLike,
    Design,
    GroupSums,
    GroupSumsAccumulator,
    LinearFit,
    as_f64,
    chunks,
    row_chunks,
)
from darkmatter.sae.codes import SparseCodes


@dataclass(frozen=True)
class ErrorParts:
    """Per token (float32 [N]; l0 int16, None for a dense reconstruction): x_norm, x_hat_norm, error_norm,
    error_norm_sq, linear_error_norm, nonlinear_error_norm, cosine, l0; ``metrics``: the reconstruction and
    sparsity metrics (:meth:`ReconstructionAccumulator.summary`); ``test_sums``: per-group test-row sums of the
    target [error, ‖error‖²] and its residual under (b*, a) (None without groups)."""

    tokens: dict[str, np.ndarray | None]
    metrics: dict[str, float | int]
    test_sums: GroupSums | None


class _PartsAccumulator:
    def __init__(self, recon: Reconstruction, fit: ErrorFit, design: Design, n: int, groups: np.ndarray | None):
        self.recon = recon
        d = design.fit.shift.shape[0]
        # [b* | a] and its offset c = s·[b* | a] + [b0 | a0]: predictions from x̃ = x − s in one float32 GEMM
        assert fit.norm_map is not None, "the family fit regresses ‖error‖² too"
        maps = [fit.linear_map, fit.norm_map]
        coef = np.concatenate([m.coef for m in maps], axis=1)
        offset = design.shift @ coef + np.concatenate([m.intercept for m in maps])
        self.coef, self.offset, self.d = torch.from_numpy(coef).float(), torch.from_numpy(offset).float(), d
        self.metrics = ReconstructionAccumulator(recon.d_sae if isinstance(recon, SparseCodes) else None)
        names = ("x_norm", "x_hat_norm", "error_norm", "error_norm_sq", "linear_error_norm", "nonlinear_error_norm",
                 "cosine")
        self.tokens: dict[str, np.ndarray | None] = {k: np.empty(n, np.float32) for k in names}
        self.tokens["l0"] = np.empty(n, np.int16) if isinstance(recon, SparseCodes) else None
        self.sums = None if groups is None else GroupSumsAccumulator(groups)

    def add_chunk(self, chunk, x_norm_sq: Tensor, test: np.ndarray, groups: np.ndarray | None) -> None:
        """One chunk of x (in row order): float32 arithmetic throughout (the per-token values are stored as float32),
        float64 only where sums accumulate over tokens."""
        sl, r = chunk.sl, self.recon
        state = r.rows(sl)
        x = chunk.x.float()
        x_hat = r.x_hat_of(state).float()
        e = x - x_hat  # SaeError, rounded once
        t: TokenSums = self.metrics.add(TokenSums(x_norm_sq, row_dot(x_hat, x_hat), row_dot(x, x_hat), row_dot(e, e)))
        pred = torch.addmm(self.offset, chunk.xt32, self.coef)  # [n, d + 1]: LinearError and the ‖e‖² map
        linear = pred[:, : self.d]
        nonlinear = e - linear
        tok, vn = self.tokens, torch.linalg.vector_norm
        for key, value in (("x_norm", x_norm_sq.sqrt()), ("x_hat_norm", t.x_hat_norm_sq.sqrt()),
                           ("error_norm", t.error_norm_sq.sqrt()), ("error_norm_sq", t.error_norm_sq),
                           ("cosine", t.cosine), ("linear_error_norm", vn(linear, dim=1)),
                           ("nonlinear_error_norm", vn(nonlinear, dim=1))):
            tok[key][sl] = value.numpy()  # type: ignore[index]
        l0 = r.l0(state)
        if l0 is not None:
            tok["l0"][sl] = l0.numpy()  # type: ignore[index]
            self.metrics.latents.update_codes(*state)  # type: ignore[union-attr]
        if self.sums is not None and test.any():
            m = torch.from_numpy(test)
            y = torch.cat([e[m], t.error_norm_sq[m, None]], dim=1)
            self.sums.add(groups[test], y, y - pred[m])  # type: ignore[index]

    def result(self, total_ss: float) -> ErrorParts:
        return ErrorParts(self.tokens, self.metrics.summary(total_ss),
                          None if self.sums is None else self.sums.result())


def error_parts(x: ArrayLike, reconstructions: Sequence[Reconstruction | ArrayLike], family: FamilyFit, *,
                groups: np.ndarray | None = None, chunk_rows: int = CHUNK_ROWS,
                progress: bool = False) -> list[ErrorParts]:
    """The second pass over x (module docstring): per-token norms, metrics and, when ``groups`` [N] (e.g. each
    row's eval context) is given, the per-group sums of the test rows for resampled R², for every reconstruction
    of ``family`` (the result of :func:`decompose_family` on the same x and reconstructions)."""
    n = x.shape[0]
    recons = [as_reconstruction(r) for r in reconstructions]
    if len(recons) != len(family.fits):
        raise ValueError(f"{len(recons)} reconstructions but {len(family.fits)} fits.")
    if groups is not None and np.shape(groups) != (n,):
        raise ValueError(f"groups has shape {np.shape(groups)}, expected ({n},).")
    accs = [_PartsAccumulator(r, f, family.design, n, groups) for r, f in zip(recons, family.fits, strict=True)]
    for chunk in chunks(x, None, family.design.shift, chunk_rows=chunk_rows, progress=progress,
                        desc=f"error parts ({len(recons)} SAEs)"):
        xc = chunk.x.float()
        x_norm_sq = row_dot(xc, xc)  # shared by the SAEs
        test = ~np.asarray(family.mask[chunk.sl])
        g = None if groups is None else np.asarray(groups[chunk.sl])
        for acc in accs:
            acc.add_chunk(chunk, x_norm_sq, test, g)
    total_ss = family.design.all_rows.total_ss
    return [acc.result(total_ss) for acc in accs]


# --------------------------------------------------------------------------------------------- one SAE


@dataclass(frozen=True)
class ErrorDecomposition:
    """:class:`ErrorFit` and :class:`ErrorParts` of one reconstruction."""

    fit: ErrorFit
    parts: ErrorParts


def decompose_error(x: ArrayLike, x_hat: Reconstruction | ArrayLike, *, groups: np.ndarray | None = None,
                    **kwargs) -> ErrorDecomposition:
    """Both passes for one reconstruction (dense x_hat [N, d] or sparse codes); ``kwargs`` as for :func:`decompose_family`
    (mask, fit_tokens, seed, intercept, ridge, chunk_rows, progress)."""
    family = decompose_family(x, [x_hat], **kwargs)
    parts = error_parts(x, [x_hat], family, groups=groups, chunk_rows=kwargs.get("chunk_rows", CHUNK_ROWS),
                        progress=kwargs.get("progress", False))
    return ErrorDecomposition(family.fits[0], parts[0])


def error_components(x: ArrayLike, x_hat: ArrayLike, linear_map: LinearFit, chunk_rows: int = CHUNK_ROWS,
                     dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(LinearError, NonlinearError) [N, d] each, as dense arrays; x = x_hat + LinearError + NonlinearError."""
    lin = linear_map.predict(x, chunk_rows, np.float64)
    nonlin = np.empty_like(lin, dtype=dtype)
    for sl in row_chunks(x.shape[0], chunk_rows):
        nonlin[sl] = (as_f64(x[sl]) - as_f64(x_hat[sl]) - torch.from_numpy(lin[sl])).numpy()
    return lin.astype(dtype, copy=False), nonlin

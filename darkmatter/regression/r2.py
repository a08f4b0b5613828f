"""Coefficients of determination, held-out fits, and the per-group sums that let R² be resampled by group.

R² on the held-out split: R²_j = 1 − SS_res,j / SS_tot,j per output dimension j, SS_tot about the *test-set* mean;
``r2_mean_dims`` = the mean over dimensions (the paper's number; scikit-learn ``multioutput="uniform_average"``);
``r2_pooled`` = 1 − Σ_j SS_res,j / Σ_j SS_tot,j (one sum of squares over all entries about the per-dimension mean
vector, like FVU; scikit-learn ``"variance_weighted"``).

:class:`GroupSums` holds, per group of test rows (an eval context), n, Σ(y − t), Σ(y − t)² and Σ(y − ŷ)² per
output dimension for fixed maps. A resample with multiplicities w over groups then scores
SS_res = Σ_g w_g R_g and SS_tot = Σ_g w_g Q_g − (Σ_g w_g S_g)² / Σ_g w_g n_g, i.e. R² about the resample's own
test mean, with no pass over the rows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from darkmatter.regression.moments import CHUNK_ROWS, ArrayLike, as_f64, row_chunks


@dataclass(frozen=True)
class R2Scores:
    """Coefficient of determination of a vector target (module docstring for the conventions).

    per_dim [p]: 1 − SS_res,j/SS_tot,j (NaN where SS_tot,j = 0); r2_mean_dims: their mean over finite dims (the
    paper's number); r2_pooled: 1 − ΣSS_res/ΣSS_tot.
    """

    per_dim: np.ndarray
    r2_mean_dims: float
    r2_pooled: float

    def __iter__(self):  # allows ``per_dim, mean_dims, pooled = r2_scores(...)``
        return iter((self.per_dim, self.r2_mean_dims, self.r2_pooled))


def r2_from_ss(ss_res: np.ndarray, ss_tot: np.ndarray, warn: bool = True) -> R2Scores:
    """R² from per-dimension residual and total sums of squares (both [p], float64)."""
    ss_res, ss_tot = np.atleast_1d(ss_res), np.atleast_1d(ss_tot)
    ok = ss_tot > 0
    per_dim = np.full(ss_tot.shape, np.nan)
    per_dim[ok] = 1 - ss_res[ok] / ss_tot[ok]
    if warn and not ok.all():
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


# --------------------------------------------------------------------------------------------- by group


@dataclass(frozen=True)
class GroupSums:
    """Per-group sums over test rows (module docstring): groups [G] (e.g. eval context ids), n [G], and per output
    dimension sum, sum_sq and res_sq [G, p] (Σ(y − t), Σ(y − t)², Σ(y − ŷ)² about one fixed shift t)."""

    groups: np.ndarray
    n: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    res_sq: np.ndarray

    def ss(self, weights: np.ndarray, cols: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(SS_res, SS_tot), each [B, p'], of the columns ``cols`` for group multiplicities ``weights`` [B, G]."""
        w = np.asarray(weights, dtype=np.float64)
        n, s, q = w @ self.n, w @ self.sum[:, cols], w @ self.sum_sq[:, cols]
        return w @ self.res_sq[:, cols], np.maximum(q - s**2 / n[:, None], 0.0)

    def r2(self, cols: slice = slice(None), weights: np.ndarray | None = None) -> list[R2Scores]:
        """R² of the columns ``cols`` for every resample in ``weights`` [B, G] (default: each group once)."""
        w = np.ones((1, len(self.n))) if weights is None else weights
        res, tot = self.ss(w, cols)
        return [r2_from_ss(res[b], tot[b], warn=weights is None) for b in range(len(w))]

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(getattr(self, k)) for k in ("groups", "n", "sum", "sum_sq", "res_sq")},
                  str(path))

    @classmethod
    def load(cls, path: str | Path) -> GroupSums:
        from darkmatter.io import load_safetensors

        return cls(**load_safetensors(path, numpy=True))


class GroupSumsAccumulator:
    """Builds :class:`GroupSums` from chunks of test rows: ``add(group_ids [n], y [n, p], residual [n, p])``."""

    def __init__(self, groups: np.ndarray):
        self.groups = np.unique(groups)
        self._acc: dict[str, torch.Tensor] | None = None
        self._shift: torch.Tensor | None = None

    def add(self, group_ids: np.ndarray, y: torch.Tensor, residual: torch.Tensor) -> None:
        y, residual = y.double(), residual.double()
        if self._shift is None:  # a fixed shift (the first rows' mean): no cancellation in Q − S²/n
            self._shift = y.mean(0)
            g, p = len(self.groups), y.shape[1]
            self._acc = {k: torch.zeros(g, p, dtype=torch.float64) for k in ("sum", "sum_sq", "res_sq")}
            self._acc["n"] = torch.zeros(g, dtype=torch.float64)
        assert self._acc is not None
        idx = torch.from_numpy(np.searchsorted(self.groups, group_ids).astype(np.int64))
        yt = y - self._shift
        self._acc["n"].index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
        self._acc["sum"].index_add_(0, idx, yt)
        self._acc["sum_sq"].index_add_(0, idx, yt.pow(2))
        self._acc["res_sq"].index_add_(0, idx, residual.pow(2))

    def result(self) -> GroupSums:
        if self._acc is None:
            raise ValueError("there are no test rows to score.")
        used = self._acc["n"].numpy() > 0  # groups without test rows are left out
        return GroupSums(self.groups[used], *(self._acc[k].numpy()[used] for k in ("n", "sum", "sum_sq", "res_sq")))

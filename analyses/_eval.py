"""Helpers for the analyses that read activation and error *vectors* (not only the DuckDB store).

- :func:`eval_split` — the eval activations of a hook, each row's context, and the regression split that
  ``measure_errors`` used (:func:`darkmatter.regression.split_mask` with the decomposition settings).
- Held-out R² with bootstrap intervals over eval contexts. Tokens of one context are correlated, so the unit of
  resampling is the context. A map is fitted once on the fit split (:class:`darkmatter.regression.Design`) and kept
  fixed; per context c the test rows give n_c, S_c = Σ(y − t), Q_c = Σ(y − t)² and R_c = Σ(y − ŷ)² per output
  dimension (t: a fixed shift). A replicate draws the C contexts with replacement (multiplicities w [C], the scheme
  of analyses/ce_contributions.py) and scores, with :func:`darkmatter.regression.r2_from_ss`,

      SS_res = Σ_c w_c R_c,        SS_tot = Σ_c w_c Q_c − (Σ_c w_c S_c)² / Σ_c w_c n_c

  (SS_tot about the replicate's own test mean, as SCIENCE.md §1 asks). The interval thus covers the sampling of
  evaluation contexts, not the refit of the map (a refit would need per-context d × d Gram matrices).
- :func:`encode_rows` — an SAE's sparse codes of a token subsample and its per-latent statistics.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from analyses._common import decomposition
from darkmatter.analysis import AnalysisContext
from darkmatter.evaluate import chunk_tokens_for
from darkmatter.family_fit import SparseCodes
from darkmatter.regression import (
    CHUNK_ROWS,
    ArrayLike,
    Design,
    LinearFit,
    TargetMoments,
    as_f64,
    r2_from_ss,
    row_chunks,
    split_mask,
    stream_moments,
)
from darkmatter.sae import Sae

log = logging.getLogger(__name__)

Target = Callable[[np.ndarray], ArrayLike]  # row ids [n] (sorted) -> target rows [n, p]


@dataclass(frozen=True)
class EvalSplit:
    """x: float32 memmap [N, d] of one hook; contexts: int64 [N]; fit: bool [N], True on the regression's fit rows."""

    x: np.ndarray
    contexts: np.ndarray
    fit: np.ndarray

    @property
    def fit_rows(self) -> np.ndarray:
        return np.flatnonzero(self.fit)

    @property
    def test_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.fit)


def eval_split(ctx: AnalysisContext, hook: str) -> EvalSplit:
    """The eval rows of ``hook`` with the split of the stored decomposition (``params['decomposition']``)."""
    store = ctx.eval_store()
    x = store.activations(hook)
    dc = decomposition(ctx)
    contexts = store.index()["context"].to_numpy().astype(np.int64)
    if contexts.shape[0] != x.shape[0]:
        raise ValueError(f"{store.folder}: index.parquet has {contexts.shape[0]} rows but {hook}.npy has {x.shape[0]}.")
    return EvalSplit(x, contexts, split_mask(x.shape[0], dc.fit_tokens, dc.seed))


class Rows:
    """The rows ``idx`` (sorted) of a function of row ids, row-sliceable like an array [len(idx), width]."""

    def __init__(self, get: Target, idx: np.ndarray, width: int):
        self._get, self.idx = get, idx
        self.shape = (len(idx), width)

    def __getitem__(self, sl: slice) -> ArrayLike:
        return self._get(self.idx[sl])


def fit_moments(design: Design, x: np.ndarray, target: Target, fit_rows: np.ndarray, width: int) -> TargetMoments:
    """:class:`TargetMoments` of ``target`` over the fit rows only, about the design's shift (the test rows are
    scored per context by :func:`context_sums` instead, so their cross moments are never formed)."""
    fit, _ = stream_moments(Rows(lambda i: x[i], fit_rows, x.shape[1]), Rows(target, fit_rows, width),
                            shift_x=design.shift, gram=False)
    return fit.target_moments()


@dataclass(frozen=True)
class ContextSums:
    """Per-context sums over the test rows (module docstring): n [C], sum/sum_sq [C, p], res_sq name → [C, p]."""

    n: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    res_sq: dict[str, np.ndarray]

    @property
    def n_contexts(self) -> int:
        return int(self.n.shape[0])

    def ss(self, name: str, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(SS_res, SS_tot), each [B, p], for context multiplicities ``weights`` [B, C]."""
        w = np.asarray(weights, dtype=np.float64)
        n, s, q = w @ self.n, w @ self.sum, w @ self.sum_sq
        return w @ self.res_sq[name], np.maximum(q - s**2 / n[:, None], 0.0)


def context_sums(x: np.ndarray, target: Target, test_rows: np.ndarray, contexts: np.ndarray,
                 fits: dict[str, LinearFit], chunk_rows: int = CHUNK_ROWS) -> ContextSums:
    """Stream the test rows once: per-context n, S, Q of ``target`` and R of each fitted map (float64).

    Cost per row: d·p multiply-adds per map (the prediction). Contexts without test rows are left out.
    """
    used, inverse = np.unique(contexts[test_rows], return_inverse=True)
    n_ctx, shift = used.shape[0], None
    acc: dict[str, torch.Tensor] = {}
    for sl in row_chunks(len(test_rows), chunk_rows):
        idx = test_rows[sl]
        xc, yc = as_f64(x[idx]), as_f64(target(idx))
        if shift is None:  # about the first chunk's mean: no cancellation in Q − S²/n
            shift = yc.mean(0)
            acc = {k: torch.zeros(n_ctx, yc.shape[1], dtype=torch.float64) for k in ("sum", "sum_sq", *fits)}
            acc["n"] = torch.zeros(n_ctx, dtype=torch.float64)
        c = torch.from_numpy(inverse[sl].astype(np.int64))
        yt = yc - shift
        acc["n"].index_add_(0, c, torch.ones(len(idx), dtype=torch.float64))
        acc["sum"].index_add_(0, c, yt)
        acc["sum_sq"].index_add_(0, c, yt.pow(2))
        for name, fit in fits.items():
            acc[name].index_add_(0, c, (yc - torch.from_numpy(fit.predict(xc))).pow(2))
    if shift is None:
        raise ValueError("there are no test rows to score.")
    return ContextSums(acc["n"].numpy(), acc["sum"].numpy(), acc["sum_sq"].numpy(),
                       {name: acc[name].numpy() for name in fits})


def multiplicities(n_contexts: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_contexts] counts of each context in a resample of n_contexts drawn with replacement."""
    return np.random.default_rng(seed).multinomial(n_contexts, np.full(n_contexts, 1 / n_contexts), size=n_boot)


def r2_interval(sums: ContextSums, name: str, cols: slice, weights: np.ndarray,
                confidence: float) -> dict[str, float]:
    """Held-out R² of map ``name`` on output columns ``cols`` with percentile intervals over ``weights`` [B, C].

    Keys: mean_dims, pooled (the point estimates on all test rows) and <key>_low / <key>_high (NaN without
    resamples). For one column mean_dims = pooled.
    """
    ss_res, ss_tot = sums.ss(name, np.ones((1, sums.n_contexts)))
    point = r2_from_ss(ss_res[0, cols], ss_tot[0, cols])
    out = {"mean_dims": point.r2_mean_dims, "pooled": point.r2_pooled}
    draws = np.full((len(weights), 2), np.nan)
    if len(weights):
        ss_res, ss_tot = sums.ss(name, weights)
        with warnings.catch_warnings():  # a dimension constant in one resample: already reported by the point
            warnings.simplefilter("ignore", RuntimeWarning)
            for b in range(len(weights)):
                r2 = r2_from_ss(ss_res[b, cols], ss_tot[b, cols])
                draws[b] = r2.r2_mean_dims, r2.r2_pooled
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    for j, key in enumerate(("mean_dims", "pooled")):
        ok = draws[:, j][np.isfinite(draws[:, j])]
        low, high = np.quantile(ok, tails) if ok.size else (np.nan, np.nan)
        out[f"{key}_low"], out[f"{key}_high"] = float(low), float(high)
    return out


def subsample(n_rows: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_rows)`` sorted row ids drawn without replacement by ``np.random.default_rng(seed)``."""
    if n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, n, replace=False))


@dataclass(frozen=True)
class LatentStats:
    """Per-latent counts over n_tokens rows: fire_count [d_sae] (tokens with f_i > 0) and activation_sum [d_sae]
    (Σ f_i) — the fields of :class:`darkmatter.metrics.LatentAccumulator`, taken from sparse codes."""

    n_tokens: int
    fire_count: np.ndarray
    activation_sum: np.ndarray

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean over all tokens, zeros included [d_sae]."""
        return self.activation_sum / max(self.n_tokens, 1)

    @property
    def mean_when_active(self) -> np.ndarray:
        """Mean over the tokens where the latent fires [d_sae]; NaN for a latent that never fires."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.activation_sum / self.fire_count


@torch.inference_mode()
def encode_rows(sae: Sae, x: ArrayLike) -> tuple[SparseCodes, LatentStats]:
    """Sparse codes of ``x [n, d_in]`` (float32 rows in memory) under ``sae`` and its per-latent statistics.

    Codes keep each row's nonzero latents (top_indices/top_values [n, max L0], zero-padded), so a reconstruction
    costs n·L0·d (``SparseCodes.x_hat``). A ``topk`` SAE's codes are taken straight from its pre-activations
    (Sae.activate's rule: the k largest, then ReLU) without forming dense latents; other architectures go through
    ``Sae.encode`` one chunk at a time (:func:`darkmatter.evaluate.chunk_tokens_for`). Statistics come from the
    codes by ``bincount`` (n·L0 instead of n·d_sae).
    """
    n = x.shape[0]
    idx_parts, val_parts = [], []
    chunk = chunk_tokens_for(sae.d_sae)
    for start in range(0, n, chunk):
        xb = torch.as_tensor(np.asarray(x[start:start + chunk], dtype=np.float32))
        if sae.architecture == "topk":
            assert sae.k is not None
            vals, ids = sae.pre_acts(xb).topk(sae.k, dim=1)
            vals = vals.relu()
        else:
            f = sae.encode(xb)
            vals, ids = f.topk(max(int((f != 0).sum(1).max()), 1), dim=1)
        idx_parts.append(ids)
        val_parts.append(vals)
    width = max(p.shape[1] for p in idx_parts)
    pad = torch.nn.functional.pad
    ids = torch.cat([pad(i, (0, width - i.shape[1])) for i in idx_parts])
    vals = torch.cat([pad(v, (0, width - v.shape[1])) for v in val_parts])
    flat_ids, flat_vals = ids.reshape(-1).numpy(), vals.reshape(-1).double().numpy()
    stats = LatentStats(n, np.bincount(flat_ids[flat_vals > 0], minlength=sae.d_sae),
                        np.bincount(flat_ids, weights=flat_vals, minlength=sae.d_sae))
    return SparseCodes(ids, vals, sae.W_dec.detach(), sae.b_dec.detach()), stats

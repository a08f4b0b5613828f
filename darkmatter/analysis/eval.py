"""The eval split as the analyses that read activation vectors see it: rows, contexts, the stored fit split,
held-out fits of new targets on that split with per-context test sums (for resampled R²), and per-context sums of x
and of the stored error norms (for resampled pooled FVUs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.stats import pooled_fvu
from darkmatter.regression import (
    CHUNK_ROWS,
    ArrayLike,
    Design,
    GroupSums,
    GroupSumsAccumulator,
    LazyRows,
    LinearFit,
    as_f64,
    row_chunks,
    stream_moments,
)

Target = Callable[[np.ndarray], ArrayLike]  # sorted row ids [n] -> target rows [n, p]


@dataclass(frozen=True)
class EvalSplit:
    """x: float32 memmap [N, d] of one hook; contexts: int64 [N]; fit: bool [N], True on the stored fit rows."""

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
    """The eval rows of ``hook`` with the fit split of the stored decomposition."""
    store = ctx.eval_store()
    x = store.activations(hook)
    contexts = store.index()["context"].to_numpy().astype(np.int64)
    fit = ctx.fit_mask(hook)
    if not contexts.shape[0] == fit.shape[0] == x.shape[0]:
        raise ValueError(f"{store.folder}: index.parquet has {contexts.shape[0]} rows, {hook}.npy {x.shape[0]} and "
                         f"the stored split {fit.shape[0]}; rerun measure_errors.")
    return EvalSplit(x, contexts, fit)


def heldout_by_context(design: Design, split: EvalSplit, target: Target, width: int,
                       chunk_rows: int = CHUNK_ROWS) -> tuple[LinearFit, GroupSums]:
    """Fit ``target`` (row ids → [n, width]) on x over the split's fit rows with ``design`` (its x moments, same
    rows); stream the test rows once for their per-context sums (n, Σ(y − t), Σ(y − t)², Σ(y − ŷ)², float64)."""
    x, fit_rows = split.x, split.fit_rows
    m = stream_moments(LazyRows(x.shape[0], x.shape[1], x.__getitem__, fit_rows, x.dtype),
                       LazyRows(x.shape[0], width, target, fit_rows), shift_x=design.shift, gram=False,
                       chunk_rows=chunk_rows)
    assert m.y is not None
    lin = design.solve(m.y[0])
    acc = GroupSumsAccumulator(split.contexts)
    test = split.test_rows
    for sl in row_chunks(len(test), chunk_rows):
        idx = test[sl]
        y = as_f64(target(idx))
        acc.add(split.contexts[idx], y, y - as_f64(lin.predict(x[idx])))
    return lin, acc.result()


@dataclass(frozen=True)
class ContextSums:
    """Per eval context (``contexts`` sorted [C]) of some rows: token count n [C], Σx [C, d] and Σ‖x‖² [C] in
    float64 — the pooled FVU's denominator for any resample of contexts (:func:`darkmatter.analysis.stats.pooled_fvu`)."""

    contexts: np.ndarray
    n: np.ndarray
    x_sum: np.ndarray
    x_sq: np.ndarray

    def fvu(self, sse: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Pooled FVU [B, m] of per-context error sums ``sse`` [C, m] (in ``contexts`` order) for the resamples
        ``weights`` [B, C] (None: every context once, B = 1)."""
        return pooled_fvu(sse, self.n, self.x_sum, self.x_sq, weights)


def context_sums(ctx: AnalysisContext, hook: str, rows: np.ndarray | None = None) -> ContextSums:
    """:class:`ContextSums` of the eval ``rows`` (sorted; default: all) of ``hook``, in one pass over them."""
    store = ctx.eval_store()
    x_all = store.activations(hook)
    contexts_of = store.index()["context"].to_numpy().astype(np.int64)
    rows = np.arange(len(contexts_of)) if rows is None else np.asarray(rows)
    contexts, group = np.unique(contexts_of[rows], return_inverse=True)
    x_sum, x_sq = np.zeros((len(contexts), x_all.shape[1])), np.zeros(len(contexts))
    for sl in row_chunks(len(rows), CHUNK_ROWS):
        x = np.asarray(x_all[rows[sl]], dtype=np.float64)
        np.add.at(x_sum, group[sl], x)
        x_sq += np.bincount(group[sl], (x * x).sum(1), len(contexts))
    return ContextSums(contexts, np.bincount(group, minlength=len(contexts)).astype(np.float64), x_sum, x_sq)


def error_sums_by_context(ctx: AnalysisContext, sae_ids: list[str], contexts: np.ndarray, table: str = "token_errors",
                          where: str = "TRUE") -> dict[str, np.ndarray]:
    """Per SAE, the per-context sums [C, 2] of ‖SaeError‖² and ‖NonlinearError‖² over the rows of ``contexts``
    (sorted) in the store's ``table`` (token_errors, or pursuit_errors with ``where`` choosing a method)."""
    with ctx.connect() as con:
        sums = con.sql(f"""SELECT e.sae_id, t.context, sum(e.error_norm_sq::DOUBLE) AS sse,
                                  sum(e.nonlinear_error_norm::DOUBLE * e.nonlinear_error_norm) AS sse_nonlinear
                           FROM {table} e JOIN tokens t USING (row)
                           WHERE list_contains(?, e.sae_id) AND list_contains(?, t.context) AND {where}
                           GROUP BY ALL""", params=[sae_ids, [int(c) for c in contexts]]).pl()
    index = np.searchsorted(contexts, sums["context"].to_numpy())
    out = {sae_id: np.zeros((len(contexts), 2)) for sae_id in sae_ids}
    for sae_id, i, sse, nl in zip(sums["sae_id"], index, sums["sse"], sums["sse_nonlinear"], strict=True):
        out[sae_id][i] = sse, nl
    return out

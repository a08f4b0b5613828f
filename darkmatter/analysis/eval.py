"""The eval split as the analyses that read activation vectors see it: rows, contexts, the stored fit split, and
held-out fits of new targets on that split with per-context test sums (for resampled R²)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from darkmatter.analysis.context import AnalysisContext
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

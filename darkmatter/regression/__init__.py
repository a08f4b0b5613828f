"""Streaming least squares from float64 sufficient statistics, with held-out R² (the building block of every fit).

:mod:`~darkmatter.regression.moments` streams rows into moments (one engine for any number of targets),
:mod:`~darkmatter.regression.solve` factorises a design once and solves any target from its moments,
:mod:`~darkmatter.regression.r2` scores held-out R², also per group of rows for resampling.
"""

from darkmatter.regression.moments import (
    CHUNK_ROWS,
    DEFAULTS,
    TILE_ROWS,
    ArrayLike,
    Chunk,
    LazyRows,
    Moments,
    TargetMoments,
    TargetSums,
    XMoments,
    XSums,
    as_f64,
    as_tensor,
    chunks,
    load_moments,
    row_chunks,
    save_moments,
    split_mask,
    stream_moments,
)
from darkmatter.regression.r2 import GroupSums, GroupSumsAccumulator, R2Scores, r2_from_ss, r2_scores
from darkmatter.regression.solve import (
    RCOND,
    Design,
    HeldoutFit,
    LinearFit,
    fit_linear,
    group_test_sums,
    group_test_sums_of,
    heldout_group_sums,
    heldout_r2,
    residual_ss,
)

__all__ = [
    "CHUNK_ROWS", "DEFAULTS", "RCOND", "TILE_ROWS", "ArrayLike", "Chunk", "Design", "GroupSums",
    "GroupSumsAccumulator", "HeldoutFit", "LazyRows", "LinearFit", "Moments", "R2Scores", "TargetMoments",
    "TargetSums", "XMoments", "XSums", "as_f64", "as_tensor", "chunks", "fit_linear", "group_test_sums",
    "group_test_sums_of", "heldout_group_sums", "heldout_r2", "load_moments", "r2_from_ss", "r2_scores",
    "residual_ss", "row_chunks", "save_moments", "split_mask", "stream_moments",
]

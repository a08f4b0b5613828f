"""The statistics analyses share: held-out R² on the store's split, R² resampled over documents, trends.

Intervals are percentile cluster bootstraps over source documents: tokens of one context are correlated, and so are
the contexts cut from one long document (a State of the Union message, a stdlib module), so the document is the unit
of resampling (:func:`cluster_multiplicities`). Sums are kept per eval context and a resample weights each context
by its document's multiplicity. A held-out R² is resampled from per-context test sums
(:class:`darkmatter.regression.GroupSums`) with the fitted map held fixed: the interval covers the sampling of
evaluation documents, not the refit of the map.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from darkmatter.regression import GroupSums, GroupSumsAccumulator, heldout_group_sums

RESAMPLING_UNIT = "document"  # what every interval resamples (named in the analyses' summaries)


def multiplicities(n_groups: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_groups] counts of each group in a resample of n_groups drawn with replacement."""
    return np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)


def resampling_summary(table) -> dict[str, int | str]:
    """The resampling fields of :meth:`AnalysisContext.resampling` from the first row of an analysis table that
    carries them (empty otherwise): every summary names what its intervals resample."""
    keys = ("resampling_unit", "n_documents", "n_contexts", "bootstrap")
    if table.is_empty() or not all(k in table.columns for k in keys):
        return {}
    row = table.row(0, named=True)
    return {k: row[k] if k == "resampling_unit" else int(row[k]) for k in keys}


def cluster_multiplicities(clusters: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, G] multiplicities of G groups (e.g. eval contexts) when their clusters (``clusters`` [G], e.g. each
    context's document) are drawn with replacement: a group counts as often as its cluster was drawn."""
    labels, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    return multiplicities(len(labels), n_boot, seed)[:, inverse.reshape(-1)]


def r2_interval(sums: GroupSums, cols: slice, weights: np.ndarray, confidence: float) -> dict[str, float]:
    """Held-out R² of the output columns ``cols`` with percentile intervals over resamples ``weights`` [B, G].

    Keys: mean_dims, pooled (the point estimates on all test rows) and <key>_low / <key>_high (NaN without
    resamples). For one column mean_dims = pooled.
    """
    point = sums.r2(cols)[0]
    out = {"mean_dims": point.r2_mean_dims, "pooled": point.r2_pooled}
    draws = np.full((len(weights), 2), np.nan)
    if len(weights):
        with warnings.catch_warnings():  # a dimension constant in one resample: already reported by the point
            warnings.simplefilter("ignore", RuntimeWarning)
            for b, r2 in enumerate(sums.r2(cols, weights)):
                draws[b] = r2.r2_mean_dims, r2.r2_pooled
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    for j, key in enumerate(("mean_dims", "pooled")):
        ok = draws[:, j][np.isfinite(draws[:, j])]
        low, high = np.quantile(ok, tails) if ok.size else (np.nan, np.nan)
        out[f"{key}_low"], out[f"{key}_high"] = float(low), float(high)
    return out


def test_sums_on_fit_flag(features: np.ndarray, y: np.ndarray, fit: np.ndarray, groups: np.ndarray) -> GroupSums:
    """Per-group test-row sums (:class:`GroupSums`, for resampled R²) of the affine least-squares fit
    ``y ≈ features·β + β₀`` on the rows where ``fit`` is True.

    ``features`` [N] or [N, p], ``y`` [N], ``fit`` [N] bool (the store's ``fit`` flag), ``groups`` [N] (e.g. each
    row's eval context). Columns constant on the fit rows are dropped (an affine fit cannot use them; e.g. L0 of a
    TopK SAE); with none left the prediction is the fit-row mean, so R² = 1 − Σ(y − ȳ_fit)²/Σ(y − ȳ_test)² ≤ 0.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=np.float64)
    fit = np.asarray(fit, dtype=bool)
    if fit.all() or not fit.any():
        raise ValueError(f"the fit flag marks {int(fit.sum())} of {fit.size} rows; both splits must be non-empty.")
    varying = np.ptp(x[fit], axis=0) > 0
    if varying.any():
        return heldout_group_sums(x[:, varying], y, fit, groups)[1]
    test = np.asarray(groups)[~fit]
    acc = GroupSumsAccumulator(test)
    acc.add(test, torch.from_numpy(y[~fit, None]), torch.from_numpy((y[~fit] - y[fit].mean())[:, None]))
    return acc.result()


def r2_on_fit_flag(features: np.ndarray, y: np.ndarray, fit: np.ndarray) -> float:
    """Test-split R² of the fit of :func:`test_sums_on_fit_flag` (all test rows as one group)."""
    return float(test_sums_on_fit_flag(features, y, fit, np.zeros(len(y), dtype=np.int64)).r2()[0].r2_pooled)


def r2_interval_on_fit_flag(features: np.ndarray, y: np.ndarray, fit: np.ndarray, groups: np.ndarray,
                            resample_weights, confidence: float) -> tuple[float, float, float]:
    """(R², low, high): :func:`r2_on_fit_flag` with the percentile interval over resamples of the groups;
    ``resample_weights(group_ids)`` gives their multiplicities [B, G] (e.g. AnalysisContext.resample_weights)."""
    sums = test_sums_on_fit_flag(features, y, fit, groups)
    r2 = r2_interval(sums, slice(0, 1), resample_weights(sums.groups), confidence)
    return r2["pooled"], r2["pooled_low"], r2["pooled_high"]


def trend(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float, float]:
    """OLS slope of y on x with its two-sided t interval at ``level``: (slope, low, high).

    NaN where it does not exist (fewer than 2 distinct x); the interval is NaN with no residual degree of freedom.
    """
    import statsmodels.api as sm

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if np.unique(x).size < 2:
        return math.nan, math.nan, math.nan
    res = sm.OLS(y, sm.add_constant(x)).fit()
    slope = float(res.params[1])
    if res.df_resid < 1:
        return slope, math.nan, math.nan
    low, high = res.conf_int(alpha=1 - level)[1]
    return slope, float(low), float(high)


def subsample(n_rows: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_rows)`` sorted row ids drawn without replacement by ``np.random.default_rng(seed)``."""
    if n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, n, replace=False))


def percentile_interval(draws: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of resampled values ``draws`` [B, ...] at ``confidence`` (NaN draws ignored; NaN where
    none is finite)."""
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    if not len(draws):
        nan = np.full(np.shape(draws)[1:], np.nan)
        return nan, nan
    with warnings.catch_warnings():  # an all-NaN column: NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(draws, tails, axis=0)
    return low, high


def basic_interval(point: np.ndarray, draws: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Basic (reverse-percentile) interval [2θ̂ − q_high, 2θ̂ − q_low] of the estimate ``point`` from its resampled
    values ``draws`` [B, ...]: for a statistic the resampling itself biases (a correlation over latents, whose
    per-latent means get noisier when documents repeat), it carries the bias to the other side of θ̂ instead of
    leaving the interval on the biased side."""
    low, high = percentile_interval(draws, confidence)
    return 2 * np.asarray(point) - high, 2 * np.asarray(point) - low


def pooled_fvu(sse: np.ndarray, n: np.ndarray, x_sum: np.ndarray, x_sq: np.ndarray,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Pooled FVU = Σ sse / Σ‖x − x̄‖² from per-group sums, for each resample of groups.

    ``sse`` [G, m] (m error sums per group), ``n`` [G] tokens, ``x_sum`` [G, d] Σx, ``x_sq`` [G] Σ‖x‖²;
    ``weights`` [B, G] group multiplicities (:func:`multiplicities`; None: every group once). Returns [B, m]
    (B = 1 without weights). Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖²/N, in float64, with x̄ the resample's own mean.
    """
    w = np.ones((1, len(n))) if weights is None else np.asarray(weights, dtype=np.float64)
    total_ss = w @ x_sq - ((w @ x_sum) ** 2).sum(1) / (w @ n)
    return (w @ sse) / total_ss[:, None]

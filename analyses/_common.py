"""Helpers shared by the analysis modules: config parameters, SAE families, held-out R² on the store's split.

Nothing here computes a regression or an R² itself: fits and scores come from :mod:`darkmatter.regression`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import polars as pl

from darkmatter.analysis import AnalysisContext
from darkmatter.config import AnalysisConfig, DecompositionConfig, ExperimentConfig, to_dict
from darkmatter.regression import Design, r2_scores, stream_moments

log = logging.getLogger(__name__)

_ANALYSIS = AnalysisConfig()  # the one source of defaults for bootstrap / confidence


def confidence(ctx: AnalysisContext) -> float:
    """Two-sided confidence level of every interval (``analysis.confidence``)."""
    return float(ctx.params.get("confidence", _ANALYSIS.confidence))


def n_bootstrap(ctx: AnalysisContext) -> int:
    """Bootstrap resamples over eval contexts (``analysis.bootstrap``)."""
    return int(ctx.params.get("bootstrap", _ANALYSIS.bootstrap))


def families(ctx: AnalysisContext) -> list[dict[str, Any]]:
    """The experiment's family dicts (name, architecture, widths, ks, ...); the config defaults when absent."""
    return list(ctx.params.get("families") or to_dict(ExperimentConfig().families))


def family_name(ctx: AnalysisContext, sweep: Literal["width", "k"]) -> str:
    """Name of the family that sweeps ``sweep`` (width: several widths; k: several ks).

    The first such family in config order; with none, the default names ``"width"`` / ``"k"``.
    """
    key = "widths" if sweep == "width" else "ks"
    for fam in families(ctx):
        if len(fam.get(key) or ()) > 1:
            return str(fam["name"])
    return sweep


def family_saes(ctx: AnalysisContext, name: str | None = None) -> pl.DataFrame:
    """Rows of ``saes`` in family ``name`` (all SAEs when None), on ``params['hook']`` when given.

    Sorted by architecture, k, width, seed so that tables and figures read in sweep order.
    """
    where, args = ["TRUE"], []
    if name is not None:
        where.append("list_contains(string_split(families, ','), ?)")
        args.append(name)
    if ctx.params.get("hook"):
        where.append("hook = ?")
        args.append(ctx.params["hook"])
    sql = f"SELECT * FROM saes WHERE {' AND '.join(where)} ORDER BY architecture, k, width, seed"
    with ctx.connect() as con:
        return con.sql(sql, params=args).pl()


def modal_group(frame: pl.DataFrame, by: list[str], over: str) -> pl.DataFrame:
    """The rows of ``frame`` whose ``by`` values have the most distinct ``over`` values (ties: first in sort order).

    E.g. ``by=["architecture", "k"], over="width"``: the fixed-k slice of a width sweep with the most widths.
    """
    if frame.is_empty():
        return frame
    counts = frame.group_by(by).agg(pl.col(over).n_unique().alias("_n")).sort(["_n", *by],
                                                                              descending=[True] + [False] * len(by))
    return frame.join(counts.head(1).drop("_n"), on=by, how="semi")


def r2_on_fit_flag(features: np.ndarray, y: np.ndarray, fit: np.ndarray) -> float:
    """Test-split R² of the affine least-squares fit ``y ≈ features·β + β₀`` on the rows where ``fit`` is True.

    ``features`` [N] or [N, p], ``y`` [N], ``fit`` [N] bool (the store's ``fit`` flag). Columns constant on the fit
    rows are dropped (an affine fit cannot use them; e.g. L0 of a TopK SAE); with none left the prediction is the
    fit-row mean, so R² = 1 − Σ(y − ȳ_fit)²/Σ(y − ȳ_test)² ≤ 0 on the test rows.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=np.float64)
    fit = np.asarray(fit, dtype=bool)
    if fit.all() or not fit.any():
        raise ValueError(f"the fit flag marks {int(fit.sum())} of {fit.size} rows; both splits must be non-empty.")
    varying = np.ptp(x[fit], axis=0) > 0
    if not varying.any():
        return float(r2_scores(y[~fit], np.full((~fit).sum(), y[fit].mean())).r2_pooled)
    fit_s, test_s = stream_moments(x[:, varying], y, fit)
    assert test_s is not None
    design = Design(fit_s.x_moments(), test_s.x_moments(), intercept=True)
    return float(design.heldout_r2(design.solve(fit_s.target_moments()), test_s.target_moments()).r2_pooled)


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


def log2_ticks(ax, axis: Literal["x", "y"], values: np.ndarray) -> None:
    """Ticks at the measured values of a log2-scaled axis, labelled in plain numbers (1024, not 2^10)."""
    vals = np.unique(np.asarray(values, dtype=np.float64))
    vals = vals[np.isfinite(vals) & (vals > 0)]
    ticks, labels = np.log2(vals), [f"{v:g}" for v in vals]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, labels)


def note_figure(title: str, note: str):
    """A placeholder figure that says why there is nothing to plot (the runner never crashes on thin data)."""
    from darkmatter.plots import new_figure

    fig, ax = new_figure()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=ax.transAxes)
    return fig


def mathtext_safe(text: str) -> str:
    """Token text as a tick label: '$' would start matplotlib mathtext, control characters would break lines."""
    return text.replace("$", r"\$").replace("\n", "\\n").replace("\t", "\\t")


# --------------------------------------------------------------------------------------------- vector analyses


def decomposition(ctx: AnalysisContext) -> DecompositionConfig:
    """The regression protocol (fit_tokens, intercept, ridge, seed) from ``params['decomposition']``.

    Missing keys take the :class:`DecompositionConfig` defaults, so every analysis fits on the same split as the
    stored decomposition (:func:`darkmatter.regression.split_mask`).
    """
    given = ctx.params.get("decomposition") or {}
    return dataclasses.replace(DecompositionConfig(), **{f.name: given[f.name]
                                                         for f in dataclasses.fields(DecompositionConfig)
                                                         if f.name in given})


def options(ctx: AnalysisContext, name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """An analysis's own options: ``params[name]`` (a mapping) over ``defaults``; an unknown key is an error."""
    given = ctx.params.get(name) or {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"params['{name}'] has unknown keys {unknown}; expected some of {sorted(defaults)}.")
    return defaults | dict(given)


def choose_sae(ctx: AnalysisContext, saes: pl.DataFrame, requested: str | None = None) -> dict[str, Any]:
    """The SAE an analysis of a single SAE studies: ``requested`` when given, else the widest SAE of the width
    family (ties: smallest k, then sae_id), else the widest SAE of all. Returns its ``saes`` row."""
    if saes.is_empty():
        raise ValueError("the saes table is empty; there is no SAE to analyse.")
    if requested is not None:
        row = saes.filter(pl.col("sae_id") == requested)
        if row.is_empty():
            raise ValueError(f"sae_id {requested!r} is not in the saes table; it has {saes['sae_id'].to_list()}.")
        return row.row(0, named=True)
    fam = family_name(ctx, "width")
    members = saes.filter(pl.col("families").str.split(",").list.contains(fam))
    pool = members if not members.is_empty() else saes
    return pool.sort(["width", "k", "sae_id"], descending=[True, False, False]).row(0, named=True)

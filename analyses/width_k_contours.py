"""How do the predictability of the error and the nonlinear error change across SAE width and L0?

Every SAE of the main architecture is placed at (log2 width, log2 mean L0) and coloured by R²(‖error‖²),
R²(error vector, mean over dims) and FVU_nonlinear from the store; a linear interpolation on a Delaunay
triangulation in those log coordinates is drawn only inside the measured points' hull and only on non-degenerate
triangles, so with the default '+'-shaped grid (a width arm and an L0 arm) the off-arm quadrants are interpolated
from the arms alone and should be read as a guide. Trends per doubling of width (at the k with most widths) and of
L0 (at the width with most ks) are OLS slopes with t intervals.
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import log2_ticks, note_figure
from darkmatter.analysis.saes import family_saes
from darkmatter.analysis.stats import percentile_interval, r2_interval, resampling_summary, trend
from darkmatter.analysis.verdict import Verdict, most_above_in
from darkmatter.errors.measure import TEST_SUMS
from darkmatter.regression import GroupSums

log = logging.getLogger(__name__)

PAPER_CLAIM = ("Across the width × L0 grid the squared error norm stays highly predictable (R² > 0.9 for most "
               "SAEs), the error vector about half predictable, and FVU_nonlinear changes far less with width "
               "than FVU_total.")
HEADLINE = ("fvu_nonlinear_per_doubling_width",
            "fvu_nonlinear_per_doubling_l0",
            "r2_norm_sq_per_doubling_width",
            "r2_vector_mean_dims_per_doubling_l0")

METRICS = {  # column -> figure title
    "r2_norm_sq": "R² of ‖SaeError‖² from x",
    "r2_vector_mean_dims": "R² of SaeError vector from x (mean over dims)",
    "fvu_nonlinear": "FVU_nonlinear",
}
COLUMNS = ["sae_id", "architecture", "width", "k", "seed", "l0_mean", "fvu", "fvu_nonlinear",
           "r2_norm_sq", "r2_vector_mean_dims", "r2_vector_pooled"]
MIN_CIRCLE_RATIO = 0.05  # triangles flatter than this (inradius/circumradius) are slivers: not interpolated


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per SAE of the most common architecture, with its coordinates on the log-width × log-L0 plane."""
    saes = family_saes(ctx).select(COLUMNS).with_columns(pl.lit(ctx.analysis.confidence).alias("confidence"))
    if saes.is_empty():
        return saes.with_columns(pl.lit(None, pl.Float64).alias(c) for c in ("log2_width", "log2_l0"))
    arch = saes["architecture"].mode().sort()[0]
    dropped = saes.filter(pl.col("architecture") != arch).height
    if dropped:
        log.info("width × L0 grid: %d SAEs of other architectures than %s left out", dropped, arch)
    saes = saes.filter(pl.col("architecture") == arch)
    # The measured mean L0 (not k) is the y coordinate: for BatchTopK/ReLU/JumpReLU k is only a target.
    l0 = pl.coalesce(pl.col("l0_mean"), pl.col("k").cast(pl.Float64))
    saes = saes.with_columns(pl.col("width").cast(pl.Float64).log(2).alias("log2_width"), l0.log(2).alias("log2_l0"))
    resampled = [_resampled_r2(ctx, row) for row in saes.iter_rows(named=True)]
    if all(r is not None for r in resampled):
        saes = saes.with_columns(pl.DataFrame(resampled))
    return saes


def _resampled_r2(ctx: AnalysisContext, sae: dict) -> dict[str, object] | None:
    """The SAE's R² metrics with intervals, and their value in every resample of documents (the same resamples for
    every SAE: the slopes' intervals resample them jointly), from its stored per-context test sums; None without."""
    path = ctx.paths.sae_errors(ctx.hook, sae["sae_id"]) / TEST_SUMS
    if not path.is_file():
        return None
    sums = GroupSums.load(path)
    d, weights, level = sums.sum.shape[1] - 1, ctx.resample_weights(sums.groups), ctx.analysis.confidence
    out: dict[str, object] = ctx.resampling(sums.groups)
    for metric, cols, key in (("r2_norm_sq", slice(d, d + 1), "pooled"), ("r2_vector_mean_dims", slice(0, d),
                                                                            "mean_dims")):
        r2 = r2_interval(sums, cols, weights, level)
        draws = [getattr(s, f"r2_{key}") for s in sums.r2(cols, weights)] if len(weights) else []
        out |= {f"{metric}_low": r2[f"{key}_low"], f"{metric}_high": r2[f"{key}_high"],
                f"{metric}_draws": [float(v) for v in draws]}
    return out


def _slice_trend(table: pl.DataFrame, fixed: str, varying: str, metric: str, level: float
                 ) -> tuple[float, float, float]:
    """Slope of ``metric`` per doubling of ``varying`` among SAEs sharing the ``fixed`` value seen most often."""
    if table.is_empty():
        return math.nan, math.nan, math.nan
    coord = "log2_width" if varying == "width" else "log2_l0"
    counts = table.group_by(fixed).agg(pl.col(coord).n_unique().alias("n")).sort(["n", fixed],
                                                                                  descending=[True, False])
    part = table.filter(pl.col(fixed) == counts[fixed][0])
    x = part[coord].to_numpy()
    slope, low, high = trend(x, part[metric].cast(pl.Float64).fill_null(math.nan).to_numpy(), level)
    draws = f"{metric}_draws"
    if draws in part.columns and np.unique(x).size >= 2 and len(part[draws][0]):
        # the slope in every resample of documents (all SAEs' values from the same resample)
        values = np.array(part[draws].to_list(), dtype=np.float64)  # [SAEs, resamples]
        slopes = np.polyfit(x - x.mean(), values, 1)[0]
        low, high = (float(v) for v in percentile_interval(slopes, level))
    return slope, low, high


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Range of each metric over the grid and its trend per doubling of width and of L0 (with t intervals)."""
    level = float(table["confidence"][0]) if not table.is_empty() else math.nan
    out: dict[str, float | str] = {"n_saes": table.height, "confidence": level, **resampling_summary(table)}
    if not table.is_empty():
        out["architecture"] = table["architecture"][0]
    for metric in METRICS:
        col = table[metric].cast(pl.Float64).drop_nulls()
        out[f"{metric}_min"] = float(col.min()) if len(col) else math.nan  # type: ignore[arg-type]
        out[f"{metric}_max"] = float(col.max()) if len(col) else math.nan  # type: ignore[arg-type]
        for fixed, varying in (("k", "width"), ("width", "l0")):
            slope, lo, hi = _slice_trend(table, fixed, varying, metric, level)
            name = f"{metric}_per_doubling_{varying}"
            out |= {name: slope, f"{name}_ci_low": lo, f"{name}_ci_high": hi}
    return out


def _triangulation(x: np.ndarray, y: np.ndarray):
    """A Delaunay triangulation with sliver triangles masked, or None when no meaningful triangle exists."""
    import matplotlib.tri as mtri

    if x.size < 3:
        return None
    try:
        tri = mtri.Triangulation(x, y)
    except (RuntimeError, ValueError):  # collinear points (e.g. a width sweep alone): nothing to interpolate
        return None
    mask = mtri.TriAnalyzer(tri).get_flat_tri_mask(MIN_CIRCLE_RATIO, rescale=True)
    if mask.all():
        return None
    tri.set_mask(mask)
    return tri


def _metric_figure(table: pl.DataFrame, metric: str, title: str):
    from darkmatter.analysis.figures import new_figure

    part = table.filter(pl.col(metric).is_not_null() & pl.col(metric).is_not_nan() & pl.col("log2_l0").is_not_null())
    if part.is_empty():
        return note_figure(title, f"no SAE has a value for {metric}")
    # seeds of one (width, k) sit on one point (TopK's L0 is exactly k): the map shows their mean
    seeds = part.height > part.select("width", "k").n_unique()
    part = part.group_by("width", "k", maintain_order=True).agg(pl.col("log2_width", "log2_l0", metric).mean())
    x, y = part["log2_width"].to_numpy(), part["log2_l0"].to_numpy()
    v = part[metric].cast(pl.Float64).to_numpy()
    fig, ax = new_figure()
    tri = _triangulation(x, y)
    vmin, vmax = float(v.min()), float(v.max())
    vmax = vmax if vmax > vmin else vmin + 1e-9
    if tri is not None:
        filled = ax.tricontourf(tri, v, levels=np.linspace(vmin, vmax, 12), cmap="viridis", alpha=0.6)
        fig.colorbar(filled, ax=ax, label=metric, format="%.3g")
        subtitle = "interpolated inside the measured hull"
    else:
        subtitle = "points only (no 2-D grid to interpolate)"
    dots = ax.scatter(x, y, c=v, cmap="viridis", vmin=vmin, vmax=vmax, s=60, edgecolor="black", zorder=3)
    if tri is None:
        fig.colorbar(dots, ax=ax, label=metric, format="%.3g")
    for xi, yi, vi in zip(x, y, v, strict=True):
        ax.annotate(f"{vi:.3g}", (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=7)
    for lim, coord in ((ax.set_xlim, x), (ax.set_ylim, y)):  # room for the labels (contourf pins the limits)
        pad = 0.15 * float(np.ptp(coord)) or 0.5
        lim(float(coord.min()) - pad, float(coord.max()) + pad)
    log2_ticks(ax, "x", part["width"].to_numpy())
    log2_ticks(ax, "y", np.exp2(y).round(1))
    subtitle += ", mean over seeds" if seeds else ""
    ax.set(xlabel="SAE width (latents, log scale)", ylabel="mean L0 (log scale)", title=f"{title}\n{subtitle}")
    return fig


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """The claim's first number: R²(‖SaeError‖²) above 0.9 for most SAEs of the grid (each SAE's interval)."""
    return most_above_in(table, "r2_norm_sq", 0.9, "R²(‖SaeError‖²)")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """One figure per metric on log-width × log-L0 axes."""
    return {metric: _metric_figure(table, metric, title) for metric, title in METRICS.items()}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

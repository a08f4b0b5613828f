"""How much of the SAE error vector, and of its squared norm, is linearly predictable from the activation x?

For every SAE, SaeError = x − Sae(x) [d] and ‖SaeError‖² are regressed on x by least squares on the fit split, both
affine and without intercept (one shared float64 design per hook), and scored by held-out R² on the test split:
mean over output dimensions (the paper's number) and pooled for the vector. The fits are the stored decomposition's
(darkmatter.errors.measure); intervals are percentile bootstraps over eval documents of the configured map, with the
map held fixed.
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
from darkmatter.analysis.saes import family_saes, in_family, modal_group
from darkmatter.analysis.stats import r2_interval, resampling_summary
from darkmatter.analysis.verdict import Verdict, most_above_in
from darkmatter.errors.measure import METRICS, TEST_SUMS
from darkmatter.io import read_json
from darkmatter.regression import GroupSums

log = logging.getLogger(__name__)

PAPER_CLAIM = ("About half of the SaeError vector (R² ≈ 0.5, mean over dimensions) and more than 90% of its squared "
               "norm are linearly predictable from x, for SAEs of every width and L0.")
HEADLINE = ("r2_vector_mean_dims_median", "r2_norm_sq_median", "fraction_saes_r2_norm_sq_above_0.9", "r2_norm_sq_max")

MAPS = {"affine": True, "linear": False}  # map name -> intercept
METRICS_COLUMNS = {"r2_vector_mean_dims": ("vector", "mean_dims"), "r2_vector_pooled": ("vector", "pooled"),
                   "r2_norm_sq": ("norm", "pooled")}


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per (SAE, map): held-out R² of the error vector and of ‖error‖², with bootstrap intervals for the
    configured map (the other map's point estimates come from the stored moments)."""
    intercept, level = ctx.decomposition.intercept, ctx.analysis.confidence
    rows = []
    for sae in family_saes(ctx).iter_rows(named=True):
        folder = ctx.paths.sae_errors(sae["hook"], sae["sae_id"])
        stored = read_json(folder / METRICS)
        sums = GroupSums.load(folder / TEST_SUMS)
        d = sums.sum.shape[1] - 1  # columns: the error vector [d] and ‖error‖²
        # The same resamples for every SAE (same seed, same documents): differences between SAEs are paired.
        weights = ctx.resample_weights(sums.groups)
        scores = {"vector": r2_interval(sums, slice(0, d), weights, level),
                  "norm": r2_interval(sums, slice(d, d + 1), weights, level)}
        for name, has_intercept in MAPS.items():
            row = {k: sae[k] for k in ("sae_id", "hook", "families", "architecture", "width", "k")}
            row |= {"map": name, "intercept": has_intercept, "default": has_intercept == intercept}
            suffix = "" if has_intercept == intercept else "_no_intercept"
            for col, (which, key) in METRICS_COLUMNS.items():
                if has_intercept == intercept:  # resampled from the per-context test sums
                    row |= {col: scores[which][key], f"{col}_low": scores[which][f"{key}_low"],
                            f"{col}_high": scores[which][f"{key}_high"]}
                else:
                    value = stored.get(col + suffix)
                    row |= {col: math.nan if value is None else value, f"{col}_low": math.nan,
                            f"{col}_high": math.nan}
            rows.append(row | {"n_fit": stored["fit_tokens"], "n_test": stored["test_tokens"],
                               **ctx.resampling(sums.groups), "confidence": level})
        log.info("%s: R² vector %.3f, R² ‖e‖² %.3f", sae["sae_id"], scores["vector"]["mean_dims"],
                 scores["norm"]["pooled"])
    return pl.DataFrame(rows)


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Medians / extremes over SAEs of the default map (the config's intercept), the other map's medians, and
    per-family medians."""
    out: dict[str, float | str] = {}
    if table.is_empty():
        return {"n_saes": 0}
    main, other = table.filter(pl.col("default")), table.filter(~pl.col("default"))
    out["map"] = str(main["map"][0])
    out["n_saes"] = main.height
    out |= resampling_summary(main)
    for col in METRICS_COLUMNS:
        out[f"{col}_median"] = float(main[col].median())
        out[f"{col}_min"] = float(main[col].min())
        out[f"{col}_max"] = float(main[col].max())
        out[f"{col}_median_{other['map'][0]}"] = float(other[col].median())
    out["fraction_saes_r2_norm_sq_above_0.9"] = float((main["r2_norm_sq"] > 0.9).mean())
    for fam in sorted({f for fams in main["families"] for f in (fams or "").split(",") if f}):
        members = main.filter(in_family(fam))
        for col in ("r2_vector_mean_dims", "r2_norm_sq"):
            out[f"{col}_median_family_{fam}"] = float(members[col].median())
    return out


def _sweep_axis(members: pl.DataFrame) -> str:
    """The column a family sweeps: the one of width and k with more distinct values."""
    return "width" if members["width"].n_unique() >= members["k"].n_unique() else "k"


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """The claim's number: R²(‖SaeError‖²) above 0.9 for most SAEs (each SAE's interval, the default map)."""
    rows = table.filter(pl.col("default")) if "default" in table.columns else table
    return most_above_in(rows, "r2_norm_sq", 0.9, "R²(‖SaeError‖²)")


def plot(table: pl.DataFrame) -> dict:
    """Per family: R² of the vector (mean over dims) and of ‖error‖² against the swept width or k, with CIs."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    if table.is_empty():
        return {"r2_vs_width": note_figure("Error predictability", "no SAEs in the store")}
    figures, colours = {}, {"r2_vector_mean_dims": PALETTE["linear error"], "r2_norm_sq": PALETTE["total"]}
    labels = {"r2_vector_mean_dims": "error vector (mean over dims)", "r2_norm_sq": "‖error‖²"}
    fams = sorted({f for fams in table["families"] for f in (fams or "").split(",") if f})
    for fam in fams:
        members = table.filter(in_family(fam))
        axis = _sweep_axis(members)
        members = modal_group(members, ["hook", "architecture", "k" if axis == "width" else "width"], axis)
        fig, ax = new_figure()
        for col, colour in colours.items():
            for name, style in (("affine", "-"), ("linear", "--")):
                part = members.filter(pl.col("map") == name).sort(axis)
                pos = np.log2(part[axis].to_numpy().astype(float))
                y = part[col].to_numpy()
                err = np.abs(np.vstack([y - part[f"{col}_low"].to_numpy(), part[f"{col}_high"].to_numpy() - y]))
                ax.errorbar(pos, y, yerr=None if name == "linear" or not np.isfinite(err).all() else err,
                            color=colour, ls=style, marker="o" if name == "affine" else "x", capsize=3,
                            label=f"{labels[col]}, {name}")
        log2_ticks(ax, "x", members[axis].to_numpy())
        fixed = "k" if axis == "width" else "width"
        ax.set(xlabel=f"{'width (latents)' if axis == 'width' else 'k (L0)'}", ylabel="held-out R² from x",
               title=f"Error predictability, family {fam} ({fixed} = {members[fixed][0]})")
        ax.legend(fontsize=8)
        key = f"r2_vs_{axis}"
        figures[key if key not in figures else f"{key}_{fam}"] = fig
    return figures


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

"""How much of the SAE error vector, and of its squared norm, is linearly predictable from the activation x?

For every SAE, SaeError = x − Sae(x) [d] and ‖SaeError‖² are regressed on x by least squares on the fit split, both
affine and without intercept (one shared float64 design per hook), and scored by held-out R² on the test split:
mean over output dimensions (the paper's number) and pooled for the vector. Intervals are percentile bootstraps
over eval contexts with the maps held fixed.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import polars as pl

from analyses._common import (
    confidence,
    decomposition,
    family_saes,
    log2_ticks,
    modal_group,
    n_bootstrap,
    note_figure,
)
from analyses._eval import context_sums, eval_split, fit_moments, multiplicities, r2_interval
from darkmatter.analysis import AnalysisContext, run_cli
from darkmatter.regression import Design

log = logging.getLogger(__name__)

PAPER_CLAIM = ("About half of the SaeError vector (R² ≈ 0.5, mean over dimensions) and more than 90% of its squared "
               "norm are linearly predictable from x, for SAEs of every width and L0.")
HEADLINE = ("r2_vector_mean_dims_median", "r2_norm_sq_median", "fraction_saes_r2_norm_sq_above_0.9", "r2_norm_sq_max")

MAPS = {"affine": True, "linear": False}  # map name -> intercept
METRICS = {"r2_vector_mean_dims": ("vector", "mean_dims"), "r2_vector_pooled": ("vector", "pooled"),
           "r2_norm_sq": ("norm", "pooled")}


def error_target(x: np.ndarray, x_hat: np.ndarray):
    """Row ids -> [n, d + 1] float64: the error vector x − x_hat and, as the last column, its squared norm.

    One least-squares solve then fits both targets (columns are independent in least squares).
    """

    def target(idx: np.ndarray) -> np.ndarray:
        e = np.asarray(x[idx], dtype=np.float64) - np.asarray(x_hat[idx], dtype=np.float64)
        return np.concatenate([e, np.einsum("ij,ij->i", e, e)[:, None]], axis=1)

    return target


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per (SAE, map): held-out R² of the error vector and of ‖error‖² with bootstrap intervals."""
    dc, level, n_boot = decomposition(ctx), confidence(ctx), n_bootstrap(ctx)
    saes, rows = family_saes(ctx), []
    for (hook,), group in saes.group_by("hook", maintain_order=True):
        split = eval_split(ctx, hook)
        d = split.x.shape[1]
        affine = Design.from_rows(split.x, split.fit, intercept=True, ridge=dc.ridge, progress=True)
        designs = {"affine": affine, "linear": Design(affine.fit, affine.test, intercept=False, ridge=dc.ridge)}
        fit_rows, test_rows = split.fit_rows, split.test_rows
        for sae in group.iter_rows(named=True):
            x_hat = np.load(ctx.errors_folder(hook, sae["sae_id"]) / "x_hat.npy", mmap_mode="r")
            if x_hat.shape != split.x.shape:
                raise ValueError(f"{sae['sae_id']}: x_hat.npy has shape {x_hat.shape} but the eval activations of "
                                 f"{hook} have {split.x.shape}; rerun measure_errors.")
            target = error_target(split.x, x_hat)
            moments = fit_moments(affine, split.x, target, fit_rows, d + 1)
            fits = {name: design.solve(moments) for name, design in designs.items()}
            sums = context_sums(split.x, target, test_rows, split.contexts, fits)
            # The same resamples for every SAE (same seed, same contexts): differences between SAEs are paired.
            weights = multiplicities(sums.n_contexts, n_boot, ctx.seed)
            for name in MAPS:
                scores = {"vector": r2_interval(sums, name, slice(0, d), weights, level),
                          "norm": r2_interval(sums, name, slice(d, d + 1), weights, level)}
                row = {k: sae[k] for k in ("sae_id", "hook", "families", "architecture", "width", "k")}
                row |= {"map": name, "intercept": MAPS[name], "default": MAPS[name] == dc.intercept}
                for col, (which, key) in METRICS.items():
                    row |= {col: scores[which][key], f"{col}_low": scores[which][f"{key}_low"],
                            f"{col}_high": scores[which][f"{key}_high"]}
                rows.append(row | {"n_fit": len(fit_rows), "n_test": len(test_rows),
                                   "n_contexts": sums.n_contexts, "bootstrap": n_boot, "confidence": level})
            log.info("%s: R² vector %.3f, R² ‖e‖² %.3f (affine)", sae["sae_id"], rows[-2]["r2_vector_mean_dims"],
                     rows[-2]["r2_norm_sq"])
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
    for col in METRICS:
        out[f"{col}_median"] = float(main[col].median())
        out[f"{col}_min"] = float(main[col].min())
        out[f"{col}_max"] = float(main[col].max())
        out[f"{col}_median_{other['map'][0]}"] = float(other[col].median())
    out["fraction_saes_r2_norm_sq_above_0.9"] = float((main["r2_norm_sq"] > 0.9).mean())
    for fam in sorted({f for fams in main["families"] for f in (fams or "").split(",") if f}):
        members = main.filter(pl.col("families").str.split(",").list.contains(fam))
        for col in ("r2_vector_mean_dims", "r2_norm_sq"):
            out[f"{col}_median_family_{fam}"] = float(members[col].median())
    return out


def _sweep_axis(members: pl.DataFrame) -> str:
    """The column a family sweeps: the one of width and k with more distinct values."""
    return "width" if members["width"].n_unique() >= members["k"].n_unique() else "k"


def plot(table: pl.DataFrame) -> dict:
    """Per family: R² of the vector (mean over dims) and of ‖error‖² against the swept width or k, with CIs."""
    from darkmatter.plots import PALETTE, new_figure

    if table.is_empty():
        return {"r2_vs_width": note_figure("Error predictability", "no SAEs in the store")}
    figures, colours = {}, {"r2_vector_mean_dims": PALETTE["linear error"], "r2_norm_sq": PALETTE["total"]}
    labels = {"r2_vector_mean_dims": "error vector (mean over dims)", "r2_norm_sq": "‖error‖²"}
    fams = sorted({f for fams in table["families"] for f in (fams or "").split(",") if f})
    for fam in fams:
        members = table.filter(pl.col("families").str.split(",").list.contains(fam))
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

"""Is the squared norm of each part of x linear in x, as it is for a sparse sum of nearly orthogonal features?

For v ∈ {x, Sae(x), SaeError, LinearError, NonlinearError} of every SAE, ‖v‖² (from the store's per-token norms;
‖x‖² from the activations) is regressed affinely on x on the fit split and scored by held-out R² on the test split,
with bootstrap intervals over eval documents. If v is a sparse sum of nearly orthogonal features with typical
magnitudes, ‖v‖² ≈ Σ_i m_i·⟨d_i, v⟩ is linear in v, and so in x when v's features are readable from x.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.eval import eval_split, heldout_by_context
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.saes import family_saes
from darkmatter.analysis.stats import r2_interval, resampling_summary
from darkmatter.analysis.verdict import Verdict, by_majority
from darkmatter.regression import row_chunks

log = logging.getLogger(__name__)

PAPER_CLAIM = ("‖x‖² and ‖Sae(x)‖² are almost perfectly linearly predictable from x (R² ≈ 1), ‖SaeError‖² and "
               "‖LinearError‖² highly, and ‖NonlinearError‖² the least: the nonlinear error is not a sparse sum of "
               "typical features.")
HEADLINE = ("measured_order", "nonlinear_lowest", "r2_norm_sq_median_x", "r2_norm_sq_median_nonlinear_error")

# v -> (label in the paper's order, the squared per-token norm from the store; None: from x itself)
VECTORS = {
    "x": ("x", None),
    "sae": ("Sae(x)", "x_hat_norm * x_hat_norm"),
    "error": ("SaeError", "error_norm_sq"),
    "linear_error": ("LinearError", "linear_error_norm * linear_error_norm"),
    "nonlinear_error": ("NonlinearError", "nonlinear_error_norm * nonlinear_error_norm"),
}
COLOURS = {"x": "#9d9d9d", "sae": "#72b7b2", "error": "#333333", "linear_error": "#4c78a8",
           "nonlinear_error": "#e45756"}  # error parts in darkmatter.analysis.figures.PALETTE's colours


def _targets(ctx: AnalysisContext, x: np.ndarray, sae_ids: list[str]) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Y [N, 1 + 4·n_sae] float64 of squared norms and the (sae_id, v) of each column (sae_id '' for x)."""
    n = x.shape[0]
    x_sq = np.empty(n)
    for sl in row_chunks(n):  # chunked: a float64 copy of all of x would be 1.1 GB at the paper's size
        xc = np.asarray(x[sl], dtype=np.float64)
        x_sq[sl] = np.einsum("ij,ij->i", xc, xc)
    cols, keys = [x_sq], [("", "x")]
    sql = ", ".join(f"CAST({expr} AS DOUBLE) AS {v}" for v, (_, expr) in VECTORS.items() if expr)
    with ctx.connect() as con:
        for sae_id in sae_ids:
            frame = con.sql(f"SELECT {sql} FROM token_errors WHERE sae_id = ? ORDER BY row", params=[sae_id]).pl()
            if frame.height != n:
                raise ValueError(f"token_errors has {frame.height} rows for {sae_id} but the eval split has {n}.")
            for v in frame.columns:
                cols.append(frame[v].to_numpy())
                keys.append((sae_id, v))
    return np.stack(cols, axis=1), keys


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per (SAE, v) — and one per hook for v = x — with the held-out R² of ‖v‖² from x and its interval."""
    level = ctx.analysis.confidence
    saes, rows = family_saes(ctx), []
    for (hook,), group in saes.group_by("hook", maintain_order=True):
        split = eval_split(ctx, hook)
        y, keys = _targets(ctx, split.x, group["sae_id"].to_list())
        design = ctx.design(hook, intercept=True)  # the stored decomposition's x moments: no pass for them
        _, sums = heldout_by_context(design, split, y.__getitem__, y.shape[1])
        weights = ctx.resample_weights(sums.groups)
        meta = {r["sae_id"]: r for r in group.iter_rows(named=True)}
        for j, (sae_id, v) in enumerate(keys):
            r2 = r2_interval(sums, slice(j, j + 1), weights, level)
            sae = meta.get(sae_id, {})
            rows.append({"hook": hook, "sae_id": sae_id or None, "width": sae.get("width"), "k": sae.get("k"),
                         "vector": v, "label": VECTORS[v][0], "r2_norm_sq": r2["pooled"],
                         "r2_norm_sq_low": r2["pooled_low"], "r2_norm_sq_high": r2["pooled_high"],
                         "n_fit": int(split.fit.sum()), "n_test": int((~split.fit).sum()),
                         **ctx.resampling(sums.groups), "confidence": level})
    return pl.DataFrame(rows)


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Median R² per v over SAEs, the measured order of the medians, and the two checks of the expected order.

    ``nonlinear_lowest``: NonlinearError's median is below every other v's. ``x_sae_above_errors``: min(x, Sae)
    medians exceed max(SaeError, LinearError) medians. Both say "yes" or "no": measured, never forced.
    """
    if table.is_empty():
        return {"n_saes": 0}
    med = {v: float(table.filter(pl.col("vector") == v)["r2_norm_sq"].median()) for v in VECTORS}
    out: dict[str, float | str] = {f"r2_norm_sq_median_{v}": m for v, m in med.items()}
    out |= {f"r2_norm_sq_min_{v}": float(table.filter(pl.col("vector") == v)["r2_norm_sq"].min())
            for v in VECTORS if v != "x"}
    out["n_saes"] = table.filter(pl.col("vector") == "sae").height
    out |= resampling_summary(table)
    out["measured_order"] = " > ".join(VECTORS[v][0] for v in sorted(med, key=lambda v: -med[v]))
    others = [m for v, m in med.items() if v != "nonlinear_error"]
    out["nonlinear_lowest"] = "yes" if med["nonlinear_error"] < min(others) else "no"
    above = min(med["x"], med["sae"]) > max(med["error"], med["linear_error"])
    out["x_sae_above_errors"] = "yes" if above else "no"
    return out


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """NonlinearError the least norm-predictable vector, per SAE from the intervals: agrees when its interval lies
    below every other vector's, differs when another vector's lies wholly below it; most SAEs decide."""
    words: list = []
    for _, rows in sorted(table.filter(pl.col("sae_id").is_not_null()).group_by("sae_id"), key=lambda g: str(g[0])):
        lo = dict(zip(rows["vector"], rows["r2_norm_sq_low"], strict=True))
        hi = dict(zip(rows["vector"], rows["r2_norm_sq_high"], strict=True))
        others = [v for v in lo if v != "nonlinear_error"]
        if hi["nonlinear_error"] < min(lo[v] for v in others):
            words.append("agrees")
        elif any(hi[v] < lo["nonlinear_error"] for v in others):
            words.append("differs")
        else:
            words.append("undetermined")
    return Verdict(by_majority(words), f"NonlinearError lowest beyond the intervals in {words.count('agrees')} of "
                                       f"{len(words)} SAEs, another vector lower in {words.count('differs')} "
                                       f"(medians: {summary.get('measured_order', '')})")


def plot(table: pl.DataFrame) -> dict:
    """Violin + strip plot of R²(‖v‖² from x) over SAEs, v in the paper's order."""
    import seaborn as sns

    from darkmatter.analysis.figures import new_figure

    if table.is_empty():
        return {"norm_r2": note_figure("Norm prediction test", "no SAEs in the store")}
    order = [VECTORS[v][0] for v in VECTORS]
    palette = {VECTORS[v][0]: c for v, c in COLOURS.items()}
    frame = table.select("label", "r2_norm_sq").to_pandas()
    fig, ax = new_figure()
    sns.violinplot(frame, x="label", y="r2_norm_sq", hue="label", order=order, palette=palette, cut=0,
                   inner=None, density_norm="width", linewidth=0.8, ax=ax, legend=False)
    sns.stripplot(frame, x="label", y="r2_norm_sq", order=order, color="black", size=4, jitter=0.15, ax=ax)
    ax.set(xlabel="", ylabel="held-out R² of ‖v‖² from x (affine)",
           title=f"Norm prediction test ({table.filter(pl.col('vector') == 'sae').height} SAEs)")
    ax.axhline(1.0, color="#999999", lw=0.8, ls=":")
    return {"norm_r2": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

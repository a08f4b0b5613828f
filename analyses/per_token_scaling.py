"""Do wider SAEs struggle with the same tokens as narrower ones, and does the nonlinear error say which?

For the width family at fixed k, the per-token error norm ‖SaeError‖ of SAE j is regressed affinely on that of SAE i
(widths i ≤ j) on the store's fit rows and scored by R² on its test rows; adding SAE i's ‖NonlinearError‖ as a
second regressor gives the gain 100·(R²_new − R²_old)/(1 − R²_old), the share of the remaining variance it explains;
both R² carry percentile intervals from resampling eval documents (fits held fixed).
A trace of consecutive tokens of one typical eval context (median mean error of the widest SAE) shows the error norm
per width and its split into ‖LinearError‖ and ‖NonlinearError‖.
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import mathtext_safe, note_figure
from darkmatter.analysis.saes import family_name, family_saes, modal_group
from darkmatter.analysis.stats import r2_interval_on_fit_flag, resampling_summary
from darkmatter.analysis.verdict import Verdict

log = logging.getLogger(__name__)

PAPER_CLAIM = ("Larger SAEs struggle with the same tokens as smaller ones: per-token error norms are highly "
               "predictable across widths, adjacent widths have the highest per-token R², and a smaller SAE's "
               "nonlinear error norm adds predictive power.")
HEADLINE = ("adjacent_is_best_predictor_fraction",
            "r2_adjacent_mean",
            "r2_smallest_to_largest",
            "nonlinear_gain_pct_mean")

NORMS = ["error_norm", "linear_error_norm", "nonlinear_error_norm"]


def _norms(ctx: AnalysisContext, sae_ids: list[str]) -> pl.DataFrame:
    """Long per-token norms of ``sae_ids`` restricted to the rows every one of them has, sorted by (sae_id, row)."""
    with ctx.connect() as con:
        long = con.sql(f"SELECT e.sae_id, e.row, e.fit, t.context, {', '.join('e.' + n for n in NORMS)} "
                       "FROM token_errors e JOIN tokens t USING (row) "
                       "WHERE list_contains(?, e.sae_id) ORDER BY e.sae_id, e.row", params=[sae_ids]).pl()
    common = long.group_by("row").len().filter(pl.col("len") == len(sae_ids)).select("row")
    if common.height < long["row"].n_unique():
        log.warning("only %d of %d rows are scored by all SAEs; using those", common.height, long["row"].n_unique())
    return long.join(common, on="row", how="semi").sort("sae_id", "row")


def _pairs(ctx: AnalysisContext, saes: pl.DataFrame, long: pl.DataFrame) -> pl.DataFrame:
    """Held-out R² of ‖e_j‖ from ‖e_i‖, and from (‖e_i‖, ‖NonlinearError_i‖), for widths i ≤ j, with intervals."""
    per = {sid: part for (sid,), part in long.partition_by("sae_id", as_dict=True).items()}
    ids, widths = saes["sae_id"].to_list(), saes["width"].to_list()
    rows = []
    for a, (sid_i, w_i) in enumerate(zip(ids, widths, strict=True)):
        e_i, nl_i = per[sid_i]["error_norm"].to_numpy(), per[sid_i]["nonlinear_error_norm"].to_numpy()
        for sid_j, w_j in zip(ids[a:], widths[a:], strict=True):
            target, fit = per[sid_j]["error_norm"].to_numpy(), per[sid_j]["fit"].to_numpy()  # the target's split
            contexts, level = per[sid_j]["context"].to_numpy(), ctx.analysis.confidence
            r2_old, old_low, old_high = r2_interval_on_fit_flag(e_i, target, fit, contexts, ctx.resample_weights,
                                                                level)
            r2_new, new_low, new_high = r2_interval_on_fit_flag(np.column_stack([e_i, nl_i]), target, fit, contexts,
                                                                ctx.resample_weights, level)
            # the gain is undefined on the diagonal (and whenever R²_old is already 1): nothing is left to explain
            gain = 100 * (r2_new - r2_old) / (1 - r2_old) if sid_i != sid_j and 1 - r2_old > 1e-9 else math.nan
            rows.append({"sae_i": sid_i, "sae_j": sid_j, "width_i": w_i, "width_j": w_j, "r2": r2_old,
                         "r2_low": old_low, "r2_high": old_high, "r2_with_nonlinear": r2_new,
                         "r2_with_nonlinear_low": new_low, "r2_with_nonlinear_high": new_high,
                         "nonlinear_gain_pct_of_unexplained": gain, "n_test": int((~fit).sum()),
                         **ctx.resampling(np.unique(contexts)), "confidence": level})
    return pl.DataFrame(rows)


def _trace(ctx: AnalysisContext, saes: pl.DataFrame) -> pl.DataFrame:
    """The first ``trace_tokens`` (an option) scored tokens of the context with the median mean error of the widest SAE."""
    ids = saes["sae_id"].to_list()
    with ctx.connect() as con:
        means = con.sql("SELECT context, avg(error_norm) AS m FROM token_errors_in_context WHERE sae_id = ? "
                        "GROUP BY context ORDER BY m, context", params=[ids[-1]]).pl()
        context = int(means["context"][(means.height - 1) // 2])
        return con.sql(f"""
            SELECT e.sae_id, s.width, t.context, t.position, t.token_text, {', '.join('e.' + n for n in NORMS)}
            FROM token_errors e JOIN tokens t USING (row) JOIN saes s USING (sae_id)
            WHERE t.context = ? AND list_contains(?, e.sae_id)
              AND t.position < (SELECT min(position) FROM tokens WHERE context = ?) + ?
            ORDER BY s.width, t.position""", params=[context, ids, context, ctx.options.trace_tokens]).pl()


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """Rows ``section='pair'`` (the R² matrices), then ``section='trace'`` (the token trace)."""
    saes = modal_group(family_saes(ctx, family_name(ctx, "width")), ["architecture", "k"], "width")
    saes = saes.unique("width", keep="first", maintain_order=True)  # one seed per width
    if saes.height < 2:
        return pl.DataFrame({"section": [], "note": []}, schema={"section": pl.Utf8, "note": pl.Utf8})
    label = {"architecture": saes["architecture"][0], "k": int(saes["k"][0])}
    pairs = _pairs(ctx, saes, _norms(ctx, saes["sae_id"].to_list()))
    trace = _trace(ctx, saes)
    return pl.concat([pairs.with_columns(section=pl.lit("pair")), trace.with_columns(section=pl.lit("trace"))],
                     how="diagonal_relaxed").with_columns(**{k: pl.lit(v) for k, v in label.items()})


def _pair_rows(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(pl.col("section") == "pair") if "r2" in table.columns else pl.DataFrame()


def _mean(values: pl.Series) -> float:
    """Mean of the finite values (NaN when there are none, e.g. no non-adjacent pair with two widths)."""
    finite = values.cast(pl.Float64).drop_nulls().drop_nans()
    return float(finite.mean()) if len(finite) else math.nan  # type: ignore[arg-type]


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """R² of adjacent vs non-adjacent widths, how often the adjacent width is the best predictor, the mean gain."""
    pairs = _pair_rows(table)
    if pairs.is_empty():
        return {"n_widths": 0, "note": "fewer than 2 widths in the width family"}
    widths = sorted(set(pairs["width_i"].to_list()))
    rank = {w: i for i, w in enumerate(widths)}
    pairs = pairs.with_columns(gap=pl.col("width_j").replace_strict(rank) - pl.col("width_i").replace_strict(rank))
    off = pairs.filter(pl.col("gap") > 0)
    # For each target j with at least two smaller SAEs: is its best predictor the adjacent width?
    best = (off.group_by("width_j").agg(pl.len().alias("n"), pl.col("gap").sort_by("r2").last().alias("best_gap"))
            .filter(pl.col("n") >= 2))
    smallest_to_largest = off.filter((pl.col("width_i") == widths[0]) & (pl.col("width_j") == widths[-1]))
    return {
        "k": int(table["k"][0]), "n_widths": len(widths),
        "r2_adjacent_mean": _mean(off.filter(pl.col("gap") == 1)["r2"]),
        "r2_nonadjacent_mean": _mean(off.filter(pl.col("gap") > 1)["r2"]),
        "adjacent_is_best_predictor_fraction": float((best["best_gap"] == 1).mean()) if best.height else math.nan,
        "r2_smallest_to_largest": float(smallest_to_largest["r2"][0]),
        "r2_smallest_to_largest_low": float(smallest_to_largest["r2_low"][0]),
        "r2_smallest_to_largest_high": float(smallest_to_largest["r2_high"][0]),
        "nonlinear_gain_pct_mean": _mean(off["nonlinear_gain_pct_of_unexplained"]),
        "n_test_tokens": int(pairs["n_test"][0]),
        "trace_context": int(table.filter(pl.col("section") == "trace")["context"][0]),
        **resampling_summary(pairs),
    }


def _heatmap(pairs: pl.DataFrame, value: str, title: str, fmt: str, cmap: str):
    import seaborn as sns

    from darkmatter.analysis.figures import new_figure

    matrix = pairs.pivot(on="width_j", index="width_i", values=value).sort("width_i")
    values = matrix.drop("width_i").to_numpy().astype(float)
    # the diagonal (an SAE predicting itself, R² = 1) is left blank so that it does not set the colour scale
    hide = np.isnan(values) | np.eye(*values.shape, dtype=bool)
    fig, ax = new_figure()
    sns.heatmap(values, mask=hide, annot=True, fmt=fmt, cmap=cmap, ax=ax, xticklabels=matrix.columns[1:],
                yticklabels=matrix["width_i"].to_list(), annot_kws={"size": 8}, cbar_kws={"label": value})
    ax.grid(False)
    ax.set(xlabel="width j (target SAE)", ylabel="width i (predictor SAE)", title=title)
    return fig


def _trace_figure(trace: pl.DataFrame):
    import matplotlib.pyplot as plt

    from darkmatter.analysis.figures import PALETTE

    widths = sorted(set(trace["width"].to_list()))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(widths)))
    for w, colour in zip(widths, colours, strict=True):
        part = trace.filter(pl.col("width") == w)
        top.plot(part["position"], part["error_norm"], color=colour, lw=1, label=f"width {w}")
    for w, style in ((widths[0], ":"), (widths[-1], "-")):
        part = trace.filter(pl.col("width") == w)
        bottom.plot(part["position"], part["linear_error_norm"], style, color=PALETTE["linear error"],
                    label=f"‖LinearError‖, width {w}")
        bottom.plot(part["position"], part["nonlinear_error_norm"], style, color=PALETTE["nonlinear error"],
                    label=f"‖NonlinearError‖, width {w}")
    top.set(ylabel="‖SaeError‖", title=f"Per-token error norms, eval context {trace['context'][0]}")
    bottom.set(ylabel="norm", xlabel="token")
    for ax in (top, bottom):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="x", visible=False)  # one grid line per token would hide the trace
    first = trace.filter(pl.col("width") == widths[-1])
    bottom.set_xticks(first["position"].to_list(), [mathtext_safe(t) for t in first["token_text"].to_list()],
                      rotation=90, fontsize=6)
    fig.tight_layout()
    return fig


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """Per-token error norms predictable across widths (smallest → largest R² interval above 0.5), adjacent widths
    the best predictors for most SAEs, and the nonlinear error norm adding predictive power."""
    low = summary.get("r2_smallest_to_largest_low", float("nan"))
    adjacent = summary.get("adjacent_is_best_predictor_fraction", float("nan"))
    gain = summary.get("nonlinear_gain_pct_mean", float("nan"))
    checks = [low > 0.5, adjacent > 0.5, gain > 0]
    word = "agrees" if all(checks) else "undetermined" if any(v != v for v in (low, adjacent, gain)) else "differs"
    return Verdict(word, f"R²(smallest → largest) lower bound {low:.2f}; adjacent best for {adjacent:.0%}; "
                         f"nonlinear norm adds {gain:.1f}% of the unexplained variance")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """Heatmaps of R² and of the nonlinear gain, and the token trace."""
    pairs = _pair_rows(table)
    if pairs.is_empty():
        note = "fewer than 2 widths in the width family"
        return {"r2_matrix": note_figure("Per-token R² across widths", note)}
    k = table["k"][0]
    return {
        "r2_matrix": _heatmap(pairs, "r2", f"Held-out R² of ‖e_j‖ from ‖e_i‖ (k={k})", ".3f", "viridis"),
        "nonlinear_gain": _heatmap(pairs, "nonlinear_gain_pct_of_unexplained",
                                   "Gain from adding ‖NonlinearError_i‖ (% of 1 − R²)", ".1f", "magma"),
        "trace": _trace_figure(table.filter(pl.col("section") == "trace")),
    }


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

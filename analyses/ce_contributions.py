"""Is the nonlinear part of the SAE error responsible for its share of the downstream loss increase?

From the spliced per-token CE and KL of the store (x replaced at the hook, positions ≥ min_pos, by Sae(x),
Sae(x) + LinearError, Sae(x) + NonlinearError), the % of each SAE's CE gap recovered by adding back each error part,
100·(L_sae − L_setting)/(L_sae − L_clean), is set beside that part's share of error variance (FVU_part/FVU, on the
spliced contexts' tokens; the all-token share beside it) and of the summed squared error norm, with the zero-ablation CE-loss score and KL; every CE number carries a seeded percentile
bootstrap interval over the spliced contexts' documents, resampled jointly for all conditions and SAEs (they share
the contexts).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.eval import error_sums_by_context
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.saes import family_name, family_saes, in_family
from darkmatter.analysis.stats import percentile_interval, resampling_summary
from darkmatter.analysis.verdict import Verdict, by_majority
from darkmatter.downstream.ce import GLOBAL_CONDITIONS, SAE_CONDITIONS, summarize_ce

log = logging.getLogger(__name__)

PAPER_CLAIM = ("The nonlinear error is responsible for a proportional share of the CE increase: adding it back "
               "recovers about as much of the SAE's CE gap as its share of the error variance.")
HEADLINE = ("percent_recovered_nonlinear_mean_pct",
            "variance_share_nonlinear_mean_pct",
            "percent_recovered_linear_mean_pct",
            "ce_loss_score_median")

CONDITIONS = ("sae", "sae_linear", "sae_nonlinear")  # summarize_ce's column suffixes
BOOTSTRAPPED = ["ce_clean", "ce_zero", *[f"{q}_{c}" for q in ("ce", "kl", "ce_increase") for c in CONDITIONS],
                "percent_recovered_linear", "percent_recovered_nonlinear", "ce_loss_score"]
PARTS = ("linear", "nonlinear")
LEADING = ["sae_id", "width", "k", "percent_recovered_linear", "percent_recovered_nonlinear", "variance_share_linear_pct",
           "variance_share_nonlinear_pct", "ce_loss_score", "ce_increase_sae", "kl_sae"]  # what the report shows first
NO_DATA = "the store has no spliced CE (token_ce is missing or empty): run the CE stage"


def _token_ce(ctx: AnalysisContext) -> pl.DataFrame:
    if not ctx.has_table("token_ce"):  # a store built before the CE stage existed
        return pl.DataFrame()
    with ctx.connect() as con:
        # this analysis's conditions only (the store also holds e.g. the pursuit's, analysed in analyses/pursuit.py)
        wanted = ", ".join(f"'{c}'" for c in (*GLOBAL_CONDITIONS, *SAE_CONDITIONS))
        return con.sql(f"SELECT sae_id, condition, context, ce, kl FROM token_ce WHERE condition IN ({wanted})").pl()


def with_increases(summary: pl.DataFrame) -> pl.DataFrame:
    """Add ce_increase_<condition> = L_condition − L_clean (nats): differences on the same contexts, whose
    paired intervals are far tighter than those of the two CEs (context difficulty cancels)."""
    return summary.with_columns((pl.col(f"ce_{c}") - pl.col("ce_clean")).alias(f"ce_increase_{c}")
                                for c in CONDITIONS)


def bootstrap_ce(per_token: pl.DataFrame, level: float,
                 resample_weights: Callable[[np.ndarray], np.ndarray]) -> pl.DataFrame:
    """Percentile intervals of every number of :func:`darkmatter.downstream.ce.summarize_ce`, resampling documents.

    Per (sae_id, condition) the sums of ce and kl and the token counts per context form matrices S [K, C], N [K, C];
    ``resample_weights(contexts)`` gives each context's multiplicity w [B, C] in every resample (its document's:
    :meth:`AnalysisContext.resample_weights`), so a resample's token means are S·w / N·w, and summarize_ce turns them
    into % recovered and CE score. Columns: sae_id, <name>_ci_low, <name>_ci_high for each name in BOOTSTRAPPED.
    """
    per_ctx = per_token.group_by("sae_id", "condition", "context").agg(
        pl.col("ce").cast(pl.Float64).sum(), pl.col("kl").cast(pl.Float64).sum(), pl.len().alias("n"))
    keys = per_ctx.select("sae_id", "condition").unique().sort("sae_id", "condition").with_row_index("key")
    contexts = per_ctx.select("context").unique().sort("context").with_row_index("c")
    per_ctx = per_ctx.join(keys, on=["sae_id", "condition"]).join(contexts, on="context")
    shape = (keys.height, contexts.height)
    sums = {name: np.zeros(shape) for name in ("ce", "kl", "n")}
    for name, mat in sums.items():
        mat[per_ctx["key"].to_numpy(), per_ctx["c"].to_numpy()] = per_ctx[name].to_numpy()
    weights = resample_weights(contexts["context"].to_numpy())  # [B, C]
    n_boot = len(weights)
    if not n_boot:  # no interval (e.g. a single document)
        return keys.select("sae_id").unique()
    with np.errstate(invalid="ignore", divide="ignore"):  # a key absent from every drawn context: NaN
        ce, kl = (sums[name] @ weights.T / (sums["n"] @ weights.T) for name in ("ce", "kl"))  # [K, B]
    # summarize_ce on the K means of each resample, so % recovered and the CE score keep one definition
    draws = [summarize_ce(keys.with_columns(ce=pl.Series(ce[:, b]), kl=pl.Series(kl[:, b]))) for b in range(n_boot)]
    tails = [(1 - level) / 2, (1 + level) / 2]
    stacked = with_increases(pl.concat(draws, how="diagonal"))  # diagonal: summarize_ce's column order varies between calls
    return stacked.group_by("sae_id").agg(
        *[pl.col(name).quantile(q, interpolation="linear").alias(f"{name}_ci_{side}")
          for name in BOOTSTRAPPED for q, side in zip(tails, ("low", "high"), strict=True)])


def _spliced_shares(ctx: AnalysisContext, sae_ids: list[str], contexts: np.ndarray, level: float) -> pl.DataFrame:
    """Per SAE, each part's share of the error variance on the spliced contexts' tokens — the tokens whose CE it is
    compared with — and its interval over resampled documents. FVU_nonlinear/FVU_total = Σ‖NonlinearError‖²/
    Σ‖SaeError‖² (one denominator), and the linear share is the rest (FVU_linear = FVU_total − FVU_nonlinear)."""
    weights = ctx.resample_weights(contexts)
    rows = []
    for sae_id, sums in error_sums_by_context(ctx, sae_ids, contexts).items():
        total, nonlinear = sums[:, 0], sums[:, 1]
        if not total.sum() > 0:
            continue
        share, draws = 100 * nonlinear.sum() / total.sum(), 100 * (weights @ nonlinear) / (weights @ total)
        low, high = percentile_interval(draws, level)
        rows.append({"sae_id": sae_id, "variance_share_nonlinear_pct": share, "variance_share_linear_pct": 100 - share,
                     "variance_share_nonlinear_pct_ci_low": float(low),
                     "variance_share_nonlinear_pct_ci_high": float(high)})
    schema = {"sae_id": pl.Utf8} | dict.fromkeys(
        ["variance_share_nonlinear_pct", "variance_share_linear_pct", "variance_share_nonlinear_pct_ci_low",
         "variance_share_nonlinear_pct_ci_high"], pl.Float64)
    return pl.DataFrame(rows, schema=schema)


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per spliced SAE: CE per condition, % recovered per error part, its shares of the error, CIs."""
    per_token = _token_ce(ctx)
    if per_token.is_empty():
        return pl.DataFrame({"sae_id": [], "note": []}, schema={"sae_id": pl.Utf8, "note": pl.Utf8})
    level, n_boot = ctx.analysis.confidence, ctx.analysis.bootstrap
    table = with_increases(summarize_ce(per_token))
    if n_boot > 0:
        table = table.join(bootstrap_ce(per_token, level, ctx.resample_weights), on="sae_id", how="left")
    width_fam, k_fam = family_name(ctx, "width"), family_name(ctx, "k")
    contexts = np.unique(per_token["context"].to_numpy())
    saes = family_saes(ctx).select(
        "sae_id", "architecture", "width", "k", "families",
        *[(100 * pl.col(f"fvu_{p}") / pl.col("fvu")).alias(f"variance_share_{p}_pct_all_tokens") for p in PARTS],
        in_family(width_fam).alias("in_width_family"),
        in_family(k_fam).alias("in_k_family"))
    saes = saes.join(_spliced_shares(ctx, saes["sae_id"].to_list(), contexts, level), on="sae_id", how="left")
    with ctx.connect() as con:
        shares = con.sql("SELECT sae_id, " + ", ".join(f"100 * {p}_share_of_sq_norm AS sq_norm_share_{p}_pct"
                                                       for p in PARTS) + " FROM sae_error_shares").pl()
    resampling = ctx.resampling(contexts)
    n_tok = per_token.filter(pl.col("condition") == "clean").height
    return (saes.join(table, on="sae_id", how="inner").join(shares, on="sae_id", how="left")
            .with_columns(n_tokens=pl.lit(n_tok), confidence=pl.lit(level),
                          **{k: pl.lit(v) for k, v in resampling.items()})
            .sort("architecture", "k", "width")
            .select(*LEADING, pl.exclude(LEADING)))


def _mean(table: pl.DataFrame, name: str) -> float:
    col = table[name].cast(pl.Float64).drop_nulls().drop_nans()
    return float(col.mean()) if len(col) else math.nan  # type: ignore[arg-type]


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Mean % recovered and variance share per error part, their ratio, CE score and KL over the spliced SAEs."""
    if table.is_empty() or "ce_sae" not in table.columns:
        return {"n_saes": 0, "note": NO_DATA}
    # ≈ 1 when the nonlinear error's CE effect is proportional to its share of the error variance
    ratio = (table["percent_recovered_nonlinear"] / table["variance_share_nonlinear_pct"]).drop_nulls().drop_nans()
    return {
        "n_saes": table.height, **resampling_summary(table),
        "n_tokens_per_condition": int(table["n_tokens"][0]), "confidence": float(table["confidence"][0]),
        "ce_clean_nats": float(table["ce_clean"][0]), "ce_zero_nats": float(table["ce_zero"][0]),
        "ce_sae_mean_nats": _mean(table, "ce_sae"), "kl_sae_mean_nats": _mean(table, "kl_sae"),
        "ce_loss_score_median": float(table["ce_loss_score"].median()),  # type: ignore[arg-type]
        **{f"percent_recovered_{p}_mean_pct": _mean(table, f"percent_recovered_{p}") for p in PARTS},
        **{f"variance_share_{p}_mean_pct": _mean(table, f"variance_share_{p}_pct") for p in PARTS},
        **{f"variance_share_{p}_all_tokens_mean_pct": _mean(table, f"variance_share_{p}_pct_all_tokens")
           for p in PARTS},
        **{f"sq_norm_share_{p}_mean_pct": _mean(table, f"sq_norm_share_{p}_pct") for p in PARTS},
        "nonlinear_recovered_over_variance_share_median": float(ratio.median()) if len(ratio) else math.nan,  # type: ignore[arg-type]
    }


def _panels(table: pl.DataFrame) -> list[tuple[str, str, pl.DataFrame]]:
    """(title, x column, rows) for the width sweep and the k sweep; all SAEs when neither family is known."""
    out = []
    for flag, by, title in (("in_width_family", "width", "width sweep"), ("in_k_family", "k", "k sweep")):
        part = table.filter(pl.col(flag)).sort(by)
        if part.height:
            fixed = "k" if by == "width" else "width"
            out.append((f"{title} ({fixed}={part[fixed][0]})", by, part))
    return out or [("all spliced SAEs", "width", table.sort("k", "width"))]


def _errorbars(part: pl.DataFrame, name: str) -> np.ndarray | None:
    """Asymmetric error bars [2, n] from the bootstrap interval (None without a bootstrap)."""
    if f"{name}_ci_low" not in part.columns:
        return None
    value = part[name].to_numpy()
    return np.abs(np.vstack([value - part[f"{name}_ci_low"].to_numpy(), part[f"{name}_ci_high"].to_numpy() - value]))


def _recovered_figure(table: pl.DataFrame):
    import matplotlib.pyplot as plt

    from darkmatter.analysis.figures import PALETTE

    panels = _panels(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    bars = [(f"percent_recovered_{p}", f"CE gap recovered by adding {p} error", PALETTE[f"{p} error"], None)
            for p in PARTS] + [(f"variance_share_{p}_pct", f"{p} share of error variance", PALETTE[f"{p} error"], "//")
                               for p in PARTS]
    order = [bars[0], bars[2], bars[1], bars[3]]  # each part's CE effect next to its variance share
    for ax, (title, by, part) in zip(axes[0], panels, strict=True):
        x, step = np.arange(part.height), 0.2
        for i, (name, label, colour, hatch) in enumerate(order):
            ax.bar(x - 0.4 + (i + 0.5) * step, part[name].fill_null(math.nan), step, yerr=_errorbars(part, name),
                   color=colour if hatch is None else "white", edgecolor=colour, hatch=hatch, label=label,
                   capsize=2, error_kw={"lw": 0.8})
        ax.set_xticks(x, [str(v) for v in part[by]])
        ax.axhline(0, color="black", lw=0.6)
        ax.set(xlabel=by, ylabel="%", title=title)
    axes[0][0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle("% of the SAE's CE gap recovered by each error part vs its share of error variance")
    fig.tight_layout()
    return fig


def _ce_figure(table: pl.DataFrame):
    import matplotlib.pyplot as plt

    from darkmatter.analysis.figures import PALETTE

    panels = _panels(table)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.0), squeeze=False, sharey=True)
    lines = [("ce_increase_sae", "Sae(x)", PALETTE["total"]),
             ("ce_increase_sae_linear", "Sae(x) + LinearError", PALETTE["linear error"]),
             ("ce_increase_sae_nonlinear", "Sae(x) + NonlinearError", PALETTE["nonlinear error"])]
    for ax, (title, by, part) in zip(axes[0], panels, strict=True):
        x = np.log2(part[by].to_numpy().astype(float))
        for name, label, colour in lines:
            ax.errorbar(x, part[name], yerr=_errorbars(part, name), color=colour, marker="o", capsize=3, label=label)
        ax.axhline(0, color="grey", ls="--", lw=1, label=f"clean ({part['ce_clean'][0]:.3f} nats)")
        ax.set_xticks(x, [str(v) for v in part[by]])
        ax.set(xlabel=f"{by} (log scale)", ylabel="CE increase over clean (nats/token)", title=title)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """A proportional share, per SAE: agrees when the CE gap recovered by adding back the nonlinear error and its
    share of the error variance have overlapping intervals, differs when they are disjoint; most SAEs decide."""
    if table.is_empty() or "percent_recovered_nonlinear_ci_low" not in table.columns:
        return Verdict("undetermined", "no CE measurement with intervals")
    words = ["agrees" if r["percent_recovered_nonlinear_ci_low"] <= r["variance_share_nonlinear_pct_ci_high"]
             and r["variance_share_nonlinear_pct_ci_low"] <= r["percent_recovered_nonlinear_ci_high"] else "differs"
             for r in table.iter_rows(named=True)]
    return Verdict(by_majority(words), f"recovered and variance-share intervals disjoint for {words.count('differs')} "
                                       f"of {len(words)} SAEs; median ratio recovered / share "
                                       f"{summary.get('nonlinear_recovered_over_variance_share_median', float('nan')):.2f}")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """The paper-style grouped bars (% recovered vs variance share) and CE per condition, with bootstrap CIs."""
    if table.is_empty() or "ce_sae" not in table.columns:
        return {"recovered_vs_share": note_figure("CE contributions", NO_DATA)}
    return {"recovered_vs_share": _recovered_figure(table), "ce_loss": _ce_figure(table)}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

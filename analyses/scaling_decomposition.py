"""How much of the SAE error disappears as SAEs get wider, and is the floor that remains linear or nonlinear?

FVU_total of the width family at fixed k is fitted as c + a·W^(−m) by nonlinear least squares with t intervals
(darkmatter.errors.scaling) and stacked as in the paper's Figure 1: absent features (curve − c), linear error
(c − mean FVU_nonlinear) and nonlinear error (FVU_nonlinear of the stored decomposition), of which the encoder
error is the share that gradient pursuit with the SAE's own decoder removes (mean over widths of FVU_nonlinear of the
encoder minus that of the pursuit, on the pursued tokens; analyses/pursuit.py). Whether FVU_nonlinear is flat is an
equivalence test on the OLS slope of FVU_nonlinear on log2 width: flat when its 90% intervals (t over the widths, and
percentile over resampled documents) lie within a practical margin (analysis option flat_margin_pct, ±1% of the mean
per doubling); with fewer than 4 widths the law is not fitted and its numbers are NaN. FVU_nonlinear of b* fitted
without intercept is shown beside it: the stored FVU_nonlinear times the test split's ratio of the two maps' residual
sums (1 − pooled R² without intercept over 1 − pooled R² with it; both R² share one test-set denominator). A width
family with several seeds per width is fitted on every SAE (a width counts by its seeds; the slope's t interval then
carries the seed noise), and the pooled within-width standard deviation of FVU_nonlinear is reported beside it.
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.eval import context_sums, error_sums_by_context
from darkmatter.analysis.figures import log2_ticks, note_figure
from darkmatter.analysis.saes import family_name, family_saes
from darkmatter.analysis.stats import percentile_interval, resampling_summary, trend
from darkmatter.analysis.verdict import Verdict, from_answer
from darkmatter.errors.measure import METRICS
from darkmatter.errors.scaling import fit_power_law, power_law, scaling_decomposition
from darkmatter.io import read_json

log = logging.getLogger(__name__)

PAPER_CLAIM = ("FVU_total follows c + a·W^(−m); FVU_nonlinear stays roughly constant as width grows and lies "
               "under the asymptote c, so the dark matter is partly linearly predictable and partly not.")
HEADLINE = ("c_fvu", "m", "fvu_nonlinear_mean", "fvu_nonlinear_slope_pct_of_mean_per_doubling")

MEASURED = ["architecture", "k", "width", "sae_id", "seed", "l0_mean", "fvu", "fvu_nonlinear", "fvu_linear",
            "encoder_error", "fvu_nonlinear_no_intercept"]
FIT = ["a", "a_ci_low", "a_ci_high", "c", "c_ci_low", "c_ci_high", "m", "m_ci_low", "m_ci_high", "residual_std"]
REGIONS = ["fvu_fit", "absent_features", "linear_error", "nonlinear_error"]
SLOPE = ["fvu_nonlinear_slope_per_doubling", "fvu_nonlinear_slope_ci_low", "fvu_nonlinear_slope_ci_high"]
# the slope's intervals over resampled documents (at the confidence level, and at 90% for the equivalence test), and
# its t interval at 90%: the "flat" verdict needs both 90% intervals inside the practical margin
SLOPE_EQUIVALENCE = ["fvu_nonlinear_slope_doc_ci_low", "fvu_nonlinear_slope_doc_ci_high",
                     "fvu_nonlinear_slope_doc_90_low", "fvu_nonlinear_slope_doc_90_high",
                     "fvu_nonlinear_slope_t_90_low", "fvu_nonlinear_slope_t_90_high"]
INTERVALS = ["fvu_ci_low", "fvu_ci_high", "fvu_nonlinear_ci_low", "fvu_nonlinear_ci_high"]
EQUIVALENCE_LEVEL = 0.90  # two one-sided tests at 5% each
RESAMPLING = ["resampling_unit", "n_documents", "n_contexts", "bootstrap"]


def _fit_group(group: pl.DataFrame, level: float) -> pl.DataFrame:
    """One fixed-(architecture, k) slice of the width sweep: measured FVUs, the law's fit and Figure-1 regions."""
    widths = group["width"].to_numpy().astype(np.float64)
    fvu = group["fvu"].cast(pl.Float64).fill_null(math.nan).to_numpy()
    nonlinear = group["fvu_nonlinear"].cast(pl.Float64).fill_null(math.nan).to_numpy()
    cols: dict[str, object] = dict.fromkeys(FIT + REGIONS, math.nan)
    note = ""
    try:
        fit = fit_power_law(widths, fvu, confidence=level, ci="t")
    except (ValueError, RuntimeError) as e:  # too few widths, non-finite FVU, or no convergence: report, not crash
        fit, note = None, f"no power-law fit: {e}"
        log.warning("k=%s: %s", group["k"][0], note)
    if fit is not None:
        s = fit.summary()
        cols.update({key: s[key] for key in FIT})
        regions = scaling_decomposition(fit, widths, nonlinear)
        cols.update({"fvu_fit": regions["fvu_total_fit"], "absent_features": regions["absent_features"],
                     "linear_error": regions["linear_error"], "nonlinear_error": regions["nonlinear_error"]})
    # Flatness of FVU_nonlinear: slope per doubling of width (log2), with its t interval over the widths, and its
    # intervals over resampled documents (every width's FVU_nonlinear recomputed on the same resample)
    x = np.log2(widths)
    cols.update(dict(zip(SLOPE, trend(x, nonlinear, level), strict=True)))
    cols.update(dict(zip(SLOPE_EQUIVALENCE[4:], trend(x, nonlinear, EQUIVALENCE_LEVEL)[1:], strict=True)))
    cols.update(dict.fromkeys(SLOPE_EQUIVALENCE[:4], math.nan))
    draws = group["fvu_nonlinear_draws"] if "fvu_nonlinear_draws" in group.columns else None
    if draws is not None and draws.null_count() == 0 and np.unique(x).size >= 2 and len(draws[0]):
        slopes = np.polyfit(x - x.mean(), np.array(draws.to_list()), 1)[0]
        for conf, (low, high) in ((level, SLOPE_EQUIVALENCE[:2]), (EQUIVALENCE_LEVEL, SLOPE_EQUIVALENCE[2:4])):
            cols[low], cols[high] = (float(v) for v in percentile_interval(slopes, conf))
    keep = MEASURED + [c for c in INTERVALS if c in group.columns]
    return group.select(keep).with_columns(
        *[pl.Series(k, np.broadcast_to(np.asarray(v, dtype=np.float64), widths.shape)) for k, v in cols.items()],
        pl.lit(note).alias("note"),
    )


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per SAE of the width family: measured FVUs, the fitted law of its k slice and the regions."""
    saes = family_saes(ctx, family_name(ctx, "width"))
    level = ctx.analysis.confidence
    if saes.is_empty():
        schema = {c: pl.Float64 for c in MEASURED + FIT + REGIONS + SLOPE} | {
            "architecture": pl.Utf8, "sae_id": pl.Utf8, "note": pl.Utf8, "primary": pl.Boolean, "confidence": pl.Float64}
        return pl.DataFrame(schema=schema)
    saes = saes.with_columns(pl.col("width").cast(pl.Int64), pl.col("k").cast(pl.Int64)).join(
        _encoder_error(ctx), on="sae_id", how="left").join(_fvu_intervals(ctx, saes), on="sae_id", how="left").join(
        _no_intercept(ctx, saes), on="sae_id", how="left")
    groups = saes.partition_by(["architecture", "k"], maintain_order=True)
    table = pl.concat([_fit_group(g, level) for g in groups], how="vertical_relaxed").join(
        saes.select("sae_id", *[c for c in RESAMPLING if c in saes.columns]), on="sae_id", how="left")
    # The slice with the most widths is the headline (the config's width family has a single k by default).
    n_widths = table.group_by("architecture", "k").agg(pl.col("width").n_unique().alias("n"))
    best = n_widths.sort(["n", "k"], descending=[True, False]).row(0, named=True)
    primary = (pl.col("architecture") == best["architecture"]) & (pl.col("k") == best["k"])
    lead = ["width", "k", "fvu", "fvu_nonlinear", "fvu_linear", "fvu_fit", "c", "m"]  # what the report shows first
    margin = ctx.options.flat_margin_pct
    return table.with_columns(primary.alias("primary"), pl.lit(level).alias("confidence"),
                              pl.lit(margin).alias("flat_margin_pct")).select(*lead, pl.exclude(lead))


def _fvu_intervals(ctx: AnalysisContext, saes: pl.DataFrame) -> pl.DataFrame:
    """Per SAE, the intervals of FVU_total and FVU_nonlinear over resampled documents (b* held fixed; from the
    store's per-token error norms and the activations' per-context sums) and FVU_nonlinear in every resample."""
    ids = saes["sae_id"].to_list()
    if not (ctx.paths.activations("eval") / "meta.json").is_file():  # a store without its activations: no intervals
        log.warning("no eval activations at %s: FVU intervals over documents left out", ctx.paths.activations("eval"))
        return pl.DataFrame({"sae_id": ids})
    x = context_sums(ctx, ctx.hook)
    weights = ctx.resample_weights(x.contexts)
    rows = []
    for sae_id, sse in error_sums_by_context(ctx, ids, x.contexts).items():
        draws = x.fvu(sse, weights)  # [B, 2]: FVU_total, FVU_nonlinear
        (fvu_low, nl_low), (fvu_high, nl_high) = percentile_interval(draws, ctx.analysis.confidence)
        rows.append({"sae_id": sae_id, "fvu_ci_low": fvu_low, "fvu_ci_high": fvu_high, "fvu_nonlinear_ci_low": nl_low,
                     "fvu_nonlinear_ci_high": nl_high, "fvu_nonlinear_draws": draws[:, 1].tolist()})
    return pl.DataFrame(rows, schema_overrides={"fvu_nonlinear_draws": pl.List(pl.Float64)}).with_columns(
        **{k: pl.lit(v) for k, v in ctx.resampling(x.contexts).items()})


def _no_intercept(ctx: AnalysisContext, saes: pl.DataFrame) -> pl.DataFrame:
    """Per SAE, FVU_nonlinear with b* fitted the other way (without intercept when the stored one has one): the
    stored FVU_nonlinear scaled by the ratio of the two maps' test residual sums, from their pooled R²."""
    rows = []
    for sae in saes.iter_rows(named=True):
        metrics = ctx.paths.sae_errors(sae["hook"], sae["sae_id"]) / METRICS
        m = read_json(metrics) if metrics.is_file() else {}
        other, own = m.get("r2_vector_pooled_no_intercept"), m.get("r2_vector_pooled")
        value = math.nan
        if m.get("intercept", True) and other is not None and own is not None and own < 1:
            value = sae["fvu_nonlinear"] * (1 - other) / (1 - own)
        rows.append({"sae_id": sae["sae_id"], "fvu_nonlinear_no_intercept": value})
    return pl.DataFrame(rows, schema={"sae_id": pl.Utf8, "fvu_nonlinear_no_intercept": pl.Float64})


def _encoder_error(ctx: AnalysisContext) -> pl.DataFrame:
    """Per SAE, FVU_nonlinear of its encoder minus that of gradient pursuit with its decoder on the pursued tokens
    (empty when the store has no pursuit comparison)."""
    if not ctx.has_table("pursuit_saes"):
        return pl.DataFrame(schema={"sae_id": pl.Utf8, "encoder_error": pl.Float64})
    with ctx.connect() as con:
        return con.sql("""SELECT sae_id, max(fvu_nonlinear) FILTER (method = 'encoder')
                                         - max(fvu_nonlinear) FILTER (method = 'pursuit') AS encoder_error
                          FROM pursuit_saes GROUP BY sae_id""").pl()


def _mean_of(rows: pl.DataFrame, column: str) -> float:
    """Mean of ``column`` over the widths (NaN when the store has none of its values)."""
    values = rows[column].cast(pl.Float64).drop_nulls().drop_nans()
    return float(values.mean()) if len(values) else math.nan  # type: ignore[arg-type]


def _nonlinear_mean(rows: pl.DataFrame) -> float:
    """Mean FVU_nonlinear over the widths (NaN when the store has no decomposition for them)."""
    return _mean_of(rows, "fvu_nonlinear")


def _no_intercept_summary(main: pl.DataFrame) -> dict[str, float]:
    """Mean FVU_nonlinear without intercept and its OLS slope per doubling in % of that mean (where measured)."""
    values = main["fvu_nonlinear_no_intercept"].cast(pl.Float64).fill_null(math.nan).to_numpy()
    if not np.isfinite(values).all() or main["width"].n_unique() < 2:
        return {}
    mean = float(values.mean())
    slope = float(np.polyfit(np.log2(main["width"].to_numpy().astype(np.float64)), values, 1)[0])
    return {"fvu_nonlinear_no_intercept_mean": mean,
            "fvu_nonlinear_no_intercept_slope_pct_of_mean_per_doubling": 100 * slope / mean if mean > 0 else math.nan}


def _seed_spread(main: pl.DataFrame) -> dict[str, float | int]:
    """With several seeds at a width: the pooled within-width standard deviation of FVU_nonlinear (ddof 1), the
    noise one more seed adds to each point. The law and the slope are fitted on every SAE, so widths count by their
    seeds and the slope's t interval over the points carries this noise (empty with one seed per width)."""
    per = main.group_by("width").agg(pl.col("fvu_nonlinear").cast(pl.Float64).var(ddof=1).alias("var"),
                                     pl.len().alias("n"))
    seeds = int(per["n"].max())  # type: ignore[arg-type]
    if seeds < 2:
        return {}
    replicated = per.filter(pl.col("n") > 1)
    pooled = float(((replicated["n"] - 1) * replicated["var"]).sum() / (replicated["n"] - 1).sum())
    mean = _nonlinear_mean(main)
    return {"seeds_per_width": seeds, "fvu_nonlinear_seed_sd": math.sqrt(pooled),
            "fvu_nonlinear_seed_sd_pct_of_mean": 100 * math.sqrt(pooled) / mean if mean > 0 else math.nan}


def _verdict(value: float, low: float, high: float, below: str, above: str, inside: str) -> str:
    if not all(math.isfinite(v) for v in (value, low, high)):
        return "unknown"
    return below if high < value else above if low > value else inside


def _flatness(first: dict, nl_mean: float) -> dict[str, float | str]:
    """Is FVU_nonlinear flat in width? An equivalence test against the practical margin ± flat_margin_pct % of its
    mean per doubling: "yes" when both 90% intervals of the slope (over documents, over widths) lie inside it, "no"
    when the slope's interval at the confidence level (either kind) lies wholly outside it, else "undetermined"."""
    margin = first["flat_margin_pct"] / 100 * nl_mean
    # the intervals that exist (the document ones need the store's activations)
    inner = [v for v in (first[k] for k in SLOPE_EQUIVALENCE[2:]) if math.isfinite(v)]
    outer = [(first["fvu_nonlinear_slope_ci_low"], first["fvu_nonlinear_slope_ci_high"]),
             (first["fvu_nonlinear_slope_doc_ci_low"], first["fvu_nonlinear_slope_doc_ci_high"])]
    if not (math.isfinite(margin) and inner):
        verdict = "unknown"
    elif all(-margin < v < margin for v in inner):
        verdict = f"yes (within ±{first['flat_margin_pct']:g}% of the mean per doubling)"
    elif any(high < -margin for _, high in outer):
        verdict = "no (falls with width)"
    elif any(low > margin for low, _ in outer):
        verdict = "no (rises with width)"
    else:
        verdict = "undetermined (the intervals reach past the margin)"
    doc = {k: first[f"fvu_nonlinear_slope_{k}"] for k in ("doc_ci_low", "doc_ci_high")}
    return {"fvu_nonlinear_flat": verdict, "flat_margin_fvu_per_doubling": margin,
            **{f"fvu_nonlinear_slope_{k}": v for k, v in doc.items() if math.isfinite(v)}}


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """The law's c and m with intervals, and how FVU_nonlinear sits relative to c (primary k slice)."""
    main = table.filter(pl.col("primary")) if "primary" in table.columns else table.clear()
    if main.is_empty():
        return {"n_widths": 0, "c_fvu": math.nan, "m": math.nan, "note": "no SAEs in the width family"}
    first = main.row(0, named=True)
    nl_mean = _nonlinear_mean(main)
    slope, lo, hi = (first[k] for k in SLOPE)
    c, c_lo, c_hi = first["c"], first["c_ci_low"], first["c_ci_high"]
    return {
        "k": int(first["k"]), "architecture": first["architecture"], "n_widths": main["width"].n_unique(),
        "confidence": first["confidence"],
        "c_fvu": c, "c_ci_low_fvu": c_lo, "c_ci_high_fvu": c_hi,
        "m": first["m"], "m_ci_low": first["m_ci_low"], "m_ci_high": first["m_ci_high"], "a_fvu": first["a"],
        "fvu_nonlinear_mean": nl_mean,
        "linear_error_fvu": c - nl_mean,
        "fvu_nonlinear_slope_per_doubling": slope,
        "fvu_nonlinear_slope_ci_low": lo, "fvu_nonlinear_slope_ci_high": hi,
        "fvu_nonlinear_slope_pct_of_mean_per_doubling": 100 * slope / nl_mean if nl_mean > 0 else math.nan,
        **_no_intercept_summary(main),
        **_seed_spread(main),
        **_flatness(first, nl_mean),
        # compared with c's interval, not just its point estimate
        "fvu_nonlinear_below_c": _verdict(nl_mean, c_lo, c_hi, "no (above c)", "yes", "within the CI of c"),
        "note": first["note"], **resampling_summary(main),
        # the part of the nonlinear error a better encoder (gradient pursuit) removes, where it was measured
        **({"encoder_error_fvu": encoder} if math.isfinite(encoder := _mean_of(main, "encoder_error")) else {}),
    }


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """FVU_nonlinear roughly flat in width: this analysis's equivalence test against its margin."""
    basis = (f"FVU_nonlinear slope {summary.get('fvu_nonlinear_slope_pct_of_mean_per_doubling', float('nan')):+.1f}% "
             f"of its mean per doubling of width; flat means within ±{summary.get('flat_margin_fvu_per_doubling', float('nan')):.4f} "
             "FVU per doubling (equivalence test)")
    return from_answer(summary.get("fvu_nonlinear_flat", ""), basis)


def plot(table: pl.DataFrame) -> dict[str, object]:
    """The stacked Figure-1 decomposition of the primary k slice, measured points over the fitted curve."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    main = table.filter(pl.col("primary")) if "primary" in table.columns else table.clear()
    if main.is_empty():
        return {"decomposition": note_figure("Scaling decomposition", "no SAEs in the width family")}
    first = main.row(0, named=True)
    widths = main["width"].to_numpy().astype(np.float64)
    fig, ax = new_figure()
    if math.isfinite(first["c"]):
        grid = np.geomspace(widths.min(), widths.max(), 200)
        curve = power_law(grid, first["a"], first["c"], first["m"])
        nl_mean, c, g = _nonlinear_mean(main), first["c"], np.log2(grid)
        encoder = _mean_of(main, "encoder_error")
        if math.isfinite(encoder) and encoder > 0:  # a band only for a removal; a rise is in the pursuit section
            ax.fill_between(g, 0, nl_mean - encoder, color=PALETTE["nonlinear error"], alpha=0.85,
                            label="nonlinear error")
            ax.fill_between(g, nl_mean - encoder, nl_mean, color=PALETTE["pursuit"], alpha=0.9,
                            label="encoder error (removed by gradient pursuit)")
        else:
            ax.fill_between(g, 0, nl_mean, color=PALETTE["nonlinear error"], alpha=0.85, label="nonlinear error")
        ax.fill_between(g, nl_mean, c, color=PALETTE["linear error"], alpha=0.85, label="linear error")
        ax.fill_between(g, c, curve, color=PALETTE["absent features"], alpha=0.9, label="absent features")
        ax.plot(g, curve, color=PALETTE["total"], lw=1.2, label=f"fit c + a·W^(−m), m={first['m']:.2f}")
        for bound in ("c_ci_low", "c_ci_high"):
            ax.axhline(first[bound], color=PALETTE["total"], lw=0.8, ls=":")
        title = f"FVU vs width ({first['architecture']}, k={first['k']}); dotted: CI of c"
    else:
        title = f"FVU vs width ({first['architecture']}, k={first['k']}): no power-law fit"
    lw = np.log2(widths)
    ax.scatter(lw, main["fvu"], color=PALETTE["total"], zorder=3, label="FVU total (measured)")
    ax.scatter(lw, main["fvu_nonlinear"], color="white", edgecolor=PALETTE["nonlinear error"], zorder=3,
               label="FVU nonlinear (measured)")
    log2_ticks(ax, "x", widths)
    ax.set(xlabel="SAE width (latents, log scale)", ylabel="FVU (fraction of variance)", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper right")
    return {"decomposition": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

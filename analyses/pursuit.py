"""How much of an SAE's error, and of its nonlinear error, is its encoder's fault rather than its dictionary's?

Each SAE's decoder pursues the same eval tokens by gradient pursuit with each token's encoder L0 (darkmatter.errors.pursuit;
b* refitted on the pursuit error with the decomposition's split); ΔFVU_total and ΔFVU_nonlinear (pursuit − encoder)
are pooled over those tokens with percentile intervals from resampling their documents (b* held fixed), and the widest
SAE's pursuit reconstruction is spliced into the model beside Sae(x) for its CE.
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
from darkmatter.analysis.saes import family_name, family_saes, in_family
from darkmatter.analysis.stats import percentile_interval, resampling_summary
from darkmatter.analysis.verdict import Verdict, interval

log = logging.getLogger(__name__)

PAPER_CLAIM = ("Gradient pursuit with the SAE's own dictionary (L0-matched) gives only a very slight decrease in "
               "nonlinear error; a third-party reading of the paper reports FVU_total about 3-5% lower and "
               "FVU_nonlinear essentially unchanged.")
HEADLINE = ("delta_fvu_pct_widest", "delta_fvu_nonlinear_pct_widest", "delta_fvu_pct_mean",
            "delta_fvu_nonlinear_pct_mean", "delta_ce_pursuit_minus_sae_nats")
NO_DATA = "the store has no pursuit comparison (pursuit_errors is missing or empty): run the pursuit stage"
MEASURES = ("fvu", "fvu_nonlinear")  # the pooled FVUs compared, each for both methods
LEADING = ["sae_id", "width", "k", "fvu_encoder", "fvu_pursuit", "delta_fvu", "delta_fvu_pct", "fvu_nonlinear_encoder",
           "fvu_nonlinear_pursuit", "delta_fvu_nonlinear", "delta_fvu_nonlinear_pct"]


def _has_rows(ctx: AnalysisContext, table: str) -> bool:
    if not ctx.has_table(table):
        return False
    with ctx.connect() as con:
        return bool(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])


def _fvu_table(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per pursued SAE: both methods' pooled FVUs, their differences and the differences' intervals."""
    with ctx.connect() as con:
        rows = con.sql("SELECT DISTINCT row FROM pursuit_errors ORDER BY row").pl()["row"].to_numpy()
        sae_ids = [r[0] for r in con.execute("SELECT DISTINCT sae_id FROM pursuit_errors ORDER BY sae_id").fetchall()]
    x = context_sums(ctx, ctx.hook, rows)
    sums = {method: error_sums_by_context(ctx, sae_ids, x.contexts, "pursuit_errors", f"e.method = '{method}'")
            for method in ("encoder", "pursuit")}
    level = ctx.analysis.confidence
    weights = ctx.resample_weights(x.contexts)
    out = []
    for sae_id in sae_ids:
        # columns: (FVU, FVU_nonlinear) of the encoder, then of the pursuit
        sse = np.concatenate([sums["encoder"][sae_id], sums["pursuit"][sae_id]], axis=1)
        point, draws = x.fvu(sse)[0], x.fvu(sse, weights)
        row: dict[str, object] = {"sae_id": sae_id, "tokens": int(x.n.sum())}
        for j, measure in enumerate(MEASURES):
            enc, pur = point[j], point[2 + j]
            delta = draws[:, 2 + j] - draws[:, j]
            low, high = percentile_interval(delta, level)
            rel_low, rel_high = percentile_interval(100 * delta / draws[:, j], level)
            row |= {f"{measure}_encoder": enc, f"{measure}_pursuit": pur, f"delta_{measure}": pur - enc,
                    f"delta_{measure}_ci_low": float(low), f"delta_{measure}_ci_high": float(high),
                    f"delta_{measure}_pct": 100 * (pur - enc) / enc, f"delta_{measure}_pct_ci_low": float(rel_low),
                    f"delta_{measure}_pct_ci_high": float(rel_high)}
        out.append(row)
    return pl.DataFrame(out).with_columns(confidence=pl.lit(level), **{
        k: pl.lit(v) for k, v in ctx.resampling(x.contexts).items()})


def _ce_table(ctx: AnalysisContext) -> pl.DataFrame:
    """For the SAE whose pursuit was spliced in: mean CE (nats) clean, with Sae(x) and with the pursuit
    reconstruction, and the paired difference pursuit − sae with its interval over resampled documents."""
    if not _has_rows(ctx, "token_ce"):
        return pl.DataFrame()
    with ctx.connect() as con:
        per = con.sql("""SELECT p.sae_id, p.context, count(*) AS n, sum(p.ce::DOUBLE) AS ce_pursuit,
                                sum(s.ce::DOUBLE) AS ce_sae, sum(c.ce::DOUBLE) AS ce_clean
                         FROM token_ce p
                         JOIN token_ce s ON s.sae_id = p.sae_id AND s.condition = 'sae'
                                        AND s.context = p.context AND s.position = p.position
                         JOIN token_ce c ON c.sae_id = '' AND c.condition = 'clean'
                                        AND c.context = p.context AND c.position = p.position
                         WHERE p.condition = 'pursuit' GROUP BY ALL ORDER BY p.sae_id, p.context""").pl()
    if per.is_empty():
        return pl.DataFrame()
    out = []
    for (sae_id,), part in per.partition_by("sae_id", as_dict=True, maintain_order=True).items():
        n = part["n"].to_numpy().astype(np.float64)
        cols = {c: part[c].to_numpy() for c in ("ce_clean", "ce_sae", "ce_pursuit")}
        w = ctx.resample_weights(part["context"].to_numpy())
        diff = (w @ (cols["ce_pursuit"] - cols["ce_sae"])) / (w @ n)
        low, high = percentile_interval(diff, ctx.analysis.confidence)
        out.append({"sae_id": sae_id, **{c: float(v.sum() / n.sum()) for c, v in cols.items()},
                    "delta_ce_pursuit_minus_sae": float((cols["ce_pursuit"] - cols["ce_sae"]).sum() / n.sum()),
                    "delta_ce_ci_low": float(low), "delta_ce_ci_high": float(high), "ce_contexts": part.height,
                    "ce_tokens": int(n.sum())})
    return pl.DataFrame(out)


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per pursued SAE: encoder and pursuit FVU_total / FVU_nonlinear, the differences with intervals,
    L0 and pursuit time (from pursuit_saes), and the CE columns for the SAE whose pursuit was spliced in."""
    if not _has_rows(ctx, "pursuit_errors"):
        return pl.DataFrame({"sae_id": [], "note": []}, schema={"sae_id": pl.Utf8, "note": pl.Utf8})
    table = _fvu_table(ctx)
    with ctx.connect() as con:
        extra = con.sql("""SELECT sae_id, max(l0_mean) FILTER (method = 'encoder') AS l0_encoder,
                                  max(l0_mean) FILTER (method = 'pursuit') AS l0_pursuit,
                                  max(seconds) FILTER (method = 'pursuit') AS pursuit_seconds
                           FROM pursuit_saes GROUP BY sae_id""").pl()
    width_fam, k_fam = family_name(ctx, "width"), family_name(ctx, "k")
    saes = family_saes(ctx).select("sae_id", "architecture", "width", "k", "families",
                                   in_family(width_fam).alias("in_width_family"),
                                   in_family(k_fam).alias("in_k_family"))
    table = saes.join(table, on="sae_id", how="inner").join(extra, on="sae_id", how="left")
    ce = _ce_table(ctx)
    if ce.height:
        table = table.join(ce, on="sae_id", how="left")
    return table.sort("architecture", "k", "width").select(*LEADING, pl.exclude(LEADING))


def _verdict(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "unknown"
    return "lower" if high < 0 else "higher" if low > 0 else "unchanged (interval contains 0)"


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """ΔFVU_total and ΔFVU_nonlinear (%, pursuit − encoder) of the width family's widest SAE and their means over
    all SAEs, how many SAEs each interval places below / above 0, and the pursuit's CE beside Sae(x)'s."""
    if table.is_empty() or "fvu_encoder" not in table.columns:
        return {"n_saes": 0, "note": NO_DATA}
    width = table.filter(pl.col("in_width_family")) if table["in_width_family"].any() else table
    widest = width.sort(["width", "k"], descending=[True, False]).row(0, named=True)
    out: dict[str, float | str] = {
        "n_saes": table.height, "tokens": int(table["tokens"][0]), **resampling_summary(table),
        "confidence": float(table["confidence"][0]), "widest_sae_id": widest["sae_id"]}
    for measure in MEASURES:
        out |= {f"delta_{measure}_pct_widest": widest[f"delta_{measure}_pct"],
                f"delta_{measure}_pct_widest_ci_low": widest[f"delta_{measure}_pct_ci_low"],
                f"delta_{measure}_pct_widest_ci_high": widest[f"delta_{measure}_pct_ci_high"],
                f"delta_{measure}_pct_mean": float(table[f"delta_{measure}_pct"].mean()),  # type: ignore[arg-type]
                f"{measure}_lower_count": int((table[f"delta_{measure}_ci_high"] < 0).sum()),
                f"{measure}_higher_count": int((table[f"delta_{measure}_ci_low"] > 0).sum()),
                f"{measure}_widest_verdict": _verdict(widest[f"delta_{measure}_ci_low"],
                                                      widest[f"delta_{measure}_ci_high"])}
    spliced = table.filter(pl.col("ce_pursuit").is_not_null()) if "ce_pursuit" in table.columns else table.clear()
    if spliced.height:
        r = spliced.row(0, named=True)
        out |= {"ce_sae_id": r["sae_id"], "ce_clean_nats": r["ce_clean"], "ce_sae_nats": r["ce_sae"],
                "ce_pursuit_nats": r["ce_pursuit"], "delta_ce_pursuit_minus_sae_nats": r["delta_ce_pursuit_minus_sae"],
                "delta_ce_ci_low_nats": r["delta_ce_ci_low"], "delta_ce_ci_high_nats": r["delta_ce_ci_high"],
                "ce_verdict": _verdict(r["delta_ce_ci_low"], r["delta_ce_ci_high"])}
    return out


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """"Only a very slight decrease" of FVU_nonlinear, read as a change within ±5% of it (widest SAE)."""
    keys = ("delta_fvu_nonlinear_pct_widest", "delta_fvu_nonlinear_pct_widest_ci_low",
            "delta_fvu_nonlinear_pct_widest_ci_high")
    if not all(k in summary for k in keys):
        return Verdict("undetermined", "no pursuit of the widest SAE")
    low, high = summary[keys[1]], summary[keys[2]]
    word = "agrees" if low > -5 and high < 5 else "differs" if high < -5 or low > 5 else "undetermined"
    return Verdict(word, f"FVU_nonlinear changes by {interval(*(summary[k] for k in keys), digits=1)}% with pursuit "
                         "(slight: within ±5%)")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """ΔFVU (% of the encoder's, with intervals) for FVU_total and FVU_nonlinear across the width and k sweeps."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    if table.is_empty() or "fvu_encoder" not in table.columns:
        return {"delta_fvu": note_figure("Gradient pursuit vs encoder", NO_DATA)}
    panels = [(title, col, table.filter(pl.col(flag))) for title, col, flag in
              (("width sweep", "width", "in_width_family"), ("k sweep", "k", "in_k_family"))]
    panels = [p for p in panels if p[2].height > 1] or [("all SAEs", "width", table)]
    fig, axes = new_figure(ncols=len(panels), sharey=True, figsize=(6.4 if len(panels) == 1 else 9.6, 4.0),
                           squeeze=False)
    colors = {"fvu": PALETTE["total"], "fvu_nonlinear": PALETTE["nonlinear error"]}
    labels = {"fvu": "FVU total", "fvu_nonlinear": "FVU nonlinear"}
    for ax, (title, col, rows) in zip(axes[0], panels, strict=True):
        rows = rows.sort(col)
        x = np.log2(rows[col].to_numpy().astype(np.float64))
        for offset, measure in zip((-0.06, 0.06), MEASURES, strict=True):
            y = rows[f"delta_{measure}_pct"].to_numpy()
            err = np.abs(np.stack([rows[f"delta_{measure}_pct_ci_low"].to_numpy(),
                                   rows[f"delta_{measure}_pct_ci_high"].to_numpy()]) - y)
            ax.errorbar(x + offset, y, yerr=err, fmt="o-", color=colors[measure], capsize=3, label=labels[measure])
        ax.axhline(0, color="black", lw=0.8)
        log2_ticks(ax, "x", rows[col].to_numpy())
        ax.set(xlabel=f"{col} (log scale)", title=title)
    axes[0][0].set_ylabel("pursuit − encoder (% of encoder's FVU)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gradient pursuit with the SAE's decoder, L0-matched", fontweight="bold")
    return {"delta_fvu": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

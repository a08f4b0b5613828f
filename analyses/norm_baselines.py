"""Is the size of the SAE error predicted by x itself, or would a cheap per-token scalar do as well?

For every SAE, ‖SaeError‖² is regressed affinely on single scalars — token identity (the mean of ‖SaeError‖² per
token id over the fit rows; unseen ids get the fit-row mean), the model's clean CE loss at that token, the SAE's L0 on
that token and ‖x‖ — and on all four together, fitted on the store's fit rows and scored by R² on its test rows; the
comparison is the store's R² of ‖SaeError‖² from the full activation vector x on the same split. Every R² carries
a percentile interval from resampling eval documents (fits held fixed).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.saes import family_saes
from darkmatter.analysis.stats import r2_interval, r2_interval_on_fit_flag, resampling_summary
from darkmatter.analysis.verdict import Verdict
from darkmatter.errors.measure import TEST_SUMS
from darkmatter.regression import GroupSums

log = logging.getLogger(__name__)

PAPER_CLAIM = ("x predicts ‖SaeError‖² far better than token identity, the model's CE loss, the SAE's L0 or ‖x‖: "
               "the error norm depends on the direction of x, not only on these scalars.")
HEADLINE = ("x_beats_each_scalar_fraction", "r2_x_median", "r2_token_identity_median", "r2_x_norm_median")

BASELINES = {  # table column -> label in the figure
    "r2_x": "x (affine, d_model regressors)",
    "r2_token_identity": "token identity",
    "r2_ce_loss": "CE loss at token",
    "r2_l0": "SAE L0 on token",
    "r2_x_norm": "‖x‖",
    "r2_all_four": "all four scalars",
}
SCALARS = ["r2_token_identity", "r2_ce_loss", "r2_l0", "r2_x_norm"]
COLOURS = ["#333333", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#bab0ac"]


def _per_token(ctx: AnalysisContext, sae_id: str) -> pl.DataFrame:
    with ctx.connect() as con:
        return con.sql("""SELECT e.fit, e.error_norm_sq, e.l0, e.x_norm, t.token_id, t.loss, t.context
                          FROM token_errors e JOIN tokens t USING (row) WHERE e.sae_id = ?
                          ORDER BY e.row""", params=[sae_id]).pl()


def baseline_features(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """The four scalar regressors [N] of one SAE, every fitted statistic taken on fit rows only.

    token identity: mean ‖SaeError‖² of that token id over the fit rows (unseen ids: the fit-row mean); CE loss:
    NULL at a context's last position, filled with the fit-row mean loss.
    """
    fit = pl.col("fit")
    y_mean = frame.filter(fit)["error_norm_sq"].mean()
    per_id = frame.filter(fit).group_by("token_id").agg(pl.col("error_norm_sq").mean().alias("token_mean"))
    token = frame.join(per_id, on="token_id", how="left", maintain_order="left")["token_mean"].fill_null(y_mean)
    loss = frame["loss"].fill_null(frame.filter(fit)["loss"].mean())
    return {"r2_token_identity": token.to_numpy(), "r2_ce_loss": loss.to_numpy(),
            "r2_l0": frame["l0"].to_numpy(), "r2_x_norm": frame["x_norm"].to_numpy()}


def _r2_x(ctx: AnalysisContext, sae: dict, level: float) -> dict[str, float]:
    """The store's R² of ‖SaeError‖² from x, with its interval from the decomposition's per-context test sums (the
    last column), resampled like the baselines'; without stored test sums, the point alone."""
    path = ctx.paths.sae_errors(sae["hook"], sae["sae_id"]) / TEST_SUMS
    if not path.is_file():
        point = math.nan if sae["r2_norm_sq"] is None else sae["r2_norm_sq"]
        return {"r2_x": point, "r2_x_low": math.nan, "r2_x_high": math.nan}
    sums = GroupSums.load(path)
    d = sums.sum.shape[1] - 1
    x = r2_interval(sums, slice(d, d + 1), ctx.resample_weights(sums.groups), level)
    return {"r2_x": x["pooled"], "r2_x_low": x["pooled_low"], "r2_x_high": x["pooled_high"]}


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per SAE: the held-out R² of each baseline beside the store's R² from x."""
    saes = family_saes(ctx)
    rows = []
    for sae in saes.iter_rows(named=True):
        frame = _per_token(ctx, sae["sae_id"])
        if frame.is_empty():
            log.warning("%s has no per-token errors; left out", sae["sae_id"])
            continue
        y, fit = frame["error_norm_sq"].to_numpy(), frame["fit"].to_numpy()
        contexts, level = frame["context"].to_numpy(), ctx.analysis.confidence
        features = baseline_features(frame)
        features["r2_all_four"] = np.column_stack(list(features.values()))
        r2: dict[str, float] = {}
        for name, v in features.items():
            r2[name], r2[f"{name}_low"], r2[f"{name}_high"] = r2_interval_on_fit_flag(
                v, y, fit, contexts, ctx.resample_weights, level)
        r2 |= _r2_x(ctx, sae, level)
        rows.append({"sae_id": sae["sae_id"], "architecture": sae["architecture"], "width": sae["width"],
                     "k": sae["k"], "families": sae["families"], **r2,
                     "l0_constant": bool(np.ptp(features["r2_l0"]) == 0), "n_test": int((~fit).sum()),
                     **ctx.resampling(np.unique(contexts)), "confidence": level})
    schema = {"sae_id": pl.Utf8, "architecture": pl.Utf8, "width": pl.Int64, "k": pl.Int64, "families": pl.Utf8,
              **{f"{b}{end}": pl.Float64 for b in BASELINES for end in ("", "_low", "_high")},
              "l0_constant": pl.Boolean, "n_test": pl.Int64, "resampling_unit": pl.Utf8, "n_documents": pl.Int64,
              "n_contexts": pl.Int64, "bootstrap": pl.Int64, "confidence": pl.Float64}
    return pl.DataFrame(rows, schema=schema).select("sae_id", "width", "k", *BASELINES, pl.all().exclude(
        "sae_id", "width", "k", *BASELINES))


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Median R² of each predictor over SAEs and the fraction of SAEs where x beats each scalar (and all four)."""
    out: dict[str, float | str] = {"n_saes": table.height, **resampling_summary(table)}
    for name in BASELINES:
        col = table[name].drop_nans().drop_nulls()
        out[f"{name}_median"] = float(col.median()) if len(col) else math.nan  # type: ignore[arg-type]
    if table.is_empty():
        return out | {"note": "no SAE has per-token errors"}
    best_scalar = table.select(pl.max_horizontal(SCALARS)).to_series()
    out["x_beats_each_scalar_fraction"] = float((table["r2_x"] > best_scalar).mean())  # type: ignore[arg-type]
    out["x_beats_all_four_fraction"] = float((table["r2_x"] > table["r2_all_four"]).mean())  # type: ignore[arg-type]
    out["x_minus_best_scalar_r2_median"] = float((table["r2_x"] - best_scalar).median())  # type: ignore[arg-type]
    # x's interval above every scalar's (the intervals of one SAE share their resamples)
    best_high = table.select(pl.max_horizontal([f"{s}_high" for s in SCALARS])).to_series()
    out["x_beats_each_scalar_beyond_intervals_fraction"] = float((table["r2_x_low"] > best_high).mean())  # type: ignore[arg-type]
    if table["l0_constant"].any():
        out["note"] = "L0 is constant on some SAEs (TopK): its R² is that of the fit-row mean, about 0"
    return out


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """x predicts ‖SaeError‖² better than each scalar, beyond the intervals, for most SAEs."""
    frac = summary.get("x_beats_each_scalar_beyond_intervals_fraction", float("nan"))
    word = "undetermined" if frac != frac else "agrees" if frac > 0.5 else "differs"
    return Verdict(word, f"x beats token identity, CE loss, L0 and ‖x‖ beyond the intervals for {frac:.0%} of SAEs "
                         f"(R² median {summary.get('r2_x_median', float('nan')):.2f} against "
                         f"{summary.get('r2_token_identity_median', float('nan')):.2f} for token identity)")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """Grouped bars: held-out R² of ‖SaeError‖² per SAE and predictor, with their intervals."""
    from darkmatter.analysis.figures import new_figure

    if table.is_empty():
        return {"baselines": note_figure("Norm baselines", "no SAE has per-token errors")}
    fig, ax = new_figure(figsize=(max(6.4, 0.9 * table.height + 2), 4.0))
    centres = np.arange(table.height)
    step = 0.8 / len(BASELINES)
    for i, ((name, label), colour) in enumerate(zip(BASELINES.items(), COLOURS, strict=True)):
        value = table[name].fill_null(math.nan).to_numpy()
        bounds = [table[f"{name}_{end}"].fill_null(math.nan).to_numpy() for end in ("low", "high")] \
            if f"{name}_low" in table.columns else [value, value]
        ax.bar(centres - 0.4 + (i + 0.5) * step, value, step, color=colour, label=label,
               yerr=np.abs(np.stack(bounds) - value), error_kw={"lw": 0.6, "capsize": 1.5})
    ax.set_xticks(centres, [f"w{w}\nk{k}" for w, k in zip(table["width"], table["k"], strict=True)], fontsize=8)
    values = table.select(list(BASELINES)).to_numpy().astype(float)
    lowest = np.nanmin(values) if np.isfinite(values).any() else 0.0
    ax.set_ylim(min(0.0, lowest) - 0.05, 1.05)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(ylabel="held-out R² of ‖SaeError‖²", title="Predicting the squared error norm: x vs scalar baselines")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    return {"baselines": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

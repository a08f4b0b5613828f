"""Does the linear probe for ‖Sae(x) − b_dec‖² read each latent's typical activation off its decoder direction?

a* = least squares of ‖Sae(x) − b_dec‖² on Sae(x) − b_dec (no intercept, as in the derivation below) on the fit
split of a token subsample; for every latent active on enough subsample tokens, W_dec[i]·a* is compared with the
latent's mean activation when active by Pearson and Spearman correlation over latents and by a running mean over
latents sorted by that activation — for the chosen SAE and, in the table, every SAE.

Why they should track (Engels et al.): if Sae(x) − b_dec = Σ_i f_i·d_i with nearly orthogonal decoder rows d_i and
f_i ≈ μ_i whenever latent i is active, then ‖Sae(x) − b_dec‖² ≈ Σ_i f_i²‖d_i‖² ≈ Σ_i μ_i f_i ‖d_i‖²
= ⟨Σ_i μ_i d_i, Sae(x) − b_dec⟩, so a* ≈ Σ_i μ_i d_i and d_i·a* ≈ μ_i‖d_i‖² (= μ_i for unit-norm decoders).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import polars as pl
from scipy import stats

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.saes import choose_sae, family_saes
from darkmatter.analysis.stats import subsample
from darkmatter.analysis.verdict import Verdict
from darkmatter.errors.metrics import LatentAccumulator
from darkmatter.regression import heldout_r2

log = logging.getLogger(__name__)

PAPER_CLAIM = ("The projection W_dec[i]·a* of the ‖Sae(x) − b_dec‖² probe onto each latent's decoder direction "
               "tracks that latent's mean activation when active.")
HEADLINE = ("spearman_r", "spearman_r_median_all_saes", "probe_r2_heldout", "median_projection_over_mean_activation")



def probe_table(ctx: AnalysisContext, sae: dict, rows: np.ndarray, n_rows: int) -> pl.DataFrame:
    """Per latent of one SAE, on the eval subsample ``rows`` (of ``n_rows``, for the protocol's fit fraction):
    activation statistics from its stored codes and d_i·a*."""
    dc, opts = ctx.decomposition, ctx.options
    model = ctx.sae(sae["hook"], sae["sae_id"])
    codes = ctx.codes(sae["hook"], sae["sae_id"], model)
    idx, vals = codes.rows(rows)
    centred = codes.decode(idx, vals).double().numpy()  # Sae(x) − b_dec
    norm_sq = np.einsum("ij,ij->i", centred, centred)
    n, d = centred.shape
    fit_n = min(max(round(n * dc.fit_tokens / n_rows), d + 1), n - 1)
    probe = heldout_r2(centred, norm_sq, fit_tokens=fit_n, seed=dc.seed, intercept=opts.intercept, ridge=dc.ridge)
    latents = LatentAccumulator(model.d_sae).update_codes(idx, vals)
    W_dec = model.W_dec.detach().double().numpy()
    return pl.DataFrame({
        "sae_id": sae["sae_id"], "hook": sae["hook"], "width": sae["width"], "k": sae["k"],
        "latent": np.arange(model.d_sae), "fire_count": latents.fire_count,
        "mean_activation_when_active": latents.mean_when_active, "decoder_norm_sq": np.einsum("ij,ij->i", W_dec, W_dec),
        "probe_projection": W_dec @ probe.fit.coef[:, 0], "used": latents.fire_count >= opts.min_fires,
        "probe_r2_heldout": probe.r2.r2_pooled, "tokens": n, "intercept": opts.intercept,
    })


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per latent of each studied SAE; ``default`` marks the chosen SAE."""
    opts = ctx.options
    saes = family_saes(ctx)
    chosen = choose_sae(ctx, saes, opts.sae_id)
    if not opts.all_saes:
        saes = saes.filter(pl.col("sae_id") == chosen["sae_id"])
    n_rows = ctx.eval_store().rows
    rows = subsample(n_rows, opts.tokens, ctx.seed)
    parts = []
    for sae in saes.iter_rows(named=True):
        parts.append(probe_table(ctx, sae, rows, n_rows))
        log.info("%s: probe R² %.3f", sae["sae_id"], parts[-1]["probe_r2_heldout"][0])
    table = pl.concat(parts)
    return table.with_columns(default=pl.col("sae_id") == chosen["sae_id"])


def tracking(part: pl.DataFrame) -> dict[str, float]:
    """Pearson and Spearman r between W_dec[i]·a* and mean activation when active, over the used latents."""
    used = part.filter(pl.col("used"))
    a, b = used["mean_activation_when_active"].to_numpy(), used["probe_projection"].to_numpy()
    if used.height < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"pearson": math.nan, "spearman": math.nan, "latents": used.height}
    return {"pearson": float(stats.pearsonr(a, b)[0]), "spearman": float(stats.spearmanr(a, b)[0]),
            "latents": used.height}


def per_sae(table: pl.DataFrame) -> pl.DataFrame:
    """One row per SAE: width, k, probe R² and the two tracking correlations."""
    rows = []
    for (sae_id,), part in table.group_by("sae_id", maintain_order=True):
        rows.append({"sae_id": sae_id, "width": part["width"][0], "k": part["k"][0],
                     "probe_r2_heldout": part["probe_r2_heldout"][0]} | tracking(part))
    return pl.DataFrame(rows)


def _median(values: pl.Series) -> float:
    """Median ignoring NaN; NaN when nothing is left."""
    v = values.to_numpy().astype(np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """The chosen SAE's correlations and probe R², and medians over all studied SAEs."""
    main = table.filter(pl.col("default"))
    t = tracking(main)
    everyone = per_sae(table)
    return {"sae_id": str(main["sae_id"][0]), "pearson_r": t["pearson"], "spearman_r": t["spearman"],
            "latents_used": t["latents"], "latents_total": main.height,
            "probe_r2_heldout": float(main["probe_r2_heldout"][0]),
            "median_projection_over_mean_activation": _median(
                main.filter(pl.col("used")).select(pl.col("probe_projection") / pl.col("mean_activation_when_active"))
                .to_series()),
            "n_saes": everyone.height, "pearson_r_median_all_saes": _median(everyone["pearson"]),
            "spearman_r_median_all_saes": _median(everyone["spearman"]),
            "spearman_r_min_all_saes": float(np.nanmin(everyone["spearman"].to_numpy())),
            "tokens": int(main["tokens"][0])}


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """No interval yet on the correlation, and the paper states no number to compare with."""
    return Verdict("undetermined", f"Spearman ρ(projection, mean activation) = {summary.get('spearman_r', float('nan')):.2f} "
                                   "for the widest SAE, without an interval; the paper gives no number")


def plot(table: pl.DataFrame) -> dict:
    """Scatter and running mean of W_dec[i]·a* against mean activation when active (chosen SAE); correlations per
    SAE against width."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    main = table.filter(pl.col("default") & pl.col("used")).sort("mean_activation_when_active")
    if main.height < 3:
        return {"probe_tracking": note_figure("Probe mechanism", "fewer than 3 latents were active often enough")}
    mu, proj = main["mean_activation_when_active"].to_numpy(), main["probe_projection"].to_numpy()
    window = max(5, main.height // 50)
    kernel = np.ones(window) / window
    fig, ax = new_figure()
    ax.scatter(mu, proj, s=6, alpha=0.35, color=PALETTE["linear error"], label="latents")
    ax.plot(np.convolve(mu, kernel, "valid"), np.convolve(proj, kernel, "valid"), color=PALETTE["total"], lw=2,
            label=f"running mean ({window} latents)")
    lim = [0, float(max(mu.max(), proj.max()))]
    ax.plot(lim, lim, color="#999999", ls=":", lw=1, label="W_dec[i]·a* = mean activation")
    t = tracking(table.filter(pl.col("default")))
    ax.set(xlabel="mean activation when active", ylabel="W_dec[i]·a*",
           title=f"{main['sae_id'][0]}: Pearson {t['pearson']:.2f}, Spearman {t['spearman']:.2f}")
    ax.legend(fontsize=8)
    figures = {"probe_tracking": fig}
    everyone = per_sae(table).sort("width", "k")
    if everyone.height > 1:
        fig2, ax2 = new_figure()
        pos = np.arange(everyone.height)
        for col, colour, shift in (("pearson", PALETTE["linear error"], -0.1), ("spearman", PALETTE["total"], 0.1)):
            ax2.plot(pos + shift, everyone[col], "o", color=colour, label=col)
        ax2.set_xticks(pos, [f"w{w}\nk{k}" for w, k in zip(everyone["width"], everyone["k"], strict=True)],
                       fontsize=8)
        ax2.set(xlabel="SAE (width, k)", ylabel="correlation over latents", title="Tracking, every SAE")
        ax2.legend(fontsize=8)
        figures["tracking_by_sae"] = fig2
    return figures


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

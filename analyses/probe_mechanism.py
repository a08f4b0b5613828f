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
from darkmatter.analysis.stats import basic_interval, resampling_summary, subsample
from darkmatter.analysis.verdict import Verdict, by_interval, interval
from darkmatter.errors.metrics import LatentAccumulator
from darkmatter.regression import heldout_r2, split_mask

log = logging.getLogger(__name__)

PAPER_CLAIM = ("The projection W_dec[i]·a* of the ‖Sae(x) − b_dec‖² probe onto each latent's decoder direction "
               "tracks that latent's mean activation when active.")
HEADLINE = ("spearman_r", "spearman_r_median_all_saes", "probe_r2_heldout", "median_projection_over_mean_activation")



TRACKING_RHO = 0.5  # "tracks": Spearman ρ above this (our boundary: the paper shows a scatter, no number)
CORRELATIONS = ("pearson", "spearman")


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    return float(stats.pearsonr(a, b)[0]), float(stats.spearmanr(a, b)[0])


def tracking_intervals(ctx: AnalysisContext, centred: np.ndarray, norm_sq: np.ndarray, fit: np.ndarray,
                       idx: np.ndarray, vals: np.ndarray, W_dec: np.ndarray, used: np.ndarray,
                       contexts: np.ndarray, point_estimate: tuple[float, float]) -> dict[str, float]:
    """Intervals of the Pearson and Spearman r of one SAE over resampled documents: in each resample the rows count
    as often as their document was drawn, a* is refitted on the fit rows (same intercept and ridge λ on a* only)
    and each used latent's mean activation when active is recomputed; the latents studied stay those of the point
    estimate. The intervals are basic bootstrap intervals (:func:`darkmatter.analysis.stats.basic_interval`): a
    resample's repeated documents make rare latents' means noisier, which lowers every resampled correlation (on the
    default run by about 0.03, more than the spread of the draws); ``*_bootstrap_bias`` reports that shift."""
    unique, inverse = np.unique(contexts, return_inverse=True)
    weights = ctx.resample_weights(unique)  # [B, contexts]
    out = {f"{c}_{key}": math.nan for c in CORRELATIONS for key in ("ci_low", "ci_high", "bootstrap_bias")}
    if not len(weights):
        return out
    intercept, ridge = ctx.options.intercept, ctx.decomposition.ridge
    draws = np.full((len(weights), 2), np.nan)
    d_sae = W_dec.shape[0]
    active = vals != 0
    for b, w_ctx in enumerate(weights.astype(np.float64)):
        w = w_ctx[inverse]
        wf, c, y = w[fit], centred[fit], norm_sq[fit]
        if intercept:  # centre by the weighted means: the intercept is unpenalised
            total = wf.sum()
            c, y = c - (wf @ c) / total, y - (wf @ y) / total
        gram = (c * wf[:, None]).T @ c
        gram[np.diag_indices_from(gram)] += ridge
        a_star = np.linalg.lstsq(gram, (c * wf[:, None]).T @ y, rcond=None)[0]
        rw = np.broadcast_to(w[:, None], vals.shape)
        fires = np.bincount(idx[active], weights=rw[active], minlength=d_sae)
        sums = np.bincount(idx[active], weights=(vals * rw)[active], minlength=d_sae)
        keep = used & (fires > 0)
        draws[b] = _correlations(sums[keep] / fires[keep], (W_dec @ a_star)[keep])
    point = np.array(point_estimate)
    low, high = (np.clip(v, -1, 1) for v in basic_interval(point, draws, ctx.analysis.confidence))  # correlations
    bias = np.nanmean(draws, axis=0) - point
    return {f"{c}_{key}": float(v[i]) for i, c in enumerate(CORRELATIONS)
            for key, v in (("ci_low", low), ("ci_high", high), ("bootstrap_bias", bias))}


def probe_table(ctx: AnalysisContext, sae: dict, rows: np.ndarray, n_rows: int,
                contexts: np.ndarray | None = None) -> pl.DataFrame:
    """Per latent of one SAE, on the eval subsample ``rows`` (of ``n_rows``, for the protocol's fit fraction):
    activation statistics from its stored codes and d_i·a*; with the rows' ``contexts``, also the intervals of
    the tracking correlations over resampled documents (:func:`tracking_intervals`)."""
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
    used = latents.fire_count >= opts.min_fires
    projection = W_dec @ probe.fit.coef[:, 0]
    intervals = {} if contexts is None else tracking_intervals(
        ctx, centred, norm_sq, split_mask(n, fit_n, dc.seed), idx.numpy(), vals.double().numpy(), W_dec, used,
        contexts, _correlations(latents.mean_when_active[used], projection[used]))
    return pl.DataFrame({
        "sae_id": sae["sae_id"], "hook": sae["hook"], "width": sae["width"], "k": sae["k"],
        "latent": np.arange(model.d_sae), "fire_count": latents.fire_count,
        "mean_activation_when_active": latents.mean_when_active, "decoder_norm_sq": np.einsum("ij,ij->i", W_dec, W_dec),
        "probe_projection": projection, "used": used,
        "probe_r2_heldout": probe.r2.r2_pooled, "tokens": n, "intercept": opts.intercept, **intervals,
    })


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per latent of each studied SAE; ``default`` marks the chosen SAE."""
    opts = ctx.options
    saes = family_saes(ctx)
    chosen = choose_sae(ctx, saes, opts.sae_id)
    if not opts.all_saes:
        saes = saes.filter(pl.col("sae_id") == chosen["sae_id"])
    store = ctx.eval_store()
    n_rows = store.rows
    rows = subsample(n_rows, opts.tokens, ctx.seed)
    contexts = store.index()["context"].to_numpy()[rows]
    parts = []
    for sae in saes.iter_rows(named=True):  # intervals for the chosen SAE (the verdict's)
        parts.append(probe_table(ctx, sae, rows, n_rows, contexts if sae["sae_id"] == chosen["sae_id"] else None))
        log.info("%s: probe R² %.3f", sae["sae_id"], parts[-1]["probe_r2_heldout"][0])
    table = pl.concat(parts, how="diagonal_relaxed")
    return table.with_columns(default=pl.col("sae_id") == chosen["sae_id"],
                              **{k: pl.lit(v) for k, v in ctx.resampling(np.unique(contexts)).items()})


def tracking(part: pl.DataFrame) -> dict[str, float]:
    """Pearson and Spearman r between W_dec[i]·a* and mean activation when active, over the used latents."""
    used = part.filter(pl.col("used"))
    pearson, spearman = _correlations(used["mean_activation_when_active"].to_numpy(),
                                      used["probe_projection"].to_numpy())
    return {"pearson": pearson, "spearman": spearman, "latents": used.height}


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
    intervals = {f"{c}_r_{key}": float(main[f"{c}_{key}"][0]) for c in CORRELATIONS
                 for key in ("ci_low", "ci_high", "bootstrap_bias") if f"{c}_{key}" in main.columns}
    return {"sae_id": str(main["sae_id"][0]), "pearson_r": t["pearson"], "spearman_r": t["spearman"], **intervals,
            **resampling_summary(main),
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
    """The chosen SAE's Spearman ρ interval against TRACKING_RHO (the paper shows the tracking, states no number)."""
    rho, low, high = (summary.get(k, math.nan) for k in ("spearman_r", "spearman_r_ci_low", "spearman_r_ci_high"))
    return Verdict(by_interval(low, high, TRACKING_RHO, claim_above=True),
                   f"Spearman ρ(projection, mean activation) = {interval(rho, low, high, 2)} for {summary.get('sae_id')} "
                   f"(documents resampled); tracking means ρ > {TRACKING_RHO:g}, our boundary: the paper gives no "
                   "number")


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

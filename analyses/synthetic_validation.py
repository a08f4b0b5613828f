"""Does the linear/nonlinear split attribute known, injected errors to the right part on synthetic data?

Synthetic activations x′ = Sae(x) (one SAE, a token subsample) are a known sparse sum of latents. Over a grid of
ablated latent fractions p, activation noise σ_act and reconstruction noise σ_rec, x_noisy = x′ + σ_act·z_act and
recon = decode(encode(x′) with the ablated latents zeroed) + σ_rec·z_rec; the linear error map is fitted on x_noisy
exactly as in docs/science.md, and FVU_linear / FVU_nonlinear are correlated (Pearson, over the grid) with the
injected variances.

Choices, stated once. Ablation ranks latents by mean activation over the subsample's tokens (zeros included) and
removes the smallest fraction p first; it zeroes their codes after encoding, so the other latents keep their
values and the removed features are exactly "absent features". σ = level·noise_step·s with s² = Σ‖x′ − x̄′‖²/(n·d),
the mean per-dimension variance of x′: with the default step 0.25 and levels 0..4 the top level injects as much
variance as x′ has. One draw z_act, z_rec ~ N(0, I) is scaled across the grid (common random numbers: a smooth
grid). True quantities, in units of the clean variance TSS′ = Σ‖x′ − x̄′‖² (a fixed denominator, so correlations
are not distorted): true_activation_noise = Σ‖σ_act·z_act‖²/TSS′, true_reconstruction_noise = Σ‖σ_rec·z_rec‖²/TSS′,
true_ablation = Σ‖R₀ − R_p‖²/TSS′ (R_p = decode of the ablated codes). Estimates in the same unit: est_linear =
FVU_linear·TSS(x_noisy)/TSS′, est_nonlinear = FVU_nonlinear·TSS(x_noisy)/TSS′. Reconstruction noise is independent
of x_noisy, hence entirely nonlinear; activation noise is in x_noisy and in the error alike, but a linear map can
separate it from x′ only where x′ has little variance, so a share of it (larger for small σ_act) is expected in the
nonlinear estimate. Cost: e = (x_noisy − R_p) − σ_rec·z_rec is linear in σ_rec, so per σ_act one pass over the
tokens forms the design and the moments of z_rec and of every x_noisy − R_p (:func:`level_moments`), and the σ_rec
grid is combined from moments (:func:`combine`).
"""

from __future__ import annotations

import logging
import math
import sys

import numpy as np
import polars as pl
import torch

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.saes import choose_sae, family_saes
from darkmatter.analysis.stats import subsample
from darkmatter.analysis.verdict import Verdict
from darkmatter.errors.decompose import error_fit
from darkmatter.errors.metrics import FvuAccumulator, LatentAccumulator
from darkmatter.regression import Design, LazyRows, TargetMoments, split_mask, stream_moments
from darkmatter.sae.codes import SparseCodes, sparse_codes

log = logging.getLogger(__name__)

PAPER_CLAIM = ("On synthetic data with known errors, the estimated linear error tracks the injected activation noise "
               "and the estimated nonlinear error tracks the injected reconstruction noise (a strong diagonal of the "
               "2×2 correlation table).")
HEADLINE = ("corr_activation_noise_vs_linear",
            "corr_reconstruction_noise_vs_nonlinear",
            "off_diagonal_max_abs",
            "diagonal_min")

TRUE = {"ablation": "true_ablation", "activation_noise": "true_activation_noise",
        "reconstruction_noise": "true_reconstruction_noise"}
ESTIMATED = {"linear": "est_linear", "nonlinear": "est_nonlinear"}


def combine(m0: TargetMoments, mz: TargetMoments, dot: np.ndarray, sigma: float) -> TargetMoments:
    """Moments of e = e0 − σ·z from those of e0 and z (same rows, same x shift) and dot = Σ e0∘z per dimension.

    With u = e0 − t0, v = z − tz: Σuv = Σe0z − tz·Σu − t0·Σv − n·t0·tz, and e − t = u − σv for t = t0 − σ·tz, so
    Σ(e − t)² = Σu² − 2σΣuv + σ²Σv² and Σx̃ᵀ(e − t) = Σx̃ᵀu − σΣx̃ᵀv.
    """
    t0, tz, n = m0.shift, mz.shift, m0.n
    uv = dot - tz * m0.sum - t0 * mz.sum - n * t0 * tz
    return TargetMoments(n, t0 - sigma * tz, m0.sum - sigma * mz.sum,
                         m0.sum_sq - 2 * sigma * uv + sigma**2 * mz.sum_sq, m0.cross - sigma * mz.cross)


def _dots(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """[Σ a∘b per dimension over the fit rows, the same over the test rows] (float64)."""
    return list(np.einsum("ij,ij->j", a[m].astype(np.float64), b[m].astype(np.float64)) for m in (mask, ~mask))


def ablations(codes: SparseCodes, latents: LatentAccumulator, percents: list[float]
              ) -> tuple[dict[float, np.ndarray], dict[float, float], dict[float, dict[str, int]]]:
    """Per ablated percentage p: the reconstruction R_p [n, d] float32 with the p% latents of smallest mean
    activation zeroed, Σ‖R₀ − R_p‖², and how many latents were ablated (and how many of them never fire)."""
    d_sae = codes.d_sae
    order = np.argsort(latents.mean_activation, kind="stable")  # smallest mean activation first
    idx, vals = codes.rows(slice(None))
    full = codes.x_hat(slice(None)).numpy()  # R₀: nothing ablated
    recon, removed, counts = {}, {}, {}
    for p in percents:
        gone = order[:round(p / 100 * d_sae)]
        keep = torch.ones(d_sae)
        keep[torch.from_numpy(gone)] = 0
        recon[p] = SparseCodes(idx, vals * keep[idx], codes.W_dec, codes.b_dec).x_hat(slice(None)).numpy()
        removed[p] = float(np.sum(np.square(recon[p] - full, dtype=np.float64)))
        # latents that never fire on the subsample are ablated first and change nothing: say how many
        counts[p] = {"ablated_latents": len(gone), "ablated_never_active": int((latents.fire_count[gone] == 0).sum())}
    return recon, removed, counts


def _columns(m: TargetMoments, cols: slice) -> TargetMoments:
    """The moments of some output columns of a stacked target."""
    return TargetMoments(m.n, m.shift[cols], m.sum[cols], m.sum_sq[cols], m.cross[:, cols])


def level_moments(x_noisy: np.ndarray, z_rec: np.ndarray, recons: list[np.ndarray], mask: np.ndarray,
                  intercept: bool, ridge: float) -> tuple[Design, tuple, list[tuple]]:
    """One pass over x_noisy [n, d]: the design and the (fit, test) moments of z_rec and of each x_noisy − R_p.

    The targets are stacked column-wise ([z_rec | x_noisy − R_0 | …], built chunk by chunk), so x is converted and
    masked once and the cross moments are one wide GEMM per chunk.
    """
    n, d = x_noisy.shape
    k = 1 + len(recons)

    def stacked(rows: slice) -> np.ndarray:  # float64: the grid is combined from these moments (see combine)
        xn = x_noisy[rows]
        return np.concatenate([z_rec[rows], *(xn - r[rows] for r in recons)], axis=1, dtype=np.float64)

    # a float64 chunk of k·d columns: keep it near 64 MiB
    m = stream_moments(x_noisy, LazyRows(n, k * d, stacked, dtype=np.float64), mask, chunk_rows=max(256, 2**23 // (k * d)))
    assert m.x is not None and m.y is not None
    design = Design(m.x[0], m.x[1], intercept=intercept, ridge=ridge)
    moments = (m.y[0], m.y[1])
    parts = [tuple(_columns(m, slice(j * d, (j + 1) * d)) for m in moments) for j in range(k)]
    return design, parts[0], parts[1:]


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per grid point (p, σ_act level, σ_rec level): true and estimated error parts (module docstring)."""
    opts, dc = ctx.options, ctx.decomposition
    chosen = choose_sae(ctx, family_saes(ctx), opts.sae_id)
    hook, sae_id = chosen["hook"], chosen["sae_id"]
    sae = ctx.sae(hook, sae_id)
    stored = ctx.codes(hook, sae_id, sae)
    x_clean = stored.x_hat(subsample(stored.n_rows, opts.tokens, ctx.seed)).numpy()  # x′ = Sae(x)
    n, d = x_clean.shape
    codes = sparse_codes(sae, x_clean)
    latents = LatentAccumulator(sae.d_sae).update_codes(codes.top_indices, codes.top_values)
    # the protocol's fit fraction (fit_tokens of the eval rows), applied to the subsample
    fit_n = min(max(round(n * dc.fit_tokens / stored.n_rows), d + 1), n - 1)
    mask = split_mask(n, fit_n, dc.seed)
    tss_clean = FvuAccumulator().update(x_clean, x_clean).total_ss  # the FVU denominator of x′
    unit = math.sqrt(tss_clean / (n * d))
    rng = np.random.default_rng(ctx.seed)
    z_act, z_rec = (rng.standard_normal((n, d), dtype=np.float32) for _ in range(2))
    z_sq = {name: float(np.sum(np.square(z, dtype=np.float64))) for name, z in (("act", z_act), ("rec", z_rec))}
    percents = [float(p) for p in opts.ablate_percent]
    recon, true_ablation, counts = ablations(codes, latents, percents)
    base = {"sae_id": sae_id, "hook": hook, "width": chosen["width"], "k": chosen["k"], "tokens": n,
            "noise_unit": unit, "noise_step": float(opts.noise_step)}
    rows = []
    for act in opts.noise_levels:
        s_act = act * opts.noise_step * unit
        x_noisy = x_clean + np.float32(s_act) * z_act
        design, z_split, e_splits = level_moments(x_noisy, z_rec, [recon[p] for p in percents], mask, dc.intercept,
                                                  dc.ridge)
        scale = design.all_rows.total_ss / tss_clean  # FVU on x_noisy -> units of TSS′
        for p, e_split in zip(percents, e_splits, strict=True):
            dots = _dots(x_noisy - recon[p], z_rec, mask)
            for rec in opts.noise_levels:
                s_rec = rec * opts.noise_step * unit
                split = tuple(combine(e, z, dot, s_rec) for e, z, dot in zip(e_split, z_split, dots, strict=True))
                fit = error_fit(design, split, None, None)
                rows.append(base | counts[p] | {
                    "ablate_percent": float(p), "act_level": act, "rec_level": rec, "sigma_act": s_act,
                    "sigma_rec": s_rec, "true_ablation": true_ablation[p] / tss_clean,
                    "true_activation_noise": s_act**2 * z_sq["act"] / tss_clean,
                    "true_reconstruction_noise": s_rec**2 * z_sq["rec"] / tss_clean,
                    "est_linear": fit.fvu_linear * scale, "est_nonlinear": fit.fvu_nonlinear * scale,
                    "est_total": fit.fvu_total * scale, "fvu_linear": fit.fvu_linear,
                    "fvu_nonlinear": fit.fvu_nonlinear, "fvu_total": fit.fvu_total})
        log.info("σ_act level %s done (%d grid points)", act, len(rows))
    return pl.DataFrame(rows)


def correlations(table: pl.DataFrame) -> dict[tuple[str, str], float]:
    """Pearson r over the rows of ``table`` between each true quantity and each estimate (NaN if one is constant)."""
    out = {}
    for t, t_col in TRUE.items():
        for e, e_col in ESTIMATED.items():
            a, b = table[t_col].to_numpy(), table[e_col].to_numpy()
            ok = a.size > 1 and np.ptp(a) > 0 and np.ptp(b) > 0
            out[(t, e)] = float(np.corrcoef(a, b)[0, 1]) if ok else math.nan
    return out


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """The correlation table over the whole grid, its diagonal / off-diagonal extremes, and the diagonal's minimum
    within each ablation level."""
    corr = correlations(table)
    out: dict[str, float | str] = {f"corr_{t}_vs_{e}": r for (t, e), r in corr.items()}
    diag = (corr[("activation_noise", "linear")], corr[("reconstruction_noise", "nonlinear")])
    off = (corr[("activation_noise", "nonlinear")], corr[("reconstruction_noise", "linear")])
    out["diagonal_min"] = min(diag)
    out["off_diagonal_max_abs"] = max(abs(r) for r in off)
    within = [correlations(part) for _, part in table.group_by("ablate_percent")]
    out["diagonal_min_within_ablation"] = min(min(c[("activation_noise", "linear")],
                                                  c[("reconstruction_noise", "nonlinear")]) for c in within)
    out |= {"sae_id": str(table["sae_id"][0]), "tokens": int(table["tokens"][0]), "grid_points": table.height,
            "noise_unit": float(table["noise_unit"][0])}
    return out


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """A strong diagonal, read as: every diagonal correlation above 0.9 and every off-diagonal one below 0.3."""
    diag, off = summary.get("diagonal_min", float("nan")), summary.get("off_diagonal_max_abs", float("nan"))
    word = "undetermined" if diag != diag or off != off else "agrees" if diag > 0.9 and off < 0.3 else "differs"
    return Verdict(word, f"smallest diagonal correlation {diag:.3f}, largest off-diagonal |r| {off:.3f} "
                         "(strong: > 0.9 and < 0.3)")


def plot(table: pl.DataFrame) -> dict:
    """The true × estimated correlation heatmap, and the estimates against the injected noise."""
    import seaborn as sns

    from darkmatter.analysis.figures import PALETTE, new_figure

    if table.is_empty():
        return {"correlations": note_figure("Synthetic validation", "no grid points")}
    corr = correlations(table)
    mat = np.array([[corr[(t, e)] for e in ESTIMATED] for t in TRUE])
    fig1, ax = new_figure()
    sns.heatmap(mat, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="RdBu_r", ax=ax,
                xticklabels=[f"estimated {e}" for e in ESTIMATED], yticklabels=[f"true {t}".replace("_", " ")
                                                                                for t in TRUE])
    ax.set_title(f"Synthetic validation: Pearson r over {table.height} grid points ({table['sae_id'][0]})")
    fig2, axes = new_figure(ncols=2, figsize=(10.0, 4.2), layout="constrained")
    for ax, t, e, hue, colour in ((axes[0], "activation_noise", "linear", "rec_level", PALETTE["linear error"]),
                                  (axes[1], "reconstruction_noise", "nonlinear", "act_level",
                                   PALETTE["nonlinear error"])):
        # fill shade = the other noise's level (white = 0): the vertical spread at one x is the leak from it
        ax.scatter(table[TRUE[t]], table[ESTIMATED[e]], c=table[hue], cmap="Greys", edgecolors=colour, s=22)
        lim = max(float(table[TRUE[t]].max()), 1e-12)
        ax.plot([0, lim], [0, lim], color="#999999", ls=":", lw=1, label="estimate = truth")
        other = "σ_rec" if hue == "rec_level" else "σ_act"
        ax.set(xlabel=f"true {t.replace('_', ' ')} (fraction of Var x′)",
               ylabel=f"estimated {e} error (fraction of Var x′)",
               title=f"r = {corr[(t, e)]:.2f}; fill: {other} level (white = 0)")
        ax.legend(fontsize=8)
    return {"correlations": fig1, "estimates_vs_truth": fig2}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

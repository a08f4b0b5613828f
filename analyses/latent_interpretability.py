"""Can a latent's firing be told from its tokens alone — and does that offline proxy separate SAE latents from random directions?

For a sample of the chosen SAE's latents, an explanation (the token ids most over-represented in its top activations
on half the eval documents) scores every token of the other half, and the proxy is the AUROC of that score for where
the latent fires (darkmatter.analysis.interpretability). The same is done for random unit directions in activation
space thresholded to the same firing densities: the proxy is worth reading only if SAE latents beat that control by
a wide margin.
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
from darkmatter.analysis.interpretability import LatentActivity, ProxyScorer, random_direction_latents
from darkmatter.analysis.saes import choose_sae, family_saes

log = logging.getLogger(__name__)

PAPER_CLAIM = ("(The paper scores latents with an LLM judge, detection scoring; this offline proxy only asks how "
               "much of a latent's firing its current token explains. Its SAE latents must beat random directions.)")
HEADLINE = ("auroc_median_sae", "auroc_median_random_direction", "auroc_median_difference", "proxy_separates")
SEPARATION = 0.1  # "a wide margin": the medians of the two AUROC distributions at least this far apart (and p < 0.01)


def _fit_half(ctx: AnalysisContext, n_rows: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Each eval row's token id, whether it is in the (seeded) fit half of the documents, and the unit split:
    documents, or contexts when the eval split holds a single document (then its contexts stand in for them)."""
    with ctx.connect() as con:
        tokens = con.sql("SELECT row, token_id, context, coalesce(doc_id, 'context ' || context) AS doc "
                         "FROM tokens ORDER BY row").pl()
    if tokens.height != n_rows:
        raise ValueError(f"the store's tokens table has {tokens.height} rows but the eval codes have {n_rows}.")
    unit = "document" if tokens["doc"].n_unique() >= 2 else "context"
    groups, inverse = np.unique(tokens["doc" if unit == "document" else "context"].to_numpy().astype(str),
                                return_inverse=True)
    in_fit = np.random.default_rng(ctx.seed).permutation(len(groups)) < (len(groups) + 1) // 2
    return tokens["token_id"].to_numpy(), in_fit[inverse], unit


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per scored latent of the chosen SAE (kind 'sae') and per random-direction control ('random')."""
    opts = ctx.options
    sae_row = choose_sae(ctx, family_saes(ctx), opts.sae_id)
    sae = ctx.sae(sae_row["hook"], sae_row["sae_id"])
    codes = ctx.codes(sae_row["hook"], sae_row["sae_id"], sae)
    activity = LatentActivity.from_codes(np.asarray(codes.top_indices), np.asarray(codes.top_values), sae.d_sae)
    token_ids, fit, unit = _fit_half(ctx, activity.n_rows)
    if fit.all() or not fit.any():  # a single context: nothing to hold out
        return pl.DataFrame({"kind": [], "note": []}, schema={"kind": pl.Utf8, "note": pl.Utf8})
    fires = np.diff(activity.offsets)
    candidates = np.flatnonzero(fires >= opts.min_fires)
    rng = np.random.default_rng(ctx.seed)
    latents = np.sort(rng.choice(candidates, min(opts.latents, len(candidates)), replace=False))
    scorer = ProxyScorer(token_ids, fit, top=opts.top, explanation_size=opts.explanation_size)
    x = ctx.eval_store().activations(sae_row["hook"])
    control = random_direction_latents(np.asarray(x), fires[latents] / activity.n_rows, seed=ctx.seed)
    rows = []
    for kind, source, ids in (("sae", activity, latents), ("random", control, np.arange(len(latents)))):
        for latent in ids:
            s = scorer.score(source, int(latent))
            rows.append({"kind": kind, "latent": int(latent), "auroc": s.auroc, "density": s.density,
                         "top_token_entropy_bits": s.top_token_entropy_bits,
                         "explanation": " ".join(str(t) for t in s.explanation)})
    log.info("%s: %d latents scored (of %d firing >= %d times)", sae_row["sae_id"], len(latents), len(candidates),
             opts.min_fires)
    return pl.DataFrame(rows).with_columns(sae_id=pl.lit(sae_row["sae_id"]), d_sae=pl.lit(sae.d_sae), split_unit=pl.lit(unit),
                                           fit_rows=pl.lit(int(fit.sum())), heldout_rows=pl.lit(int((~fit).sum())))


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Median AUROC of the SAE's latents and of the controls, their difference and a rank test, and the verdict."""
    if table.is_empty() or "auroc" not in table.columns:
        return {"n_latents": 0, "note": "no latent fires often enough to be scored, or nothing to hold out"}
    auroc = {kind: table.filter(pl.col("kind") == kind)["auroc"].drop_nans().to_numpy() for kind in ("sae", "random")}
    med = {kind: float(np.median(v)) if len(v) else math.nan for kind, v in auroc.items()}
    p = float(stats.mannwhitneyu(auroc["sae"], auroc["random"], alternative="greater").pvalue) \
        if min(len(v) for v in auroc.values()) else math.nan
    difference = med["sae"] - med["random"]
    sae = table.filter(pl.col("kind") == "sae")
    return {
        "sae_id": table["sae_id"][0], "n_latents": sae.height, "split_unit": table["split_unit"][0],
        "auroc_median_sae": med["sae"], "auroc_median_random_direction": med["random"],
        "auroc_median_difference": difference, "mann_whitney_p": p,
        "proxy_separates": "yes" if difference >= SEPARATION and p < 0.01 else "no",
        "fraction_sae_auroc_above_0.9": float((auroc["sae"] > 0.9).mean()),
        "fraction_random_direction_auroc_above_0.9": float((auroc["random"] > 0.9).mean()),
        "top_token_entropy_bits_median_sae": float(sae["top_token_entropy_bits"].drop_nans().median()),  # type: ignore[arg-type]
        "density_median_sae": float(sae["density"].median()),  # type: ignore[arg-type]
    }


def plot(table: pl.DataFrame) -> dict[str, object]:
    """The two AUROC distributions (ECDFs), and AUROC against firing density for the SAE's latents."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    if table.is_empty() or "auroc" not in table.columns:
        return {"proxy": note_figure("Latent interpretability (proxy)", "no latent fires often enough, or nothing "
                                     "to hold out")}
    fig, (left, right) = new_figure(ncols=2, figsize=(9.6, 4.0))
    for kind, colour, label in (("sae", PALETTE["total"], "SAE latents"),
                                ("random", PALETTE["pursuit"], "random directions (same densities)")):
        v = np.sort(table.filter(pl.col("kind") == kind)["auroc"].drop_nans().to_numpy())
        left.step(v, np.arange(1, len(v) + 1) / max(len(v), 1), where="post", color=colour, label=label)
    left.axvline(0.5, color="black", lw=0.6, ls=":")
    left.set(xlabel="held-out detection AUROC from token identity", ylabel="fraction of latents ≤ AUROC",
             title="Proxy: SAE latents vs random directions")
    left.legend(fontsize=8)
    sae = table.filter(pl.col("kind") == "sae")
    right.scatter(np.log10(sae["density"].to_numpy()), sae["auroc"].to_numpy(), s=8, color=PALETTE["total"])
    right.set(xlabel="log10 firing density", ylabel="AUROC", title="SAE latents: AUROC vs density")
    return {"proxy": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

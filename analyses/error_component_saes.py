"""Is the nonlinear error harder for an SAE to learn than the linear error, and are the latents it learns less interpretable?

TopK SAEs of the same recipe were trained on the base SAE's SaeError (the control), LinearError and NonlinearError
(darkmatter.errors.error_saes); each one's FVU of its own target on the eval split is compared, with intervals
resampling documents. Their latents and the base SAE's are scored by detection of held-out firings per activation
decile: offline from token identity (a proxy, trusted only as far as it separates the base SAE's latents from
random directions of the same densities) and, when a judge endpoint is configured, by an LLM (detection scoring).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.detection import TokenWindows, detect, detection_set
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.interpretability import (
    DECILES,
    LatentActivity,
    ProxyScorer,
    random_direction_latents,
)
from darkmatter.analysis.saes import choose_sae, family_saes
from darkmatter.analysis.stats import percentile_interval
from darkmatter.analysis.verdict import Verdict, from_answer, interval

log = logging.getLogger(__name__)

PAPER_CLAIM = ("The SAE trained on NonlinearError is worse than the one trained on LinearError (FVU about 0.59 "
               "against 0.54 in a third-party reading), and its latents are less interpretable under LLM "
               "detection scoring.")
HEADLINE = ("fvu_nonlinear_error_sae", "fvu_linear_error_sae", "fvu_difference_nonlinear_minus_linear",
            "proxy_separates", "proxy_auroc_top_decile_median_nonlinear_error", "proxy_auroc_top_decile_median_linear_error")
SEPARATION = 0.1  # "a wide margin": top-decile AUROC medians of SAE latents and random directions this far apart
COMPONENT_LABELS = {"sae_error": "SaeError SAE (control)", "linear_error": "LinearError SAE",
                    "nonlinear_error": "NonlinearError SAE"}
EXAMPLE_WINDOWS, EXAMPLE_TOKENS = 3, 12  # top contexts per example latent, tokens per context
# the report shows a table's first 10 columns and 15 rows: FVU rows, then the example latents with their contexts
SCHEMA = {"kind": pl.Utf8, "sae": pl.Utf8, "latent": pl.Int64, "decile": pl.Int64, "value": pl.Float64,
          "ci_low": pl.Float64, "ci_high": pl.Float64, "n": pl.Int64, "text": pl.Utf8, "sae_id": pl.Utf8,
          "density": pl.Float64, "entropy_bits": pl.Float64}


@dataclass(frozen=True)
class Scored:
    """One set of latents to score: ``name`` (base, a component, random), its ``activity`` and ``sae_id``."""

    name: str
    sae_id: str
    activity: LatentActivity


def _eval_tokens(ctx: AnalysisContext, n_rows: int) -> tuple[pl.DataFrame, np.ndarray, str]:
    """The eval rows (token_id, token_text, context), whether each is in the seeded fit half of the documents, and
    the unit split: documents, or contexts when the split holds a single document (its contexts stand in)."""
    with ctx.connect() as con:
        tokens = con.sql("SELECT row, token_id, token_text, context, coalesce(doc_id, 'context ' || context) AS doc "
                         "FROM tokens ORDER BY row").pl()
    if tokens.height != n_rows:
        raise ValueError(f"the store's tokens table has {tokens.height} rows but the eval codes have {n_rows}.")
    unit = "document" if tokens["doc"].n_unique() >= 2 else "context"
    groups, inverse = np.unique(tokens["doc" if unit == "document" else "context"].to_numpy().astype(str),
                                return_inverse=True)
    in_fit = np.random.default_rng(ctx.seed).permutation(len(groups)) < (len(groups) + 1) // 2
    return tokens, in_fit[inverse], unit


def _error_saes(ctx: AnalysisContext) -> pl.DataFrame:
    if not ctx.has_table("error_saes"):
        return pl.DataFrame()
    with ctx.connect() as con:
        table = con.sql("SELECT * FROM error_saes WHERE hook = ?", params=[ctx.hook]).pl()
    return table.sort(pl.col("component").replace_strict(list(COMPONENT_LABELS), list(range(3))))


def _fvu_rows(ctx: AnalysisContext, error_saes: pl.DataFrame) -> list[dict]:
    """Each error SAE's FVU of its own target with a document-resampled interval, and the paired difference
    NonlinearError − LinearError."""
    from darkmatter.errors.error_saes import component_fvu, load_sums

    sums = load_sums(ctx.paths.error_saes(ctx.hook))
    weights = ctx.resample_weights(sums["contexts"])
    conf = ctx.analysis.confidence
    point = {c: float(component_fvu(sums, c)[0]) for c in error_saes["component"]}
    draws = {c: component_fvu(sums, c, weights) for c in point}
    rows = []
    for r in error_saes.iter_rows(named=True):
        c = r["component"]
        low, high = percentile_interval(draws[c], conf)
        rows.append({"kind": "fvu", "sae": COMPONENT_LABELS[c], "sae_id": r["sae_id"], "value": point[c],
                     "ci_low": float(low), "ci_high": float(high), "n": int(sums["n"].sum()),
                     "text": f"dead latents {r['dead_count']} of {r['width']}; L0 {r['l0_mean']:.1f}"})
    if {"linear_error", "nonlinear_error"} <= set(point):
        low, high = percentile_interval(draws["nonlinear_error"] - draws["linear_error"], conf)
        rows.append({"kind": "fvu_difference", "sae": "NonlinearError − LinearError", "n": int(sums["n"].sum()),
                     "value": point["nonlinear_error"] - point["linear_error"], "ci_low": float(low),
                     "ci_high": float(high), "text": str(ctx.resampling(sums["contexts"]))})
    return rows


def _sources(ctx: AnalysisContext, error_saes: pl.DataFrame) -> tuple[list[Scored], str]:
    """The base SAE's latents, each error SAE's, and (last) random directions: name, sae_id, activity."""
    from darkmatter.sae.codes import load_codes
    from darkmatter.sae.formats import load_sae

    requested = ctx.options.sae_id or (error_saes["base_sae_id"][0] if not error_saes.is_empty() else None)
    base = choose_sae(ctx, family_saes(ctx), requested)
    sae = ctx.sae(base["hook"], base["sae_id"])
    codes = ctx.codes(base["hook"], base["sae_id"], sae)
    out = [Scored("base", base["sae_id"], LatentActivity.from_codes(np.asarray(codes.top_indices),
                                                                   np.asarray(codes.top_values), sae.d_sae))]
    folder = ctx.paths.error_saes(ctx.hook)
    for r in error_saes.iter_rows(named=True):
        esae = load_sae(folder / "saes" / r["component"])
        ecodes = load_codes(folder / "codes" / r["component"], esae)
        out.append(Scored(r["component"], r["sae_id"], LatentActivity.from_codes(
            np.asarray(ecodes.top_indices), np.asarray(ecodes.top_values), esae.d_sae)))
    return out, base["sae_id"]


def _sample(activity: LatentActivity, n: int, min_fires: int, seed: int) -> np.ndarray:
    fires = np.diff(activity.offsets)
    candidates = np.flatnonzero(fires >= min_fires)
    return np.sort(np.random.default_rng(seed).choice(candidates, min(n, len(candidates)), replace=False))


def _dense(activity: LatentActivity, latent: int) -> np.ndarray:
    rows, values = activity.of(latent)
    out = np.zeros(activity.n_rows, dtype=np.float32)
    out[rows] = values
    return out


def _example_text(windows: TokenWindows, acts: np.ndarray, fit: np.ndarray) -> str:
    """The latent's top windows on the fit documents, firing tokens in <<…>>, separated by ' ‖ '."""
    from darkmatter.analysis.judge import highlighted

    rows = np.flatnonzero((acts > 0) & fit)
    top = rows[np.argsort(-acts[rows], kind="stable")[:EXAMPLE_WINDOWS]]
    return " ‖ ".join(highlighted(windows.window(int(r), EXAMPLE_TOKENS, acts)) for r in top)


def _judge(ctx: AnalysisContext):
    from darkmatter.analysis.judge import ChatJudge

    jd = ctx.options.judge
    if jd.endpoint is None:
        return None
    return ChatJudge(jd.endpoint, jd.model, api_key=os.environ.get(jd.api_key_env) or None, timeout_s=jd.timeout_s)


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """Rows of kind fvu / fvu_difference (per error SAE), example (per SAE, a few latents with top contexts),
    proxy (per SAE, latent and decile; decile 0 = all firings) and judge (per SAE, latent and decile; decile 0 =
    the windows where it never fires)."""
    opts = ctx.options
    error_saes = _error_saes(ctx)
    rows: list[dict] = _fvu_rows(ctx, error_saes) if not error_saes.is_empty() else []
    sources, base_id = _sources(ctx, error_saes)
    tokens, fit, unit = _eval_tokens(ctx, sources[0].activity.n_rows)
    if fit.all() or not fit.any():  # a single context: nothing to hold out
        return pl.DataFrame(rows, schema=SCHEMA)
    scorer = ProxyScorer(tokens["token_id"].to_numpy(), fit, top=opts.top, explanation_size=opts.explanation_size)
    windows = TokenWindows(tokens["token_text"].to_numpy(), tokens["context"].to_numpy())
    samples = {s.name: _sample(s.activity, opts.latents, opts.min_fires, ctx.seed + i) for i, s in enumerate(sources)}
    base = sources[0]
    x = ctx.eval_store().activations(ctx.hook)
    densities = np.diff(base.activity.offsets)[samples["base"]] / base.activity.n_rows
    sources.append(Scored("random", "", random_direction_latents(np.asarray(x), densities, seed=ctx.seed)))
    samples["random"] = np.arange(len(densities))
    judge = _judge(ctx)
    for s in sources:
        label = COMPONENT_LABELS.get(s.name, {"base": f"base SAE ({base_id})", "random": "random directions"}.get(s.name))
        for i, latent in enumerate(samples[s.name]):
            score = scorer.score(s.activity, int(latent))
            common = {"sae": label, "sae_id": s.sae_id, "latent": int(latent), "density": score.density,
                      "entropy_bits": score.top_token_entropy_bits}
            rows += [{"kind": "proxy", **common, "decile": q, "value": v}
                     for q, v in enumerate((score.auroc, *score.auroc_by_decile))]
            if i < opts.examples:
                rows.append({"kind": "example", **common, "value": score.auroc_top_decile,
                             "text": _example_text(windows, _dense(s.activity, int(latent)), fit)})
            if judge is not None and s.name != "random" and i < opts.judge.latents:
                rows += _judge_rows(judge, opts.judge, s.activity, int(latent), fit, windows, common, ctx.seed + i)
        log.info("%s: %d latents scored", label, len(samples[s.name]))
    order = {"fvu": 0, "fvu_difference": 1, "example": 2, "judge": 3, "proxy": 4}
    return (pl.DataFrame(rows, schema=SCHEMA).with_columns(split_unit=pl.lit(unit))
            .sort(pl.col("kind").replace_strict(order, return_dtype=pl.Int8), maintain_order=True))


def _judge_rows(judge, jd, activity: LatentActivity, latent: int, fit: np.ndarray, windows: TokenWindows,
                common: dict, seed: int) -> list[dict]:
    """Detection scoring of one latent by the LLM judge: accuracy per activation decile (0 = silent windows)."""
    examples = detection_set(latent, _dense(activity, latent), fit, windows, size=jd.window, n_explain=jd.explain,
                             per_decile=jd.per_decile, n_silent=jd.silent, rng=np.random.default_rng(seed))
    verdict = detect(judge, examples)
    deciles, correct = np.array(verdict.deciles), verdict.correct
    return [{"kind": "judge", **common, "decile": q, "value": float(correct[deciles == q].mean()),
             "n": int((deciles == q).sum()), "text": verdict.explanation}
            for q in range(DECILES + 1) if (deciles == q).any()]


def _median_ci(values: np.ndarray, seed: int, confidence: float = 0.95, n_boot: int = 1000) -> tuple[float, float]:
    """Percentile interval of the median over latents (latents resampled: they are drawn at random)."""
    if len(values) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    draws = np.median(values[rng.integers(0, len(values), (n_boot, len(values)))], axis=1)
    low, high = percentile_interval(draws, confidence)
    return float(low), float(high)


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """FVU per error SAE with intervals and the paper's comparison; the proxy's validation (base SAE vs random
    directions, top decile) and its medians per SAE; the judge's accuracy per SAE when it ran."""
    out: dict[str, float | str] = {}
    key = {"SaeError SAE (control)": "sae_error", "LinearError SAE": "linear_error",
           "NonlinearError SAE": "nonlinear_error"}
    for r in table.filter(pl.col("kind") == "fvu").iter_rows(named=True):
        name = key[r["sae"]]
        out |= {f"fvu_{name}_sae": r["value"], f"fvu_{name}_sae_ci_low": r["ci_low"],
                f"fvu_{name}_sae_ci_high": r["ci_high"]}
    diff = table.filter(pl.col("kind") == "fvu_difference")
    if diff.height:
        d = diff.row(0, named=True)
        out |= {"fvu_difference_nonlinear_minus_linear": d["value"], "fvu_difference_ci_low": d["ci_low"],
                "fvu_difference_ci_high": d["ci_high"],
                "paper_claim_nonlinear_sae_worse": "yes" if d["ci_low"] > 0 else ("no" if d["ci_high"] < 0 else
                                                                                  "undetermined")}
    proxy = table.filter((pl.col("kind") == "proxy") & (pl.col("decile") == DECILES))
    if proxy.is_empty():
        return out | {"note": "no latent fires often enough to be scored, or nothing to hold out"}
    top = {name: proxy.filter(pl.col("sae") == name)["value"].drop_nans().to_numpy()
           for name in proxy["sae"].unique(maintain_order=True)}
    base = next(n for n in top if n.startswith("base SAE"))
    for name, values in top.items():
        slug = key.get(name, "random_direction" if name == "random directions" else "base")
        low, high = _median_ci(values, seed=0)
        out |= {f"proxy_auroc_top_decile_median_{slug}": float(np.median(values)) if len(values) else math.nan,
                f"proxy_auroc_top_decile_median_{slug}_ci_low": low, f"proxy_auroc_top_decile_median_{slug}_ci_high": high}
    sep = out["proxy_auroc_top_decile_median_base"] - out["proxy_auroc_top_decile_median_random_direction"]
    p = float(stats.mannwhitneyu(top[base], top["random directions"], alternative="greater").pvalue) \
        if min(len(top[base]), len(top["random directions"])) else math.nan
    out |= {"proxy_separation_top_decile": sep, "proxy_separation_mann_whitney_p": p,
            "proxy_separates": "yes" if sep >= SEPARATION and p < 0.01 else "no",
            "n_latents_per_sae": int(len(top[base])), "split_unit": table["split_unit"][0]}
    if "LinearError SAE" in top and "NonlinearError SAE" in top:
        lin, nl = top["LinearError SAE"], top["NonlinearError SAE"]
        out |= {"proxy_auroc_top_decile_nonlinear_minus_linear": float(np.median(nl) - np.median(lin)),
                "proxy_auroc_top_decile_nonlinear_vs_linear_mann_whitney_p":
                    float(stats.mannwhitneyu(nl, lin, alternative="two-sided").pvalue)}
    judged = table.filter(pl.col("kind") == "judge")
    for name in judged["sae"].unique(maintain_order=True):
        j = judged.filter(pl.col("sae") == name)
        slug = key.get(name, "base")
        out[f"judge_accuracy_{slug}"] = float((j["value"] * j["n"]).sum() / j["n"].sum())
        out[f"judge_top_decile_accuracy_{slug}"] = float(j.filter(pl.col("decile") == DECILES)["value"].mean())
    return out


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """The FVU half of the claim (the interpretability half needs the LLM judge, off by default)."""
    keys = ("fvu_difference_nonlinear_minus_linear", "fvu_difference_ci_low", "fvu_difference_ci_high")
    if not all(k in summary for k in keys):
        return Verdict("undetermined", "no error-component SAEs were trained")
    return from_answer(summary.get("paper_claim_nonlinear_sae_worse", ""),
                       f"FVU(NonlinearError SAE) − FVU(LinearError SAE) = {interval(*(summary[k] for k in keys))}; "
                       "the interpretability half is scored only with an LLM judge")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """FVU of each error SAE; the proxy's median AUROC per decile per SAE; the judge's accuracy per decile."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    colours = dict(zip(COMPONENT_LABELS.values(), (PALETTE[k] for k in ("total", "linear error", "nonlinear error")),
                       strict=True))

    figures: dict[str, object] = {}
    fvu = table.filter(pl.col("kind") == "fvu")
    if fvu.height:
        fig, ax = new_figure(figsize=(5.2, 3.6))
        y = fvu["value"].to_numpy()
        ax.bar(np.arange(len(y)), y, yerr=[y - fvu["ci_low"].to_numpy(), fvu["ci_high"].to_numpy() - y],
               color=[colours[label] for label in fvu["sae"]], capsize=4)
        ax.set_xticks(np.arange(len(y)), fvu["sae"].to_list(), fontsize=8)
        ax.set(ylabel="FVU of its own target (eval)", title="SAEs trained on error components")
        figures["fvu"] = fig
    for kind, ylabel, name in (("proxy", "median AUROC (token-identity proxy)", "proxy_by_decile"),
                               ("judge", "mean detection accuracy (LLM judge)", "judge_by_decile")):
        part = table.filter((pl.col("kind") == kind) & (pl.col("decile") >= (1 if kind == "proxy" else 0)))
        if part.is_empty():
            continue
        fig, ax = new_figure(figsize=(6.4, 4.0))
        for sae in part["sae"].unique(maintain_order=True):
            curve = (part.filter(pl.col("sae") == sae).group_by("decile")
                     .agg(pl.col("value").drop_nans().median() if kind == "proxy" else pl.col("value").mean())
                     .sort("decile"))
            ax.plot(curve["decile"], curve["value"], marker="o", ms=3, label=sae,
                    ls=":" if sae == "random directions" else "-")
        ax.axhline(0.5, color="black", lw=0.6, ls=":")
        ax.set(xlabel="activation decile (10 = strongest)" + ("; 0 = silent windows" if kind == "judge" else ""),
               ylabel=ylabel, title="Interpretability per activation decile")
        ax.legend(fontsize=7)
        figures[name] = fig
    return figures or {"fvu": note_figure("Error-component SAEs", "no error SAEs and no latents to score")}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

"""Does each disagreement with the paper hold up, or move, as the same SAEs are trained for more tokens?

Each family of the experiment with its own training budget (`families[].tokens`) is analysed alone by the four
analyses whose claims the default run disputes (error predictability, the scaling decomposition, the norm test, CE
contributions), with their document-resampled intervals and verdicts. A claim is *robust to budget* when the
largest budget gives the reference budget's verdict and every SAE's value there lies inside the reference
budget's interval; otherwise it *moves with budget*, toward or away from the paper (the distance to the paper's
claim at the largest budget against the reference).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import note_figure
from darkmatter.sae.families import tokens_label

log = logging.getLogger(__name__)

PAPER_CLAIM = ("The paper's SAEs are trained on billions of tokens; its claims are made of converged SAEs. A "
               "disagreement measured on SAEs trained on millions of tokens is a finding only if it does not move "
               "as training grows.")
HEADLINE = tuple(f"robustness_{a}" for a in ("error_predictability", "scaling_decomposition", "norm_test",
                                             "ce_contributions"))
NUMERIC = ("value", "ci_low", "ci_high")


@dataclass(frozen=True)
class Claim:
    """One disputed claim: its analysis, how to read its measures from that analysis's table and summary
    (rows: metric, width or None, value, ci_low, ci_high; the first metric decides whether it moved), and the
    distance from the paper's claim of one budget's rows (smaller: closer to the paper)."""

    analysis: str
    measures: Callable[[pl.DataFrame, dict], list[tuple[str, int | None, float, float, float]]]
    distance: Callable[[pl.DataFrame], float]
    paper: str


def _per_sae(table: pl.DataFrame, metric: str, column: str, low: str, high: str) -> list:
    return [(metric, int(r["width"]), float(r[column]), float(r[low]), float(r[high]))
            for r in table.sort("width").iter_rows(named=True)]


def _predictability(table: pl.DataFrame, summary: dict) -> list:
    rows = table.filter(pl.col("default")) if "default" in table.columns else table
    return _per_sae(rows, "R²(‖SaeError‖²)", "r2_norm_sq", "r2_norm_sq_low", "r2_norm_sq_high")


def _scaling(table: pl.DataFrame, summary: dict) -> list:
    mean = summary.get("fvu_nonlinear_mean", math.nan)
    pct = [100 * summary.get(k, math.nan) / mean for k in
           ("fvu_nonlinear_slope_per_doubling", "fvu_nonlinear_slope_doc_ci_low", "fvu_nonlinear_slope_doc_ci_high")]
    main = table.filter(pl.col("primary")) if "primary" in table.columns else table
    return [("FVU_nonlinear slope, % of its mean per doubling", None, *pct),
            *_per_sae(main, "FVU_nonlinear", "fvu_nonlinear", "fvu_nonlinear_ci_low", "fvu_nonlinear_ci_high")]


def _norms(table: pl.DataFrame, summary: dict) -> list:
    out = []
    for vector, label in (("nonlinear_error", "R²(‖NonlinearError‖²)"), ("error", "R²(‖SaeError‖²), norm test")):
        rows = table.filter(pl.col("vector") == vector)
        out += _per_sae(rows, label, "r2_norm_sq", "r2_norm_sq_low", "r2_norm_sq_high")
    return out


def _ce(table: pl.DataFrame, summary: dict) -> list:
    if "percent_recovered_nonlinear_ci_low" not in table.columns:
        return []
    return [*_per_sae(table, "% of CE gap recovered by NonlinearError", "percent_recovered_nonlinear",
                      "percent_recovered_nonlinear_ci_low", "percent_recovered_nonlinear_ci_high"),
            *_per_sae(table, "NonlinearError % of error variance", "variance_share_nonlinear_pct",
                      "variance_share_nonlinear_pct_ci_low", "variance_share_nonlinear_pct_ci_high")]


def _mean(rows: pl.DataFrame, metric: str) -> float:
    values = rows.filter(pl.col("metric") == metric)["value"].to_numpy()
    return float(np.mean(values)) if values.size else math.nan


def _norm_gap(rows: pl.DataFrame) -> float:
    """How far NonlinearError's norm R² sits above SaeError's (the paper: below every other vector's)."""
    return _mean(rows, "R²(‖NonlinearError‖²)") - _mean(rows, "R²(‖SaeError‖²), norm test")


def _ce_ratio(rows: pl.DataFrame) -> float:
    """|recovered / variance share − 1| (the paper: a proportional share, ratio 1)."""
    return abs(_mean(rows, "% of CE gap recovered by NonlinearError") / _mean(rows, "NonlinearError % of error variance")
               - 1)


CLAIMS = (
    Claim("error_predictability", _predictability, lambda r: max(0.0, 0.9 - _mean(r, "R²(‖SaeError‖²)")),
          "R²(‖SaeError‖²) > 0.9"),
    Claim("scaling_decomposition", _scaling,
          lambda r: abs(_mean(r, "FVU_nonlinear slope, % of its mean per doubling")),
          "FVU_nonlinear flat in width (slope 0)"),
    Claim("norm_test", _norms, _norm_gap, "R²(‖NonlinearError‖²) the lowest"),
    Claim("ce_contributions", _ce, _ce_ratio, "recovered / variance share = 1 (proportional)"),
)


def _budgets(ctx: AnalysisContext) -> list[tuple[str, int, bool]]:
    """(family, tokens, replicate) of every family with its own budget, by budget: the first family of a budget
    (config order) is its main one, later ones at the same budget (other seeds) are replicates."""
    seen: set[int] = set()
    out = []
    for f in ctx.families:
        if f.get("tokens"):
            out.append((f["name"], int(f["tokens"]), int(f["tokens"]) in seen))
            seen.add(int(f["tokens"]))
    return sorted(out, key=lambda b: b[1])


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """Per budget family × claim × measure (× SAE width): the value, its interval and the analysis's verdict
    there; ``replicate`` marks a second family at a budget (another seed), which measures the seed spread."""
    seeds = {f["name"]: (f.get("seeds") or [0])[0] for f in ctx.families}
    rows = []
    for family, tokens, replicate in _budgets(ctx):
        for claim in CLAIMS:
            module = importlib.import_module(f"analyses.{claim.analysis}")
            sub = dataclasses.replace(ctx, name=claim.analysis, only_families=(family,))
            table = module.compute(sub)
            summary = module.summarize(table)
            verdict = module.verdict(summary, table)
            log.info("%s at %s token-steps: %s", claim.analysis, tokens_label(tokens), verdict.word)
            for metric, width, value, low, high in claim.measures(table, summary):
                rows.append({"family": family, "tokens": tokens, "seed": seeds[family], "replicate": replicate,
                             "analysis": claim.analysis, "metric": metric,
                             "width": width, "value": value, "ci_low": low, "ci_high": high,
                             "verdict": verdict.word, "verdict_basis": verdict.basis})
    schema = {"family": pl.Utf8, "tokens": pl.Int64, "seed": pl.Int64, "replicate": pl.Boolean, "analysis": pl.Utf8,
              "metric": pl.Utf8, "width": pl.Int64,
              "value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64, "verdict": pl.Utf8,
              "verdict_basis": pl.Utf8}
    table = pl.DataFrame(rows, schema=schema)
    reference = ctx.options.reference_tokens
    return table.with_columns(pl.lit(reference, dtype=pl.Int64).alias("reference_tokens"))


def _first_metric(rows: pl.DataFrame) -> str:
    return rows["metric"][0]


def seed_spread(rows: pl.DataFrame, reference: int) -> pl.DataFrame:
    """Per width (None: a per-budget measure), |replicate − main| of the first metric at the reference budget:
    how far another seed moves it (empty without a replicate family there)."""
    metric = _first_metric(rows)
    at = rows.filter((pl.col("tokens") == reference) & (pl.col("metric") == metric))
    main, rep = at.filter(~pl.col("replicate")), at.filter(pl.col("replicate"))
    return main.join(rep, on="width", how="inner", suffix="_rep", nulls_equal=True).select(
        "width", (pl.col("value") - pl.col("value_rep")).abs().alias("spread")).filter(pl.col("spread").is_finite())


def robustness(rows: pl.DataFrame, claim: Claim, reference: int) -> tuple[str, str]:
    """(word, basis) for one claim's rows: robust, moves toward/away from the paper, or undetermined when the
    reference budget or a larger one is missing. Each width is compared at the largest budget it was trained for: it
    moved when its value there lies outside the reference budget's interval and, where a replicate seed was trained,
    farther from it than that seed's value. The verdicts are compared at the largest budget with every width."""
    spread = seed_spread(rows, reference)
    metric = _first_metric(rows)
    # measured values only (a per-budget measure of a budget with one width is NaN)
    rows = rows.filter(~pl.col("replicate") & pl.col("value").is_finite())
    measured = rows.filter(pl.col("metric") == metric)
    budgets = sorted(set(measured["tokens"].to_list()))
    if reference not in budgets or budgets[-1] <= reference:
        return "undetermined", f"needs the reference budget {tokens_label(reference)} and a larger one"
    ref = measured.filter(pl.col("tokens") == reference)
    # each width (or per-budget measure) at the largest budget it was measured at
    top = measured.sort("tokens").group_by("width", maintain_order=True).last()
    both = ref.join(top, on="width", how="inner", suffix="_top", nulls_equal=True)
    if spread.height:
        both = both.join(spread, on="width", how="left", nulls_equal=True)
    noise = {r["width"]: r.get("spread") or 0.0 for r in both.iter_rows(named=True)}
    outside = [r for r in both.iter_rows(named=True) if not r["ci_low"] <= r["value_top"] <= r["ci_high"]
               and abs(r["value_top"] - r["value"]) > noise[r["width"]]]
    # the verdict is compared at the largest budget that measured every width the reference did
    widths = set(ref["width"].to_list())
    full = [t for t in budgets if widths <= set(measured.filter(pl.col("tokens") == t)["width"].to_list())]
    verdicts = (ref["verdict"][0], rows.filter(pl.col("tokens") == full[-1])["verdict"][0])
    last = rows.sort("tokens").group_by("metric", "width", maintain_order=True).last()
    d_ref, d_top = claim.distance(rows.filter(pl.col("tokens") == reference)), claim.distance(last)
    what = f"{metric} {', '.join(f'{v:.3f}' for v in both['value'])} at {tokens_label(reference)} → " + ", ".join(
        f"{r['value_top']:.3f} at {tokens_label(r['tokens_top'])}" for r in both.iter_rows(named=True))
    if spread.height:
        what += f" (seed spread at {tokens_label(reference)}: {', '.join(f'{v:.3f}' for v in spread['spread'])})"
    at = f"verdict {verdicts[0]} at {tokens_label(reference)}, {verdicts[1]} at {tokens_label(full[-1])}"
    if not outside and verdicts[0] == verdicts[1]:
        return "robust", f"{what}, inside the {tokens_label(reference)} intervals; {at}"
    toward = "toward" if d_top < d_ref else "away from"
    where = f"{len(outside)} of {both.height} beyond the {tokens_label(reference)} intervals and the seed spread"
    return f"moves {toward} the paper", f"{what} ({where}); {at}"


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """Per claim: the verdict at each budget and the robustness word with its basis."""
    if table.is_empty():
        return {"n_budgets": 0, "note": "no family with its own training budget (families[].tokens)"}
    reference = int(table["reference_tokens"][0])
    out: dict[str, float | str] = {"n_budgets": table["tokens"].n_unique(), "reference_tokens": reference,
                                   "budgets": ", ".join(tokens_label(t) for t in sorted(set(table["tokens"])))}
    for claim in CLAIMS:
        rows = table.filter(pl.col("analysis") == claim.analysis)
        if rows.is_empty():
            continue
        word, basis = robustness(rows, claim, reference)
        out[f"robustness_{claim.analysis}"] = word
        out[f"robustness_{claim.analysis}_basis"] = basis
        for tokens, part in rows.filter(~pl.col("replicate")).group_by("tokens", maintain_order=True):
            out[f"verdict_{claim.analysis}_at_{tokens_label(int(tokens[0]))}"] = part["verdict"][0]
    return out


def plot(table: pl.DataFrame) -> dict[str, object]:
    """One panel per claim: its first measure against training token-steps, one line per SAE width, with
    intervals."""
    if table.is_empty():
        return {"budget": note_figure("Training budget", "no family with its own training budget")}
    import matplotlib.pyplot as plt

    claims = [c for c in CLAIMS if not table.filter(pl.col("analysis") == c.analysis).is_empty()]
    fig, axes = plt.subplots(1, len(claims), figsize=(4.6 * len(claims), 3.8), squeeze=False)
    for ax, claim in zip(axes[0], claims, strict=True):
        rows = table.filter(pl.col("analysis") == claim.analysis)
        metric = _first_metric(rows)
        rows = rows.filter((pl.col("metric") == metric) & ~pl.col("replicate"))
        for (width,), part in rows.group_by("width", maintain_order=True):
            part = part.sort("tokens")
            x, y = part["tokens"].to_numpy() / 1e6, part["value"].to_numpy()
            err = np.abs(np.vstack([y - part["ci_low"].to_numpy(), part["ci_high"].to_numpy() - y]))
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label="all widths" if width is None else f"w{width}")
        ax.axvline(int(table["reference_tokens"][0]) / 1e6, color="#999999", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training token-steps (M)")
        ax.set_title(f"{claim.analysis}\n{metric}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return {"budget": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

"""Where does an SAE's error come from: how much of it do the reconstructions of SAEs on other hooks predict linearly?

The targets are the SaeError, LinearError and NonlinearError of the primary hook's widest k = 32 SAE (b* from the
stored decomposition). The predictors are the reconstructions of that SAE and of the widest k = 32 SAE on each other
harvested hook (previous-layer residual, MLP output, attention output), alone and jointly, and, as ceilings, those
hooks' raw activations. Held-out R² (fitted on the decomposition's fit rows, scored on the rest), mean over
dimensions and pooled, with and without intercept, with intervals resampling documents.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from darkmatter.analysis.context import AnalysisContext
from darkmatter.analysis.contract import run_cli
from darkmatter.analysis.figures import note_figure
from darkmatter.analysis.stats import percentile_interval, r2_interval
from darkmatter.analysis.verdict import Verdict, from_answer
from darkmatter.config import hook_layer, previous_residual
from darkmatter.downstream.ce import SOURCE_CONDITION, SOURCE_CONDITION_WITH_LINEAR
from darkmatter.downstream.splice import percent_recovered
from darkmatter.errors.sources import COMPONENTS, SOURCE_K, component_rows
from darkmatter.io import load_safetensors
from darkmatter.regression import Design, LazyRows, group_test_sums_of, stream_moments

log = logging.getLogger(__name__)

PAPER_CLAIM = ("Linear maps from earlier-layer SAE outputs predict part of the nonlinear error (a third-party reading: "
               "up to about half of its variance), and reduce it more than a better encoder (gradient pursuit) does.")
HEADLINE = ("r2_nonlinear_error_from_previous_layer_sae", "r2_nonlinear_error_from_other_hooks_saes",
            "pursuit_fvu_nonlinear_reduction_pct", "previous_layer_beats_pursuit",
            "ce_recovered_nonlinear_from_previous_layer_pct", "ce_recovered_nonlinear_pct",
            "ce_recovered_nonlinear_from_previous_layer_given_linear_pct")
TARGETS = COMPONENTS


@dataclass(frozen=True)
class Predictor:
    """One predictor set: its ``name``, ``kind`` (sae | raw) and the blocks it stacks (by name, see
    :func:`_predictors`)."""

    name: str
    kind: str
    blocks: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """One predictor block: a function of a row slice giving [rows, width] float32."""

    get: Callable[[slice], torch.Tensor]
    width: int


def role(hook: str, primary: str) -> str:
    """A hook's place relative to the primary one, in the paper's words."""
    if hook == primary:
        return "same layer"
    if hook == previous_residual(primary):
        return "previous-layer residual"
    if hook.endswith("hook_mlp_out"):
        return "MLP output" + ("" if hook_layer(hook) == hook_layer(primary) else f" (block {hook_layer(hook)})")
    if hook.endswith("hook_attn_out"):
        return "attention output" + ("" if hook_layer(hook) == hook_layer(primary) else f" (block {hook_layer(hook)})")
    return hook


def _widest(saes: pl.DataFrame, hook: str) -> dict | None:
    """The widest SAE of a hook with k = 32 (else the widest), or None when the hook has none."""
    on = saes.filter(pl.col("hook") == hook)
    if on.is_empty():
        return None
    pool = on.filter(pl.col("k") == SOURCE_K) if (on["k"] == SOURCE_K).any() else on
    return pool.sort(["width", "k", "sae_id"], descending=[True, False, False]).row(0, named=True)


def _targets(ctx: AnalysisContext, base: dict, x: np.ndarray) -> LazyRows:
    """[SaeError | LinearError | NonlinearError] of the base SAE, float32 [N, 3d], from its codes and b*."""
    from darkmatter.errors.measure import LINEAR_MAP

    lin = load_safetensors(ctx.paths.sae_errors(base["hook"], base["sae_id"]) / LINEAR_MAP)
    return component_rows(x, ctx.codes(base["hook"], base["sae_id"]), lin["coef"].float(), lin["intercept"].float())


def _predictors(ctx: AnalysisContext, saes: pl.DataFrame, base: dict) -> tuple[dict[str, Block], list[Predictor]]:
    """The blocks (each chosen SAE's reconstruction, each other hook's raw activations) and the predictor sets: each
    SAE's reconstruction alone, the other hooks' SAEs jointly, all SAEs jointly, each other hook's raw activations
    and all of them jointly."""
    store = ctx.eval_store()
    others = [h for h in dict.fromkeys(saes["hook"]) if h != ctx.hook]
    chosen = [base] + [s for s in (_widest(saes, h) for h in others) if s is not None]
    blocks: dict[str, Block] = {}
    for s in chosen:
        codes = ctx.codes(s["hook"], s["sae_id"])
        blocks[f"{role(s['hook'], ctx.hook)} SAE"] = Block(codes.x_hat, int(codes.W_dec.shape[1]))
    for h in others:
        a = store.activations(h)
        blocks[f"{role(h, ctx.hook)} activations (ceiling)"] = Block(
            lambda sl, a=a: torch.from_numpy(np.array(a[sl], dtype=np.float32)), int(a.shape[1]))
    sae_blocks, raw_blocks = list(blocks)[: len(chosen)], list(blocks)[len(chosen):]
    sets = [Predictor(b, "sae", (b,)) for b in sae_blocks]
    if len(chosen) > 2:
        sets.append(Predictor("other hooks' SAEs jointly", "sae", tuple(sae_blocks[1:])))
    if len(chosen) > 1:
        sets.append(Predictor("all SAEs jointly", "sae", tuple(sae_blocks)))
    sets += [Predictor(b, "raw", (b,)) for b in raw_blocks]
    if len(others) > 1:
        sets.append(Predictor("other hooks' activations jointly (ceiling)", "raw", tuple(raw_blocks)))
    return blocks, sets


def compute(ctx: AnalysisContext) -> pl.DataFrame:
    """One row per predictor set × intercept × target: held-out R² (mean over dims and pooled) with intervals.

    Every predictor set of a kind (SAE reconstructions, raw activations) is a column subset of that kind's union of
    blocks, so its moments are sub-blocks of the union's: one pass of moments and one of held-out sums per kind."""
    saes = _all_saes(ctx)
    base = _widest(saes, ctx.hook)
    if base is None:
        raise ValueError(f"no SAE on the primary hook {ctx.hook}; nothing to explain.")
    store = ctx.eval_store()
    x = store.activations(ctx.hook)
    n, d = x.shape
    y = _targets(ctx, base, x)
    mask = ctx.fit_mask(ctx.hook)
    contexts = store.index()["context"].to_numpy().astype(np.int64)
    weights = ctx.resample_weights(np.unique(contexts))
    conf = ctx.analysis.confidence
    blocks, sets = _predictors(ctx, saes, base)
    rows = []
    for kind in dict.fromkeys(p.kind for p in sets):
        members = [p for p in sets if p.kind == kind]
        union = list(dict.fromkeys(b for p in members for b in p.blocks))
        start = np.cumsum([0] + [blocks[b].width for b in union])
        at = {b: np.arange(start[i], start[i + 1]) for i, b in enumerate(union)}
        xs = LazyRows(n, int(start[-1]), lambda sl, union=union: torch.cat([blocks[b].get(sl) for b in union], dim=1))
        m = stream_moments(xs, y, mask, desc=f"{kind} predictors")
        assert m.x is not None and m.y is not None
        fits = []
        for p in members:
            cols = np.concatenate([at[b] for b in p.blocks])
            design = [xm.columns(cols) for xm in m.x]
            for intercept in (True, False):
                lin = Design(design[0], design[1], intercept=intercept).solve(m.y[0].on_columns(cols))
                fits.append((p, cols, intercept, lin))
        for (p, cols, intercept, _), sums in zip(fits, group_test_sums_of(
                xs, y, mask, contexts, [(cols, lin) for _, cols, _, lin in fits]), strict=True):
            for t, target in enumerate(TARGETS):
                r2 = r2_interval(sums, slice(t * d, (t + 1) * d), weights, conf)
                rows.append({"predictor": p.name, "kind": p.kind, "width": len(cols), "intercept": intercept,
                             "target": target, **{f"r2_{k}": v for k, v in r2.items()}})
                if intercept and target == "nonlinear_error":
                    log.info("%s: R² of NonlinearError %.3f (pooled, affine)", p.name, r2["pooled"])
    return pl.DataFrame(rows).with_columns(
        base_sae_id=pl.lit(base["sae_id"]), pursuit_fvu_nonlinear_reduction_pct=pl.lit(_pursuit_reduction(ctx, base)),
        **{k: pl.lit(v) for k, v in _ce_recovered(ctx, base["sae_id"]).items()},
        **{k: pl.lit(v) for k, v in ctx.resampling(np.unique(contexts)).items()})


CE_PARTS = {"nonlinear": ("sae+nonlinear", "sae"), "nonlinear_from_previous_layer": (SOURCE_CONDITION, "sae"),
            # against Sae(x) + LinearError(x), whose gap is the NonlinearError's own cost: the prediction is fitted to
            # NonlinearError, and added to Sae(x) alone it also meets the LinearError it was not fitted beside
            "nonlinear_from_previous_layer_given_linear": (SOURCE_CONDITION_WITH_LINEAR, "sae+linear")}


def _ce_recovered(ctx: AnalysisContext, sae_id: str) -> dict[str, float]:
    """% of the CE gap Sae(x) leaves that splicing in its whole NonlinearError closes, and that its part predicted
    by the previous layer's SAE closes (measure_sources_ce); and % of the gap Sae(x) + LinearError(x) leaves (the
    NonlinearError's own cost) that adding the predicted part closes. Same contexts, intervals resampling documents
    (paired: one draw serves all); NaN without that step."""
    keys = [f"ce_recovered_{p}_pct{s}" for p in CE_PARTS for s in ("", "_ci_low", "_ci_high")] + ["ce_contexts"]
    out = dict.fromkeys(keys, math.nan)
    if not ctx.has_table("token_ce"):
        return out
    used = sorted({c for pair in CE_PARTS.values() for c in pair})
    with ctx.connect() as con:
        per = con.sql(f"""SELECT context, condition, count(*) AS n, sum(ce::DOUBLE) AS ce FROM token_ce
                          WHERE (sae_id = ? AND condition IN ({", ".join("?" * len(used))}))
                             OR (sae_id = '' AND condition = 'clean') GROUP BY ALL""",
                      params=[sae_id, *used]).pl()
    wide = per.pivot(on="condition", index="context", values=["ce", "n"]).drop_nulls().sort("context")
    if wide.is_empty() or any(f"ce_{c}" not in wide.columns for c in used):
        return out
    n = wide["n_clean"].to_numpy().astype(np.float64)
    w = np.vstack([np.ones(len(n)), ctx.resample_weights(wide["context"].to_numpy())])  # row 0: the point estimate
    mean = {c: (w @ wide[f"ce_{c}"].to_numpy()) / (w @ n) for c in ("clean", *used)}
    for part, (cond, ref) in CE_PARTS.items():
        pct = np.array([percent_recovered(*m) for m in zip(mean[ref], mean[cond], mean["clean"], strict=True)])
        low, high = percentile_interval(pct[1:], ctx.analysis.confidence)
        out |= {f"ce_recovered_{part}_pct": float(pct[0]), f"ce_recovered_{part}_pct_ci_low": float(low),
                f"ce_recovered_{part}_pct_ci_high": float(high)}
    return out | {"ce_contexts": float(len(n))}


def _all_saes(ctx: AnalysisContext) -> pl.DataFrame:
    with ctx.connect() as con:
        return con.sql("SELECT * FROM saes ORDER BY hook, width, k, sae_id").pl()


def _pursuit_reduction(ctx: AnalysisContext, base: dict) -> float:
    """How much gradient pursuit lowers the base SAE's FVU_nonlinear, % of the encoder's (NaN if not pursued)."""
    if not ctx.has_table("pursuit_saes"):
        return math.nan
    with ctx.connect() as con:
        got = dict(con.execute("SELECT method, fvu_nonlinear FROM pursuit_saes WHERE sae_id = ?",
                               [base["sae_id"]]).fetchall())
    if {"encoder", "pursuit"} - set(got):
        return math.nan
    return 100 * (1 - got["pursuit"] / got["encoder"])


def _pick(table: pl.DataFrame, predictor: str, target: str, intercept: bool = True) -> dict | None:
    rows = table.filter((pl.col("predictor") == predictor) & (pl.col("target") == target)
                        & (pl.col("intercept") == intercept))
    return rows.row(0, named=True) if rows.height else None


def summarize(table: pl.DataFrame) -> dict[str, float | str]:
    """R² of each target from the previous-layer SAE and from the other hooks' SAEs jointly (with intervals), the
    best ceiling, and whether the previous layer's SAE removes more nonlinear error than gradient pursuit."""
    out: dict[str, float | str] = {"base_sae_id": table["base_sae_id"][0]}
    for key, predictor in (("previous_layer_sae", "previous-layer residual SAE"),
                           ("other_hooks_saes", "other hooks' SAEs jointly"), ("all_saes", "all SAEs jointly"),
                           ("same_layer_sae", "same layer SAE"),
                           ("other_hooks_activations", "other hooks' activations jointly (ceiling)")):
        for target in TARGETS:
            r = _pick(table, predictor, target)
            if r is not None:
                out[f"r2_{target}_from_{key}"] = r["r2_pooled"]
                out[f"r2_{target}_from_{key}_ci_low"] = r["r2_pooled_low"]
                out[f"r2_{target}_from_{key}_ci_high"] = r["r2_pooled_high"]
    pursuit = float(table["pursuit_fvu_nonlinear_reduction_pct"][0])
    out["pursuit_fvu_nonlinear_reduction_pct"] = pursuit
    for key in (c for c in table.columns if c.startswith("ce_recovered_") or c == "ce_contexts"):
        out[key] = float(table[key][0])
    prev = _pick(table, "previous-layer residual SAE", "nonlinear_error")
    if prev is None or not math.isfinite(pursuit):
        out["previous_layer_beats_pursuit"] = "not measured"
    else:
        low, high = 100 * prev["r2_pooled_low"], 100 * prev["r2_pooled_high"]
        out["previous_layer_beats_pursuit"] = "yes" if low > pursuit else ("no" if high < pursuit else "undetermined")
    for key in HEADLINE:  # an experiment without those hooks (or without pursuit) says so instead of omitting them
        out.setdefault(key, math.nan)
    if prev is None:
        out["note"] = "no SAE on the previous layer's residual stream: harvest it and give it a family"
    for k in ("resampling_unit", "n_documents", "n_contexts", "bootstrap"):
        out[k] = table[k][0]
    return out


def verdict(summary: dict, table: pl.DataFrame) -> Verdict:
    """Earlier-layer SAE outputs reduce the nonlinear error more than gradient pursuit does."""
    return from_answer(summary.get("previous_layer_beats_pursuit", ""),
                       f"R²(NonlinearError ← previous-layer SAE) "
                       f"{summary.get('r2_nonlinear_error_from_previous_layer_sae', float('nan')):.3f} against the "
                       f"pursuit's {summary.get('pursuit_fvu_nonlinear_reduction_pct', float('nan')):.1f}% reduction")


def plot(table: pl.DataFrame) -> dict[str, object]:
    """Grouped bars: held-out R² (pooled, affine) of each target from each predictor set, intervals as whiskers."""
    from darkmatter.analysis.figures import PALETTE, new_figure

    affine = table.filter(pl.col("intercept"))
    if affine.is_empty():
        return {"r2": note_figure("Error sources", "no predictors")}
    predictors = affine["predictor"].unique(maintain_order=True).to_list()
    fig, ax = new_figure(figsize=(max(6.4, 1.1 * len(predictors)), 4.4))
    colours = {"sae_error": PALETTE["total"], "linear_error": PALETTE["linear error"],
               "nonlinear_error": PALETTE["nonlinear error"]}
    width = 0.8 / len(TARGETS)
    for t, target in enumerate(TARGETS):
        part = affine.filter(pl.col("target") == target)
        y = np.array([part.filter(pl.col("predictor") == p)["r2_pooled"][0] for p in predictors])
        lo = np.array([part.filter(pl.col("predictor") == p)["r2_pooled_low"][0] for p in predictors])
        hi = np.array([part.filter(pl.col("predictor") == p)["r2_pooled_high"][0] for p in predictors])
        pos = np.arange(len(predictors)) + (t - 1) * width
        ax.bar(pos, y, width, color=colours[target], label=target.replace("_", " "),
               yerr=np.clip(np.nan_to_num([y - lo, hi - y]), 0, None), capsize=2)  # a percentile
        # interval need not contain the point estimate: whiskers stop at the bar there
    pursuit = float(table["pursuit_fvu_nonlinear_reduction_pct"][0])
    if math.isfinite(pursuit):
        ax.axhline(pursuit / 100, color=PALETTE["pursuit"], ls="--", lw=1,
                   label="gradient pursuit: FVU_nonlinear reduction")
    ax.set_xticks(np.arange(len(predictors)), predictors, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="held-out R² (pooled, affine)", title=f"Predicting {table['base_sae_id'][0]}'s error")
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=7)
    return {"r2": fig}


def main() -> None:
    run_cli(sys.modules[__name__])


if __name__ == "__main__":
    main()

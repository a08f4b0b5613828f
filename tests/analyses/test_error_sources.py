"""analyses/error_sources.py on a planted experiment: one extra hook carries the base SAE's error under a random
rotation (its exact SAE predicts SaeError with R² ≈ 1; with the same-layer SAE's reconstruction beside it, x is in
the span and NonlinearError is exact too), another carries independent noise (R² ≈ 0 within the null tolerance),
and every interval resamples documents."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from tests.helpers import make_experiment
from tests.regression.test_regression import null_r2_tolerance


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    exp = make_experiment(tmp_path_factory.mktemp("sources"), n_contexts=12, n_positions=80, source_hooks=True)
    return exp, exp.run("error_sources", tmp_path_factory.mktemp("run") / "error_sources")


def _r2(table: pl.DataFrame, predictor: str, target: str, intercept: bool = True) -> dict:
    return table.filter((pl.col("predictor") == predictor) & (pl.col("target") == target)
                        & (pl.col("intercept") == intercept)).row(0, named=True)


def test_the_planted_source_predicts_the_error_and_the_noise_does_not(out):
    exp, res = out
    table = res["table"]
    assert set(table["base_sae_id"]) == {"topk-w96-k4-s0"}
    n_test = int(round(0.4 * 12 * 80))
    tol = null_r2_tolerance(48, 12 * 80 - n_test, n_test)
    for intercept in (True, False):
        for predictor in ("MLP output SAE", "MLP output activations (ceiling)"):  # the same columns
            exact = _r2(table, predictor, "sae_error", intercept)
            assert exact["r2_pooled"] == pytest.approx(1.0, abs=1e-4)
            assert exact["r2_mean_dims"] == pytest.approx(1.0, abs=1e-4)
        joint = _r2(table, "all SAEs jointly", "nonlinear_error", intercept)
        assert joint["width"] == 3 * 48 and joint["r2_pooled"] <= 1.0 + 1e-9
        for target in ("sae_error", "nonlinear_error"):
            noise = _r2(table, "previous-layer residual SAE", target, intercept)  # blocks.0: independent noise
            assert abs(noise["r2_pooled"]) < tol
            assert noise["r2_pooled_low"] <= noise["r2_pooled_high"]
    # x = x_hat + error is in the span of the two reconstructions, so NonlinearError = error − x·b* − b0 is an exact
    # affine function of them (without intercept b0 is missing: below 1)
    assert _r2(table, "all SAEs jointly", "nonlinear_error")["r2_pooled"] == pytest.approx(1.0, abs=1e-4)


def test_summary_names_the_comparison_and_the_unit(out):
    _, res = out
    s = res["summary"]
    assert s["resampling_unit"] == "document" and s["n_documents"] == 12
    assert s["r2_sae_error_from_all_saes"] == pytest.approx(1.0, abs=1e-4)
    assert abs(s["r2_nonlinear_error_from_previous_layer_sae"]) < 0.6
    assert math.isnan(s["pursuit_fvu_nonlinear_reduction_pct"])  # not pursued here: no comparison
    assert s["previous_layer_beats_pursuit"] == "not measured" and "note" not in s
    assert "r2" in res["figures"]


def test_ce_recovered_by_the_predicted_nonlinear_error_beside_the_whole(tmp_path):
    """Planted per-token CE: per context the SAE's gap is 1 + u_c, the whole NonlinearError closes half of it and its
    previous-layer prediction a fifth, so every resample gives exactly 50% and 20%; Sae(x) + LinearError(x) leaves
    0.6 of the gap, of which adding the prediction closes a quarter (25%)."""
    from darkmatter.config import SaeFamilyConfig, from_dict
    from darkmatter.downstream.ce import SOURCE_CONDITION, SOURCE_CONDITION_WITH_LINEAR
    from darkmatter.store.build import build_experiment_database
    from tests.helpers import _ByteTokenizer

    exp = make_experiment(tmp_path, n_contexts=10, n_positions=40, source_hooks=True)
    base = "topk-w96-k4-s0"
    u = np.random.default_rng(0).uniform(0, 1, 10)
    rows = []
    for c in range(10):
        gap = 1 + u[c]
        for sae_id, cond, ce in (("", "clean", 1.0), (base, "sae", 1 + gap), (base, "sae+nonlinear", 1 + gap / 2),
                                 (base, SOURCE_CONDITION, 1 + 0.8 * gap), (base, "sae+linear", 1 + 0.6 * gap),
                                 (base, SOURCE_CONDITION_WITH_LINEAR, 1 + 0.45 * gap)):
            rows.append(pl.DataFrame({"sae_id": sae_id, "condition": cond, "context": np.full(5, c, np.int32),
                                      "position": np.arange(5, dtype=np.int32), "ce": np.full(5, ce, np.float32),
                                      "kl": np.zeros(5, np.float32)}))
    table = pl.concat(rows)
    sourced = [SOURCE_CONDITION, SOURCE_CONDITION_WITH_LINEAR]
    for folder, part in ((exp.paths.ce, table.filter(~pl.col("condition").is_in(sourced))),
                         (exp.paths.sources_ce, table.filter(pl.col("condition").is_in(["clean", *sourced])))):
        folder.mkdir(parents=True)
        part.write_parquet(folder / "token_ce.parquet")
    families = [from_dict(SaeFamilyConfig, f) for f in exp.params["families"]]
    exp.db.unlink()
    build_experiment_database(exp.paths, families, exp.hook, tokenizer=_ByteTokenizer())
    s = exp.run("error_sources", tmp_path / "out")["summary"]
    assert s["ce_contexts"] == 10
    for part, pct in (("nonlinear", 50.0), ("nonlinear_from_previous_layer", 20.0),
                      ("nonlinear_from_previous_layer_given_linear", 25.0)):
        for suffix in ("", "_ci_low", "_ci_high"):  # float32 CE: a few ulps of 100
            assert s[f"ce_recovered_{part}_pct{suffix}"] == pytest.approx(pct, abs=1e-4)


def test_each_predictor_set_equals_its_own_regression(out):
    """The sets share one pass per kind (their moments are sub-blocks of the union's): each set's held-out R² equals
    a regression of the targets on that set's columns alone (darkmatter.regression.heldout_group_sums)."""
    import analyses.error_sources as es
    from darkmatter.analysis.stats import r2_interval
    from darkmatter.regression import LazyRows, heldout_group_sums

    exp, res = out
    ctx = exp.context("error_sources")
    saes = es._all_saes(ctx)
    base = es._widest(saes, ctx.hook)
    store = ctx.eval_store()
    x = store.activations(ctx.hook)
    n, d = x.shape
    y = es._targets(ctx, base, x)
    contexts = store.index()["context"].to_numpy().astype(np.int64)
    weights = ctx.resample_weights(np.unique(contexts))
    blocks, sets = es._predictors(ctx, saes, base)
    assert len(sets) == len(res["table"]) // (2 * len(es.TARGETS))
    for p in sets:
        xs = LazyRows(n, sum(blocks[b].width for b in p.blocks),
                      lambda sl, p=p: torch.cat([blocks[b].get(sl) for b in p.blocks], dim=1))
        for intercept in (True, False):
            _, sums = heldout_group_sums(xs, y, ctx.fit_mask(ctx.hook), contexts, intercept=intercept)
            for t, target in enumerate(es.TARGETS):
                alone = r2_interval(sums, slice(t * d, (t + 1) * d), weights, ctx.analysis.confidence)
                shared = _r2(res["table"], p.name, target, intercept)
                for key in ("pooled", "mean_dims", "pooled_low", "pooled_high"):
                    assert shared[f"r2_{key}"] == pytest.approx(alone[key], abs=1e-6), (p.name, target, key)

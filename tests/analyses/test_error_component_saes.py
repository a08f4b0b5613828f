"""The error_component_saes analysis on an experiment whose error SAEs were trained by the real step: FVUs that a
direct computation reproduces, the proxy's rows for every SAE and the random control, example contexts, and the
LLM-judge path against the loopback stub judge."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from darkmatter.errors.error_saes import COMPONENTS, ErrorComponents
from darkmatter.errors.measure import LINEAR_MAP
from darkmatter.sae.formats import load_sae
from darkmatter.store import connect
from tests.analysis.test_judge import stub  # noqa: F401  (the loopback judge fixture)
from tests.helpers import make_experiment

LATENTS = 12


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("error_saes"), n_contexts=12, n_positions=60, error_saes=True)


def test_fvu_of_each_error_sae_matches_a_direct_computation(exp, tmp_path):
    out = exp.run("error_component_saes", tmp_path / "ec", latents=LATENTS, min_fires=5)
    table, summary = out["table"], out["summary"]
    with connect(exp.db) as con:
        stored = con.sql("SELECT * FROM error_saes").pl()
    assert sorted(stored["component"]) == sorted(COMPONENTS) and set(stored["base_sae_id"]) == {"topk-w96-k4-s0"}
    base = exp.saes["topk-w96-k4-s0"]
    components = ErrorComponents.load(base, exp.paths.sae_errors(exp.hook, "topk-w96-k4-s0") / LINEAR_MAP)
    targets = components(torch.from_numpy(exp.planted.x))
    for name in COMPONENTS:
        sae = load_sae(exp.paths.error_saes(exp.hook) / "saes" / name)
        y = targets[name].double()
        with torch.no_grad():
            direct = float((y - sae(targets[name]).x_hat.double()).square().sum() / (y - y.mean(0)).square().sum())
        row = table.filter((pl.col("kind") == "fvu") & (pl.col("sae_id") == sae.cfg["metadata"]["sae_id"])
                           & pl.col("sae").str.contains({"sae_error": "SaeError", "linear_error": "LinearError",
                                                         "nonlinear_error": "NonlinearError"}[name]))
        assert row["value"][0] == pytest.approx(direct, rel=1e-4)
        assert row["ci_low"][0] <= row["value"][0] <= row["ci_high"][0]
        assert stored.filter(pl.col("component") == name)["fvu"][0] == pytest.approx(direct, rel=1e-4)
    diff = summary["fvu_difference_nonlinear_minus_linear"]
    assert diff == pytest.approx(summary["fvu_nonlinear_error_sae"] - summary["fvu_linear_error_sae"], rel=1e-12)
    assert summary["fvu_difference_ci_low"] <= diff <= summary["fvu_difference_ci_high"]


def test_proxy_scores_every_sae_and_the_random_control_per_decile(exp, tmp_path):
    out = exp.run("error_component_saes", tmp_path / "ec", latents=LATENTS, min_fires=5, examples=2)
    table, s = out["table"], out["summary"]
    proxy = table.filter(pl.col("kind") == "proxy")
    saes = proxy["sae"].unique(maintain_order=True).to_list()
    assert saes == ["base SAE (topk-w96-k4-s0)", "SaeError SAE (control)", "LinearError SAE", "NonlinearError SAE",
                    "random directions"]
    counts = proxy.group_by("sae").agg(pl.col("latent").n_unique(), pl.len())
    assert (counts["latent"] == LATENTS).all() and (counts["len"] == LATENTS * 11).all()  # all firings + 10 deciles
    assert proxy["value"].drop_nans().is_between(0, 1).all()
    examples = table.filter(pl.col("kind") == "example")
    assert examples.group_by("sae").len()["len"].to_list() == [2] * 5
    assert examples["text"].str.contains("<<t").all()  # the byte tokenizer's tokens, firing ones highlighted
    # token ids are drawn independently of the planted features: nothing for the proxy to find, and it says so
    assert abs(s["proxy_auroc_top_decile_median_base"] - 0.5) < 0.15 and s["proxy_separates"] == "no"
    assert not table.filter(pl.col("kind") == "judge").height  # no endpoint: no judge


def test_the_llm_judge_path_scores_with_the_endpoint(exp, tmp_path, stub):  # noqa: F811
    """The stub judge answers "fires" only for windows containing "cat": on these tokens it never says so, so it is
    right on every silent window and wrong on every firing one — which checks that each verdict is matched to the
    decile of its own window after the shuffle."""
    judge = {"endpoint": stub.url, "model": "stub", "latents": 2, "window": 8, "explain": 5, "per_decile": 1,
             "silent": 4}
    out = exp.run("error_component_saes", tmp_path / "ec", latents=4, min_fires=5, judge=judge)
    judged = out["table"].filter(pl.col("kind") == "judge")
    assert judged["sae"].n_unique() == 4 and judged["latent"].n_unique() >= 2  # not the random control
    assert (judged.filter(pl.col("decile") == 0)["value"] == 1.0).all()
    assert (judged.filter(pl.col("decile") > 0)["value"] == 0.0).all()
    assert set(judged["text"]) == {"the token cat"}
    assert out["summary"]["judge_accuracy_nonlinear_error"] == pytest.approx(
        float((judged.filter(pl.col("sae") == "NonlinearError SAE").select(pl.col("value") * pl.col("n")).sum()
               / judged.filter(pl.col("sae") == "NonlinearError SAE")["n"].sum()).item()))
    assert len(stub.bodies) >= 4 * 2 * 2  # an explanation and at least one detection request per judged latent
    assert np.all([b["model"] == "stub" for b in stub.bodies])

"""analyses/training_budget.py: each budget's family analysed alone (the same numbers as the analyses give for those
SAEs), and the robustness word from planted tables."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from analyses.training_budget import CLAIMS, robustness
from darkmatter.sae.families import SaeSpec
from tests.helpers import Experiment, make_experiment, topk_sae, torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")
BUDGETS = {1000: 0.3, 4000: 0.0}  # tokens -> the feature noise of that budget's SAEs (more training: exact)


@pytest.fixture(scope="module")
def budgets(tmp_path_factory) -> Experiment:
    """The synthetic sweep plus two budget families (widths 32 and 64, k = 4): noisy features at 1k token-steps,
    the planted features at 4k."""
    probe = make_experiment(tmp_path_factory.mktemp("probe"), widths=(64,), ks=(4,), k_width=64)
    features, bias = probe.planted.features, probe.planted.bias
    rng = np.random.default_rng(3)
    extra = {}
    for tokens, noise in BUDGETS.items():
        for width in (32, 64):
            f = features[:width] + noise * rng.standard_normal(features[:width].shape)
            extra[SaeSpec("topk", width, 4, 0, tokens)] = (f"t{tokens}", topk_sae(f, bias, 4))
    for width in (32, 64):  # another seed at the first budget: other noise of the same size
        f = features[:width] + BUDGETS[1000] * rng.standard_normal(features[:width].shape)
        extra[SaeSpec("topk", width, 4, 1, 1000)] = ("t1000-s1", topk_sae(f, bias, 4))
    with torch_threads(1):
        return make_experiment(tmp_path_factory.mktemp("budgets"), extra=extra)


def test_each_budget_is_its_family_alone(budgets, tmp_path):
    out = budgets.run("training_budget", tmp_path / "out", reference_tokens=1000)
    table, summary = out["table"], out["summary"]
    assert sorted(set(table["tokens"])) == sorted(BUDGETS)
    assert set(table.filter(pl.col("replicate"))["family"]) == {"t1000-s1"}  # the second family at a budget
    assert set(table["width"].drop_nulls()) == {32, 64}  # never the width or k family's SAEs
    # the numbers are those error_predictability gives for the same SAEs in the whole store
    whole = budgets.run("error_predictability", tmp_path / "ep")["table"].filter(pl.col("default"))
    for tokens, seed in [(t, 0) for t in BUDGETS] + [(1000, 1)]:
        for width in (32, 64):
            sae_id = SaeSpec("topk", width, 4, seed, tokens).sae_id
            mine = table.filter((pl.col("tokens") == tokens) & (pl.col("width") == width) & (pl.col("seed") == seed)
                                & (pl.col("metric") == "R²(‖SaeError‖²)"))
            theirs = whole.filter(pl.col("sae_id") == sae_id)
            assert mine["value"][0] == pytest.approx(theirs["r2_norm_sq"][0], rel=1e-12)
            assert mine["ci_low"][0] == pytest.approx(theirs["r2_norm_sq_low"][0], rel=1e-12)
    for claim in ("error_predictability", "scaling_decomposition", "norm_test"):
        assert summary[f"robustness_{claim}"] in ("robust", "moves toward the paper", "moves away from the paper")
        assert summary[f"verdict_{claim}_at_1k"] in ("agrees", "differs", "undetermined")
    assert "robustness_ce_contributions" not in summary  # no CE measured in this store: no claim, not a guess
    assert out["figures"]["budget"].is_file()


def _rows(values: dict[int, tuple[float, float, float]], verdicts: dict[int, str],
          replicate: float | None = None) -> pl.DataFrame:
    """One width's rows per budget; ``replicate``: another seed's value at budget 2."""
    metric = "R²(‖SaeError‖²)"
    rows = [{"tokens": t, "replicate": False, "analysis": "error_predictability", "metric": metric, "width": 64,
             "value": v, "ci_low": lo, "ci_high": hi, "verdict": verdicts[t]} for t, (v, lo, hi) in values.items()]
    if replicate is not None:
        rows.append(rows[0] | {"tokens": 2, "replicate": True, "value": replicate})
    return pl.DataFrame(rows)


def test_robustness_words():
    claim = CLAIMS[0]  # error_predictability: the paper says R² > 0.9
    inside = _rows({2: (0.76, 0.70, 0.80), 8: (0.78, 0.0, 1.0)}, {2: "differs", 8: "differs"})
    assert robustness(inside, claim, 2)[0] == "robust"
    up = _rows({2: (0.76, 0.70, 0.80), 8: (0.85, 0.8, 0.9)}, {2: "differs", 8: "differs"})
    assert robustness(up, claim, 2)[0] == "moves toward the paper"
    down = _rows({2: (0.76, 0.70, 0.80), 8: (0.60, 0.5, 0.7)}, {2: "differs", 8: "differs"})
    assert robustness(down, claim, 2)[0] == "moves away from the paper"
    flipped = _rows({2: (0.88, 0.85, 0.95), 8: (0.93, 0.91, 0.95)}, {2: "undetermined", 8: "agrees"})
    assert robustness(flipped, claim, 2)[0] == "moves toward the paper"  # inside, but the verdict changed
    # a move beyond the interval but within what another seed gives at the reference budget is not a move
    noisy = _rows({2: (0.76, 0.70, 0.80), 8: (0.85, 0.8, 0.9)}, {2: "differs", 8: "differs"}, replicate=0.66)
    word, basis = robustness(noisy, claim, 2)
    assert word == "robust" and "seed spread at 2: 0.100" in basis
    assert robustness(_rows({2: (0.76, 0.70, 0.80), 8: (0.85, 0.8, 0.9)}, {2: "differs", 8: "differs"},
                            replicate=0.74), claim, 2)[0] == "moves toward the paper"
    # a width trained only up to the reference budget is compared there; the other at its largest budget
    two = pl.concat([up, _rows({2: (0.70, 0.65, 0.75)}, {2: "differs"}).with_columns(width=pl.lit(16, dtype=pl.Int64))])
    word, basis = robustness(two, claim, 2)
    assert word == "moves toward the paper" and "0.850 at 8" in basis and "1 of 2 beyond" in basis
    # a replicate that could not measure it (NaN: e.g. a slope from one width) gives no spread, not an infinite one
    unmeasured = _rows({2: (0.76, 0.70, 0.80), 8: (0.85, 0.8, 0.9)}, {2: "differs", 8: "differs"}, replicate=math.nan)
    assert robustness(unmeasured, claim, 2)[0] == "moves toward the paper"
    assert robustness(inside, claim, 8)[0] == "undetermined"  # no budget beyond the reference
    assert robustness(inside, claim, 4)[0] == "undetermined"  # the reference budget is missing

"""The store-based analyses (scaling, contours, per-token scaling, norm baselines, CE contributions).

Each runs through the real runner (darkmatter.analysis.run) on a small synthetic DuckDB store, and each recovers a
planted ground truth: the scaling law's (a, c, m), R² = 1 for proportional error norms, a planted dependence of
‖SaeError‖² on ‖x‖, hand-computed % of the CE gap recovered.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from darkmatter.analysis import AnalysisContext, load_outputs, run
from darkmatter.paths import ExperimentPaths
from darkmatter.regression import split_mask
from darkmatter.store.build import build_database
from darkmatter.store.schema import TABLES

HOOK = "blocks.1.hook_resid_post"
MODULES = ("scaling_decomposition", "width_k_contours", "per_token_scaling", "norm_baselines", "ce_contributions")
WIDTHS, K_OF_WIDTHS = (256, 512, 1024, 2048, 4096), 16
KS, WIDTH_OF_KS = (4, 8, 16, 32, 64), 1024
A, C, M = 3.0, 0.08, 0.6  # planted FVU(W) = C + A·W^(−M) of the width family
NL = 0.05  # planted FVU_nonlinear, flat in width
N_CONTEXTS, N_POSITIONS, MIN_POS = 10, 80, 200
GAP_LINEAR, GAP_NONLINEAR = 0.6, 0.2  # planted fraction of each SAE's CE gap closed by adding the part back

Norms = Callable[[int, int, np.random.Generator], dict[str, np.ndarray]]


SEED_SHIFT = 3e-3  # planted: another seed of a width-family SAE has FVU_nonlinear this much higher


def _sae_rows(widths=WIDTHS, seeds: int = 1) -> list[dict]:
    """The '+'-shaped grid: a width sweep at k=16 (``seeds`` seeds per width) and a k sweep at width 1024
    (w1024-k16 seed 0 is in both)."""
    members: dict[tuple[int, int, int], list[str]] = {}
    for w in widths:
        for seed in range(seeds):
            members.setdefault((w, K_OF_WIDTHS, seed), []).append("width")
    for k in KS:
        members.setdefault((WIDTH_OF_KS, k, 0), []).append("k")
    rows = []
    for (w, k, seed), fams in members.items():
        fvu = C + A * w ** (-M) + 1e-4 * (-1) ** len(rows)  # a little alternating noise: the fit has residuals
        fvu *= (k / K_OF_WIDTHS) ** -0.25
        nl = NL + 2e-4 * (-1) ** len(rows) + SEED_SHIFT * seed
        rows.append({c.name: None for c in TABLES["saes"]} | {
            "sae_id": f"topk-w{w}-k{k}-s{seed}", "hook": HOOK, "families": ",".join(fams),
            "architecture": "topk", "width": w, "k": k, "seed": seed, "fvu": fvu, "fvu_nonlinear": nl,
            "fvu_linear": fvu - nl, "r2_norm_sq": 0.95 - 0.01 * len(rows), "r2_vector_mean_dims": 0.5 + 0.01 * len(rows),
            "r2_vector_pooled": 0.55, "l0_mean": float(k)})
    return rows


def default_norms(width: int, k: int, rng: np.random.Generator, d: np.ndarray) -> dict[str, np.ndarray]:
    """Error norms shrinking with width and k around a per-token difficulty ``d`` shared by every SAE."""
    s = (width / 256) ** -0.3 * (k / 16) ** -0.2
    n = d.size
    linear = s * d * (1 + 0.1 * rng.standard_normal(n))
    nonlinear = s * (0.5 + 0.3 * d + 0.2 * np.abs(rng.standard_normal(n)))
    err = np.sqrt(linear**2 + nonlinear**2)
    return {"x_norm": 5 + 2 * d + 0.3 * rng.standard_normal(n), "error_norm": err, "linear_error_norm": linear,
            "nonlinear_error_norm": nonlinear}


def _token_ce(saes: list[dict], rng: np.random.Generator) -> pl.DataFrame:
    """Planted CE: per-context offsets shared by all conditions, ±δ token pairs that cancel within a context."""
    offset = np.repeat(rng.normal(0, 0.3, N_CONTEXTS), N_POSITIONS)
    wiggle = np.tile(np.where(np.arange(N_POSITIONS) % 2 == 0, 0.1, -0.1), N_CONTEXTS)
    base = {"context": np.repeat(np.arange(N_CONTEXTS), N_POSITIONS),
            "position": np.tile(MIN_POS + np.arange(N_POSITIONS), N_CONTEXTS)}
    clean = 2.0 + offset + wiggle
    frames = [pl.DataFrame(base | {"sae_id": "", "condition": cond, "ce": clean + shift, "kl": np.full(clean.size, kl)})
              for cond, shift, kl in (("clean", 0.0, 0.0), ("zero", 5.0, 3.0), ("mean", 3.0, 2.0))]
    for sae in saes:
        gap = gap_of(sae["width"], sae["k"])
        for cond, closed in (("sae", 0.0), ("sae+linear", GAP_LINEAR), ("sae+nonlinear", GAP_NONLINEAR)):
            frames.append(pl.DataFrame(base | {"sae_id": sae["sae_id"], "condition": cond,
                                               "ce": clean + gap * (1 - closed), "kl": np.full(clean.size, gap / 2)}))
    return pl.concat(frames, how="diagonal").select([c.name for c in TABLES["token_ce"]])


def gap_of(width: int, k: int) -> float:
    return 0.5 * (width / 256) ** -0.3 * (k / 16) ** -0.2


def make_store(root: Path, norms: Callable | None = None, widths=WIDTHS, with_ce: bool = True,
               error_sq: Callable | None = None, seeds: int = 1) -> AnalysisContext:
    """A synthetic experiment: tokens, the saes grid, per-token error shards, planted token_ce; its context."""
    rng = np.random.default_rng(0)
    n = N_CONTEXTS * N_POSITIONS
    tokens = pl.DataFrame({
        "row": np.arange(n), "context": np.repeat(np.arange(N_CONTEXTS), N_POSITIONS),
        "position": np.tile(MIN_POS + np.arange(N_POSITIONS), N_CONTEXTS),
        "token_id": rng.integers(0, 40, n), "token_text": [f" t{i % 37}$" for i in range(n)],
        "doc_id": [f"sotu/{c // 2}" for c in np.repeat(np.arange(N_CONTEXTS), N_POSITIONS)],  # 2 contexts a doc
        "loss": rng.gamma(2.0, 1.0, n),
    }).with_columns(  # the store has no loss at a context's last position (no next token)
        pl.when(pl.col("position") == MIN_POS + N_POSITIONS - 1).then(None).otherwise(pl.col("loss")).alias("loss"))
    saes = _sae_rows(widths, seeds)
    fit = split_mask(n, n * 5 // 8, seed=0)  # 500 of 800 rows
    d = 10 + rng.standard_normal(n)  # per-token difficulty shared by all SAEs
    shards = []
    for sae in saes:
        cols = (norms or default_norms)(sae["width"], sae["k"], rng, d)
        cols.setdefault("x_norm", 5 + 2 * d)
        sq = cols["error_norm"] ** 2 if error_sq is None else error_sq(cols)
        shard = pl.DataFrame({"sae_id": sae["sae_id"], "row": np.arange(n), "fit": fit, "x_hat_norm": 1.0,
                              "error_norm_sq": sq, "l0": np.full(n, sae["k"], dtype=np.int16), "cosine": 0.9, **cols})
        path = root / f"{sae['sae_id']}.parquet"
        shard.select([c.name for c in TABLES["token_errors"]]).write_parquet(path)
        shards.append(path)
    paths = ExperimentPaths.at(root)
    build_database(paths.database, tokens, pl.DataFrame(saes), shards,
                   token_ce=_token_ce(saes, rng) if with_ce else None)
    families = [{"name": "width", "architecture": "topk", "widths": list(widths), "ks": [K_OF_WIDTHS],
                 "seeds": list(range(seeds))},
                {"name": "k", "architecture": "topk", "widths": [WIDTH_OF_KS], "ks": list(KS)}]
    return AnalysisContext(paths, {"seed": 0, "analysis": {"bootstrap": 40, "confidence": 0.9},
                                   "families": families, "harvest": {"hooks": [HOOK], "min_pos": MIN_POS},
                                   "decomposition": {"fit_tokens": n * 5 // 8, "seed": 0}})


# The regressions here have 1–4 columns: on a loaded 2-core machine torch's intra-op thread pool only adds waiting
# (measured 60× slower per tiny moment update with 2 threads than with 1).
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(name: str, ctx: AnalysisContext, out: Path) -> dict:
    return load_outputs(run(importlib.import_module(f"analyses.{name}"), ctx, out / name))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> AnalysisContext:
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.mark.parametrize("name", MODULES)
def test_contract_runs_and_writes_finite_headlines(name, store, tmp_path):
    out = _run(name, store, tmp_path)
    numbers = {k: v for k, v in out["summary"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert len(numbers) >= 4, out["summary"]
    assert all(math.isfinite(v) for v in numbers.values()), {k: v for k, v in numbers.items() if not math.isfinite(v)}
    assert out["table"].height > 0 and out["figures"], out
    meta = out["meta"]
    assert meta["question"].endswith("?") and len(meta["method"]) > 100 and meta["paper_claim"]
    assert len(meta["headline"]) == 4 and set(meta["headline"]) <= set(out["summary"])  # the report's top table
    assert all(p.stat().st_size > 5_000 for p in out["figures"].values())  # real figures, not blank canvases


def test_scaling_recovers_planted_law(store, tmp_path):
    s = _run("scaling_decomposition", store, tmp_path)["summary"]
    assert s["n_widths"] == len(WIDTHS) and s["k"] == K_OF_WIDTHS
    assert s["c_fvu"] == pytest.approx(C, abs=2e-3)
    assert s["m"] == pytest.approx(M, abs=0.03)
    assert s["a_fvu"] == pytest.approx(A, rel=0.1)
    assert s["c_ci_low_fvu"] < C < s["c_ci_high_fvu"] and s["m_ci_low"] < M < s["m_ci_high"]
    assert s["c_ci_high_fvu"] - s["c_ci_low_fvu"] < 0.02  # tight: the planted noise is 1e-4
    assert s["fvu_nonlinear_mean"] == pytest.approx(NL, abs=2e-4)
    assert s["linear_error_fvu"] == pytest.approx(C - NL, abs=2e-3)
    assert s["fvu_nonlinear_flat"].startswith("yes (within ±1%") and s["fvu_nonlinear_below_c"] == "yes"
    assert abs(s["fvu_nonlinear_slope_per_doubling"]) < 2e-4


def test_scaling_degrades_gracefully_with_three_widths(tmp_path):
    ctx = make_store(tmp_path, widths=(256, 1024, 4096), with_ce=False)
    out = _run("scaling_decomposition", ctx, tmp_path)
    s = out["summary"]
    assert s["n_widths"] == 3 and math.isnan(s["c_fvu"]) and math.isnan(s["m"])
    assert "no power-law fit" in s["note"] and "at least 4" in s["note"]
    assert math.isfinite(s["fvu_nonlinear_mean"]) and out["figures"]


def test_contours_interpolate_the_plus_grid(store):
    from analyses import width_k_contours as mod

    table = mod.compute(store)
    assert table.height == len(set(_ids())) == 9
    s = mod.summarize(table)
    # planted FVU ∝ (k/16)^−0.25 along the k arm: FVU_nonlinear is flat, so its slope per doubling of L0 is ~0
    assert abs(s["fvu_nonlinear_per_doubling_l0"]) < 1e-3
    assert s["r2_norm_sq_min"] == pytest.approx(0.95 - 0.01 * 8, abs=1e-9)
    tri = mod._triangulation(table["log2_width"].to_numpy(), table["log2_l0"].to_numpy())
    assert tri is not None and 0 < (~tri.mask).sum() <= 2 * 9  # a '+' grid has few non-degenerate triangles
    assert mod._triangulation(np.arange(5.0), np.zeros(5)) is None  # a width sweep alone is a line


def _ids() -> list[str]:
    return [r["sae_id"] for r in _sae_rows()]


def test_per_token_r2_is_one_for_proportional_norms_and_gain_is_planted(tmp_path):
    """Narrowest SAE: ‖e‖ = d; every wider one: ‖e‖ ∝ d + u with u the narrowest SAE's ‖NonlinearError‖.

    So R²(wider from wider) = 1, R²(wider from narrowest) = var d / (var d + var u) ≈ 1/2, and adding u closes all
    of the rest: gain = 100%.
    """
    u_store: dict[str, np.ndarray] = {}

    def norms(width, k, rng, d):
        u = u_store.setdefault("u", rng.standard_normal(d.size))
        err = d.copy() if width == WIDTHS[0] else (4096 / width) * (d + u)
        return {"error_norm": err, "linear_error_norm": 0.5 * err, "nonlinear_error_norm": u}

    ctx = make_store(tmp_path, norms=norms, with_ce=False)
    out = _run("per_token_scaling", ctx, tmp_path)
    pairs = out["table"].filter(pl.col("section") == "pair")
    assert pairs.height == len(WIDTHS) * (len(WIDTHS) + 1) // 2
    wide = pairs.filter(pl.col("width_i") > WIDTHS[0])
    np.testing.assert_allclose(wide["r2"], 1.0, atol=1e-9)
    narrow = pairs.filter((pl.col("width_i") == WIDTHS[0]) & (pl.col("width_j") > WIDTHS[0]))
    assert narrow["r2"].min() > 0.3 and narrow["r2"].max() < 0.7
    np.testing.assert_allclose(narrow["nonlinear_gain_pct_of_unexplained"], 100.0, atol=1e-6)
    assert pairs.filter(pl.col("width_i") == pl.col("width_j"))["nonlinear_gain_pct_of_unexplained"].is_nan().all()
    trace = out["table"].filter(pl.col("section") == "trace")
    assert trace.height == len(WIDTHS) * N_POSITIONS and trace["position"].min() == MIN_POS  # < 100 positions
    assert out["summary"]["r2_smallest_to_largest"] == pytest.approx(narrow["r2"][-1], abs=1e-12)


def test_norm_baselines_find_planted_norm_dependence(tmp_path):
    ctx = make_store(tmp_path, with_ce=False, error_sq=lambda cols: 2.0 * cols["x_norm"] + 1.0)
    out = _run("norm_baselines", ctx, tmp_path)
    table = out["table"]
    np.testing.assert_allclose(table["r2_x_norm"], 1.0, atol=1e-9)
    np.testing.assert_allclose(table["r2_all_four"], 1.0, atol=1e-9)
    # CE loss is independent of the error; a TopK SAE's L0 is constant: both explain nothing on held-out rows
    assert table["r2_ce_loss"].abs().max() < 0.05 and table["r2_l0"].abs().max() < 0.05
    assert table["l0_constant"].all()
    # Token ids are random here, but the per-id means are fitted on 500 rows only: their R² is small and noisy
    assert table["r2_token_identity"].max() < 0.5
    assert out["summary"]["x_beats_each_scalar_fraction"] == 0.0  # the planted store's r2_x is ~0.9 < 1


def test_token_identity_baseline_uses_fit_rows_only():
    from analyses.norm_baselines import baseline_features

    frame = pl.DataFrame({"fit": [True, True, False, False], "error_norm_sq": [1.0, 3.0, 100.0, 7.0],
                          "token_id": [5, 5, 5, 9], "loss": [1.0, None, 2.0, 4.0], "l0": [1, 1, 1, 1],
                          "x_norm": [1.0, 2.0, 3.0, 4.0]})
    f = baseline_features(frame)
    np.testing.assert_allclose(f["r2_token_identity"], [2.0, 2.0, 2.0, 2.0])  # id 9 unseen: the fit mean (2)
    np.testing.assert_allclose(f["r2_ce_loss"], [1.0, 1.0, 2.0, 4.0])  # NULL loss: the fit-row mean (1)


def test_ce_contributions_match_hand_computed_values(store, tmp_path):
    out = _run("ce_contributions", store, tmp_path)
    table = out["table"]
    assert table.height == 9 and table["n_contexts"][0] == N_CONTEXTS
    np.testing.assert_allclose(table["percent_recovered_linear"], 100 * GAP_LINEAR, atol=1e-3)
    np.testing.assert_allclose(table["percent_recovered_nonlinear"], 100 * GAP_NONLINEAR, atol=1e-3)
    gaps = np.array([gap_of(w, k) for w, k in zip(table["width"], table["k"], strict=True)])
    np.testing.assert_allclose(table["ce_loss_score"], (5 - gaps) / 5, atol=1e-5)  # (L_zero − L_sae)/(L_zero − L_clean)
    np.testing.assert_allclose(table["kl_sae"], gaps / 2, rtol=1e-5)
    # offsets cancel in every difference: % recovered is the same in every resample, the CE itself is not
    np.testing.assert_allclose(table["percent_recovered_linear_ci_low"], 100 * GAP_LINEAR, atol=1e-3)
    np.testing.assert_allclose(table["percent_recovered_linear_ci_high"], 100 * GAP_LINEAR, atol=1e-3)
    assert (table["ce_sae_ci_low"] < table["ce_sae"]).all() and (table["ce_sae"] < table["ce_sae_ci_high"]).all()
    assert (table["ce_sae_ci_high"] - table["ce_sae_ci_low"]).min() > 0.05
    # ... while the paired increase over clean is exact in every resample
    np.testing.assert_allclose(table["ce_increase_sae_ci_low"], gaps, atol=1e-4)
    np.testing.assert_allclose(table["ce_increase_sae_ci_high"], gaps, atol=1e-4)
    row = table.filter(pl.col("sae_id") == "topk-w4096-k16-s0").row(0, named=True)
    saes = {r["sae_id"]: r for r in _sae_rows()}
    fvu, nl = saes["topk-w4096-k16-s0"]["fvu"], saes["topk-w4096-k16-s0"]["fvu_nonlinear"]
    assert row["variance_share_nonlinear_pct_all_tokens"] == pytest.approx(100 * nl / fvu, rel=1e-9)
    # the share compared with the CE: on the spliced contexts' tokens, Σ‖NonlinearError‖² / Σ‖SaeError‖²
    with store.connect() as con:
        e = con.sql("""SELECT e.error_norm_sq, e.nonlinear_error_norm FROM token_errors e JOIN tokens t USING (row)
                       WHERE e.sae_id = 'topk-w4096-k16-s0'
                         AND t.context IN (SELECT DISTINCT context FROM token_ce)""").pl()
    share = 100 * (e["nonlinear_error_norm"].cast(pl.Float64) ** 2).sum() / e["error_norm_sq"].cast(pl.Float64).sum()
    assert row["variance_share_nonlinear_pct"] == pytest.approx(share, rel=1e-9)
    assert row["variance_share_linear_pct"] == pytest.approx(100 - share, rel=1e-9)
    assert row["variance_share_nonlinear_pct_ci_low"] < share < row["variance_share_nonlinear_pct_ci_high"]
    assert row["in_width_family"] and not row["in_k_family"]
    s = out["summary"]
    assert s["percent_recovered_nonlinear_mean_pct"] == pytest.approx(100 * GAP_NONLINEAR, abs=1e-3)


def test_ce_contributions_seeded_bootstrap_is_reproducible(store, tmp_path):
    from analyses.ce_contributions import bootstrap_ce
    from darkmatter.analysis.stats import cluster_multiplicities

    with store.connect() as con:
        per_token = con.sql("SELECT * FROM token_ce").pl()
    def weights(seed):  # two consecutive contexts per document
        return lambda contexts: cluster_multiplicities(contexts // 2, 30, seed)

    a, b = (bootstrap_ce(per_token, 0.9, weights(1)).sort("sae_id") for _ in range(2))
    assert a.equals(b)
    c = bootstrap_ce(per_token, 0.9, weights(2)).sort("sae_id")
    assert not a["ce_clean_ci_low"].equals(c["ce_clean_ci_low"])


def test_ce_contributions_without_spliced_ce(tmp_path):
    ctx = make_store(tmp_path, with_ce=False)
    out = _run("ce_contributions", ctx, tmp_path)
    assert out["summary"]["n_saes"] == 0 and "no spliced CE" in out["summary"]["note"]


def test_on_a_store_built_by_the_pipeline_steps(tmp_path):
    """On the shared fixture made by the real encode/measure/build steps (tests/helpers.py), whose TopK SAEs are
    nested (width w decodes the w most frequent planted features): each SAE's per-token error is best predicted by
    its neighbour's, and the other modules read the real store's types without trouble."""
    from tests.helpers import make_experiment

    exp = make_experiment(tmp_path / "exp", n_contexts=12, n_positions=60)
    s = exp.run("per_token_scaling", tmp_path / "per_token_scaling")["summary"]
    assert s["adjacent_is_best_predictor_fraction"] == 1.0
    assert s["r2_adjacent_mean"] > s["r2_nonadjacent_mean"] + 0.1
    assert exp.run("scaling_decomposition", tmp_path / "scaling")["summary"]["n_widths"] == 4
    contours = exp.run("width_k_contours", tmp_path / "contours")
    assert contours["table"].height == len(exp.sae_ids) and contours["summary"]["r2_norm_sq_max"] <= 1
    baselines = exp.run("norm_baselines", tmp_path / "baselines")["table"]
    assert baselines.height == len(exp.sae_ids) and baselines["r2_x"].is_finite().all()


def test_no_width_family_degrades_without_crashing(store, tmp_path):
    """A config whose sweep families match no stored SAE: the family analyses say so, the others still run."""
    fams = [{"name": "nomatch", "architecture": "topk", "widths": [1, 2], "ks": [1]}]
    ctx = AnalysisContext(store.paths, store.params | {"families": fams})
    assert _run("scaling_decomposition", ctx, tmp_path)["summary"]["n_widths"] == 0
    assert _run("per_token_scaling", ctx, tmp_path)["summary"]["n_widths"] == 0
    ce = _run("ce_contributions", ctx, tmp_path)
    assert ce["summary"]["n_saes"] == 9 and not ce["table"]["in_width_family"].any()


def test_intervals_need_two_documents(store, tmp_path, monkeypatch):
    """All spliced contexts from one document: no between-document variation to resample, so the CE intervals are
    absent rather than of zero width (the point estimates stay)."""
    monkeypatch.setattr(AnalysisContext, "documents_of", lambda self, contexts: np.full(len(contexts), "one doc"))
    assert store.resample_weights(np.arange(N_CONTEXTS)).shape == (0, N_CONTEXTS)
    out = _run("ce_contributions", store, tmp_path)
    assert "ce_sae_ci_low" not in out["table"].columns and out["table"]["ce_sae"].is_finite().all()
    assert out["summary"]["n_documents"] == 1 and out["summary"]["resampling_unit"] == "document"


@pytest.mark.parametrize(("t90", "doc90", "outer", "verdict"), [
    ((-4e-4, 3e-4), (-2e-4, 1e-4), (-5e-4, 4e-4), "yes"),  # both 90% intervals inside ±5e-4
    ((-4e-4, 3e-4), (-7e-4, 1e-4), (-5e-4, 4e-4), "undetermined"),  # the document interval reaches past the margin
    ((-9e-4, -6e-4), (-8e-4, -7e-4), (-9.5e-4, -5.5e-4), "no (falls"),  # wholly below -margin
    ((6e-4, 9e-4), (7e-4, 8e-4), (5.5e-4, 9.5e-4), "no (rises"),
])
def test_flatness_is_an_equivalence_test(t90, doc90, outer, verdict):
    """Margin 1% of a mean FVU_nonlinear of 0.05: ±5e-4 per doubling. The interval containing 0 is not the test."""
    from analyses.scaling_decomposition import _flatness

    first = {"flat_margin_pct": 1.0, "fvu_nonlinear_slope_t_90_low": t90[0], "fvu_nonlinear_slope_t_90_high": t90[1],
             "fvu_nonlinear_slope_doc_90_low": doc90[0], "fvu_nonlinear_slope_doc_90_high": doc90[1],
             "fvu_nonlinear_slope_ci_low": outer[0], "fvu_nonlinear_slope_ci_high": outer[1],
             "fvu_nonlinear_slope_doc_ci_low": outer[0], "fvu_nonlinear_slope_doc_ci_high": outer[1]}
    out = _flatness(first, 0.05)
    assert out["fvu_nonlinear_flat"].startswith(verdict), out
    assert out["flat_margin_fvu_per_doubling"] == pytest.approx(5e-4)


def test_store_analyses_take_two_seeds_per_width(store, tmp_path):
    """A width family with two seeds per width: every store analysis runs, the scaling law is fitted on all
    points, and the seed spread of FVU_nonlinear is the planted one (two values SEED_SHIFT apart: SD SEED_SHIFT/√2)."""
    ctx = make_store(tmp_path, seeds=2)
    for name in MODULES:
        assert _run(name, ctx, tmp_path)["table"].height > 0, name
    s = _run("scaling_decomposition", ctx, tmp_path)["summary"]
    assert s["n_widths"] == len(WIDTHS) and s["seeds_per_width"] == 2
    assert s["fvu_nonlinear_seed_sd"] == pytest.approx(SEED_SHIFT / math.sqrt(2), rel=0.15)  # ± the 2e-4 wiggle
    assert s["fvu_nonlinear_mean"] == pytest.approx(NL + SEED_SHIFT / 2, abs=2e-4)
    assert s["c_fvu"] == pytest.approx(C, abs=2e-3) and s["m"] == pytest.approx(M, abs=0.03)
    # the seed spread is noise the slope's t interval over the points now carries: still flat, wider interval
    one = _run("scaling_decomposition", store, tmp_path / "one")["summary"]
    width = s["fvu_nonlinear_slope_ci_high"] - s["fvu_nonlinear_slope_ci_low"]
    assert width > one["fvu_nonlinear_slope_ci_high"] - one["fvu_nonlinear_slope_ci_low"]
    assert "seeds_per_width" not in one and "fvu_nonlinear_seed_sd" not in one
    # the contour maps draw one point per (width, k), the mean of its seeds, where the seeds' points coincide
    from matplotlib.collections import PathCollection

    from analyses import width_k_contours as contours

    table = contours.compute(ctx)
    ax = contours._metric_figure(table, "fvu_nonlinear", "FVU_nonlinear").axes[0]
    (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    grid = table.group_by("width", "k").agg(pl.col("fvu_nonlinear").mean())
    assert len(dots.get_offsets()) == grid.height < table.height and "mean over seeds" in ax.get_title()
    assert sorted(dots.get_array()) == pytest.approx(sorted(grid["fvu_nonlinear"]), abs=1e-12)

"""The pursuit analysis, the encoder-error band and the store's pursuit tables, on an experiment made by the real
encode / measure / pursue / measure-pursuit / build steps (tests/helpers.py)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from darkmatter.store import connect
from tests.helpers import make_experiment


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return make_experiment(tmp_path_factory.mktemp("pursued"), n_contexts=12, n_positions=60, pursuit_contexts=7)


def _pursuit_saes(exp) -> pl.DataFrame:
    with connect(exp.db) as con:
        return con.sql("SELECT * FROM pursuit_saes").pl()


def test_store_holds_both_methods_on_the_same_tokens(exp):
    with connect(exp.db) as con:
        per = con.sql("""SELECT method, sae_id, count(*) AS n, count(DISTINCT t.context) AS contexts
                         FROM pursuit_errors p JOIN tokens t USING (row) GROUP BY ALL""").pl()
        saes = con.sql("SELECT sae_id, pursuit_fvu, pursuit_fvu_nonlinear FROM saes").pl()
        same_rows = con.sql("""SELECT count(*) FROM pursuit_errors e JOIN pursuit_errors p USING (sae_id, row)
                               WHERE e.method = 'encoder' AND p.method = 'pursuit' AND e.fit = p.fit""").fetchall()
    assert per.height == 2 * len(exp.sae_ids)
    assert set(per["n"]) == {7 * 60} and set(per["contexts"]) == {7}
    assert same_rows[0][0] == len(exp.sae_ids) * 7 * 60  # the same rows and the same split for both methods
    pursued = _pursuit_saes(exp).filter(pl.col("method") == "pursuit")
    joined = saes.join(pursued, on="sae_id")
    assert joined.height == len(exp.sae_ids)
    assert (joined["pursuit_fvu"] == joined["fvu"]).all()
    assert (joined["pursuit_fvu_nonlinear"] == joined["fvu_nonlinear"]).all()


def test_analysis_deltas_agree_with_the_stored_fvus(exp, tmp_path):
    out = exp.run("pursuit", tmp_path / "pursuit")
    table, summary = out["table"], out["summary"]
    stored = _pursuit_saes(exp)
    assert table.height == len(exp.sae_ids)
    for row in table.iter_rows(named=True):
        for measure in ("fvu", "fvu_nonlinear"):
            for method in ("encoder", "pursuit"):
                want = stored.filter((pl.col("sae_id") == row["sae_id"]) & (pl.col("method") == method))[measure][0]
                # recomputed from float32 per-token norms grouped by context; the store's from float64 moments
                assert row[f"{measure}_{method}"] == pytest.approx(want, rel=2e-6)
            delta = row[f"{measure}_pursuit"] - row[f"{measure}_encoder"]
            assert row[f"delta_{measure}"] == pytest.approx(delta, rel=1e-12)
            assert row[f"delta_{measure}_pct"] == pytest.approx(100 * delta / row[f"{measure}_encoder"], rel=1e-12)
            assert row[f"delta_{measure}_ci_low"] <= row[f"delta_{measure}_ci_high"]
    widest = table.filter(pl.col("in_width_family")).sort("width")[-1]
    assert summary["widest_sae_id"] == widest["sae_id"][0]
    assert summary["delta_fvu_pct_widest"] == pytest.approx(widest["delta_fvu_pct"][0])
    assert "ce_pursuit_nats" not in summary  # no CE was spliced in this experiment
    numbers = [v for v in summary.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert set(out["figures"]) == {"delta_fvu"}


def test_encoder_error_band_is_the_width_family_mean_removal(exp, tmp_path):
    s = exp.run("scaling_decomposition", tmp_path / "scaling")["summary"]
    stored = _pursuit_saes(exp).pivot(on="method", index="sae_id", values="fvu_nonlinear")
    width_ids = [i for i in exp.sae_ids if i.endswith("-k4-s0")]  # the width family (k = 4)
    want = np.mean([(stored.filter(pl.col("sae_id") == i)["encoder"] - stored.filter(pl.col("sae_id") == i)["pursuit"])[0]
                    for i in width_ids])
    assert s["encoder_error_fvu"] == pytest.approx(want, rel=1e-12)


def test_without_a_pursuit_stage_the_analysis_says_so(tmp_path):
    plain = make_experiment(tmp_path / "plain", n_contexts=6, n_positions=40, widths=(16, 32), ks=(2, 4))
    out = plain.run("pursuit", tmp_path / "pursuit")
    assert out["summary"]["n_saes"] == 0 and "run the pursuit stage" in out["summary"]["note"]
    assert "encoder_error_fvu" not in plain.run("scaling_decomposition", tmp_path / "scaling")["summary"]


def test_a_half_measured_pursuit_is_refused_by_the_store(tmp_path):
    from darkmatter.config import SaeFamilyConfig
    from darkmatter.errors.measure import METRICS
    from darkmatter.store.build import StoreError, build_experiment_database
    from tests.helpers import HOOK, _ByteTokenizer

    small = make_experiment(tmp_path / "small", n_contexts=6, n_positions=40, widths=(16, 32), ks=(2, 4),
                            pursuit_contexts=3)
    (small.paths.pursuit_errors(HOOK) / "pursuit" / small.sae_ids[0] / METRICS).unlink()
    families = [SaeFamilyConfig(**f) for f in small.params["families"]]
    with pytest.raises(StoreError, match=f"{METRICS} is missing; rerun measure_pursuit"):
        build_experiment_database(small.paths, families, HOOK, out=tmp_path / "x.duckdb", tokenizer=_ByteTokenizer())
    assert not (tmp_path / "x.duckdb").exists()


def test_every_analysis_resamples_the_same_documents(exp, tmp_path):
    """An SAE's R² interval is the same in error_predictability and in width_k_contours (both resample its stored
    test sums with the same documents), and every summary names documents as its unit."""
    pred = exp.run("error_predictability", tmp_path / "pred")
    contours = exp.run("width_k_contours", tmp_path / "contours")
    default = pred["table"].filter(pl.col("default"))
    joined = default.join(contours["table"], on="sae_id", suffix="_c")
    assert joined.height == len(exp.sae_ids)
    for col in ("r2_norm_sq_low", "r2_norm_sq_high", "r2_vector_mean_dims_low", "r2_vector_mean_dims_high"):
        np.testing.assert_allclose(joined[col], joined[f"{col}_c"], rtol=1e-12)
    for out, documents in ((pred, 12), (contours, 12), (exp.run("pursuit", tmp_path / "p"), 7),  # 7 pursued
                           (exp.run("norm_baselines", tmp_path / "nb"), 12),
                           (exp.run("per_token_scaling", tmp_path / "pts"), 12)):
        assert out["summary"]["resampling_unit"] == "document" and out["summary"]["n_documents"] == documents

"""The DuckDB store: schema, documentation, row counts, read-only concurrent access, atomic build."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from darkmatter.store.build import StoreError, build_database, connect
from darkmatter.store.schema import TABLES, markdown


def _frames(tmp_path, n_rows=50, sae_ids=("topk-w64-k4-s0", "topk-w128-k4-s0")):
    rng = np.random.default_rng(0)
    tokens = pl.DataFrame({
        "row": np.arange(n_rows), "context": np.arange(n_rows) // 10, "position": 200 + np.arange(n_rows) % 10,
        "token_id": rng.integers(0, 100, n_rows), "token_text": [f"t{i}" for i in range(n_rows)],
        "doc_id": ["sotu/x"] * n_rows, "loss": rng.random(n_rows).astype(np.float32),
    })
    saes = pl.DataFrame([{c.name: None for c in TABLES["saes"]} | {"sae_id": s, "width": 64 * (i + 1), "k": 4}
                         for i, s in enumerate(sae_ids)])
    shards = []
    for s in sae_ids:
        err = rng.random(n_rows)
        shard = pl.DataFrame({
            "sae_id": [s] * n_rows, "row": np.arange(n_rows), "fit": np.arange(n_rows) < 30,
            "x_norm": rng.random(n_rows) + 1, "x_hat_norm": rng.random(n_rows), "error_norm": err,
            "error_norm_sq": err**2, "l0": np.full(n_rows, 4, dtype=np.int16), "cosine": rng.random(n_rows),
            "linear_error_norm": err * 0.6, "nonlinear_error_norm": err * 0.8,
        })
        path = tmp_path / f"{s}.parquet"
        shard.write_parquet(path)
        shards.append(path)
    return tokens, saes, shards


def test_build_counts_docs_and_views(tmp_path):
    tokens, saes, shards = _frames(tmp_path)
    db = build_database(tmp_path / "dm.duckdb", tokens, saes, shards)
    with connect(db) as con:
        assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] == 50
        assert con.execute("SELECT count(*) FROM token_errors").fetchone()[0] == 50 * 2  # tokens x SAEs
        docs = con.execute("SELECT comment FROM duckdb_columns() WHERE table_name='token_errors' "
                           "AND column_name='nonlinear_error_norm'").fetchone()[0]
        assert "NonlinearError" in docs
        # The README's question: the tokens with the largest nonlinear error for the widest SAE, in context.
        top = con.execute("""
            SELECT token_text, context, position, nonlinear_error_norm FROM token_errors_in_context
            WHERE width = (SELECT max(width) FROM saes) ORDER BY nonlinear_error_norm DESC LIMIT 3""").fetchall()
        assert len(top) == 3 and top[0][3] >= top[1][3] >= top[2][3]
        share = con.execute("SELECT linear_share_of_sq_norm, nonlinear_share_of_sq_norm FROM sae_error_shares "
                            "ORDER BY sae_id").fetchall()
        np.testing.assert_allclose(share[0], (0.36, 0.64), rtol=1e-6)  # (0.6^2, 0.8^2) by construction
    assert "| `error_norm_sq` |" in markdown()


def test_read_only_and_concurrent_readers(tmp_path):
    tokens, saes, shards = _frames(tmp_path)
    db = build_database(tmp_path / "dm.duckdb", tokens, saes, shards)
    code = ("import sys; from darkmatter.store.build import connect; c = connect(sys.argv[1]); "
            "print(c.execute('SELECT count(*) FROM token_errors').fetchone()[0])")
    with connect(db) as con:  # a reader holds the file while two other processes read it
        procs = [subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True)
                 for _ in range(2)]
        assert [p.stdout.strip() for p in procs] == ["100", "100"], [p.stderr for p in procs]
        with pytest.raises(Exception, match="read-only"):
            con.execute("DELETE FROM tokens")


def test_bad_input_leaves_nothing(tmp_path):
    tokens, saes, shards = _frames(tmp_path)
    with pytest.raises(StoreError, match="table 'tokens' lacks columns \\['token_text'\\]"):
        build_database(tmp_path / "dm.duckdb", tokens.drop("token_text"), saes, shards)
    with pytest.raises(Exception, match="No files found|does not exist"):
        build_database(tmp_path / "dm.duckdb", tokens, saes, [tmp_path / "missing.parquet"])
    assert not list(tmp_path.glob("*dm.duckdb*"))
    with pytest.raises(FileNotFoundError, match="run the build_database step first"):
        connect(tmp_path / "dm.duckdb")

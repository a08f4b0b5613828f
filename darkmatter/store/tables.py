"""Assemble the store's tables from an experiment's result files (for ``build_database``).

Each function reads one kind of artifact and returns a polars frame with the columns of
:mod:`darkmatter.store.schema`; :func:`darkmatter.store.build_database` writes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from darkmatter.data.activations import ActivationStore
from darkmatter.io import read_parquet
from darkmatter.sae.families import SaeMember
from darkmatter.store.schema import ERROR_SAES, PURSUIT_SAES, SAES

METHODS = ("encoder", "pursuit")  # the pursuit comparison's two codes of the same tokens


def tokens_table(store: ActivationStore, contexts_parquet: Path, tokenizer) -> pl.DataFrame:
    """One row per eval row: position, token id and text, source document, clean loss (NaN → NULL)."""
    index = store.index()
    ids = np.unique(index["token_id"].to_numpy())
    text = pl.DataFrame({"token_id": ids.astype(np.int32),
                         "token_text": [tokenizer.decode([int(i)]) for i in ids]})
    docs = read_parquet(contexts_parquet).select("context", "doc_id")
    return (index.join(text, on="token_id", how="left").join(docs, on="context", how="left")
            .with_columns(pl.col("loss").fill_nan(None)).sort("row"))


def pursuit_table(metrics: Mapping[str, Sequence[Path]]) -> pl.DataFrame:
    """One row per SAE and method (:data:`METHODS`) from the metrics.json of darkmatter.errors.pursuit's folders
    (``metrics``: method → files); columns of :data:`darkmatter.store.schema.PURSUIT_SAES`."""
    rows = []
    for method, paths in metrics.items():
        for path in paths:
            m = json.loads(Path(path).read_text())
            rows.append({"sae_id": m["sae_id"], "method": method, "tokens": m["n_tokens"],
                         **{c: m.get(c) for c in ("fvu", "fvu_linear", "fvu_nonlinear", "r2_vector_mean_dims",
                                                  "r2_norm_sq", "l0_mean")},
                         "seconds": m.get("pursuit_seconds")})
    return pl.DataFrame(rows, schema=_schema(PURSUIT_SAES))


def error_saes_table(metrics: Sequence[Path]) -> pl.DataFrame:
    """One row per error SAE from the metrics.json of darkmatter.errors.error_saes' folders (one per hook);
    columns of :data:`darkmatter.store.schema.ERROR_SAES`."""
    rows = [{"component": r["component"], "sae_id": r["sae_id"], "hook": r["base_hook"],
             "base_sae_id": r["base_sae_id"], "width": r["d_sae"],
             **{c: r[c] for c in ("k", "fvu", "l0_mean", "dead_count", "dead_fraction", "training_tokens",
                                  "train_final_batch_fvu")}}
            for path in metrics for r in json.loads(Path(path).read_text())["components"].values()]
    return pl.DataFrame(rows, schema=_schema(ERROR_SAES))


def _schema(columns) -> dict[str, pl.DataType]:
    return {c.name: {"VARCHAR": pl.Utf8, "BIGINT": pl.Int64, "INTEGER": pl.Int32}.get(c.sql_type, pl.Float64)
            for c in columns}


def saes_table(members: Sequence[SaeMember], metrics: Sequence[Path],
               ce_summary: pl.DataFrame | None = None, pursuit: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per SAE: identity (from the config), its metrics.json (eval metrics and decomposition results,
    darkmatter.errors.measure), CE score and KL, and its pursuit's FVUs (:func:`pursuit_table`) where run."""
    identity = ("sae_id", "hook", "families", "architecture", "width", "k", "seed")
    rows = []
    for member, metrics_path in zip(members, metrics, strict=True):
        m = json.loads(Path(metrics_path).read_text())
        rows.append({
            "sae_id": member.sae_id, "hook": member.hook, "families": ",".join(member.families),
            "architecture": member.spec.architecture, "width": member.spec.d_sae,
            "k": member.spec.k, "seed": member.spec.seed,
            **{c.name: m[c.name] for c in SAES if c.name in m and c.name not in identity},
        })
    table = pl.DataFrame(rows)
    if ce_summary is not None and ce_summary.height:
        table = table.join(ce_summary.select("sae_id", "ce_loss_score", "kl_sae"), on="sae_id", how="left")
    if pursuit is not None and pursuit.height:
        table = table.join(pursuit.filter(pl.col("method") == "pursuit").select(
            "sae_id", pl.col("fvu").alias("pursuit_fvu"), pl.col("fvu_nonlinear").alias("pursuit_fvu_nonlinear")),
            on="sae_id", how="left")
    for col in SAES:
        if col.name not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=pl.Float64).alias(col.name))
    return table.select([c.name for c in SAES])

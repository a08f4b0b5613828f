"""The queryable per-token store: one DuckDB file per experiment, built once, then opened read-only.

:func:`build_database` is the only writer (the ``build_database`` rule); it writes to a temporary file and
renames it into place. Everything downstream calls :func:`connect`, which opens the file read-only so that
analyses can run in parallel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import duckdb
import polars as pl

from darkmatter.config import SaeFamilyConfig
from darkmatter.io import atomic_file
from darkmatter.paths import ExperimentPaths
from darkmatter.store.schema import TABLES, VIEWS, create_table_sql


class StoreError(ValueError):
    """A table handed to the store does not match the schema, or the store file is unreadable."""


def _check_columns(name: str, frame: pl.DataFrame) -> pl.DataFrame:
    want = [c.name for c in TABLES[name]]
    missing = [c for c in want if c not in frame.columns]
    if missing:
        raise StoreError(f"table '{name}' lacks columns {missing}; expected {want}.")
    return frame.select(want)


def _literal(text: str) -> str:
    """A SQL string literal (COMMENT ON takes no bound parameters)."""
    return "'" + text.replace("'", "''") + "'"


def build_database(path: str | Path, tokens: pl.DataFrame, saes: pl.DataFrame,
                   token_error_shards: Sequence[str | Path], token_ce: pl.DataFrame | None = None,
                   pursuit_saes: pl.DataFrame | None = None,
                   pursuit_error_shards: Mapping[str, Sequence[str | Path]] | None = None,
                   error_saes: pl.DataFrame | None = None) -> Path:
    """Create the DuckDB file at ``path`` from the token and SAE tables, per-SAE Parquet shards and CE rows;
    ``pursuit_saes`` and ``pursuit_error_shards`` (method → per-SAE shards): the gradient-pursuit comparison;
    ``error_saes``: the SAEs trained on error components."""
    path = Path(path)
    frames = {"tokens": _check_columns("tokens", tokens), "saes": _check_columns("saes", saes)}
    if token_ce is not None:
        frames["token_ce"] = _check_columns("token_ce", token_ce)
    if pursuit_saes is not None:
        frames["pursuit_saes"] = _check_columns("pursuit_saes", pursuit_saes)
    if error_saes is not None:
        frames["error_saes"] = _check_columns("error_saes", error_saes)
    cols = ", ".join(c.name for c in TABLES["token_errors"])
    with atomic_file(path) as tmp, duckdb.connect(str(tmp)) as con:
        for name in TABLES:
            con.execute(create_table_sql(name))
            for c in TABLES[name]:
                con.execute(f"COMMENT ON COLUMN {name}.{c.name} IS {_literal(c.doc)}")
        for name, frame in frames.items():
            con.register(f"{name}_frame", frame.to_arrow())
            con.execute(f"INSERT INTO {name} SELECT * FROM {name}_frame")
        try:  # a truncated or foreign shard is named below (DuckDB's error does not always name it)
            if token_error_shards:
                files = [str(p) for p in token_error_shards]
                con.execute(f"INSERT INTO token_errors SELECT {cols} FROM read_parquet(?)", [files])
            for method, shards in (pursuit_error_shards or {}).items():
                if shards:
                    con.execute(f"INSERT INTO pursuit_errors SELECT ? AS method, {cols} FROM read_parquet(?)",
                                [method, [str(p) for p in shards]])
        except duckdb.Error as e:
            shards = [*token_error_shards, *(s for shards in (pursuit_error_shards or {}).values() for s in shards)]
            bad = _first_unreadable(con, shards)
            if bad is None:  # not a damaged file: a bug, keep DuckDB's own error
                raise
            raise StoreError(f"{bad}: not a readable Parquet file ({str(e).splitlines()[0]}); rerun the step that "
                             "wrote it.") from None
        for view, (doc, sql) in VIEWS.items():
            con.execute(f"CREATE VIEW {view} AS {sql}")
            con.execute(f"COMMENT ON VIEW {view} IS {_literal(doc)}")
    return path


def _first_unreadable(con: duckdb.DuckDBPyConnection, files: Sequence[str | Path]) -> str | None:
    """The first of ``files`` that DuckDB cannot read (DuckDB's error does not always name it), or None."""
    for f in files:
        try:
            con.execute("SELECT * FROM read_parquet(?)", [str(f)]).fetchall()  # every page, not just the footer
        except duckdb.Error:
            return str(f)
    return None


def connect(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open the store read-only (many readers at once; the file is never modified after it is built)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the build_database step first.")
    try:
        return duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:  # truncated, corrupted or not a DuckDB file at all
        raise StoreError(f"{path}: not a readable DuckDB store ({str(e).splitlines()[0]}); rebuild it with the "
                         "build_database step.") from None


def build_experiment_database(paths: ExperimentPaths, families: Sequence[SaeFamilyConfig], primary_hook: str,
                              out: Path | None = None, tokenizer=None) -> Path:
    """The ``build_database`` step: gather an experiment's tokens, SAE metrics, per-token errors and spliced CE
    (each where :class:`~darkmatter.paths.ExperimentPaths` puts it) into ``out`` (default: ``paths.database``).
    ``tokenizer`` (anything with ``decode([id])``) names the tokens; default: the experiment's model's."""
    import polars as pl

    from darkmatter.data.activations import ActivationStore
    from darkmatter.data.models import load_tokenizer
    from darkmatter.errors.error_saes import METRICS as ERROR_SAE_METRICS
    from darkmatter.errors.measure import METRICS, TOKEN_ERRORS
    from darkmatter.io import read_json
    from darkmatter.sae.families import expand_families
    from darkmatter.store.tables import METHODS, error_saes_table, pursuit_table, saes_table, tokens_table

    members = expand_families(families, primary_hook)
    tokenizer = tokenizer or load_tokenizer(read_json(paths.model_json)["path"])
    tokens = tokens_table(ActivationStore(paths.activations("eval")), paths.contexts("eval"), tokenizer)
    ce_summary, token_ce = (paths.ce / "summary.parquet", paths.ce / "token_ce.parquet")
    # the pursuit comparison of every hook where it was run (folders: pursuit/errors/<hook>/<method>/<sae_id>/)
    pursued = {method: [paths.pursuit_errors(m.hook) / method / m.sae_id for m in members
                        if paths.pursuit_errors(m.hook).is_dir()] for method in METHODS}
    for folder in (f for folders in pursued.values() for f in folders):
        if not (folder / METRICS).is_file():
            raise StoreError(f"{folder / METRICS} is missing; rerun measure_pursuit for every SAE of the hook.")
    pursuit = pursuit_table({method: [f / METRICS for f in folders] for method, folders in pursued.items()})
    saes = saes_table(members, [paths.sae_errors(m.hook, m.sae_id) / METRICS for m in members],
                      pl.read_parquet(ce_summary) if ce_summary.is_file() else None, pursuit)
    ce_rows = [pl.read_parquet(token_ce)] if token_ce.is_file() else []
    for extra in (paths.pursuit_ce, paths.sources_ce):  # their clean rows repeat measure_ce's
        if (extra / "token_ce.parquet").is_file():
            ce_rows.append(pl.read_parquet(extra / "token_ce.parquet").filter(pl.col("condition") != "clean"))
    hooks = dict.fromkeys(m.hook for m in members)
    error_sae_metrics = [paths.error_saes(h) / ERROR_SAE_METRICS for h in hooks if paths.error_saes(h).is_dir()]
    return build_database(out or paths.database, tokens, saes,
                          [paths.sae_errors(m.hook, m.sae_id) / TOKEN_ERRORS for m in members],
                          pl.concat(ce_rows) if ce_rows else None, pursuit,
                          {method: [f / TOKEN_ERRORS for f in folders] for method, folders in pursued.items()},
                          error_saes_table(error_sae_metrics))

"""The queryable per-token store: one DuckDB file per experiment, built once, then opened read-only.

:mod:`~darkmatter.store.schema` documents every table and column; :mod:`~darkmatter.store.tables` assembles them
from an experiment's result files; :mod:`~darkmatter.store.build` writes the file (the only writer) and opens it.
"""

from darkmatter.store.build import StoreError, build_database, build_experiment_database, connect

__all__ = ["StoreError", "build_database", "build_experiment_database", "connect"]

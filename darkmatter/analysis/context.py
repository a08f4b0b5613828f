"""What an analysis may read: the experiment's result tree and its slice of the configuration.

The workflow passes each analysis its slice (:mod:`darkmatter.config.steps`); a key missing from ``params`` takes
the configuration's default, so an analysis can also be run by hand on any experiment folder.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from darkmatter.config import AnalysisConfig, DecompositionConfig, ExperimentConfig, from_dict, to_dict
from darkmatter.io import load_npy
from darkmatter.paths import ExperimentPaths

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _documents(db: str, mtime_ns: int) -> dict[int, str | None]:
    """context → doc_id of a store, read once per store file and version (every interval of an analysis needs it)."""
    from darkmatter.store import connect

    with connect(db) as con:
        return dict(con.execute("SELECT DISTINCT context, doc_id FROM tokens").fetchall())


@dataclass(frozen=True)
class AnalysisContext:
    """The experiment's ``paths``, the analysis's config slice ``params`` and its ``name`` (for its options).
    ``only_families``: when set, the analysis sees only these families and their SAEs (the training-budget
    analysis asks each question of one budget's family at a time)."""

    paths: ExperimentPaths
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    only_families: tuple[str, ...] = ()

    # ------------------------------------------------------------------------------------------ configuration
    @property
    def analysis(self) -> AnalysisConfig:
        """The analysis section (bootstrap, confidence, each analysis's options) over its defaults."""
        return from_dict(AnalysisConfig, self.params.get("analysis") or {}, "params.analysis", "analysis.")

    @property
    def options(self) -> Any:
        """This analysis's own options (``analysis.<name>``), typed; None for an analysis without options."""
        return getattr(self.analysis, self.name, None)

    @property
    def decomposition(self) -> DecompositionConfig:
        """The regression protocol (fit_tokens, intercept, ridge, seed) of the stored decomposition."""
        return from_dict(DecompositionConfig, self.params.get("decomposition") or {}, "params.decomposition",
                         "decomposition.")

    @property
    def families(self) -> list[dict[str, Any]]:
        """The experiment's family dicts (name, architecture, widths, ks, ...); the defaults when absent; only
        ``only_families`` when set."""
        families = list(self.params.get("families") or to_dict(ExperimentConfig().families))
        return [f for f in families if f["name"] in self.only_families] if self.only_families else families

    @property
    def hook(self) -> str:
        """The primary hook (the first harvested one), which the family analyses study."""
        hooks = (self.params.get("harvest") or {}).get("hooks")
        return hooks[0] if hooks else ExperimentConfig().primary_hook

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", 0))

    # ------------------------------------------------------------------------------------------ results
    @property
    def db(self) -> Path:
        return self.paths.database

    def connect(self):
        """The DuckDB store, read-only."""
        from darkmatter.store import connect

        return connect(self.db)

    def has_table(self, name: str) -> bool:
        """Whether the store has the table ``name`` (a store built before a stage existed lacks its tables)."""
        with self.connect() as con:
            found = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name])
            return bool(found.fetchall()[0][0])

    def eval_store(self):
        from darkmatter.data.activations import ActivationStore

        return ActivationStore(self.paths.activations("eval"))

    def sae(self, hook: str, sae_id: str):
        """An SAE of the experiment (:class:`darkmatter.sae.Sae`)."""
        from darkmatter.sae.formats import load_sae

        return load_sae(self.paths.sae(hook, sae_id))

    def codes(self, hook: str, sae_id: str, sae=None):
        """That SAE's stored codes of the eval tokens (:class:`darkmatter.sae.codes.SparseCodes`, memmapped)."""
        from darkmatter.sae.codes import load_codes

        return load_codes(self.paths.codes(hook, sae_id), sae if sae is not None else self.sae(hook, sae_id))

    def fit_mask(self, hook: str) -> np.ndarray:
        """bool [rows]: the fit rows of the stored decomposition of ``hook``."""
        from darkmatter.errors.measure import SPLIT

        return load_npy(self.paths.errors(hook) / SPLIT)

    def design(self, hook: str, intercept: bool | None = None, ridge: float | None = None):
        """The factorised x design of the stored decomposition (its fit and test moments), no pass over x."""
        from darkmatter.errors.measure import DESIGN
        from darkmatter.regression import Design, load_moments

        dc = self.decomposition
        m = load_moments(self.paths.errors(hook) / DESIGN)
        return Design(m["fit"], m["test"], intercept=dc.intercept if intercept is None else intercept,
                      ridge=dc.ridge if ridge is None else ridge)

    def documents_of(self, contexts: np.ndarray) -> np.ndarray:
        """The source document of each eval context in ``contexts`` (the store's ``tokens.doc_id``; a context with
        no document recorded is its own)."""
        docs = _documents(str(self.db), self.db.stat().st_mtime_ns)
        return np.array([docs.get(int(c)) or f"context {int(c)}" for c in contexts], dtype=object)

    def resample_weights(self, contexts: np.ndarray) -> np.ndarray:
        """[analysis.bootstrap, len(contexts)] multiplicities of the eval ``contexts`` in each resample of their
        documents (:func:`darkmatter.analysis.stats.cluster_multiplicities`), seeded with the experiment's seed: the
        same contexts give the same resamples in every analysis, so differences between SAEs are paired. No
        resamples (0 rows: NaN intervals) when the contexts come from fewer than 2 documents."""
        from darkmatter.analysis.stats import cluster_multiplicities

        documents = self.documents_of(contexts).astype(str)
        if len(set(documents)) < 2:  # one document: its variation between documents is unknown, so no interval
            log.warning("the %d contexts come from %d document(s): intervals need at least 2; they are NaN",
                        len(contexts), len(set(documents)))
            return np.zeros((0, len(contexts)), dtype=np.int64)
        return cluster_multiplicities(documents, self.analysis.bootstrap, self.seed)

    def resampling(self, contexts: np.ndarray) -> dict[str, Any]:
        """What the intervals over ``contexts`` resample, for the analyses' tables and summaries."""
        from darkmatter.analysis.stats import RESAMPLING_UNIT

        return {"resampling_unit": RESAMPLING_UNIT, "n_documents": len(set(self.documents_of(contexts))),
                "n_contexts": len(contexts), "bootstrap": self.analysis.bootstrap}

    def with_options(self, **options: Any) -> AnalysisContext:
        """A copy whose ``analysis.<name>`` options are updated (tests, notebooks)."""
        analysis = dict(self.params.get("analysis") or {})
        analysis[self.name] = {**(analysis.get(self.name) or {}), **options}
        return dataclasses.replace(self, params={**self.params, "analysis": analysis})

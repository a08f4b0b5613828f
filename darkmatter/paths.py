"""Every file and folder of an experiment, named once: the Snakemake rules and the library both use this module.

::

    results/<exp>/
      model/model.json, model/hf/          prepare_model: the model (embedded GGUF converted to safetensors once)
      corpus/                              prepare_corpus: {train,eval}_tokens.npy and where each context came from
      activations/<split>/                 harvest (split = train | eval): <hook>.npy, index.parquet, meta.json
      saes/<hook>/<sae_id>/                train_sae: cfg.json + sae_weights.safetensors (SAELens layout)
      codes/<hook>/<sae_id>/               encode_sae: each eval token's active latents (top_indices/top_values.npy)
      errors/<hook>/                       measure_errors, one folder per hook: split.npy, design.safetensors and
      errors/<hook>/<sae_id>/                per SAE metrics.json, linear_map.safetensors, token_errors.parquet,
                                             test_sums.safetensors
      pursuit/codes/<hook>/<sae_id>/       pursue: gradient-pursuit codes of a subset of eval tokens (+ rows.npy)
      pursuit/errors/<hook>/               measure_pursuit: encoder/<sae_id>/ and pursuit/<sae_id>/ error folders
                                             on those tokens (b* refitted for each)
      error_saes/<hook>/                   train_error_saes: SAEs on the base SAE's error components, their eval
                                             codes and metrics (darkmatter.errors.error_saes)
      ce/                                  measure_ce: token_ce.parquet, summary.parquet
      ce_cache/                            measure_ce: each SAE's spliced rows by content, so that an added SAE
                                             is the only one spliced (darkmatter.downstream.cache; safe to delete)
      pursuit/ce/                          measure_pursuit_ce: token_ce.parquet of the widest SAE's pursuit
      sources/ce/                          measure_sources_ce: token_ce.parquet with the part of the NonlinearError
                                             that the previous layer's SAE predicts, and that map
      darkmatter.duckdb                    build_database: the queryable per-token store
      analyses/<name>/                     run_analysis: table.parquet, summary.json, figures, meta.json
      logs/                                one log per step
      benchmarks/<rule>/…                  each heavy job's wall time and peak memory (Snakemake's benchmark TSV)
    reports/<exp>/index.html, browser.html render_report

Methods take the wildcard values; the rules pass ``"{hook}"``-style placeholders to get Snakemake patterns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS = Path("results")
REPORTS = Path("reports")
DATABASE = "darkmatter.duckdb"


@dataclass(frozen=True)
class ExperimentPaths:
    """The result tree of one experiment: ``root`` = results/<exp>, ``reports`` = reports/<exp>."""

    root: Path
    reports: Path

    @classmethod
    def of(cls, name: str, base: str | Path = ".") -> ExperimentPaths:
        """The paths of experiment ``name`` under ``base`` (the workflow's working directory)."""
        base = Path(base)
        return cls(base / RESULTS / name, base / REPORTS / name)

    @classmethod
    def from_database(cls, database: str | Path) -> ExperimentPaths:
        """The paths of the experiment whose store is ``database`` (results/<exp>/darkmatter.duckdb)."""
        database = Path(database)
        if database.name != DATABASE:
            raise ValueError(f"{database} is not an experiment's store; expected results/<exp>/{DATABASE}.")
        return cls.at(database.parent)

    @classmethod
    def at(cls, root: str | Path) -> ExperimentPaths:
        """The paths of the experiment whose results folder is ``root`` (its reports beside, by name)."""
        root = Path(root)
        return cls(root, root.parent.parent / REPORTS / root.name)

    # ------------------------------------------------------------------------------------------ data
    @property
    def model_json(self) -> Path:
        return self.root / "model" / "model.json"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    def tokens(self, split: str) -> Path:
        return self.corpus / f"{split}_tokens.npy"

    def contexts(self, split: str) -> Path:
        return self.corpus / f"{split}_contexts.parquet"

    def activations(self, split: str) -> Path:
        return self.root / "activations" / split

    # ------------------------------------------------------------------------------------------ SAEs
    def sae(self, hook: str, sae_id: str) -> Path:
        return self.root / "saes" / hook / sae_id

    def codes(self, hook: str, sae_id: str) -> Path:
        return self.root / "codes" / hook / sae_id

    def errors(self, hook: str) -> Path:
        return self.root / "errors" / hook

    def sae_errors(self, hook: str, sae_id: str) -> Path:
        return self.errors(hook) / sae_id

    def pursuit_codes(self, hook: str, sae_id: str) -> Path:
        return self.root / "pursuit" / "codes" / hook / sae_id

    def pursuit_errors(self, hook: str) -> Path:
        return self.root / "pursuit" / "errors" / hook

    @property
    def pursuit_ce(self) -> Path:
        return self.root / "pursuit" / "ce"

    @property
    def sources_ce(self) -> Path:
        return self.root / "sources" / "ce"

    def error_saes(self, hook: str) -> Path:
        return self.root / "error_saes" / hook

    # ------------------------------------------------------------------------------------------ downstream
    @property
    def ce(self) -> Path:
        return self.root / "ce"

    @property
    def ce_cache(self) -> Path:
        return self.root / "ce_cache"

    @property
    def database(self) -> Path:
        return self.root / DATABASE

    @property
    def analyses(self) -> Path:
        return self.root / "analyses"

    def analysis(self, name: str) -> Path:
        return self.analyses / name

    def log(self, step: str, *parts: str) -> Path:
        """results/<exp>/logs/<step>.log, or logs/<step>/<part>/…/<last part>.log (one log per wildcard value)."""
        if not parts:
            return self.root / "logs" / f"{step}.log"
        return self.root.joinpath("logs", step, *parts[:-1], f"{parts[-1]}.log")

    def benchmark(self, rule: str, *parts: str) -> Path:
        """results/<exp>/benchmarks/<rule>.tsv, or benchmarks/<rule>/<part>/…/<last part>.tsv (one per job)."""
        if not parts:
            return self.root / "benchmarks" / f"{rule}.tsv"
        return self.root.joinpath("benchmarks", rule, *parts[:-1], f"{parts[-1]}.tsv")

    # ------------------------------------------------------------------------------------------ report
    @property
    def report_index(self) -> Path:
        return self.reports / "index.html"

    @property
    def report_browser(self) -> Path:
        return self.reports / "browser.html"

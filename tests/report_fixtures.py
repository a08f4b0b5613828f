"""A synthetic experiment for the report tests: a DuckDB store, analysis folders made through the real
analysis runner (tiny matplotlib figures), provenance files, and one configured analysis that never ran.

The error norms are planted so that the three error kinds peak on different tokens: the total error on
numbers, the nonlinear error on capitalised words, the linear error on everything else. The texts contain
HTML-special characters, newlines and indentation, which the pages must show literally.
"""

from __future__ import annotations

import re
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from darkmatter.analysis.contract import AnalysisContext, run
from darkmatter.config import load_config, to_dict
from darkmatter.provenance import write_provenance
from darkmatter.store.schema import TABLES
from darkmatter.store.build import build_database
from tests.conftest import REPO

PROSE = ("The Congress of 1861 met in <special> session & voted 42 to 17 on the \"Union\" question ; "
         "Mr. Lincoln said the nation could not endure half slave and half free . ")
CODE = "def f(x):\n    if x < 3 and x > 0:\n        return x * 2  # </script>\n    return None\n\n"
SAE_IDS = ("topk-w64-k4-s0", "topk-w128-k4-s0", "topk-w256-k4-s0")
ANALYSES = ("error_predictability", "per_token_shares", "pursuit")  # the last one is never run


@dataclass(frozen=True)
class Experiment:
    results: Path
    db: Path
    analyses: list[str]
    config: dict[str, Any]
    out: Path  # reports/<exp>/index.html


def _words(text: str) -> list[str]:
    """Crude word-piece tokens: words keep their leading space, newlines and indents are their own tokens."""
    out: list[str] = []
    for line in text.split("\n"):
        indent = len(line) - len(line.lstrip(" "))
        if indent:
            out.append(" " * indent)
        out += [(" " if i else "") + w for i, w in enumerate(line.split())]
        out.append("\n")
    return out[:-1]


def token_frame(n_contexts: int, n_positions: int, min_pos: int) -> pl.DataFrame:
    """The tokens table: alternating prose and code contexts of ``n_positions`` tokens from ``min_pos``."""
    texts, docs = [], []
    for c in range(n_contexts):
        words = _words((PROSE if c % 2 == 0 else CODE) * (n_positions // 10 + 2))
        texts += words[c:c + n_positions]
        docs += [f"sotu/{1790 + c}-synthetic" if c % 2 == 0 else f"stdlib/mod{c}.py"] * n_positions
    n = n_contexts * n_positions
    return pl.DataFrame({
        "row": np.arange(n), "context": np.repeat(np.arange(n_contexts), n_positions),
        "position": min_pos + np.tile(np.arange(n_positions), n_contexts),
        "token_id": [hash(t) % 1000 for t in texts], "token_text": texts, "doc_id": docs,
        "loss": np.random.default_rng(0).random(n).astype(np.float32),
    })


def error_shard(tokens: pl.DataFrame, sae_id: str, scale: float, seed: int) -> pl.DataFrame:
    """Per-token norms with a planted structure (see the module docstring); wider SAEs have smaller errors."""
    rng = np.random.default_rng(seed)
    text = tokens["token_text"].to_list()
    number = np.array([t.strip().isdigit() for t in text])
    capital = np.array([t.strip()[:1].isupper() for t in text])
    n = len(text)
    linear = scale * (1 + 0.3 * rng.random(n) + 6 * number)
    nonlinear = scale * (0.5 + 0.3 * rng.random(n) + 5 * capital)
    err = np.sqrt(linear**2 + nonlinear**2)
    return pl.DataFrame({
        "sae_id": [sae_id] * n, "row": tokens["row"], "fit": np.arange(n) % 2 == 0,
        "x_norm": np.full(n, 10.0), "x_hat_norm": np.full(n, 9.0), "error_norm": err, "error_norm_sq": err**2,
        "l0": np.full(n, 4, dtype=np.int16), "cosine": np.full(n, 0.9), "linear_error_norm": linear,
        "nonlinear_error_norm": nonlinear,
    })


def sae_frame(sae_ids: tuple[str, ...] = SAE_IDS) -> pl.DataFrame:
    """The saes table; FVU falls with width, as it should."""
    rows = []
    for i, sid in enumerate(sae_ids):
        rows.append({c.name: None for c in TABLES["saes"]} | {
            "sae_id": sid, "hook": "blocks.1.hook_resid_post", "families": "width", "architecture": "topk",
            "width": int(re.search(r"-w(\d+)-", sid).group(1)), "k": 4, "seed": 0, "training_tokens": 60_000,
            "fvu": 0.30 / (i + 1), "fvu_nonlinear": 0.12 - 0.01 * i, "fvu_linear": 0.30 / (i + 1) - (0.12 - 0.01 * i),
            "r2_norm_sq": 0.93 + 0.01 * i, "l0_mean": 4.0, "dead_fraction": 0.01 * i,
        })
    return pl.DataFrame(rows) if rows else sae_frame().clear()  # no SAEs: the columns, no rows


def fake_analysis_module(name: str, doc: str, claim: str, compute, summarize, plot,
                     headline: tuple[str, ...] = ()) -> types.ModuleType:
    module = types.ModuleType(f"analyses.{name}", doc)
    module.PAPER_CLAIM, module.HEADLINE = claim, headline
    module.compute, module.summarize, module.plot = compute, summarize, plot
    return module


def _bar_figure(labels: list[str], values: list[float], title: str):
    from darkmatter.analysis.figures import new_figure

    fig, ax = new_figure(figsize=(3.2, 2.0))
    ax.bar(labels, values, color="#4c78a8")
    ax.set_title(title)
    return fig


def _write_analyses(results: Path, db: Path) -> None:
    """Two analyses through the real runner (``darkmatter.analysis.run``), reading the synthetic store."""
    def predictability(ctx: AnalysisContext) -> pl.DataFrame:
        with ctx.connect() as con:
            return con.sql("SELECT sae_id, width, r2_norm_sq, fvu FROM saes ORDER BY width").pl()

    def shares(ctx: AnalysisContext) -> pl.DataFrame:
        with ctx.connect() as con:
            return con.sql("""SELECT sae_id, context, avg(linear_error_norm) AS linear_norm_mean,
                                     avg(nonlinear_error_norm) AS nonlinear_norm_mean
                              FROM token_errors_in_context GROUP BY sae_id, context
                              ORDER BY sae_id, context""").pl()

    modules = [
        fake_analysis_module(
            "error_predictability",
            "How much of the SAE error is linearly predictable from x?\n\nRegress the squared error norm on x "
            "with an affine map fitted on half the tokens. Score R² on the other half.",
            "Squared-norm R² > 0.9 for most SAEs; vector R² ≈ 0.5.",
            predictability,
            lambda t: {"r2_norm_sq_median": float(t["r2_norm_sq"].median()), "saes": t.height,
                       "fvu_min": float(t["fvu"].min())},
            lambda t: {"r2_norm_sq": _bar_figure([str(w) for w in t["width"]], t["r2_norm_sq"].to_list(), "R²"),
                       "fvu": _bar_figure([str(w) for w in t["width"]], t["fvu"].to_list(), "FVU")},
            headline=("saes", "r2_norm_sq_median"),
        ),
        fake_analysis_module(
            "per_token_shares",
            "Which contexts carry the nonlinear error?\n\nAverage the linear and nonlinear error norms per "
            "context and SAE.",
            "Larger SAEs struggle with the same tokens as smaller ones.",
            shares,
            lambda t: {"nonlinear_norm_mean_max": float(t["nonlinear_norm_mean"].max()), "rows": t.height,
                       "note": "synthetic <data> & co"},
            lambda t: {"shares": _bar_figure(["lin", "nonlin"], [float(t["linear_norm_mean"].mean()),
                                                                 float(t["nonlinear_norm_mean"].mean())], "mean")},
        ),
    ]
    for module in modules:
        name = module.__name__.rsplit(".", 1)[-1]
        run(module, AnalysisContext(db, {"results": str(results), "seed": 0}), results / "analyses" / name)


def make_experiment(root: Path, n_contexts: int = 12, n_positions: int = 60, name: str = "synthetic",
                    sae_ids: tuple[str, ...] = SAE_IDS, analyses: bool = True) -> Experiment:
    """Build the synthetic experiment under ``root`` (results/<name>/…, reports/<name>/ left empty)."""
    config = to_dict(load_config(REPO / "config" / "smoke.yaml")) | {"name": name}
    min_pos = config["harvest"]["min_pos"]
    results = root / "results" / name
    results.mkdir(parents=True)
    tokens = token_frame(n_contexts, n_positions, min_pos)
    shards = []
    for i, sid in enumerate(sae_ids):
        path = results / "errors" / f"{sid}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        error_shard(tokens, sid, scale=1.0 / (i + 1), seed=i).write_parquet(path)
        shards.append(path)
    saes = sae_frame(sae_ids)
    db = build_database(results / "darkmatter.duckdb", tokens, saes, shards)
    for stage in ("activations/eval", "activations/train", "corpus"):
        started = time.time() - 12.5
        write_provenance(results / stage, {"stage": stage}, started=started)
    if analyses:
        _write_analyses(results, db)
    return Experiment(results, db, list(ANALYSES), config, root / "reports" / name / "index.html")

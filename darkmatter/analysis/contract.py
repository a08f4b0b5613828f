"""The analysis contract, and the one runner every ``analyses/<name>.py`` module uses.

An analysis module answers one scientific question:

- module docstring: first line = the question; the next paragraph = the method in about two sentences;
- ``PAPER_CLAIM: str`` — what the paper reports for this question (docs/science.md), shown next to our numbers;
- ``compute(ctx: AnalysisContext) -> pl.DataFrame`` — the result table;
- ``summarize(table: pl.DataFrame) -> dict[str, float | str]`` — headline numbers, units in the names;
- ``HEADLINE: tuple[str, ...]`` — the summary keys that answer the question, most important first (the report's
  top table shows those the summary has; every key is in the section);
- ``plot(table: pl.DataFrame) -> dict[str, matplotlib.figure.Figure]`` — figures, no I/O;
- optional ``verdict(summary, table) -> darkmatter.analysis.verdict.Verdict`` — does the paper's claim hold here
  (agrees / differs / undetermined, with the numbers behind the word); stored in the summary;
- ``main()`` = ``run_cli(sys.modules[__name__])``.

Outputs in ``--out``: ``table.parquet``, ``summary.json``, ``<figure>.png`` per figure, ``meta.json``
(name, question, method, paper claim, figure names, seconds) and ``provenance.json``. The report assembles
these and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl

from darkmatter.analysis.context import AnalysisContext
from darkmatter.io import atomic_dir, read_json, write_json
from darkmatter.paths import ExperimentPaths
from darkmatter.provenance import write_provenance


def module_name(module: ModuleType) -> str:
    """``error_predictability`` for ``analyses.error_predictability``, also when run as ``__main__``."""
    full = module.__spec__.name if module.__name__ == "__main__" and module.__spec__ else module.__name__
    return full.rsplit(".", 1)[-1]


def question(module: ModuleType) -> str:
    return (inspect.getdoc(module) or "").strip().splitlines()[0]


def method(module: ModuleType) -> str:
    paragraphs = (inspect.getdoc(module) or "").strip().split("\n\n")
    return " ".join(paragraphs[1].split()) if len(paragraphs) > 1 else ""


def run(module: ModuleType, ctx: AnalysisContext, out: Path) -> Path:
    """Compute, summarise and plot one analysis, writing its outputs atomically into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from darkmatter.analysis.figures import apply_style

    apply_style()
    started = time.time()
    if not ctx.name:  # the context reads this analysis's options
        ctx = dataclasses.replace(ctx, name=module_name(module))
    table = module.compute(ctx)
    summary = module.summarize(table)
    if hasattr(module, "verdict"):
        summary |= module.verdict(summary, table).as_summary()
    name = module_name(module)
    # a degraded run (no CE, no width family, ...) may leave some headline keys out: show the others
    headline = [k for k in getattr(module, "HEADLINE", ()) if k in summary]
    figures = module.plot(table)
    with atomic_dir(out) as tmp:
        table.write_parquet(tmp / "table.parquet")
        write_json(tmp / "summary.json", summary)
        for fig_name, fig in figures.items():
            fig.savefig(tmp / f"{fig_name}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
        write_json(tmp / "meta.json", {
            "name": name, "question": question(module), "method": method(module),
            "paper_claim": getattr(module, "PAPER_CLAIM", ""), "figures": sorted(figures), "headline": headline,
            "seconds": round(time.time() - started, 2),
        })
        write_provenance(tmp, ctx.params, seeds={"analysis": ctx.seed}, started=started)
    return out


def run_cli(module: ModuleType, argv: list[str] | None = None) -> None:
    """``python -m analyses.<name> --db results/<exp>/darkmatter.duckdb --params JSON [--out DIR]``."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ap = argparse.ArgumentParser(prog=f"python -m {module.__name__}", description=question(module))
    ap.add_argument("--db", required=True, help="the experiment's store, results/<exp>/darkmatter.duckdb")
    ap.add_argument("--params", required=True, help="JSON: the analysis's config slice (darkmatter.config.steps)")
    ap.add_argument("--out", default=None, help="output folder (default: results/<exp>/analyses/<name>)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from darkmatter.cli import exit_on_user_error

    def step() -> None:
        paths, name = ExperimentPaths.from_database(args.db), module_name(module)
        run(module, AnalysisContext(paths, json.loads(args.params), name),
            Path(args.out) if args.out else paths.analysis(name))

    exit_on_user_error(step, args.out)


def load_outputs(folder: Path) -> dict[str, Any]:
    """Read one analysis's outputs back (for the report and tests)."""
    folder = Path(folder)
    return {
        "meta": read_json(folder / "meta.json"),
        "summary": read_json(folder / "summary.json"),
        "table": pl.read_parquet(folder / "table.parquet"),
        "figures": {p.stem: p for p in sorted(folder.glob("*.png"))},
    }

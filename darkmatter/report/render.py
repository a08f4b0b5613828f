"""Assemble an experiment's outputs into a self-contained HTML report: ``reports/<exp>/index.html``.

The report only assembles: figures, tables and headline numbers come from the analysis folders
(:func:`darkmatter.analysis.load_outputs`), the SAE table and the token browser from the DuckDB store, the
footer from the ``provenance.json`` files under ``results/<exp>/``. Everything is inlined (CSS, JavaScript,
PNGs as data URIs), so both pages open from ``file://`` with no network. A missing or incomplete analysis is
shown as "not run" instead of failing the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import markupsafe
import polars as pl

from darkmatter.analysis.contract import load_outputs
from darkmatter.analysis.contract import method as module_method
from darkmatter.analysis.contract import question as module_question
from darkmatter.config import stable_hash
from darkmatter.io import read_json, write_text
from darkmatter.paths import ExperimentPaths
from darkmatter.provenance import git_state, package_versions
from darkmatter.report.browser import DEFAULT_LIMITS, BrowserLimits, browser_data
from darkmatter.report.tables import (
    CompactTable,
    compact_table,
    experiment_facts,
    fmt,
    sae_table,
    stage_records,
    stage_totals,
)
from darkmatter.store.build import connect

log = logging.getLogger(__name__)

HEADLINE_ITEMS = 4  # summary numbers per analysis in the report's top table (every one is in its section)


@dataclass
class AnalysisSection:
    """One analysis as the report shows it; ``status`` is ``"ok"`` or ``"not run"`` (then ``reason`` says why)."""

    name: str
    status: str
    question: str
    method: str = ""
    paper_claim: str = ""
    reason: str = ""
    verdict: str = ""  # agrees / differs / undetermined (darkmatter.analysis.verdict); empty: the analysis has none
    verdict_basis: str = ""
    # from a training-budget experiment (analyses/training_budget.py): robust / moves toward|away from the paper
    robustness: str = ""
    robustness_basis: str = ""
    seconds: float | None = None
    summary: list[tuple[str, str]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (name, data URI)
    table: CompactTable | None = None

    @property
    def anchor(self) -> str:
        return f"analysis-{self.name}"

    @property
    def badge(self) -> str:
        """The status shown beside the title: the run time, or "not run"."""
        if self.status != "ok":
            return self.status
        return f"{self.seconds:.1f} s" if self.seconds is not None else "ok"


def _module_text(name: str) -> tuple[str, str, str]:
    """(question, method, paper claim) from ``analyses.<name>``'s docstring, or empty when it cannot be imported.

    Used for analyses that have not run, so their section still says what they would answer.
    """
    module_name = f"analyses.{name}"
    try:
        if importlib.util.find_spec(module_name) is None:
            return "", "", ""
        module = importlib.import_module(module_name)
    except Exception as e:  # an import error in one analysis must not take the report down
        log.warning("cannot import %s for its description: %s", module_name, e)
        return "", "", ""
    return module_question(module), module_method(module), getattr(module, "PAPER_CLAIM", "")


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _headline_first(summary: dict[str, Any], headline: list[str]) -> list[str]:
    """The summary keys with the analysis's HEADLINE keys first, in its order, then the rest alphabetically."""
    return [k for k in headline if k in summary] + sorted(k for k in summary if k not in headline)


def load_section(folder: Path, name: str) -> AnalysisSection:
    """Read one analysis folder into a section; a missing folder or file gives a "not run" section."""
    try:
        out = load_outputs(folder)
    except (OSError, ValueError, pl.exceptions.PolarsError) as e:
        question, method, claim = _module_text(name)
        reason = "no output folder" if not Path(folder).exists() else f"incomplete outputs ({type(e).__name__}: {e})"
        log.warning("analysis %s not run: %s", name, reason)
        return AnalysisSection(name=name, status="not run", question=question or name, method=method,
                               paper_claim=claim, reason=reason)
    meta, figures, summary = out["meta"], out["figures"], dict(out["summary"])
    verdict, basis = str(summary.pop("verdict", "")), str(summary.pop("verdict_basis", ""))
    # meta.json lists the figures in the order the analysis made them; fall back to what is on disk.
    names = [n for n in meta.get("figures", []) if n in figures] or list(figures)
    return AnalysisSection(
        name=name, status="ok", question=meta.get("question") or name, method=meta.get("method", ""),
        paper_claim=meta.get("paper_claim", ""), seconds=meta.get("seconds"), verdict=verdict, verdict_basis=basis,
        summary=[(k, fmt(summary[k])) for k in _headline_first(summary, meta.get("headline", []))],
        figures=[(n, _data_uri(figures[n])) for n in names],
        table=compact_table(out["table"]),
    )


def budget_summary(paths: ExperimentPaths, config: dict[str, Any]) -> dict[str, Any]:
    """The summary of the training-budget analysis of the experiment named ``analysis.budget_study`` (a sibling of
    this experiment's results folder; empty when none is named or it has not run)."""
    study = (config.get("analysis") or {}).get("budget_study")
    if not study:
        return {}
    path = budget_study_summary(paths, study)
    if not path.is_file():
        log.warning("analysis.budget_study %r has no %s yet: verdicts shown without their robustness", study, path)
        return {}
    return read_json(path)


def budget_study_summary(paths: ExperimentPaths, study: str) -> Path:
    """Where the budget study ``study`` of the experiment at ``paths`` keeps its training-budget summary."""
    return ExperimentPaths.at(paths.root.parent / study).analysis("training_budget") / "summary.json"


def add_robustness(sections: list[AnalysisSection], budget: dict[str, Any]) -> None:
    """Give each section whose claim the budget study tested its robustness word and basis; "undetermined" when
    the study's own verdict at its reference budget is not this run's (its intervals cannot tell this run's
    answer apart, e.g. fewer CE contexts)."""
    from darkmatter.sae.families import tokens_label

    reference = tokens_label(int(budget.get("reference_tokens", 0) or 1))
    for s in sections:
        if f"robustness_{s.name}" not in budget:
            continue
        basis = f"training budgets {budget.get('budgets', '')}: {budget[f'robustness_{s.name}_basis']}"
        theirs = budget.get(f"verdict_{s.name}_at_{reference}")
        if theirs is not None and theirs != s.verdict:
            s.robustness = "undetermined"
            basis = f"the budget study's verdict at {reference} is {theirs}, not {s.verdict}, so it cannot tell; {basis}"
        else:
            s.robustness = str(budget[f"robustness_{s.name}"])
        s.robustness_basis = basis


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("darkmatter.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    # Long snake_case names (summary keys) may wrap after an underscore, never inside a word.
    env.filters["wbr"] = lambda text: markupsafe.Markup("_<wbr>").join(str(text).split("_"))
    return env


def _asset(name: str) -> str:
    return resources.files("darkmatter.report").joinpath("templates", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe to place inside a <script> element: '<' is escaped, so no token can close the element."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def render_report(paths: ExperimentPaths, analyses: list[str], config: dict[str, Any],
                  limits: BrowserLimits = DEFAULT_LIMITS, out: Path | None = None) -> Path:
    """Write the report (``out``, default ``reports/<exp>/index.html``) and ``browser.html`` beside it.

    ``analyses`` names the experiment's analysis folders in the order to show them; ``config`` is the
    experiment configuration as plain data (``darkmatter.config.to_dict`` or the slice the Snakemake rule passes);
    ``limits`` bounds what the token browser embeds.
    """
    exp_results, db, out = paths.root, paths.database, Path(out or paths.report_index)
    env = _environment()
    css = _asset("report.css")
    sections = [load_section(paths.analysis(name), name) for name in analyses]
    add_robustness(sections, budget_summary(paths, config))

    store: dict[str, Any] = {"ok": db.is_file(), "path": str(db)}
    if store["ok"]:
        data = browser_data(db, limits)
        with connect(db) as con:
            store["saes"] = sae_table(con)
        store |= {"n_tokens": data["n_tokens_total"], "n_contexts": data["n_contexts_total"],
                  "n_saes": len(data["saes"]), "n_embedded": len(data["contexts"])}
        browser = env.get_template("browser.html.j2").render(
            title=f"Dark-matter browser · {config.get('name', exp_results.name)}", css=css + _asset("browser.css"),
            js=_asset("browser.js"), data_json=_script_json(data), limits=limits, data=data)
        write_text(out.parent / "browser.html", browser)
    else:
        log.warning("%s does not exist: the report has no SAE table and no token browser", db)

    stages = stage_records(exp_results)
    report_prov = {**git_state(), "config_hash": stable_hash(config), "packages": package_versions(),
                   "rendered_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    html = env.get_template("index.html.j2").render(
        title=f"Dark matter of sparse autoencoders · {config.get('name', exp_results.name)}", css=css,
        facts=experiment_facts(config, store), sections=sections, headline_items=HEADLINE_ITEMS, store=store,
        limits=limits, stages=stages, stage_totals=stage_totals(stages), prov=report_prov,
        shas=sorted({s["git_sha"] for s in stages if s["git_sha"]}),
    )
    write_text(out, html)
    log.info("report: %s (%d bytes), %d analyses (%d not run)", out, len(html.encode()), len(sections),
             sum(s.status != "ok" for s in sections))
    return out

"""Numbers and tables as the report prints them: formatting, compact tables, the SAE table, facts, run times."""

from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

log = logging.getLogger(__name__)

MAX_ROWS = 15
MAX_COLS = 10

# (saes column, header, multiplier, optional). Optional columns are shown only when the store has values for
# them; the CE-loss score is added by the splicing stage and may be absent (either of its two names).
SAE_COLUMNS: tuple[tuple[str, str, float, bool], ...] = (
    ("sae_id", "SAE", 1, False), ("architecture", "architecture", 1, False), ("width", "width", 1, False),
    ("k", "k", 1, False), ("l0_mean", "L0", 1, False), ("fvu", "FVU", 1, False),
    ("fvu_linear", "FVU linear", 1, True), ("fvu_nonlinear", "FVU nonlinear", 1, False),
    ("r2_norm_sq", "R² ‖error‖²", 1, True), ("r2_vector_mean_dims", "R² error vector", 1, True),
    ("dead_fraction", "dead %", 100, False), ("ce_loss_score", "CE score", 1, True), ("ce_score", "CE score", 1, True),
    # gradient pursuit with the SAE's decoder, on the pursued tokens (analyses/pursuit.py has the encoder's on those)
    ("pursuit_fvu", "FVU pursuit", 1, True), ("pursuit_fvu_nonlinear", "FVU nonlinear pursuit", 1, True),
)

def fmt(value: Any) -> str:
    """A number as a reader wants it: thousands separators for integers, three significant digits otherwise."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        v = float(value)
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e6 or a < 1e-3:
            mantissa, exponent = f"{v:.2e}".split("e")
            return f"{mantissa}e{int(exponent)}"
        if a >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}"
    if isinstance(value, str):
        return value
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


@dataclass
class CompactTable:
    """A table cut to what fits on a page, every cell already formatted."""

    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    notes: list[str] = field(default_factory=list)


def compact_table(frame: pl.DataFrame, max_rows: int = MAX_ROWS, max_cols: int = MAX_COLS) -> CompactTable:
    """The first ``max_rows`` rows and ``max_cols`` columns of ``frame``, formatted, with notes on what was cut."""
    shown = frame.head(max_rows).select(frame.columns[:max_cols])
    notes = []
    if frame.height > max_rows:
        notes.append(f"first {max_rows} of {frame.height:,} rows")
    if frame.width > max_cols:
        notes.append(f"{frame.width - max_cols} more columns not shown: {', '.join(frame.columns[max_cols:])}")
    return CompactTable(
        columns=shown.columns,
        rows=[[fmt(v) for v in row] for row in shown.iter_rows()],
        numeric=[dtype.is_numeric() for dtype in shown.dtypes],
        notes=notes,
    )


def sae_table(con: Any) -> CompactTable:
    """The SAE family table from the store's ``saes`` table (every SAE; families are small)."""
    frame = con.sql("SELECT * FROM saes ORDER BY hook, architecture, width, k, sae_id").pl()
    present = {c for c in frame.columns if frame[c].null_count() < frame.height}
    chosen, headers = [], set()
    for col, header, scale, optional in SAE_COLUMNS:
        if col not in frame.columns or header in headers or (optional and col not in present):
            continue
        chosen.append((pl.col(col) * scale if scale != 1 else pl.col(col)).alias(header))
        headers.add(header)
    return compact_table(frame.select(chosen), max_rows=max(frame.height, 1), max_cols=len(chosen))


def _join(values: Any) -> str:
    return ", ".join(str(v) for v in values) if isinstance(values, (list, tuple)) else fmt(values)


def experiment_facts(config: dict[str, Any], store: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's first lines: what was measured, on what, with which SAEs (missing keys show as —)."""
    model, harvest = config.get("model", {}), config.get("harvest", {})
    corpus, families = config.get("corpus", {}), config.get("families", [])
    model_text = fmt(model.get("name"))
    if model.get("source") == "random":
        r = model.get("random", {})
        model_text = (f"random {r.get('architecture', '?')} ({r.get('n_layers', '?')} blocks, "
                      f"d_model {r.get('d_model', '?')})")
    elif model.get("source"):
        model_text += f" ({model['source']})"
    eval_text = (f"{fmt(harvest.get('eval_contexts'))} contexts × {fmt(harvest.get('context_size'))} tokens, "
                 f"positions ≥ {fmt(harvest.get('min_pos'))}")
    family_text = "; ".join(
        f"{f.get('name')}: {f.get('architecture')}, widths {_join(f.get('widths'))}, k {_join(f.get('ks'))}"
        for f in families) or "—"
    facts = [("experiment", fmt(config.get("name"))), ("model", model_text),
             ("layer / hook", _join(harvest.get("hooks", "—"))), ("corpus", _join(corpus.get("sources", "—"))),
             ("evaluation", eval_text), ("SAE families", family_text)]
    if store.get("ok"):
        facts.append(("store", f"{fmt(store['n_tokens'])} eval tokens in {fmt(store['n_contexts'])} contexts, "
                               f"{fmt(store['n_saes'])} SAEs"))
    return facts


def stage_records(exp_results: Path) -> list[dict[str, Any]]:
    """One row per ``provenance.json`` under the results folder (temporary folders skipped), oldest first."""
    rows = []
    for path in sorted(Path(exp_results).rglob("provenance.json")):
        rel = path.parent.relative_to(exp_results)
        if any(part.startswith(".") for part in rel.parts):
            continue  # a half-written temporary folder of a running or killed job
        try:
            prov = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("unreadable provenance %s: %s", path, e)
            continue
        rows.append({
            "stage": rel.as_posix() or ".", "git_sha": prov.get("git_sha"), "git_dirty": prov.get("git_dirty"),
            "config_hash": prov.get("config_hash"), "seconds": prov.get("seconds"),
            "finished_at": prov.get("finished_at") or "",
        })
    return sorted(rows, key=lambda r: (r["finished_at"], r["stage"]))


def stage_totals(stages: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
    """(top-level stage, artifacts, summed seconds) — e.g. all SAE trainings together."""
    totals: dict[str, list[float]] = {}
    for s in stages:
        totals.setdefault(s["stage"].split("/")[0], []).append(s["seconds"] or 0.0)
    return [(name, len(secs), fmt(sum(secs))) for name, secs in totals.items()]

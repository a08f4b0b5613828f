"""The dark-matter browser's data: eval contexts with every token's error norms, taken from the DuckDB store.

The page must stay light however large the experiment is, so it embeds a *sample*: ``max_contexts`` eval
contexts (evenly spaced over the eval split, so prose and code both appear), each token's text stored once
(a shared vocabulary) and, per SAE and error kind, the norms quantised to ``digits`` significant digits of
that array's largest value (integers plus one step per array). The worst tokens are the ``top_k`` largest
values per SAE and kind *among the embedded contexts*, so every one of them can be opened in context.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from darkmatter.analysis.figures import PALETTE
from darkmatter.store.build import connect

log = logging.getLogger(__name__)

# (token_errors column, label on the page, colour). Linear and nonlinear use the figures' palette; the total
# gets a warm colour of its own because the palette's near-black total would hide the text it shades.
ERROR_KINDS: tuple[tuple[str, str, str], ...] = (
    ("error_norm", "total", "#d9822b"),
    ("linear_error_norm", "linear", PALETTE["linear error"]),
    ("nonlinear_error_norm", "nonlinear", PALETTE["nonlinear error"]),
)


@dataclass(frozen=True)
class BrowserLimits:
    """How much of the store the browser page embeds (the page states these numbers).

    At the defaults, the default experiment (300 contexts x 824 tokens, 11 SAEs) embeds 20 x 824 tokens and
    11 x 3 arrays of 16,480 small integers: about 2 MB of JSON, with 5 x 824 token spans in the DOM at a time.
    """

    max_contexts: int = 20  # eval contexts embedded (evenly spaced over the eval split)
    top_k: int = 50  # worst tokens listed per SAE and error kind
    contexts_per_page: int = 5  # contexts rendered at once (keeps the DOM small)
    digits: int = 3  # significant digits kept, relative to each array's largest value

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BrowserLimits.{name} must be an integer >= 1, got {value!r}.")


DEFAULT_LIMITS = BrowserLimits()


def sample_contexts(context_ids: list[int], max_contexts: int) -> list[int]:
    """At most ``max_contexts`` ids, evenly spaced over the sorted ids (first and last included)."""
    ids = sorted(context_ids)
    if len(ids) <= max_contexts:
        return ids
    picks = np.unique(np.linspace(0, len(ids) - 1, max_contexts).round().astype(int))
    return [ids[i] for i in picks]


def quantise(values: np.ndarray, digits: int) -> tuple[float, list[int | None]]:
    """Values as integers times a power-of-ten step that keeps ``digits`` significant digits of the maximum.

    NaN (a token an SAE has no error for) becomes None. Returns ``(step, integers)``.
    """
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    # Written as a decimal literal so the step is exactly the power of ten JSON readers expect.
    step = float(f"1e{math.floor(math.log10(top)) - digits + 1}") if top > 0 else 1.0
    q = np.round(values / step)
    return step, [None if math.isnan(v) else int(v) for v in q.tolist()]


def _sae_rows(con: Any) -> list[dict[str, Any]]:
    """One description per SAE (with its error shares when the view has them), widths ascending."""
    frame = con.sql("""
        SELECT s.sae_id, s.hook, s.architecture, s.width, s.k, s.fvu, s.fvu_nonlinear, s.l0_mean,
               sh.linear_share_of_sq_norm, sh.nonlinear_share_of_sq_norm
        FROM saes s LEFT JOIN sae_error_shares sh USING (sae_id)
        ORDER BY s.hook, s.architecture, s.width, s.k, s.sae_id""").pl()
    return frame.to_dicts()


def browser_data(db: str | Path, limits: BrowserLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Everything ``browser.html`` embeds, as JSON-able data (see the module docstring for the layout)."""
    with connect(db) as con:
        saes = _sae_rows(con)
        all_contexts = [r[0] for r in con.execute("SELECT DISTINCT context FROM tokens").fetchall()]
        n_tokens = con.execute("SELECT count(*) FROM tokens").fetchall()[0][0]
        chosen = sample_contexts(all_contexts, limits.max_contexts)
        tokens = con.sql("SELECT row, context, position, token_text, doc_id FROM tokens "
                         "WHERE list_contains(?, context) ORDER BY context, position", params=[chosen]).pl()
        kinds = [k for k, _, _ in ERROR_KINDS]
        errors = con.sql(f"SELECT e.sae_id, e.row, {', '.join('e.' + k for k in kinds)} FROM token_errors e "
                         "JOIN tokens t USING (row) WHERE list_contains(?, t.context)", params=[chosen]).pl()
    log.info("browser: %d of %d contexts, %d tokens, %d SAEs", len(chosen), len(all_contexts), tokens.height,
             len(saes))

    # Tokens once: a vocabulary of distinct strings, and per context the indices into it.
    vocab: dict[str, int] = {}
    token_idx = [vocab.setdefault(t or "", len(vocab)) for t in tokens["token_text"].to_list()]
    bounds = tokens.with_row_index("i").group_by("context", maintain_order=True).agg(
        pl.col("i").first().alias("lo"), pl.len().alias("n"), pl.col("doc_id").first(), pl.col("position").first())
    spans = bounds.select("lo", "n").rows()  # each context's slice of the flat token order
    positions = tokens["position"].to_list()
    contexts = []
    for (c, d, p), (lo, n) in zip(bounds.select("context", "doc_id", "position").rows(), spans, strict=True):
        ctx: dict[str, Any] = {"id": c, "doc": d, "start": p, "tokens": token_idx[lo:lo + n]}
        if positions[lo + n - 1] - p != n - 1:  # a gap: spell out the positions (rare, so not by default)
            ctx["positions"] = positions[lo:lo + n]
        contexts.append(ctx)
    # (context index, token index within it) for every embedded token, in page order.
    where = [(ci, ti) for ci, (_, n) in enumerate(spans) for ti in range(n)]

    norms: dict[str, dict[str, Any]] = {}
    worst: dict[str, dict[str, list[list[int]]]] = {}
    rows = tokens.select("row")
    for sae in saes:
        sid = sae["sae_id"]
        # Aligned with the token order; a token this SAE has no error for stays NaN (shown unshaded).
        aligned = rows.join(errors.filter(pl.col("sae_id") == sid), on="row", how="left", maintain_order="left")
        norms[sid], worst[sid] = {}, {}
        for kind in kinds:
            values = aligned[kind].cast(pl.Float64).fill_null(float("nan")).to_numpy()
            step, q = quantise(values, limits.digits)
            finite = values[np.isfinite(values)]
            per_ctx = [q[lo:lo + n] for lo, n in spans]
            norms[sid][kind] = {"step": step, "p99": float(np.quantile(finite, 0.99)) if finite.size else 0.0,
                                "q": per_ctx}
            order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")[:min(limits.top_k, finite.size)]
            worst[sid][kind] = [[*where[i], q[i]] for i in order.tolist()]
    return {
        "limits": asdict(limits),
        "n_contexts_total": len(all_contexts),
        "n_tokens_total": int(n_tokens),
        "kinds": [{"key": k, "label": label, "color": color} for k, label, color in ERROR_KINDS],
        "saes": [_clean(s) for s in saes],
        "vocab": list(vocab),
        "contexts": contexts,
        "norms": norms,
        "worst": worst,
    }


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """NaN → None, so the JSON stays valid (JSON has no NaN)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}

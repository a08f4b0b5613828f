"""Which SAEs an analysis studies: the ``saes`` table by family, the sweep slices, the SAE of single-SAE analyses."""

from __future__ import annotations

from typing import Any, Literal

import polars as pl

from darkmatter.analysis.context import AnalysisContext


def family_name(ctx: AnalysisContext, sweep: Literal["width", "k"]) -> str:
    """Name of the family that sweeps ``sweep`` (width: several widths; k: several ks) on the primary hook.

    The first such family in config order, judged by its SAEs in the store (an imported family's widths and ks
    are read from its files, not its config); else the first whose config grid sweeps it; else the default names
    ``"width"`` / ``"k"``.
    """
    column = "width" if sweep == "width" else "k"
    with ctx.connect() as con:
        rows = con.execute("SELECT families, width, k FROM saes WHERE hook = ?", [ctx.hook]).fetchall()
    for fam in ctx.families:
        values = {r[1 if column == "width" else 2] for r in rows if fam["name"] in (r[0] or "").split(",")}
        if len(values) > 1:
            return str(fam["name"])
    for fam in ctx.families:  # none in the store: the family the config says sweeps it (its analyses find no SAEs)
        if not fam.get("source") and len(fam.get(f"{column}s") or ()) > 1:
            return str(fam["name"])
    return sweep


def in_family(name: str) -> pl.Expr:
    """Rows of ``saes`` whose comma-separated ``families`` contain ``name``."""
    return pl.col("families").str.split(",").list.contains(name)


def family_saes(ctx: AnalysisContext, name: str | None = None) -> pl.DataFrame:
    """Rows of ``saes`` in family ``name`` (all SAEs when None: those of ``ctx.only_families`` when set) on the
    primary hook.

    Sorted by architecture, k, width, seed so that tables and figures read in sweep order.
    """
    where, args = ["hook = ?"], [ctx.hook]
    if name is not None:
        where.append("list_contains(string_split(families, ','), ?)")
        args.append(name)
    elif ctx.only_families:
        where.append("list_has_any(string_split(families, ','), ?)")
        args.append(list(ctx.only_families))
    sql = f"SELECT * FROM saes WHERE {' AND '.join(where)} ORDER BY architecture, k, width, seed"
    with ctx.connect() as con:
        return con.sql(sql, params=args).pl()


def modal_group(frame: pl.DataFrame, by: list[str], over: str) -> pl.DataFrame:
    """The rows of ``frame`` whose ``by`` values have the most distinct ``over`` values (ties: first in sort order).

    E.g. ``by=["architecture", "k"], over="width"``: the fixed-k slice of a width sweep with the most widths.
    """
    if frame.is_empty():
        return frame
    counts = frame.group_by(by).agg(pl.col(over).n_unique().alias("_n")).sort(["_n", *by],
                                                                              descending=[True] + [False] * len(by))
    return frame.join(counts.head(1).drop("_n"), on=by, how="semi")


def choose_sae(ctx: AnalysisContext, saes: pl.DataFrame, requested: str | None = None) -> dict[str, Any]:
    """The SAE an analysis of a single SAE studies: ``requested`` when given, else the widest SAE of the width
    family (ties: smallest k, then sae_id), else the widest SAE of all. Returns its ``saes`` row."""
    if saes.is_empty():
        raise ValueError("the saes table is empty; there is no SAE to analyse.")
    if requested is not None:
        row = saes.filter(pl.col("sae_id") == requested)
        if row.is_empty():
            raise ValueError(f"sae_id {requested!r} is not in the saes table; it has {saes['sae_id'].to_list()}.")
        return row.row(0, named=True)
    members = saes.filter(in_family(family_name(ctx, "width")))
    pool = members if not members.is_empty() else saes
    return pool.sort(["width", "k", "sae_id"], descending=[True, False, False]).row(0, named=True)

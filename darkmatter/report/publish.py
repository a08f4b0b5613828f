"""The small outputs of a run, published in the repository so that anyone can browse them without a run.

The published set of an experiment is: every analysis folder (``results/<exp>/analyses/<name>/``: summary, table,
figures, meta, provenance), the report (``reports/<exp>/index.html`` and ``browser.html``), and one manifest,
``results/<exp>/published.json``, which holds what the rest of the run leaves in large files — the SAE table (every
SAE's metrics, from the store), each step's provenance (git commit, config hash, seconds) — and the size and SHA-256
of every published file, so that a test can tell when they no longer match. Activations, weights, codes and the
store are never published. ``.gitignore`` admits exactly this set for the default experiment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from darkmatter.io import sha256, write_json
from darkmatter.paths import ExperimentPaths
from darkmatter.provenance import git_state
from darkmatter.report.tables import stage_records
from darkmatter.store import connect

log = logging.getLogger(__name__)

MANIFEST = "published.json"
MAX_FILE_BYTES = 5 * 2**20  # "nothing over a few MB": a larger file is refused, not published
MAX_TOTAL_BYTES = 32 * 2**20


def published_files(paths: ExperimentPaths) -> list[Path]:
    """The files of the published set that exist now (besides the manifest), sorted."""
    files = sorted(p for p in paths.analyses.rglob("*") if p.is_file() and not p.name.startswith("."))
    return files + [p for p in (paths.report_index, paths.report_browser) if p.is_file()]


def publish(paths: ExperimentPaths, base: Path = Path(".")) -> dict[str, Any]:
    """Write ``results/<exp>/published.json`` for the run in ``paths`` (file paths in it relative to ``base``, the
    repository root); raises ValueError when a file or the set is too large to publish."""
    files = published_files(paths)
    if not paths.report_index.is_file() or not paths.analyses.is_dir():
        raise ValueError(f"{paths.root}: no report or analyses to publish; run the workflow first.")
    entries, total = [], 0
    for path in files:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path} has {size / 2**20:.1f} MiB; a published file must stay under "
                             f"{MAX_FILE_BYTES / 2**20:.0f} MiB.")
        total += size
        entries.append({"path": Path(os.path.relpath(path, base)).as_posix(), "bytes": size, "sha256": sha256(path)})
    if total > MAX_TOTAL_BYTES:
        raise ValueError(f"the published set of {paths.root} has {total / 2**20:.1f} MiB; it must stay under "
                         f"{MAX_TOTAL_BYTES / 2**20:.0f} MiB.")
    with connect(paths.database) as con:
        saes = con.sql("SELECT * FROM saes ORDER BY hook, architecture, k, width, seed").pl().to_dicts()
    manifest = {"experiment": paths.root.name, **git_state(), "files": entries, "saes": saes,
                "stages": stage_records(paths.root)}
    write_json(paths.root / MANIFEST, manifest)
    log.info("published %d files (%.1f MiB) and %d SAEs of %s", len(entries), total / 2**20, len(saes), paths.root)
    return manifest

"""Provenance records written beside every artifact: what code, config, seeds and packages made it."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from darkmatter.config import stable_hash
from darkmatter.io import write_json

PACKAGES = ("darkmatter", "torch", "numpy", "scipy", "transformers", "safetensors", "polars", "duckdb")


# the workflow's own outputs: the default run's are committed, so a run that rewrites them does not make the code dirty
OUTPUTS = ("results", "reports")


def git_state(root: Path | None = None) -> dict[str, Any]:
    """The git commit of the working tree and whether its code or config has uncommitted changes (changes under
    :data:`OUTPUTS` do not count; None outside git)."""
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", *(f":!{o}" for o in OUTPUTS)], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": None, "git_dirty": None}
    return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(params: Any, seeds: dict[str, int] | None = None, started: float | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A provenance record for an artifact made from ``params`` (the config slice the step received); ``extra``:
    facts resolved at run time (e.g. the precision chosen on this machine)."""
    now = time.time()
    return {
        **git_state(),
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "config_hash": stable_hash(params),
        "params": params,
        "seeds": seeds or {},
        "command": " ".join(sys.argv),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "seconds": None if started is None else round(now - started, 3),
        **(extra or {}),
    }


def write_provenance(folder: Path, params: Any, seeds: dict[str, int] | None = None,
                     started: float | None = None, extra: dict[str, Any] | None = None) -> None:
    write_json(Path(folder) / "provenance.json", provenance(params, seeds, started, extra))

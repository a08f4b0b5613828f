"""Read access to harvested activations (written by :mod:`darkmatter.data.harvest`).

Store layout (one folder per split)::

    <split>/index.parquet        row → context, position, token_id, loss (next-token CE in nats, when harvested)
    <split>/<hook>.npy           float32 [rows, d_model], rows ordered by (context, position), positions ≥ min_pos
    <split>/meta.json            hooks, d_model, n_contexts, context_size, min_pos, rows, with_loss, precision
    <split>/provenance.json
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from darkmatter.io import load_npy, read_json, read_parquet


class ActivationStore:
    """Read access to a harvested split: memmapped activations per hook and the per-row index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} is not an activation store (no meta.json); harvest it first.")
        self.meta = read_json(meta_path)
        self.hooks: list[str] = self.meta["hooks"]
        self.rows: int = self.meta["rows"]

    def d_model(self, hook: str) -> int:
        return self.meta["d_model"][hook]

    def activations(self, hook: str) -> np.ndarray:
        """float32 memmap [rows, d_model] (read-only)."""
        if hook not in self.hooks:
            raise KeyError(f"{self.folder} has no activations for hook {hook!r}; it has {self.hooks}.")
        return load_npy(self.folder / f"{hook}.npy", mmap=True)

    def index(self) -> pl.DataFrame:
        return read_parquet(self.folder / "index.parquet")


def contexts_for_tokens(n_tokens: int, context_size: int, min_pos: int) -> int:
    """How many contexts give at least ``n_tokens`` kept positions."""
    return math.ceil(n_tokens / (context_size - min_pos))

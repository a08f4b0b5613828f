"""Each SAE's spliced CE rows, kept by content so that adding SAEs to an experiment splices only the new ones.

The ``measure_ce`` step is one job over every SAE of the primary hook (the clean pass is shared), so without this a
new seed or width would re-splice all the others: about 4 min per SAE for the 48 default contexts on 2 AVX2 cores
(3 conditions at about 1.6 s per context each).

An entry holds one SAE's per-token CE and KL rows for its conditions, and the clean rows of the pass they were
measured against. Two guards keep a stale entry out:

- its key hashes everything the rows are a function of: the SAE's files, its linear map's file, the model's files,
  the contexts, the positions scored, the batch size, the precision, the device, the thread count, the torch version
  and the source of the whole ``darkmatter`` package (so any code change starts a fresh cache);
- an entry is used only when its clean rows equal this run's clean pass bit for bit, so the model, the tokens and
  the forward pass are also checked by what they produce, not only by what they were named.

The folder is safe to delete at any time: a miss only costs the splicing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from darkmatter.io import atomic_file, files_sha256, read_parquet, sha256, tree_sha256

log = logging.getLogger(__name__)

FORMAT = 1  # bump when an entry's layout changes
PACKAGE = Path(__file__).resolve().parents[1]  # the darkmatter package folder


def package_sha256() -> str:
    """One sha256 over the source of every module of the ``darkmatter`` package."""
    return files_sha256(sorted(PACKAGE.rglob("*.py")), PACKAGE)


def _model_id(model_path: str) -> str:
    """A local model folder by its content; anything else (a hub id) by its name, the clean check guarding it."""
    return tree_sha256(Path(model_path)) if Path(model_path).is_dir() else f"name:{model_path}"


@dataclass(frozen=True)
class CeCache:
    """The entries in ``folder`` that were measured in the same setting as this run (:meth:`for_run`)."""

    folder: Path
    setting: str  # sha256 of everything the rows depend on besides the SAE itself

    @classmethod
    def for_run(cls, folder: Path, *, model_path: str, contexts: np.ndarray, min_pos: int, batch_contexts: int,
                autocast_bf16: bool, device: torch.device | str) -> CeCache:
        setting = {
            "format": FORMAT, "model": _model_id(model_path), "contexts": [int(c) for c in contexts],
            "min_pos": min_pos, "batch_contexts": batch_contexts, "autocast_bf16": autocast_bf16,
            "device": torch.device(device).type, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "darkmatter": package_sha256(),
        }
        return cls(Path(folder), hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest())

    def key(self, sae_id: str, sae_dir: Path, linear_map: Path) -> str:
        """The entry name of one SAE (its folder's files and its linear map's file, in this setting)."""
        parts = [self.setting, sae_id, tree_sha256(Path(sae_dir)), sha256(Path(linear_map))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.parquet"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str, clean: pl.DataFrame) -> pl.DataFrame | None:
        """The entry's SAE rows if it exists and its clean rows equal ``clean`` (this run's clean rows) bit for bit;
        else None (a mismatch or an unreadable entry is logged and left to be overwritten)."""
        path = self._path(key)
        try:
            rows = read_parquet(path)
        except Exception as e:  # a damaged entry is a miss, never a failure: the rows are measured again
            log.warning("CE cache: ignoring the unreadable entry %s (%s)", path, e)
            return None
        is_clean = pl.col("condition") == "clean"
        if not rows.filter(is_clean).equals(clean):
            log.warning("CE cache: the entry %s was measured against another clean pass; measuring again", path)
            return None
        return rows.filter(~is_clean)

    def splice_missing(self, keys: Mapping[str, str], splice: Callable[[list[str]], pl.DataFrame]
                       ) -> tuple[pl.DataFrame, list[str]]:
        """All rows for the SAEs of ``keys`` (sae_id → :meth:`key`), and the sae_ids read from the cache.

        ``splice(sae_ids)`` measures the clean pass, the global conditions and those SAEs' conditions (a table of
        darkmatter.downstream.ce.measure_ce). It runs once for the SAEs the cache lacks; an entry whose clean rows
        differ from that pass's is measured in a second call. Every SAE measured is then stored."""
        held = [i for i, key in keys.items() if self.has(key)]
        table = splice([i for i in keys if i not in held])
        clean = table.filter(pl.col("condition") == "clean")
        parts, reused = [table], []
        for sae_id in held:
            rows = self.get(keys[sae_id], clean)
            if rows is not None:
                parts.append(rows)
                reused.append(sae_id)
        if stale := [i for i in held if i not in reused]:
            parts.append(splice(stale).filter(pl.col("sae_id").is_in(stale)))
        table = pl.concat(parts)
        for sae_id in (i for i in keys if i not in reused):
            self.put(keys[sae_id], table.filter(pl.col("sae_id") == sae_id), clean)
        return table, reused

    def put(self, key: str, rows: pl.DataFrame, clean: pl.DataFrame) -> None:
        """Store one SAE's rows with the clean rows they were measured against (written atomically)."""
        with atomic_file(self._path(key)) as tmp:
            pl.concat([clean, rows]).write_parquet(tmp)

"""Evaluate one SAE on the harvested evaluation split: reconstruction and sparsity metrics, streamed in chunks.

The evaluation store (darkmatter.activations) holds only positions ≥ ``harvest.min_pos`` (SCIENCE.md §2), so
every token in it counts; a store harvested with a smaller ``min_pos`` is filtered here. Each metric is defined
once, in :mod:`darkmatter.metrics`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from darkmatter.activations import ActivationStore
from darkmatter.io import write_json
from darkmatter.metrics import DENSE_THRESHOLD, ReconstructionAccumulator
from darkmatter.provenance import provenance
from darkmatter.sae import Sae
from darkmatter.sae_formats import load_any

log = logging.getLogger(__name__)

# Dense latents [chunk, d_sae] dominate memory: keep each chunk's latents near 2**24 floats (64 MiB).
LATENT_BUDGET = 2**24
MAX_CHUNK_TOKENS = 8192


class EvaluationError(ValueError):
    """The SAE and the activations do not fit together (sizes), or there is nothing to evaluate."""


def chunk_tokens_for(d_sae: int) -> int:
    """Tokens per chunk so that one chunk's dense latents stay within :data:`LATENT_BUDGET` floats."""
    return int(np.clip(LATENT_BUDGET // max(d_sae, 1), 64, MAX_CHUNK_TOKENS))


def evaluate_sae(sae: Sae, x: np.ndarray | torch.Tensor, rows: np.ndarray | None = None,
                 chunk_tokens: int | None = None, dense_threshold: float = DENSE_THRESHOLD,
                 progress: bool = True, desc: str = "evaluate") -> dict[str, float | int]:
    """Metrics of ``sae`` on activations ``x [N, d_in]`` (a memmap is fine), or on ``x[rows]`` when given.

    Returns :meth:`darkmatter.metrics.ReconstructionAccumulator.summary` (fvu, nmse_per_token_mean, l0 mean and
    quantiles, dead and dense latents, cosine, ...). Chunks are read, encoded and accumulated one at a time.
    """
    d_in, d_sae = sae.cfg["d_in"], sae.cfg["d_sae"]
    if x.ndim != 2 or x.shape[1] != d_in:
        raise EvaluationError(f"the SAE expects activations with d_in={d_in} but they have shape {tuple(x.shape)}.")
    n = x.shape[0] if rows is None else len(rows)
    if n == 0:
        raise EvaluationError("there are no activations to evaluate on.")
    chunk = chunk_tokens or chunk_tokens_for(d_sae)
    acc = ReconstructionAccumulator(d_sae)
    bar = tqdm(total=n, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    sae.eval()
    with torch.inference_mode():
        for start in range(0, n, chunk):
            block = x[start : start + chunk] if rows is None else x[rows[start : start + chunk]]
            # np.array copies: a memmap slice is read-only, which torch refuses to wrap without a warning.
            xb = block.float() if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block, np.float32))
            out = sae(xb)
            acc.update(xb, out.x_hat, out.latents)
            bar.update(xb.shape[0])
    bar.close()
    return acc.summary(dense_threshold)


def eval_rows(store: ActivationStore, min_pos: int | None) -> np.ndarray | None:
    """Row ids with position ≥ ``min_pos`` (None: every row qualifies, the usual case)."""
    if min_pos is None or store.meta.get("min_pos", 0) >= min_pos:
        return None
    positions = store.index()["position"].to_numpy()
    log.info("store %s starts at position %d; keeping positions >= %d", store.folder, store.meta["min_pos"], min_pos)
    return np.flatnonzero(positions >= min_pos)


def evaluate_to_file(sae_path: str | Path, store_path: str | Path, hook: str, out: str | Path,
                     params: dict[str, Any] | None = None, chunk_tokens: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Load an SAE (any supported format), evaluate it on ``hook`` of an activation store, write ``out`` JSON.

    ``params`` is the config slice the step received (its ``harvest.min_pos`` is enforced; it is recorded in
    the provenance). The JSON holds the metrics at top level plus the SAE's identity and ``provenance``.
    """
    started = time.time()
    params = params or {}
    sae = load_any(sae_path)
    store = ActivationStore(store_path)
    x = store.activations(hook)
    if x.shape[1] != sae.cfg["d_in"]:
        raise EvaluationError(f"SAE {sae_path} has d_in={sae.cfg['d_in']} but the activations of {hook} in "
                         f"{store_path} have d_model={x.shape[1]}.")
    if sae.cfg.get("hook_name") not in (None, hook):
        log.warning("SAE %s was trained on %s but is evaluated on %s", sae_path, sae.cfg["hook_name"], hook)
    min_pos = (params.get("harvest") or {}).get("min_pos")
    rows = eval_rows(store, min_pos)
    t0 = time.time()
    metrics = evaluate_sae(sae, x, rows, chunk_tokens, progress=progress, desc=f"evaluate {Path(sae_path).name}")
    seconds = time.time() - t0
    log.info("%s: fvu %.4f, l0 %.1f, %d dead, %d tokens in %.1f s (%.0f tok/s)", sae_path, metrics["fvu"],
             metrics["l0_mean"], metrics["dead_count"], metrics["n_tokens"], seconds,
             metrics["n_tokens"] / max(seconds, 1e-9))
    record: dict[str, Any] = {
        **metrics,
        "sae_id": Path(sae_path).name,
        "sae_path": str(sae_path),
        "activations": str(store_path),
        "hook": hook,
        "architecture": sae.architecture,
        "k": sae.cfg.get("k"),
        "d_in": sae.cfg["d_in"],
        "min_pos": max(store.meta.get("min_pos", 0), min_pos or 0),
        "provenance": provenance(params, started=started),
    }
    write_json(Path(out), record)
    return record

"""The workflow's error measurement: every SAE of one hook on the eval split, from its stored codes, in two passes.

Both passes of :mod:`darkmatter.errors.decompose` run over the eval activations once for the whole hook (the x
statistics and their factorisation are shared), and each SAE gets one folder. Output
``results/<exp>/errors/<hook>/``:

    split.npy                          bool [rows]: True on the fit rows of b* (split_mask(rows, fit_tokens, seed))
    rows.npy                           int64: the eval rows measured, when they are a subset (the pursuit's)
    design.safetensors                 x moments of the fit and test rows (n, shift, sum, gram), shared by the SAEs
    <sae_id>/metrics.json              one flat mapping: reconstruction and sparsity metrics (FVU, L0, dead and
                                       dense latents, cosine, ...), FVU_linear / FVU_nonlinear, held-out R² of the
                                       error vector and of ‖error‖² (affine and without intercept), settings
    <sae_id>/linear_map.safetensors    coef [d, d] and intercept [d] (b*: LinearError = x·coef + intercept);
                                       norm_coef [d, 1] and norm_intercept [1] (‖error‖² ≈ x·a + a0)
    <sae_id>/token_errors.parquet      the per-token scalars of :data:`darkmatter.store.schema.TOKEN_ERRORS`
    <sae_id>/test_sums.safetensors     per eval context, the test rows' sums of [error, ‖error‖²] and of their
                                       residuals (:class:`darkmatter.regression.GroupSums`), for resampled R²
    provenance.json
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file

from darkmatter.data.activations import ActivationStore
from darkmatter.errors.decompose import ErrorFit, Reconstruction, decompose_family
from darkmatter.errors.parts import ErrorParts, error_parts
from darkmatter.io import InputError, atomic_dir, write_json
from darkmatter.provenance import write_provenance
from darkmatter.regression import ArrayLike, save_moments, split_mask
from darkmatter.sae.codes import load_codes
from darkmatter.sae.formats import load_sae
from darkmatter.sae.model import Sae

log = logging.getLogger(__name__)

SPLIT, DESIGN, ROWS = "split.npy", "design.safetensors", "rows.npy"
METRICS, LINEAR_MAP, TOKEN_ERRORS, TEST_SUMS = ("metrics.json", "linear_map.safetensors", "token_errors.parquet",
                                                "test_sums.safetensors")


def save_linear_map(path: Path, fit: ErrorFit) -> None:
    """b* and the ‖error‖² map as float32 safetensors (module docstring)."""
    tensors = {"coef": fit.linear_map.coef, "intercept": fit.linear_map.intercept}
    if fit.norm_map is not None:
        tensors |= {"norm_coef": fit.norm_map.coef, "norm_intercept": fit.norm_map.intercept}
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in tensors.items()}, str(path))


def token_table(sae_id: str, parts: ErrorParts, fit_mask: np.ndarray, rows: np.ndarray | None = None) -> pl.DataFrame:
    """The per-token rows of one SAE (columns of darkmatter.store.schema.TOKEN_ERRORS); ``rows``: the eval rows of
    a subset (default: all rows, in order)."""
    t = parts.tokens
    rows = np.arange(len(fit_mask), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    return pl.DataFrame({"sae_id": sae_id, "row": rows, "fit": fit_mask,
                         **{k: t[k] for k in ("x_norm", "x_hat_norm", "error_norm", "error_norm_sq")},
                         "l0": t["l0"], "cosine": t["cosine"], "linear_error_norm": t["linear_error_norm"],
                         "nonlinear_error_norm": t["nonlinear_error_norm"]})


def load_saes(saes: Sequence[str | Path], x: np.ndarray, where: str, device: torch.device | str = "cpu"
              ) -> list[Sae]:
    """The SAEs in the folders ``saes`` (any format) on ``device``, checked against the activations ``x`` [N, d] of
    ``where``. (The measurement itself stays on the CPU: float64 moments and SciPy sparse products.)"""
    models = [load_sae(p, device) for p in saes]
    for path, sae in zip(saes, models, strict=True):
        if sae.d_in != x.shape[1]:
            raise InputError(f"SAE {path} has d_in={sae.d_in} but the activations of {where} have "
                             f"d_model={x.shape[1]}.")
    return models


def measure_reconstructions(x: ArrayLike, named: Mapping[str, tuple[Sae, Reconstruction]], out: str | Path, *,
                            hook: str, mask: np.ndarray, contexts: np.ndarray, rows: np.ndarray | None = None,
                            seed: int, intercept: bool, ridge: float, extra: Mapping[str, dict[str, Any]] | None = None,
                            params: Any = None, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Both passes of the decomposition for the reconstructions ``named`` (folder name → (SAE, its reconstruction
    of ``x``)) with the fit rows ``mask`` and per-row eval ``contexts``; writes ``out`` (module docstring; one
    folder per name, which may contain '/'). ``rows``: the eval rows of ``x`` when it is a subset (saved as
    rows.npy, used in the token tables); ``extra``: more fields for a name's metrics.json. Returns the records."""
    started = time.time()
    recons = [recon for _, recon in named.values()]
    family = decompose_family(x, recons, mask=mask, intercept=intercept, ridge=ridge, progress=progress)
    parts = error_parts(x, recons, family, groups=contexts, progress=progress)
    records: dict[str, dict[str, Any]] = {}
    with atomic_dir(Path(out)) as tmp:
        np.save(tmp / SPLIT, mask)
        if rows is not None:
            np.save(tmp / ROWS, rows)
        save_moments(tmp / DESIGN, {"fit": family.design.fit, "test": family.design.test})
        for (name, (sae, _)), fit, part in zip(named.items(), family.fits, parts, strict=True):
            sae_id = Path(name).name
            folder = tmp / name
            folder.mkdir(parents=True)
            save_linear_map(folder / LINEAR_MAP, fit)
            token_table(sae_id, part, mask, rows).write_parquet(folder / TOKEN_ERRORS)
            if part.test_sums is not None:
                part.test_sums.save(folder / TEST_SUMS)
            # the decomposition's FVU (from its float64 moments) is the one reported; the metrics' (from per-token
            # sums) agrees with it to float rounding
            record = {"sae_id": sae_id, "hook": hook, "architecture": sae.architecture, "k": sae.k, "d_in": sae.d_in,
                      "training_tokens": (sae.cfg.get("metadata") or {}).get("training_tokens"),
                      **part.metrics, **fit.summary(), "intercept": intercept, "ridge": ridge, "seed": seed,
                      **(extra or {}).get(name, {})}
            write_json(folder / METRICS, record)
            records[name] = record
            log.info("%s: FVU %.4f = linear %.4f + nonlinear %.4f; R² vector %.3f, R² ‖e‖² %.3f; L0 %.1f, %d dead",
                     name, record["fvu"], record["fvu_linear"], record["fvu_nonlinear"],
                     record["r2_vector_mean_dims"] or 0, record["r2_norm_sq"] or 0, record.get("l0_mean", 0),
                     record.get("dead_count", 0))
        write_provenance(tmp, params, seeds={"split": seed}, started=started)
    log.info("measured %d reconstructions on %d tokens in %.0f s", len(named), x.shape[0], time.time() - started)
    return records


def measure_hook(saes: Sequence[str | Path], codes: Sequence[str | Path], store_path: str | Path, hook: str,
                 out: str | Path, *, fit_tokens: int, seed: int, intercept: bool, ridge: float, params: Any = None,
                 progress: bool = True) -> dict[str, dict[str, Any]]:
    """Measure the SAEs in ``saes`` (folders, any format) from their ``codes`` folders on ``hook`` of the eval store
    and write the folder of the module docstring; returns each SAE's metrics.json, keyed by SAE folder name."""
    store = ActivationStore(store_path)
    x = store.activations(hook)
    models = load_saes(saes, x, f"{hook} in {store_path}")
    named = {Path(p).name: (sae, load_codes(c, sae)) for p, c, sae in zip(saes, codes, models, strict=True)}
    return measure_reconstructions(
        x, named, out, hook=hook, mask=split_mask(x.shape[0], fit_tokens, seed),
        contexts=store.index()["context"].to_numpy().astype(np.int64), seed=seed, intercept=intercept, ridge=ridge,
        params=params, progress=progress)

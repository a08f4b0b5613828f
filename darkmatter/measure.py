"""Per-SAE error measurement on the eval split: x_hat, the linear error map b*, and per-token scalars.

Output folder ``results/<exp>/errors/<hook>/<sae_id>/``:

    x_hat.npy               float32 [rows, d_in]: Sae(x) for every eval row (error = x − x_hat)
    linear_map.safetensors  coef [d_in, d_in], intercept [d_in]: LinearError(x) = x·coef + intercept
    token_errors.parquet    the per-token scalars of :data:`darkmatter.schema.TOKEN_ERRORS`
    summary.json            FVU total / linear / nonlinear, held-out R² of the error vector and of ‖error‖²
                            (affine and without intercept), condition number, split sizes, settings
    provenance.json
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from darkmatter.activations import ActivationStore
from darkmatter.config import DecompositionConfig
from darkmatter.decompose import decompose
from darkmatter.evaluate import chunk_tokens_for
from darkmatter.io import atomic_dir, write_json
from darkmatter.metrics import cosine_per_token
from darkmatter.provenance import write_provenance
from darkmatter.regression import split_mask
from darkmatter.sae import Sae
from darkmatter.sae_formats import load_any

log = logging.getLogger(__name__)


def reconstruct(sae: Sae, x: np.ndarray, out: Path, progress: bool = True) -> dict[str, np.ndarray]:
    """Write Sae(x) to ``out`` (float32 .npy [rows, d_in]); return per-token ‖x‖, ‖x_hat‖, L0, cosine."""
    n, d = x.shape
    x_hat = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, d))
    scalars = {name: np.empty(n, dtype=np.float32) for name in ("x_norm", "x_hat_norm", "cosine")}
    scalars["l0"] = np.empty(n, dtype=np.int16)
    chunk = chunk_tokens_for(sae.cfg["d_sae"])
    bar = tqdm(total=n, unit="tok", unit_scale=True, disable=not progress, desc=f"reconstruct {out.parent.name}")
    with torch.inference_mode():
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            xb = torch.from_numpy(np.array(x[sl], dtype=np.float32))
            res = sae(xb)
            x_hat[sl] = res.x_hat.numpy()
            scalars["x_norm"][sl] = xb.norm(dim=1).numpy()
            scalars["x_hat_norm"][sl] = res.x_hat.norm(dim=1).numpy()
            scalars["cosine"][sl] = cosine_per_token(xb, res.x_hat).numpy()
            scalars["l0"][sl] = (res.latents != 0).sum(1).numpy()
            bar.update(sl.stop - sl.start)
    bar.close()
    x_hat.flush()  # once, at the end (a per-chunk msync of a large mapping is slow)
    del x_hat
    return scalars


def measure_errors(sae_path: str | Path, store_path: str | Path, hook: str, out: str | Path,
                   cfg: DecompositionConfig, sae_id: str | None = None, params: Any = None,
                   progress: bool = True) -> dict[str, Any]:
    """Reconstruct the eval split with one SAE, fit b*, and write the folder described in the module docstring."""
    started = time.time()
    out = Path(out)
    sae_id = sae_id or Path(sae_path).name
    sae = load_any(sae_path)
    x = ActivationStore(store_path).activations(hook)
    if x.shape[1] != sae.cfg["d_in"]:
        raise ValueError(f"SAE {sae_path} has d_in={sae.cfg['d_in']} but the activations of {hook} in {store_path} "
                         f"have d_model={x.shape[1]}.")
    with atomic_dir(out) as tmp:
        scalars = reconstruct(sae, x, tmp / "x_hat.npy", progress)
        x_hat = np.load(tmp / "x_hat.npy", mmap_mode="r")
        mask = split_mask(x.shape[0], cfg.fit_tokens, cfg.seed)
        res = decompose(x, x_hat, mask=mask, intercept=cfg.intercept, ridge=cfg.ridge, progress=progress)
        fit = res.fit
        lin = fit.linear_map
        save_file({"coef": torch.from_numpy(lin.coef).float().contiguous(),
                   "intercept": torch.from_numpy(lin.intercept).float().contiguous()},
                  str(tmp / "linear_map.safetensors"))
        assert res.error_norm is not None and res.linear_error_norm is not None
        assert res.nonlinear_error_norm is not None
        pl.DataFrame({
            "sae_id": sae_id,
            "row": np.arange(x.shape[0], dtype=np.int64),
            "fit": mask,
            "x_norm": scalars["x_norm"],
            "x_hat_norm": scalars["x_hat_norm"],
            "error_norm": res.error_norm,
            "error_norm_sq": res.error_norm.astype(np.float64) ** 2,
            "l0": scalars["l0"],
            "cosine": scalars["cosine"],
            "linear_error_norm": res.linear_error_norm,
            "nonlinear_error_norm": res.nonlinear_error_norm,
        }).write_parquet(tmp / "token_errors.parquet")

        def r2(scores, attr):
            return None if scores is None else float(getattr(scores, attr))

        summary = {
            "sae_id": sae_id, "hook": hook, "fvu": fit.fvu_total, "fvu_nonlinear": fit.fvu_nonlinear,
            "fvu_linear": fit.fvu_linear,
            "r2_vector_mean_dims": r2(fit.r2_vector, "r2_mean_dims"),
            "r2_vector_pooled": r2(fit.r2_vector, "r2_pooled"),
            "r2_norm_sq": r2(fit.r2_norm_sq, "r2_pooled"),
            "r2_vector_mean_dims_no_intercept": r2(fit.r2_vector_no_intercept, "r2_mean_dims"),
            "r2_vector_pooled_no_intercept": r2(fit.r2_vector_no_intercept, "r2_pooled"),
            "r2_norm_sq_no_intercept": r2(fit.r2_norm_sq_no_intercept, "r2_pooled"),
            "condition_number": float(lin.condition_number), "solver": lin.method, "rank": int(lin.rank),
            "fit_tokens": fit.n_fit, "test_tokens": fit.n_test, "intercept": cfg.intercept, "ridge": cfg.ridge,
            "seed": cfg.seed,
        }
        write_json(tmp / "summary.json", summary)
        write_provenance(tmp, params, seeds={"split": cfg.seed}, started=started)
    log.info("%s: FVU %.4f = linear %.4f + nonlinear %.4f; R² vector %.3f, R² ‖e‖² %.3f (%.0f s)", sae_id,
             summary["fvu"], summary["fvu_linear"], summary["fvu_nonlinear"], summary["r2_vector_mean_dims"] or 0,
             summary["r2_norm_sq"] or 0, time.time() - started)
    return summary

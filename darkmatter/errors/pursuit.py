"""Gradient pursuit in the workflow (docs/science.md, experiment 10): how much of each SAE's error is its encoder's.

Each SAE's decoder pursues a subset of the eval tokens (:func:`darkmatter.sae.pursuit.gradient_pursuit`), every
token for as many iterations as its encoder's L0 (times ``l0_multiple``, or a fixed ``l0``); then the encoder's
codes and the pursuit's of those tokens are measured side by side, with b* refitted for each on the subset's fit
rows of the decomposition's split (the same split, restricted), so that the two FVUs differ only by the encoder.

``pursue`` step, results/<exp>/pursuit/codes/<hook>/<sae_id>/: a codes folder (:mod:`darkmatter.sae.codes`) of the
pursued tokens, their eval rows as rows.npy, and codes.json with the settings and the time taken.

``measure-pursuit`` step, results/<exp>/pursuit/errors/<hook>/: rows.npy, split.npy (the subset's fit flags),
design.safetensors, and encoder/<sae_id>/ and pursuit/<sae_id>/, each laid out as the error folders of
:mod:`darkmatter.errors.measure` (token_errors.parquet rows are eval rows).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.data.activations import ActivationStore
from darkmatter.errors.measure import ROWS, load_saes, measure_reconstructions
from darkmatter.io import InputError, load_npy, read_json
from darkmatter.regression import split_mask
from darkmatter.sae.codes import META, SparseCodes, load_codes, save_codes
from darkmatter.sae.model import Sae
from darkmatter.sae.pursuit import GRAM_BYTES, gradient_pursuit

log = logging.getLogger(__name__)

# tokens per call of gradient_pursuit: the progress bar's step (the kernel's own batching is finer)
PURSUIT_CHUNK = 2048


def pursuit_rows(contexts: np.ndarray, n_contexts: int | None, seed: int) -> np.ndarray:
    """Sorted eval rows of ``n_contexts`` eval contexts drawn without replacement with ``seed`` (all rows when
    ``n_contexts`` is None or at least the number of contexts); ``contexts`` [rows] is each row's context."""
    contexts = np.asarray(contexts)
    unique = np.unique(contexts)
    if n_contexts is None or n_contexts >= len(unique):
        return np.arange(len(contexts), dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(unique, size=n_contexts, replace=False)
    return np.flatnonzero(np.isin(contexts, chosen)).astype(np.int64)


def pursuit_l0(encoder_l0: Tensor, d_sae: int, *, multiple: int = 1, fixed: int | None = None) -> Tensor:
    """Iterations per token: ``fixed`` for every token when given, else ``multiple`` × the encoder's L0, at most
    ``d_sae`` (a support cannot hold more atoms than the dictionary has)."""
    l0 = torch.full_like(encoder_l0, fixed) if fixed is not None else encoder_l0 * multiple
    return l0.clamp(max=d_sae)


def _dictionary(sae: Sae) -> tuple[Tensor, Tensor, Tensor | None]:
    """W_dec, b_dec in float32 and the Gram matrix W_dec·W_decᵀ when it fits :data:`GRAM_BYTES` (formed once per
    SAE and shared by every call of gradient_pursuit)."""
    W_dec, b_dec = sae.W_dec.detach().float().contiguous(), sae.b_dec.detach().float()
    fits = W_dec.shape[0] ** 2 * W_dec.element_size() <= GRAM_BYTES
    return W_dec, b_dec, W_dec @ W_dec.T if fits else None


def pursue(sae: Sae, x: np.ndarray, l0: Tensor, *, progress: bool = True, desc: str = "pursuit"
           ) -> tuple[np.ndarray, np.ndarray]:
    """Gradient-pursuit codes (indices int32 [N, L], values float32 [N, L]) of x [N, d] with ``sae``'s decoder in
    float32, ``l0`` [N] iterations per token; the Gram matrix is formed once for all chunks (on the SAE's device,
    as the other GEMMs: darkmatter.sae.pursuit)."""
    W_dec, b_dec, gram = _dictionary(sae)
    width = int(l0.max()) if len(l0) else 0
    indices, values = np.zeros((len(x), width), np.int32), np.zeros((len(x), width), np.float32)
    bar = tqdm(total=len(x), unit="tok", unit_scale=True, disable=not progress, desc=desc)
    for start in range(0, len(x), PURSUIT_CHUNK):
        rows = slice(start, start + PURSUIT_CHUNK)
        xb = torch.from_numpy(np.asarray(x[rows], dtype=np.float32)).to(W_dec.device)
        res = gradient_pursuit(xb, W_dec, b_dec, l0[rows], gram=gram)
        w = res.indices.shape[1]
        indices[rows, :w], values[rows, :w] = res.indices.cpu().numpy(), res.values.cpu().numpy()
        bar.update(len(xb))
    bar.close()
    return indices, values


def pursue_to_folder(sae_path: str | Path, codes_path: str | Path, store_path: str | Path, hook: str,
                     out: str | Path, *, contexts: int | None, seed: int, l0_multiple: int = 1,
                     l0: int | None = None, params: Any = None, progress: bool = True,
                     device: torch.device | str = "cpu", device_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``pursue`` step for one SAE on ``device`` (module docstring; its provenance record ``device_info``);
    returns codes.json."""
    started = time.time()
    store = ActivationStore(store_path)
    x = store.activations(hook)
    (sae,) = load_saes([sae_path], x, f"{hook} in {store_path}", device)
    codes = load_codes(codes_path, sae)
    rows = pursuit_rows(store.index()["context"].to_numpy(), contexts, seed)
    encoder_l0 = torch.from_numpy((np.asarray(codes.top_values[rows]) != 0).sum(1).astype(np.int64))
    iterations = pursuit_l0(encoder_l0, sae.d_sae, multiple=l0_multiple, fixed=l0)
    sae_id = Path(sae_path).name
    indices, values = pursue(sae, x[rows], iterations, progress=progress, desc=f"pursuit {sae_id}")
    seconds = time.time() - started
    record = {"sae_id": sae_id, "hook": hook, "architecture": sae.architecture, "d_sae": sae.d_sae, "k": sae.k,
              "rows": len(rows), "width": int(indices.shape[1]), "method": "gradient_pursuit",
              "contexts": contexts, "seed": seed, "l0_multiple": l0_multiple, "l0": l0,
              "l0_mean": float(iterations.float().mean()) if len(rows) else 0.0, "seconds": round(seconds, 2),
              "tokens_per_s": round(len(rows) / max(seconds, 1e-9), 1),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    save_codes(Path(out), indices, values, record, params, started, device_info, rows=rows)
    log.info("pursued %d tokens with %s in %.1f s (%.0f tok/s)", len(rows), sae_id, seconds, record["tokens_per_s"])
    return record


def measure_pursuit(saes: Sequence[str | Path], codes: Sequence[str | Path], pursuits: Sequence[str | Path],
                    store_path: str | Path, hook: str, out: str | Path, *, fit_tokens: int, seed: int,
                    intercept: bool, ridge: float, params: Any = None, progress: bool = True
                    ) -> dict[str, dict[str, Any]]:
    """The ``measure-pursuit`` step (module docstring): the encoder's codes (``codes``) and the pursuit's
    (``pursuits``) of every SAE in ``saes`` on the pursued rows, in one decomposition family; returns the records
    keyed ``encoder/<sae_id>`` and ``pursuit/<sae_id>``."""
    if not len(saes) == len(codes) == len(pursuits):
        raise InputError(f"got {len(saes)} SAE, {len(codes)} codes and {len(pursuits)} pursuit folders; give one "
                         "of each per SAE.")
    store = ActivationStore(store_path)
    x_all = store.activations(hook)
    rows = load_npy(Path(pursuits[0]) / ROWS)
    for folder in pursuits[1:]:
        if not np.array_equal(load_npy(Path(folder) / ROWS), rows):
            raise InputError(f"{folder} pursued other eval rows than {pursuits[0]}; rerun the pursue steps with one "
                             "pursuit configuration.")
    models = load_saes(saes, x_all, f"{hook} in {store_path}")
    named: dict[str, tuple[Sae, SparseCodes]] = {}
    extra: dict[str, dict[str, Any]] = {}
    for path, code, pursued, sae in zip(saes, codes, pursuits, models, strict=True):
        sae_id = Path(path).name
        enc = load_codes(code, sae)
        named[f"encoder/{sae_id}"] = (sae, SparseCodes(np.asarray(enc.top_indices[rows]),
                                                       np.asarray(enc.top_values[rows]), enc.W_dec, enc.b_dec))
        named[f"pursuit/{sae_id}"] = (sae, load_codes(pursued, sae))
        meta = read_json(Path(pursued) / META)
        extra[f"encoder/{sae_id}"] = {"method": "encoder"}
        extra[f"pursuit/{sae_id}"] = {"method": "pursuit", "pursuit_seconds": meta["seconds"],
                                      **{k: meta[k] for k in ("l0_multiple", "l0", "cpu_capability", "threads")}}
    return measure_reconstructions(
        np.asarray(x_all[rows]), named, out, hook=hook, mask=split_mask(x_all.shape[0], fit_tokens, seed)[rows],
        contexts=store.index()["context"].to_numpy().astype(np.int64)[rows], rows=rows, seed=seed,
        intercept=intercept, ridge=ridge, extra=extra, params=params, progress=progress)


def pursuit_reconstruction(sae: Sae, *, l0_multiple: int = 1, l0: int | None = None) -> Callable[[Tensor], Tensor]:
    """x [N, d] → the gradient-pursuit reconstruction with ``sae``'s decoder (float32), each token pursued for
    :func:`pursuit_l0` of its L0 under ``sae``'s encoder: the replacement the CE experiment splices in."""
    W_dec, b_dec, gram = _dictionary(sae)

    def reconstruct(x: Tensor) -> Tensor:
        x = x.float()
        encoder_l0 = (sae.encode(x) != 0).sum(1)
        return gradient_pursuit(x, W_dec, b_dec, pursuit_l0(encoder_l0, sae.d_sae, multiple=l0_multiple, fixed=l0),
                                gram=gram).x_hat

    return reconstruct

r"""SAEs trained on the error components of one SAE (the paper's §5): do the linear and the nonlinear part of its
error hold features another SAE can find?

For the base SAE (the primary hook's widest k = 32 member) with its b* from ``measure_errors``:

    SaeError = x − Sae(x)      LinearError = x·b* + b0      NonlinearError = SaeError − LinearError

are computed on the fly from the activations — over the training pool while training, over the eval split to
evaluate — never stored (two extra float32 copies of the 2M-token pool would be ~9 GB, and the base SAE's encoder
is a third of one training step's cost). One SAE per component (``sae_error`` is the control) is trained with
the shared recipe and the same seed, so all three read the same rows in the same order: one stream of x, one pass
of the base SAE per batch, every trainer stepping on its component (:func:`train_jointly`).

Output folder (``error_saes/<hook>/``)::

    saes/<component>/            the SAE (cfg.json, sae_weights.safetensors, train_log.parquet, provenance.json)
    codes/<component>/           its codes of the component on every eval token (darkmatter.sae.codes layout)
    context_sums.safetensors     per eval context and component: tokens, Σ‖t − t̂‖², Σ‖t‖², Σt — FVU about the
                                 target's mean under any resampling of contexts or documents
    metrics.json                 per component: FVU, L0, dead latents on the eval split, the base SAE, seconds
    provenance.json
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.config import SaeTrainingConfig
from darkmatter.errors.sources import COMPONENTS, split_error
from darkmatter.io import atomic_dir, load_safetensors, write_json
from darkmatter.provenance import write_provenance
from darkmatter.regression import LazyRows
from darkmatter.sae.codes import save_codes, sparse_codes
from darkmatter.sae.families import SaeSpec
from darkmatter.sae.model import Sae
from darkmatter.sae.train import Trainer, TrainResult, write_trained

log = logging.getLogger(__name__)

CONTEXT_SUMS, METRICS = "context_sums.safetensors", "metrics.json"
EVAL_CHUNK = 8192


@dataclass(frozen=True)
class ErrorComponents:
    """The error components of ``sae`` with the linear map (``coef`` [d, d], ``intercept`` [d]) fitted for it."""

    sae: Sae
    coef: Tensor
    intercept: Tensor

    @classmethod
    def load(cls, sae: Sae, linear_map: str | Path) -> ErrorComponents:
        """From the SAE and its linear_map.safetensors (darkmatter.errors.measure), on the SAE's device."""
        lin = load_safetensors(linear_map, device=str(sae.W_dec.device))
        return cls(sae, lin["coef"].float(), lin["intercept"].float())

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """Each component [N, d] (float32, on the SAE's device) of activations x [N, d]; they sum to x − Sae(x)
        exactly as defined."""
        x = x.float().to(self.coef.device)
        return split_error(x, sparse_codes(self.sae, x, chunk_tokens=len(x)).x_hat(slice(None)), self.coef,
                           self.intercept)


def component_rows(x: np.ndarray, components: ErrorComponents, name: str) -> LazyRows:
    """Component ``name`` of ``x`` as a read-only array whose rows are computed when indexed (by a slice or by row
    ids): what a Trainer samples its initialisation (input scale, b_dec) from."""
    def get(rows: Any) -> np.ndarray:
        return components(torch.from_numpy(np.array(x[rows], dtype=np.float32)))[name].cpu().numpy()

    return LazyRows(x.shape[0], x.shape[1], get)


def train_jointly(trainers: Sequence[Trainer], x: np.ndarray, targets: Callable[[Tensor], dict[str, Tensor]],
                  names: Sequence[str], progress: bool = True) -> list[TrainResult]:
    """Train each ``trainers[i]`` on ``targets(batch)[names[i]]`` of one shared stream of x's rows.

    The trainers must share seed, batch size and buffer (then each would have read exactly these rows in this
    order on its own). Each resumes from its own checkpoint; the stream starts at the earliest of their steps and
    a trainer steps only from its own (so a kill between two checkpoints' writes costs nothing but time).
    """
    first = trainers[0]
    for t in trainers[1:]:
        if (t.spec.seed, t.cfg.batch_size, t.cfg.buffer_tokens, t.n_steps) != (
                first.spec.seed, first.cfg.batch_size, first.cfg.buffer_tokens, first.n_steps):
            raise ValueError("jointly trained SAEs must share seed, batch size, buffer and steps.")
    for t in trainers:
        t.load_checkpoint()
    start = min(t.step for t in trainers)
    cfg = first.cfg
    stream = first.batches(x)
    bar = tqdm(total=first.n_steps * cfg.batch_size, initial=start * cfg.batch_size, unit="tok", unit_scale=True,
               desc=f"{len(trainers)} error SAEs", disable=not progress)
    started = time.time()
    for step, xb in zip(range(start, first.n_steps), stream.batches(start), strict=False):
        ys = targets(xb)
        fvus = {}
        for t, name in zip(trainers, names, strict=True):
            if t.step == step:
                fvus[name] = float(t.advance(ys[name]).fvu)
        bar.update(cfg.batch_size)
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix({name: f"{v:.3f}" for name, v in fvus.items()})
    bar.close()
    return [t.result(time.time() - started) for t in trainers]


@torch.inference_mode()
def evaluate(saes: dict[str, Sae], x: np.ndarray, contexts: np.ndarray, components: ErrorComponents,
             progress: bool = True) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Each SAE on its own component of every eval row: its codes (indices, values), and per eval context the sums
    behind FVU about the target's mean (keys ``contexts``, ``n`` and <component>.{sse, target_sq, target_sum})."""
    n, d = x.shape
    groups, inverse = np.unique(contexts, return_inverse=True)
    codes = {name: (np.empty((n, sae.k), np.int32), np.empty((n, sae.k), np.float32)) for name, sae in saes.items()}
    sums = {f"{name}.{key}": torch.zeros(len(groups), *shape, dtype=torch.float64)
            for name in saes for key, shape in (("sse", ()), ("target_sq", ()), ("target_sum", (d,)))}
    sums["contexts"] = torch.from_numpy(groups.astype(np.int64))
    sums["n"] = torch.from_numpy(np.bincount(inverse, minlength=len(groups)).astype(np.float64))
    for start in tqdm(range(0, n, EVAL_CHUNK), desc="evaluate error SAEs", disable=not progress):
        sl = slice(start, min(start + EVAL_CHUNK, n))
        g = torch.from_numpy(inverse[sl])
        ys = components(torch.from_numpy(np.asarray(x[sl], dtype=np.float32)))
        for name, sae in saes.items():
            y = ys[name]
            own = sparse_codes(sae, y, chunk_tokens=len(y))
            codes[name][0][sl], codes[name][1][sl] = own.top_indices, own.top_values
            y_hat = own.x_hat(slice(None))
            sums[f"{name}.sse"].index_add_(0, g, (y - y_hat).double().square().sum(1).cpu())
            sums[f"{name}.target_sq"].index_add_(0, g, y.double().square().sum(1).cpu())
            sums[f"{name}.target_sum"].index_add_(0, g, y.double().cpu())
    return codes, {k: v.numpy() for k, v in sums.items()}


def component_fvu(sums: dict[str, np.ndarray], name: str, weights: np.ndarray | None = None) -> np.ndarray:
    """FVU of component ``name``'s SAE on its own target, about the target's mean, from the per-context sums
    (:func:`darkmatter.analysis.stats.pooled_fvu`): [B] for context multiplicities ``weights`` [B, contexts], [1]
    without."""
    from darkmatter.analysis.stats import pooled_fvu

    return pooled_fvu(sums[f"{name}.sse"][:, None], sums["n"], sums[f"{name}.target_sum"],
                      sums[f"{name}.target_sq"], weights)[:, 0]


def error_sae_specs(d_model: int, expansion: int, k: int, seed: int) -> dict[str, SaeSpec]:
    """The TopK spec of each component's SAE (width ``expansion`` × d_model)."""
    spec = SaeSpec(architecture="topk", d_sae=expansion * d_model, k=k, seed=seed)
    return {name: spec for name in COMPONENTS}


def train_error_saes_to_folder(x_train: np.ndarray, x_eval: np.ndarray, contexts: np.ndarray,
                               components: ErrorComponents, base: dict[str, Any], specs: dict[str, SaeSpec],
                               cfg: SaeTrainingConfig, out: str | Path, *, params: Any = None,
                               progress: bool = True, device_info: dict[str, Any] | None = None
                               ) -> dict[str, dict[str, Any]]:
    """Train one SAE per component on ``x_train`` (checkpoints in ``.<name>.ckpt/<component>`` beside ``out``),
    evaluate them on ``x_eval`` (rows of eval ``contexts``), and write the folder of the module docstring. Everything
    runs on the base SAE's device (its provenance record: ``device_info``, darkmatter.device)."""
    device = components.coef.device
    started = time.time()
    out = Path(out)
    ckpt = out.with_name(f".{out.name}.ckpt")
    names = list(specs)
    trainers = [Trainer(component_rows(x_train, components, name), specs[name], cfg,  # type: ignore[arg-type]
                        checkpoint_dir=ckpt / name, device=device) for name in names]
    results = train_jointly(trainers, x_train, components, names, progress=progress)
    trained = time.time()
    saes = {name: r.sae.to(device) for name, r in zip(names, results, strict=True)}  # folded on the CPU
    codes, sums = evaluate(saes, x_eval, contexts, components, progress=progress)
    records = {}
    with atomic_dir(out) as tmp:
        for trainer, result, name in zip(trainers, results, names, strict=True):
            write_trained(trainer, result, tmp / "saes" / name, params, started,
                          extra={"target": name, "base": base, "device": device_info})
            idx, val = codes[name]
            fires = np.bincount(idx[val > 0], minlength=result.sae.d_sae)
            records[name] = {
                "component": name, "sae_id": specs[name].sae_id, "d_sae": result.sae.d_sae, "k": specs[name].k,
                "fvu": float(component_fvu(sums, name)[0]), "l0_mean": float((val > 0).sum(1).mean()),
                "dead_count": int((fires == 0).sum()), "dead_fraction": float((fires == 0).mean()),
                "eval_tokens": int(x_eval.shape[0]), "training_tokens": result.steps * cfg.batch_size,
                "train_final_batch_fvu": float(result.log["fvu"][-1]), **{f"base_{k}": v for k, v in base.items()},
            }
            save_codes(tmp / "codes" / name, idx, val, {"sae_id": specs[name].sae_id, "component": name,
                       "architecture": "topk", "d_sae": result.sae.d_sae, "k": specs[name].k, "rows": len(idx),
                       "width": int(idx.shape[1])}, params, started, device_info)
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sums.items()}, str(tmp / CONTEXT_SUMS))
        write_json(tmp / METRICS, {"components": records, "train_seconds": round(trained - started, 1),
                                   "eval_seconds": round(time.time() - trained, 1)})
        write_provenance(tmp, params, seeds={"sae": specs[names[0]].seed}, started=started,
                         extra={"device": device_info})
    for name, r in records.items():
        log.info("%s SAE: FVU %.4f of its target, L0 %.1f, %d dead", name, r["fvu"], r["l0_mean"], r["dead_count"])
    shutil.rmtree(ckpt, ignore_errors=True)
    return records


def load_sums(folder: str | Path) -> dict[str, np.ndarray]:
    """context_sums.safetensors of an error-SAE folder as float64 arrays."""
    return {k: v.numpy() for k, v in load_safetensors(Path(folder) / CONTEXT_SUMS).items()}

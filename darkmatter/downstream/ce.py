"""Downstream CE of every SAE and of its error parts, on a subset of eval contexts (docs/science.md, experiment 9).

For each batch the clean forward pass runs once; then every condition of every SAE re-runs only the blocks
from the hook onwards (:func:`darkmatter.downstream.splice.splice_losses`). Conditions:

- ``clean``; ``zero`` (zero ablation, the ecosystem's CE-score baseline); ``mean`` (mean ablation);
- per SAE: ``sae`` = Sae(x); ``sae+linear`` = Sae(x) + LinearError(x); ``sae+nonlinear`` = Sae(x) + NonlinearError(x),
- and, in a step of its own for the widest SAE, ``pursuit`` = its gradient-pursuit reconstruction (experiment 10),
- and, in another, for the widest k = 32 SAE, ``sae+nonlinear_from_previous_layer`` = Sae(x) + the part of its
  NonlinearError that the previous layer's SAE predicts, and ``sae+linear+nonlinear_from_previous_layer`` = that plus
  LinearError(x) (experiment 11; :func:`measure_sources_ce_to_folder`),

with LinearError(x) = x·b* + c (the fitted map of ``darkmatter.errors.decompose``) and NonlinearError = x − Sae(x) − LinearError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.downstream.contexts import spliced_contexts
from darkmatter.downstream.splice import (
    Conditioned,
    ce_loss_score,
    mean_ablation,
    percent_recovered,
    splice_losses,
    zero_ablation,
)
from darkmatter.io import load_npy, load_safetensors
from darkmatter.precision import autocast

log = logging.getLogger(__name__)

SAE_CONDITIONS = ("sae", "sae+linear", "sae+nonlinear")
SOURCE_CONDITION = "sae+nonlinear_from_previous_layer"
SOURCE_CONDITION_WITH_LINEAR = "sae+linear+nonlinear_from_previous_layer"
SOURCE_MAP = "nonlinear_map.safetensors"
GLOBAL_CONDITIONS = ("clean", "zero", "mean")


@dataclass(frozen=True)
class SplicedSae:
    """An SAE's reconstruction function and its fitted linear error map ``LinearError(x) = x @ coef + intercept``."""

    reconstruct: Callable[[Tensor], Tensor]  # x [N, d] -> x_hat [N, d]
    coef: Tensor  # [d, d]
    intercept: Tensor  # [d]


def _flat(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Apply a map of [N, d] rows (x and any further activations) to [B, T, d] activations in float32, outside any
    autocast: an SAE and b* are applied in the precision they were fitted in, whatever precision the model runs in."""
    def flat(x: Tensor, *others: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return fn(*(a.reshape(-1, a.shape[-1]).float() for a in (x, *others))).reshape(x.shape)

    return flat


def conditions(saes: Mapping[str, SplicedSae], mean: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """Every replacement to splice, keyed ``"<condition>"`` or ``"<sae_id>|<condition>"``."""
    out: dict[str, Callable[[Tensor], Tensor]] = {"zero": zero_ablation, "mean": mean_ablation(mean)}
    for sae_id, s in saes.items():
        def linear(x, s=s):
            return x @ s.coef + s.intercept

        out[f"{sae_id}|sae"] = _flat(s.reconstruct)
        out[f"{sae_id}|sae+linear"] = _flat(lambda x, s=s, linear=linear: s.reconstruct(x) + linear(x))
        out[f"{sae_id}|sae+nonlinear"] = _flat(lambda x, linear=linear: x - linear(x))
    return out


def measure_ce(model: torch.nn.Module, tokens: np.ndarray, contexts: np.ndarray, hook: str, min_pos: int,
               reps: Mapping[str, Callable[[Tensor], Tensor] | Conditioned], batch_contexts: int = 2,
               autocast_bf16: bool = False, progress: bool = True) -> pl.DataFrame:
    """Per-token CE and KL(clean ‖ spliced) for the clean pass and every replacement in ``reps`` (keyed
    ``"<condition>"`` or ``"<sae_id>|<condition>"``, e.g. :func:`conditions`) on the chosen eval ``contexts``;
    ``autocast_bf16``: the model runs under bf16 autocast, as the activations were harvested (so the SAEs and b*
    meet the activations they were fitted on).

    The model runs on its own device (the replacements must live there too); CE and KL come to the CPU per batch.
    Returns a long table: sae_id ('' for global conditions), condition, context, position, ce, kl (nats).
    """
    on = next(model.parameters()).device
    frames = []
    bar = tqdm(total=len(contexts) * tokens.shape[1], unit="tok", unit_scale=True, disable=not progress,
               desc="splice CE")
    with torch.inference_mode():
        for start in range(0, len(contexts), batch_contexts):
            ctx = contexts[start : start + batch_contexts]
            ids = torch.from_numpy(tokens[ctx].astype(np.int64)).to(on)
            with autocast(autocast_bf16, on.type):
                res = splice_losses(model, ids, hook, min_pos, reps)
            n_pos = res.ce["clean"].shape[1]
            positions = np.tile(np.arange(min_pos, min_pos + n_pos, dtype=np.int32), len(ctx))
            ctx_col = np.repeat(ctx.astype(np.int32), n_pos)
            for key, ce in res.ce.items():
                sae_id, _, cond = key.rpartition("|")
                frames.append(pl.DataFrame({
                    "sae_id": sae_id, "condition": cond, "context": ctx_col, "position": positions,
                    "ce": ce.reshape(-1).cpu().numpy(), "kl": res.kl[key].reshape(-1).cpu().numpy(),
                }))
            bar.update(ids.numel())
    bar.close()
    return pl.concat(frames)


def summarize_ce(per_token: pl.DataFrame) -> pl.DataFrame:
    """Mean CE/KL per SAE and condition, with the SAE-independent conditions attached to every SAE row.

    Columns: sae_id, ce_clean, ce_zero, ce_mean, ce_sae, ce_sae_linear, ce_sae_nonlinear, kl_sae, ...,
    percent_recovered_linear, percent_recovered_nonlinear, ce_loss_score (zero-ablation baseline).
    """
    means = per_token.group_by("sae_id", "condition").agg(pl.col("ce").mean(), pl.col("kl").mean())
    glob = {r["condition"]: r for r in means.filter(pl.col("sae_id") == "").iter_rows(named=True)}
    rows = []
    for sae_id in sorted(set(means["sae_id"]) - {""}):
        per = {r["condition"]: r for r in means.filter(pl.col("sae_id") == sae_id).iter_rows(named=True)}
        row = {"sae_id": sae_id}
        for cond, r in sorted({**glob, **per}.items()):
            name = cond.replace("+", "_")
            row[f"ce_{name}"] = r["ce"]
            row[f"kl_{name}"] = r["kl"]
        for part in ("linear", "nonlinear"):
            row[f"percent_recovered_{part}"] = percent_recovered(row["ce_sae"], row[f"ce_sae_{part}"],
                                                                 row["ce_clean"])
        row["ce_loss_score"] = ce_loss_score(row["ce_zero"], row["ce_sae"], row["ce_clean"])
        rows.append(row)
    return pl.DataFrame(rows)


def _write_ce(out: Path, table: pl.DataFrame, summary: pl.DataFrame | None, params: Any, started: float,
              autocast_bf16: bool, device_info: dict[str, Any] | None,
              arrays: Mapping[str, dict[str, Tensor]] | None = None, extra: dict[str, Any] | None = None) -> None:
    """token_ce.parquet, the summary, any ``arrays`` (file name → tensors, safetensors) and provenance (with any
    ``extra`` entries), atomically."""
    from safetensors.torch import save_file

    from darkmatter.io import atomic_dir
    from darkmatter.provenance import write_provenance

    with atomic_dir(out) as tmp:
        table.write_parquet(tmp / "token_ce.parquet")
        if summary is not None:
            summary.write_parquet(tmp / "summary.parquet")
        for name, tensors in (arrays or {}).items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / name))
        write_provenance(tmp, params, started=started,
                         extra={"model_autocast_bf16": autocast_bf16, "device": device_info, **(extra or {})})


def measure_ce_to_folder(model_path: str, tokens_path: Path, errors: Path, hook: str, sae_dirs: Sequence[str],
                         out: Path, *, contexts: int, batch_contexts: int, min_pos: int, seed: int = 0,
                         autocast_bf16: bool = False, params: Any = None, device: torch.device | str = "cpu",
                         device_info: dict[str, Any] | None = None, cache: Path | None = None) -> None:
    """The ``measure_ce`` step: load the model, the SAEs and their linear maps (``errors`` = the hook's folder of
    darkmatter.errors.measure) on ``device``; write token_ce.parquet + summary.parquet into ``out`` (provenance with
    ``device_info``, darkmatter.device). With a ``cache`` folder (darkmatter.downstream.cache), an SAE whose rows it
    holds for this setting and clean pass is not spliced again, and every SAE spliced is added to it."""
    from darkmatter.data.models import load_model
    from darkmatter.downstream.cache import CeCache
    from darkmatter.errors.measure import DESIGN, LINEAR_MAP
    from darkmatter.regression import load_moments
    from darkmatter.sae.formats import load_sae

    started = time.time()
    model, _ = load_model(model_path, device=device)
    tokens = load_npy(tokens_path)
    design = load_moments(Path(errors) / DESIGN)
    # mean ablation: the eval mean of x over the scored positions, from the decomposition's float64 x moments
    mean = torch.from_numpy((design["fit"] + design["test"]).mean.astype(np.float32)).to(device)
    saes, keys = {}, {}
    chosen = spliced_contexts(tokens_path, len(tokens), contexts, seed)
    store = CeCache.for_run(cache, model_path=model_path, contexts=chosen, min_pos=min_pos,
                            batch_contexts=batch_contexts, autocast_bf16=autocast_bf16, device=device) if cache else None
    for sae_dir in sae_dirs:
        sae_id = Path(sae_dir).name
        sae, lin = load_sae(sae_dir, device), load_safetensors(Path(errors) / sae_id / LINEAR_MAP, device=str(device))
        saes[sae_id] = SplicedSae(lambda v, sae=sae: sae(v).x_hat, lin["coef"], lin["intercept"])
        if store is not None:
            keys[sae_id] = store.key(sae_id, Path(sae_dir), Path(errors) / sae_id / LINEAR_MAP)

    def splice(ids: Sequence[str]) -> pl.DataFrame:
        return measure_ce(model, tokens, chosen, hook, min_pos, conditions({i: saes[i] for i in ids}, mean),
                          batch_contexts=batch_contexts, autocast_bf16=autocast_bf16)

    table, reused = store.splice_missing(keys, splice) if store is not None else (splice(list(saes)), [])
    table = table.sort("sae_id", "condition", "context", "position")  # one order, cached or not
    _write_ce(out, table, summarize_ce(table), params, started, autocast_bf16, device_info,
              extra={"ce_cache": {"folder": str(cache), "reused": reused}} if cache else None)
    log.info("CE on %d contexts for %d SAEs (%d of them from the cache) in %.0f s", len(chosen), len(saes),
             len(reused), time.time() - started)


def measure_pursuit_ce_to_folder(model_path: str, tokens_path: Path, sae_dir: str, hook: str, out: Path, *,
                                 contexts: int, batch_contexts: int, min_pos: int, seed: int = 0,
                                 l0_multiple: int = 1, l0: int | None = None, autocast_bf16: bool = False,
                                 params: Any = None, device: torch.device | str = "cpu",
                                 device_info: dict[str, Any] | None = None) -> None:
    """The ``measure_pursuit_ce`` step: CE and KL with one SAE's gradient-pursuit reconstruction spliced in
    (condition ``pursuit``; darkmatter.errors.pursuit) on the contexts of ``measure_ce``; writes token_ce.parquet
    (its clean rows equal measure_ce's) into ``out``."""
    from darkmatter.data.models import load_model
    from darkmatter.errors.pursuit import pursuit_reconstruction
    from darkmatter.sae.formats import load_sae

    started = time.time()
    model, _ = load_model(model_path, device=device)
    tokens = load_npy(tokens_path)
    fn = pursuit_reconstruction(load_sae(sae_dir, device), l0_multiple=l0_multiple, l0=l0)
    chosen = spliced_contexts(tokens_path, len(tokens), contexts, seed)
    table = measure_ce(model, tokens, chosen, hook, min_pos, {f"{Path(sae_dir).name}|pursuit": _flat(fn)},
                       batch_contexts=batch_contexts, autocast_bf16=autocast_bf16)
    _write_ce(out, table, None, params, started, autocast_bf16, device_info)
    log.info("pursuit CE on %d contexts for %s in %.0f s", len(chosen), Path(sae_dir).name, time.time() - started)


def measure_sources_ce_to_folder(model_path: str, tokens_path: Path, errors: Path, activations: Path, hook: str,
                                 sae_dir: str, codes_dir: str, source_hook: str, source_sae_dir: str,
                                 source_codes_dir: str, out: Path, *, contexts: int, batch_contexts: int,
                                 min_pos: int, seed: int = 0, autocast_bf16: bool = False, params: Any = None,
                                 device: torch.device | str = "cpu", device_info: dict[str, Any] | None = None) -> None:
    """The ``measure_sources_ce`` step: how much CE does the part of an SAE's NonlinearError that an earlier layer's
    SAE predicts recover?

    Fits NonlinearError(x) ≈ SourceSae(x_source)·W + c (affine, on the decomposition's fit rows of the eval split,
    from both SAEs' stored codes: darkmatter.errors.sources), then splices Sae(x) + SourceSae(x_source)·W + c
    (:data:`SOURCE_CONDITION`) and the same plus LinearError(x) (:data:`SOURCE_CONDITION_WITH_LINEAR`) at ``hook``
    on the contexts of ``measure_ce``, x_source being the clean pass's activation at ``source_hook``. Writes
    token_ce.parquet (its clean rows equal measure_ce's) and the map W, c (nonlinear_map.safetensors) into ``out``."""
    from darkmatter.data.activations import ActivationStore
    from darkmatter.data.models import load_model
    from darkmatter.errors.measure import LINEAR_MAP, SPLIT
    from darkmatter.errors.sources import component_rows, fit_on, reconstruction_rows
    from darkmatter.sae.codes import load_codes
    from darkmatter.sae.formats import load_sae

    started = time.time()
    store = ActivationStore(activations)
    x = store.activations(hook)
    sae, source = load_sae(sae_dir), load_sae(source_sae_dir)
    sae_id = Path(sae_dir).name
    lin = load_safetensors(Path(errors) / sae_id / LINEAR_MAP)
    b, b0 = lin["coef"].float(), lin["intercept"].float()
    target = component_rows(x, load_codes(codes_dir, sae), b, b0, ("nonlinear_error",))
    fit = fit_on(reconstruction_rows(load_codes(source_codes_dir, source), len(x)), target,
                 load_npy(Path(errors) / SPLIT))
    coef = torch.from_numpy(fit.coef.astype(np.float32)).to(device)
    intercept = torch.from_numpy(fit.intercept.astype(np.float32)).to(device)
    sae, source, b, b0 = sae.to(device), source.to(device), b.to(device), b0.to(device)

    def spliced(v: Tensor, v_source: Tensor) -> Tensor:
        return sae(v).x_hat + torch.addmm(intercept, source(v_source).x_hat, coef)

    def spliced_with_linear(v: Tensor, v_source: Tensor) -> Tensor:
        return spliced(v, v_source) + torch.addmm(b0, v, b)

    model, _ = load_model(model_path, device=device)
    tokens = load_npy(tokens_path)
    chosen = spliced_contexts(tokens_path, len(tokens), contexts, seed)
    reps = {f"{sae_id}|{condition}": Conditioned(_flat(fn), (source_hook,))
            for condition, fn in ((SOURCE_CONDITION, spliced), (SOURCE_CONDITION_WITH_LINEAR, spliced_with_linear))}
    table = measure_ce(model, tokens, chosen, hook, min_pos, reps, batch_contexts=batch_contexts,
                       autocast_bf16=autocast_bf16)
    _write_ce(out, table, None, params, started, autocast_bf16, device_info,
              arrays={SOURCE_MAP: {"coef": coef.cpu(), "intercept": intercept.cpu()}})
    log.info("CE of %s + its NonlinearError predicted from %s on %d contexts in %.0f s", sae_id, source_hook,
             len(chosen), time.time() - started)

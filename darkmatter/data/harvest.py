"""Harvest activations at hook points into memmapped stores (layout and reader: darkmatter.data.activations).

The forward pass stops right after the last hooked module when loss is not needed. A harvest writes into a
hidden partial folder, records its progress after every batch, resumes from there when rerun after an
interruption, and renames the folder into place only when complete. The progress record (and the losses so far)
sit beside the partial folder, not in it, so that they outlive its rename: a harvest killed at any moment before
the rename, even after its last batch, resumes instead of starting again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from darkmatter.data.models import hook_module, logits_from_hidden, output_tensor
from darkmatter.io import atomic_file, load_npy, read_json, write_json
from darkmatter.precision import autocast
from darkmatter.provenance import write_provenance

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised inside a forward hook once every requested activation has been captured."""


@contextlib.contextmanager
def capture(model: torch.nn.Module, hooks: list[str], min_pos: int = 0, stop: bool = False):
    """Capture ``{hook: activation[:, min_pos:, :]}`` during a forward pass; optionally stop after the last one.

    Use as ``with capture(model, hooks, stop=True) as acts: run_forward(model, ids)``; when ``stop`` is set,
    the forward pass is aborted (and the exception swallowed) as soon as every hook has fired.
    """
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def make(name: str):
        def fn(_module, _inputs, output):
            acts[name] = output_tensor(output)[:, min_pos:, :].detach()
            if stop and len(acts) == len(hooks):
                raise _StopForward

        return fn

    for name in hooks:
        handles.append(hook_module(model, name).register_forward_hook(make(name)))
    try:
        yield acts
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def next_token_loss(model: torch.nn.Module, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """Per-token next-token CE (nats, float32) for positions ``start .. T-2``; shape [B, T-1-start].

    The LM head runs only on the positions that are kept (the unembedding is ~20% of a small model's FLOPs).
    """
    hidden = model.base_model(input_ids=input_ids).last_hidden_state[:, start:-1]
    logits = logits_from_hidden(model, hidden)
    targets = input_ids[:, start + 1 :].long()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@dataclass(frozen=True)
class HarvestSpec:
    hooks: tuple[str, ...]
    min_pos: int
    batch_contexts: int
    autocast_bf16: bool
    with_loss: bool


def harvest(model: torch.nn.Module, tokens: np.ndarray, spec: HarvestSpec, out: Path, params: dict | None = None,
            progress: bool = True, precision: dict | None = None, device_info: dict | None = None) -> Path:
    """Run ``model`` over ``tokens [n_contexts, context_size]`` and write the store folder ``out``.

    The forward passes run on the model's device; each batch's activations and losses come to the CPU only to be
    written. Resumes a partial harvest of the same ``params`` left by an interrupted run. ``precision``, ``device_info``:
    the resolved precision and device records (darkmatter.precision, darkmatter.device) written to meta.json and
    provenance.json.
    """
    started = time.time()
    on = next(model.parameters()).device
    out = Path(out)
    n_ctx, ctx = tokens.shape
    keep = ctx - spec.min_pos
    rows = n_ctx * keep
    partial = out.with_name(f".{out.name}.partial")
    state_path = out.with_name(f".{out.name}.progress.json")
    loss_path = out.with_name(f".{out.name}.loss.npy")
    key = {"params": params, "shape": [n_ctx, ctx], "spec": spec.__dict__ | {"hooks": list(spec.hooks)}}
    done = 0
    if partial.is_dir() and state_path.is_file() and read_json(state_path).get("key") == key:
        done = read_json(state_path)["done_contexts"]
        log.info("resuming the harvest of %s at context %d/%d", out, done, n_ctx)
    else:
        shutil.rmtree(partial, ignore_errors=True)
        state_path.unlink(missing_ok=True)
        loss_path.unlink(missing_ok=True)
        partial.mkdir(parents=True)
    ids_all = torch.from_numpy(tokens.astype(np.int64))
    stores: dict[str, _RowWriter] = {}
    losses = np.full((n_ctx, keep), np.nan, dtype=np.float32)
    if done and spec.with_loss:
        losses[:done] = load_npy(loss_path)[:done]

    bar = tqdm(total=n_ctx * ctx, initial=done * ctx, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {out.name}")
    try:
        with torch.inference_mode():
            for start in range(done, n_ctx, spec.batch_contexts):
                stop = min(start + spec.batch_contexts, n_ctx)
                ids = ids_all[start:stop].to(on)
                with autocast(spec.autocast_bf16, on.type), capture(model, list(spec.hooks), spec.min_pos,
                                                            stop=not spec.with_loss) as acts:
                    if spec.with_loss:
                        losses[start:stop, : keep - 1] = next_token_loss(model, ids, spec.min_pos).cpu().numpy()
                    else:
                        model.base_model(input_ids=ids)
                for hook in spec.hooks:
                    a = acts[hook].float().cpu().numpy().reshape(-1, acts[hook].shape[-1])
                    if hook not in stores:
                        stores[hook] = _RowWriter(partial / f"{hook}.npy", rows, a.shape[-1], create=not done)
                    stores[hook].write(start * keep, a)
                if spec.with_loss:  # atomically: a kill while saving must not spoil the losses already recorded
                    with atomic_file(loss_path) as tmp, open(tmp, "wb") as f:
                        np.save(f, losses)
                # Written data sits in the page cache, so it survives a killed process: record progress now.
                write_json(state_path, {"key": key, "done_contexts": stop})
                bar.update((stop - start) * ctx)
    finally:
        bar.close()
        for w in stores.values():
            w.close()
    d_models = {hook: load_npy(partial / f"{hook}.npy", mmap=True).shape[1] for hook in spec.hooks}

    positions = np.arange(spec.min_pos, ctx, dtype=np.int32)
    index = pl.DataFrame({
        "row": np.arange(rows, dtype=np.int64),
        "context": np.repeat(np.arange(n_ctx, dtype=np.int32), keep),
        "position": np.tile(positions, n_ctx),
        "token_id": tokens[:, spec.min_pos :].reshape(-1).astype(np.int32),
        "loss": losses.reshape(-1) if spec.with_loss else np.full(rows, np.nan, dtype=np.float32),
    })
    index.write_parquet(partial / "index.parquet")
    write_json(partial / "meta.json", {
        "hooks": list(spec.hooks), "d_model": d_models, "n_contexts": n_ctx, "context_size": ctx,
        "min_pos": spec.min_pos, "rows": rows, "with_loss": spec.with_loss, "dtype": "float32",
        "autocast_bf16": spec.autocast_bf16, "precision": precision, "device": device_info,
    })
    write_provenance(partial, params, started=started, extra={"precision": precision, "device": device_info})
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    state_path.unlink()  # a kill before this leaves a record that the next run ignores (no partial folder)
    loss_path.unlink(missing_ok=True)
    return out


class _RowWriter:
    """Writes row blocks into a preallocated float32 ``.npy`` file with positional writes.

    Cheaper than a memmap whose ``flush()`` (msync) walks the whole multi-GB mapping after every batch.
    """

    def __init__(self, path: Path, rows: int, cols: int, create: bool):
        if create:  # writes the header and sizes the (sparse) file; the mapping is dropped at once
            np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, cols))
        self.offset = path.stat().st_size - rows * cols * 4  # the .npy header length
        self.cols = cols
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block, dtype=np.float32)
        os.pwrite(self.fd, data.tobytes(), self.offset + row * self.cols * 4)

    def close(self) -> None:
        os.close(self.fd)

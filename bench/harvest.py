"""Harvest throughput vs its limit and vs the naive approach, measured in one run (fp32 and bf16).

(a) the limit: a bare forward pass over the same batches with the blocks after the last hooked one removed;
(b) the naive user: the model's ordinary full forward pass (all blocks + logits) with forward hooks.
Ours: :func:`darkmatter.data.harvest.harvest` itself, writing its memmapped store (every hook, float32: with the
default's four hooks, 4 × d_model × 4 bytes per token). Trials are interleaved (ours, a, b, ours, a, b, ...) and
medians reported, because the machine's 2 cores are noisy.

    python -m bench.harvest [--model results/default/model/hf] [--hooks H ...] [--contexts 8] [--repeats 3]
                            [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from darkmatter.config import HarvestConfig, hook_layer
from darkmatter.data.harvest import HarvestSpec, capture, harvest
from darkmatter.data.models import blocks, load_model


def bare_early_stop(model, ids: torch.Tensor, hooks: list[str], batch: int) -> None:
    layers = blocks(model)
    keep = max(hook_layer(h) for h in hooks) + 1
    base = model.base_model
    base.layers = torch.nn.ModuleList(list(layers)[:keep])
    try:
        for start in range(0, len(ids), batch):
            base(input_ids=ids[start : start + batch])
    finally:
        base.layers = layers


def naive_full_forward(model, ids: torch.Tensor, hooks: list[str], batch: int) -> None:
    for start in range(0, len(ids), batch):
        with capture(model, hooks) as acts:
            model(ids[start : start + batch])
        for h in hooks:
            acts[h].float().numpy().copy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/default/model/hf")
    ap.add_argument("--hooks", nargs="+", default=list(HarvestConfig().hooks), help="default: the default run's")
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--context-size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                    help="bf16 only where the CPU has it (AVX-512 BF16): elsewhere it is ~40x slower")
    ap.add_argument("--out", default="bench/out/harvest.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_model(args.model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, model.config.vocab_size, size=(args.contexts, args.context_size), dtype=np.int32)
    tokens[:, 0] = 1
    ids = torch.from_numpy(tokens.astype(np.int64))
    n_tok = tokens.size
    results: dict[str, dict[str, float]] = {}
    for bf16 in (p == "bf16" for p in args.precisions):
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        spec = HarvestSpec(tuple(args.hooks), 1, args.batch, bf16, with_loss=False)
        times: dict[str, list[float]] = {"ours": [], "bare_early_stop": [], "naive_full_forward": []}
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats + 1):  # the first round warms up and is discarded
                for name in times:
                    t0 = time.perf_counter()
                    if name == "ours":
                        harvest(model, tokens, spec, Path(tmp) / f"h{rep}", progress=False)
                    else:
                        with torch.inference_mode(), amp:
                            fn = bare_early_stop if name == "bare_early_stop" else naive_full_forward
                            fn(model, ids, args.hooks, args.batch)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
        tps = {name: n_tok / statistics.median(t) for name, t in times.items()}
        key = "bf16" if bf16 else "fp32"
        results[key] = {
            **{f"{k}_tok_per_s": round(v) for k, v in tps.items()},
            "ratio_vs_limit": tps["ours"] / tps["bare_early_stop"],
            "ratio_vs_naive": tps["ours"] / tps["naive_full_forward"],
        }
        print(f"{key}: ours {tps['ours']:.0f} tok/s | limit {tps['bare_early_stop']:.0f} | naive "
              f"{tps['naive_full_forward']:.0f} | ours/limit {results[key]['ratio_vs_limit']:.2f} "
              f"(need >= 0.9) | ours/naive {results[key]['ratio_vs_naive']:.2f} (need >= 1.8)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Prefix reuse in splicing vs recomputing the full forward pass per condition, measured in one run.

Conditions: clean + ``--conditions`` replacements at ``blocks.15.hook_resid_post`` (stand-ins with the cost of
Sae(x), Sae(x)+LinearError, Sae(x)+NonlinearError: a dense d×d map each), positions ≥ 200 of 1024-token
contexts, fp32 (the default for loss evaluation). Reports tokens/s of both paths, the ratio, and the largest
per-token CE/KL difference between them.

The issue's setting is 3 conditions; the default experiment's CE analysis splices 9 SAEs × 3 parts + zero and
mean ablation = 29 conditions on one clean pass (``--conditions 29 --contexts 2 --repeats 1``).

Bound: with F = one full forward's blocks, H = one LM head + log-softmax + losses on the scored positions and
S = the blocks after the hook on positions ≥ min_pos, the ratio is (n + 1)(F + H) / (F + H + n(S + H)) for n
conditions; blocks 16–29 on 824 of 1024 positions make S ≈ 0.37 F at best.

    python -m bench.splice [--model results/default/model/hf] [--contexts 4] [--repeats 2] [--conditions 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from darkmatter.data.models import load_model
from darkmatter.downstream.splice import splice_losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="results/default/model/hf")
    ap.add_argument("--hook", default="blocks.15.hook_resid_post")
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context-size", type=int, default=1024)
    ap.add_argument("--min-pos", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--conditions", type=int, default=3)
    ap.add_argument("--out", default="bench/out/splice.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, _ = load_model(args.model)
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    ids = torch.randint(3, model.config.vocab_size, (args.contexts, args.context_size), generator=g)
    ids[:, 0] = 1
    maps = [torch.eye(d) + 0.05 * torch.randn(d, d, generator=g) for _ in range(args.conditions)]
    reps = {f"cond{i}": functools.partial(torch.matmul, other=m) for i, m in enumerate(maps)}
    times: dict[str, list[float]] = {"prefix_reuse": [], "full_recompute": []}
    results: dict[str, dict] = {}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):  # round 0 warms up
            for name in times:
                t0 = time.perf_counter()
                out = [splice_losses(model, ids[s : s + args.batch], args.hook, args.min_pos, reps,
                                     reuse_prefix=name == "prefix_reuse")
                       for s in range(0, args.contexts, args.batch)]
                if rep:
                    times[name].append(time.perf_counter() - t0)
                results[name] = out
    diff_ce = max((a.ce[k] - b.ce[k]).abs().max().item()
                  for a, b in zip(results["prefix_reuse"], results["full_recompute"], strict=True) for k in a.ce)
    diff_kl = max((a.kl[k] - b.kl[k]).abs().max().item()
                  for a, b in zip(results["prefix_reuse"], results["full_recompute"], strict=True) for k in a.kl)
    n_tok = ids.numel()
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    summary = {
        "tok_per_s": {k: round(v) for k, v in tps.items()},
        "ratio": tps["prefix_reuse"] / tps["full_recompute"],
        "max_abs_ce_diff_nats": diff_ce,
        "max_abs_kl_diff_nats": diff_kl,
        "conditions": ["clean", *reps],
    }
    print(f"clean + {args.conditions} conditions: prefix reuse {tps['prefix_reuse']:.0f} tok/s | full recompute "
          f"{tps['full_recompute']:.0f} tok/s | ratio {summary['ratio']:.2f} (issue: >= 1.6 at 3 conditions) | "
          f"max |dCE| {diff_ce:.2e} | max |dKL| {diff_kl:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": summary}, indent=2))


if __name__ == "__main__":
    main()

"""Gradient pursuit: the Gram route (darkmatter.sae.pursuit.gradient_pursuit) vs the literal dense loop, one run.

For each dictionary — a random unit dictionary at each ``--widths`` and, when the default run's SAEs are on disk,
the real decoders of its w8192 and w16384 SAEs (k = 32) — both routes pursue the same ``--tokens`` float32 signals for ``--l0``
iterations. Trials are interleaved (ref, fast, ref, fast, ...) and medians reported, because the machine's 2 cores
are noisy; the Gram matrix DDᵀ is timed separately (it is computed once per SAE and shared by all its tokens).
The outputs are compared: supports equal per token, largest relative reconstruction gap.

The limits, measured in the same run: the Gram route does n·d multiply-adds per token for sDᵀ (a GEMM, against this
machine's float32 GEMM peak) and Σ_t t·n = n·L0(L0+1)/2 for the gradient updates, each of which streams one float of
a support row (the token's L0·n·4 bytes of rows do not fit a 2-core machine's L2, so they stream from L3 at every
iteration): against the read bandwidth of a buffer of that size, each thread its own, measured with a compiled sum.

Peer, when installed: dictionary_learning's ``grad_pursuit`` (``pip install --no-deps dictionary-learning==0.1.0``;
its package ``__init__`` imports nnsight, so its ``grad_pursuit.py`` is loaded from the file). It keeps an atom in
the support once selected, even after its weight is clipped to 0, where the algorithm here (and the paper's
description) restricts the gradient to {w ≠ 0} ∪ {new}; its supports therefore differ on tokens where a clip happens.

    python -m bench.pursuit [--widths 9216 16384] [--tokens 256] [--l0 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numba
import numpy as np
import torch

from darkmatter.sae.formats import load_sae
from darkmatter.sae.pursuit import gradient_pursuit, gradient_pursuit_reference

SAES = Path("results/default/saes/blocks.15.hook_resid_post")
REAL_WIDTHS = (8192, 16384)  # the default run's k = 32 SAEs of these widths, when on disk


def dictionaries(widths: list[int], d: int) -> dict[str, torch.Tensor]:
    """Random unit dictionaries of each width, and the default run's decoders (:data:`REAL_WIDTHS`) when present."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in widths:
        D = torch.randn(n, d, generator=g)
        out[f"random-w{n}"] = D / D.norm(dim=1, keepdim=True)
    for n in REAL_WIDTHS:
        path = SAES / f"topk-w{n}-k32-s0"
        if path.is_dir():
            out[f"default-sae-w{n}"] = load_sae(path).W_dec.detach().float()
    return out


def dictionary_learning_peer():
    """dictionary_learning's ``grad_pursuit(signal [b, d], dictionary [d, n], target_l0)``, or None if absent."""
    spec = importlib.util.find_spec("dictionary_learning")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "grad_pursuit.py"
    module_spec = importlib.util.spec_from_file_location("_dl_grad_pursuit", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.grad_pursuit


def gemm_peak(repeats: int = 5) -> float:
    """float32 GFLOP/s of a [2048, 576] × [576, 8192] product on the current threads (median of ``repeats``)."""
    a, b = torch.randn(2048, 576), torch.randn(576, 8192)
    out = torch.empty(2048, 8192)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2 * 2048 * 576 * 8192 / statistics.median(times) / 1e9


@numba.njit(parallel=True, fastmath=True, cache=True)  # fastmath: the sum may be reordered, hence vectorised
def _stream(buffers, passes):  # pragma: no cover - compiled
    total = np.zeros(buffers.shape[0])
    for p in numba.prange(buffers.shape[0]):
        acc = 0.0
        for _ in range(passes):
            for q in range(buffers.shape[1]):
                acc += buffers[p, q]
        total[p] = acc
    return total


def stream_bandwidth(nbytes: int, threads: int, passes: int = 200) -> float:
    """GB/s of reading, on each of ``threads`` threads, its own float32 buffer of ``nbytes`` again and again (the
    support rows a token streams at each iteration)."""
    buffers = np.random.default_rng(0).random((threads, nbytes // 4), dtype=np.float32)
    _stream(buffers, 1)
    t0 = time.perf_counter()
    _stream(buffers, passes)
    return buffers.nbytes * passes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[9216, 16384])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out/pursuit.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, 2 threads, float32, {args.tokens} tokens, "
          f"L0 = {args.l0}")
    peer = dictionary_learning_peer()
    if peer is None:
        print("dictionary_learning is not installed: its grad_pursuit is left out of this run")
    peak = gemm_peak()
    print(f"float32 GEMM peak {peak:.0f} GFLOP/s (2 threads)")
    results = {}
    for name, D in dictionaries(args.widths, args.d).items():
        x = torch.randn(args.tokens, D.shape[1], generator=torch.Generator().manual_seed(1)) * 2
        b_dec = torch.zeros(D.shape[1])
        t0 = time.perf_counter()
        gram = D @ D.T
        gram_s = time.perf_counter() - t0
        contenders = ["reference", "gram_route"] + (["dictionary_learning"] if peer is not None else [])
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeats):
            if peer is not None:
                t0 = time.perf_counter()
                w_peer = peer(x - b_dec, D.T.contiguous(), target_l0=args.l0)
                times["dictionary_learning"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            w_ref = gradient_pursuit_reference(x, D, b_dec, args.l0)
            times["reference"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fast = gradient_pursuit(x, D, b_dec, args.l0, gram=gram)  # the Gram is shared by all of an SAE's tokens
            times["gram_route"].append(time.perf_counter() - t0)
        w = torch.zeros_like(w_ref).scatter_add_(1, fast.indices, fast.values)
        gap = ((fast.x_hat - (w_ref @ D + b_dec)).norm(dim=1) / (x - b_dec).norm(dim=1)).max()
        med = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: v / med["gram_route"] for k, v in med.items() if k != "gram_route"}
        results[name] = {"seconds": med, "gram_seconds": gram_s, "ratio": ratios["reference"], "ratios": ratios,
                         "tokens_per_s": {k: args.tokens / v for k, v in med.items()},
                         "same_support_fraction": float((w != 0).eq(w_ref != 0).all(1).float().mean()),
                         "max_relative_gap": float(gap)}
        r = results[name]
        n = D.shape[0]
        rows_bytes = args.l0 * n * 4  # one token's support rows
        bandwidth = stream_bandwidth(rows_bytes, 2)
        gemm_s = args.tokens * n * args.d * 2 / (peak * 1e9)  # sDᵀ at the GEMM peak
        stream_s = args.tokens * n * args.l0 * (args.l0 + 1) / 2 * 4 / (bandwidth * 1e9)  # the rows, streamed
        r |= {"gemm_peak_gflops": peak, "rows_bytes_per_token": rows_bytes, "rows_read_gb_per_s": bandwidth,
              "bound_seconds": gemm_s + stream_s, "share_of_bound": (gemm_s + stream_s) / med["gram_route"],
              "gram_bytes": n * n * 4}
        if peer is not None:
            r["dictionary_learning_same_support_fraction"] = float((w_peer != 0).eq(w_ref != 0).all(1).float().mean())
        print(f"{name:>14}: reference {med['reference']:.2f} s, gram route {med['gram_route']:.2f} s "
              f"(+ Gram {gram_s:.2f} s once per SAE): {r['ratio']:.1f}x; same supports "
              f"{r['same_support_fraction']:.3f}, max relative x_hat gap {r['max_relative_gap']:.1e}", flush=True)
        if peer is not None:
            print(f"{'':>14}  dictionary_learning {med['dictionary_learning']:.2f} s: gram route "
                  f"{ratios['dictionary_learning']:.1f}x faster; its supports equal the reference's on "
                  f"{r['dictionary_learning_same_support_fraction']:.3f} of tokens", flush=True)
        print(f"{'':>14}  bound {gemm_s + stream_s:.3f} s (sDᵀ at the GEMM peak {gemm_s:.3f} s + support rows "
              f"{rows_bytes / 2**20:.1f} MiB per token read at {bandwidth:.0f} GB/s {stream_s:.3f} s): "
              f"{100 * r['share_of_bound']:.0f}% of it; Gram {n * n * 4 / 2**30:.2f} GiB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

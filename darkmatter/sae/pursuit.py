"""Gradient pursuit: inference-time refinement of an SAE's codes with its own dictionary.

The decoder rows W_dec [n, d] are the atoms D; the signal is s = x − b_dec. Per token, starting from w = 0, each
iteration takes r = s − wD and g = rDᵀ, adds argmax(g) (signed, not masked) to the support S = {w ≠ 0} ∪ {new},
restricts the gradient to S (ĝ), steps along c = ĝD by α = ⟨c, r⟩ / ⟨c, c⟩ and clips: w ← max(w + αĝ, 0). A token
runs exactly its L0 iterations (per-token L0 matching: the L0 its SAE's encoder gave it); x̂ = wD + b_dec.

:func:`gradient_pursuit_reference` is that loop written literally (three dense n × d products per iteration): the
oracle of the tests and the benchmark's baseline. :func:`gradient_pursuit` computes the same iterates from sDᵀ (one
GEMM for many tokens) and rows of the Gram matrix G = DDᵀ: g = sDᵀ − wG is updated by the support's Gram rows only,
⟨c, r⟩ = ‖ĝ‖² (since ĝ is g on S) and ⟨c, c⟩ = ĝ G_SS ĝᵀ, so an iteration costs O(|S|·n) instead of O(n·d). That
loop is a compiled kernel (:func:`_pursue`) that runs one token at a time on each thread, so that the token's
support rows stay in the core's caches across its iterations; batched tensor code instead streams every token's
rows from memory at each iteration and is bound by memory bandwidth at about 4× the reference (bench/pursuit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# G = DDᵀ is precomputed when it fits in this many bytes (n = 16384 in float32: 1 GiB); otherwise each atom's Gram
# row is computed (n·d multiply-adds) when it enters a token's support.
GRAM_BYTES = 2**31
# sDᵀ [tokens, n] is formed for this many tokens at a time
GRADIENT_BYTES = 2**27


@dataclass(frozen=True)
class PursuitResult:
    """Codes and reconstruction of N tokens: ``indices`` int64 [N, L] and ``values`` [N, L] (L = the largest L0;
    the atoms in the order they entered the support; padding is index 0 with value 0, and an atom clipped back to 0
    keeps its index with value 0), ``x_hat`` [N, d] = Σ values·W_dec[indices] + b_dec."""

    indices: Tensor
    values: Tensor
    x_hat: Tensor


def _check(x: Tensor, W_dec: Tensor, b_dec: Tensor, l0: int | Tensor) -> Tensor:
    """The per-token L0 [N] int64, after checking shapes and values (one-sentence ValueErrors)."""
    if x.ndim != 2 or W_dec.ndim != 2 or b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"gradient_pursuit: expected x [N, d], W_dec [n, d] and b_dec [d]; got {tuple(x.shape)}, "
                         f"{tuple(W_dec.shape)} and {tuple(b_dec.shape)}.")
    if x.shape[1] != W_dec.shape[1]:
        raise ValueError(f"gradient_pursuit: x has d = {x.shape[1]} but W_dec has d = {W_dec.shape[1]}.")
    if not torch.isfinite(x).all():
        raise ValueError("gradient_pursuit: x contains NaN or infinite values.")
    l0 = torch.as_tensor(l0).long()
    l0 = l0.expand(x.shape[0]) if l0.ndim == 0 else l0
    if l0.shape != (x.shape[0],):
        raise ValueError(f"gradient_pursuit: l0 must be an int or one value per token ({x.shape[0]}); "
                         f"got shape {tuple(l0.shape)}.")
    if len(l0) and (l0.min() < 0 or l0.max() > W_dec.shape[0]):
        raise ValueError(f"gradient_pursuit: l0 must lie in [0, n = {W_dec.shape[0]}]; "
                         f"got {int(l0.min())} to {int(l0.max())}.")
    return l0


def _step(num: Tensor, den: Tensor) -> Tensor:
    """α = ⟨c, r⟩ / ⟨c, c⟩, and 0 where c = 0 (r is orthogonal to every atom: nothing to do)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)


def gradient_pursuit_reference(x: Tensor, W_dec: Tensor, b_dec: Tensor, l0: int | Tensor) -> Tensor:
    """The dense weights w [N, n] of gradient pursuit, the loop of the module docstring written literally."""
    l0 = _check(x, W_dec, b_dec, l0)
    D = W_dec
    s = x - b_dec
    w = torch.zeros(x.shape[0], D.shape[0], dtype=x.dtype)
    for t in range(int(l0.max()) if len(l0) else 0):
        run = (t < l0)[:, None]
        r = s - w @ D
        g = r @ D.T
        support = (w != 0) | F.one_hot(g.argmax(1), D.shape[0]).bool()
        g_hat = torch.where(support, g, 0)
        c = g_hat @ D
        alpha = _step((c * r).sum(1), (c * c).sum(1))
        w = torch.where(run, torch.clamp(w + alpha[:, None] * g_hat, min=0), w)
    return w


def gradient_pursuit(x: Tensor, W_dec: Tensor, b_dec: Tensor, l0: int | Tensor, *, gram: Tensor | None = None,
                     gram_bytes: int = GRAM_BYTES) -> PursuitResult:
    """Gradient pursuit of every row of ``x`` [N, d] with the atoms ``W_dec`` [n, d] after subtracting ``b_dec``
    [d], for ``l0`` iterations (an int, or one per token: the encoder's L0 of each token), in the inputs' dtype
    (float32 or float64). Gives the iterates of :func:`gradient_pursuit_reference` up to rounding. Runs on as many
    threads as torch (``torch.set_num_threads``); the result does not depend on their number.

    ``gram``: W_dec·W_decᵀ [n, n] when the caller already has it (it is shared by every token of an SAE); otherwise
    it is computed here if it fits in ``gram_bytes``, else each atom's Gram row when a token first selects it.

    On a GPU (darkmatter.device) the GEMMs (the Gram matrix, sDᵀ and the decoding) run there, while the per-token
    loop, a compiled CPU kernel, reads their results on the host; the returned tensors are on the inputs' device."""
    l0 = _check(x, W_dec, b_dec, l0).cpu()
    n, d = W_dec.shape
    if x.dtype not in (torch.float32, torch.float64) or W_dec.dtype != x.dtype or b_dec.dtype != x.dtype:
        raise ValueError(f"gradient_pursuit: x, W_dec and b_dec must share one dtype, float32 or float64; got "
                         f"{x.dtype}, {W_dec.dtype} and {b_dec.dtype}.")
    if gram is not None and gram.shape != (n, n):
        raise ValueError(f"gradient_pursuit: gram must be W_dec·W_decᵀ [{n}, {n}]; got {tuple(gram.shape)}.")
    width = int(l0.max()) if len(l0) else 0
    indices = np.zeros((x.shape[0], width), np.int64)
    values = np.zeros((x.shape[0], width), {torch.float32: np.float32, torch.float64: np.float64}[x.dtype])
    if width:
        if gram is None and n * n * x.element_size() <= gram_bytes:
            gram = W_dec @ W_dec.T
        # the kernel reads Gram rows from ``gram``, or (a 0 × n stand-in) computes them from the dictionary
        G = (np.ascontiguousarray(gram.to(x.dtype).cpu().numpy()) if gram is not None
             else np.zeros((0, n), values.dtype))
        D = np.ascontiguousarray(W_dec.detach().cpu().numpy())
        step = max(1, GRADIENT_BYTES // (n * x.element_size()))
        threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        for start in range(0, x.shape[0], step):
            rows = slice(start, start + step)
            grad = ((x[rows] - b_dec) @ W_dec.T).detach().contiguous().cpu().numpy()  # g at w = 0
            _pursue(grad, G, D, l0[rows].numpy(), indices[rows], values[rows], threads)
    idx, val = torch.from_numpy(indices).to(x.device), torch.from_numpy(values).to(x.device)
    decoded = F.embedding_bag(idx, W_dec, per_sample_weights=val, mode="sum") if width else torch.zeros_like(x)
    return PursuitResult(idx, val, decoded + b_dec)


@numba.njit(inline="always", cache=True)
def _argmax(g):  # pragma: no cover - compiled; tested through gradient_pursuit and in test_pursuit
    """np.argmax(g), the first index of the largest value (g holds no NaN: x is checked): the largest value from
    eight interleaved running maxima, then its first index. Measured 2-3× faster than numba's np.argmax, which keeps
    one dependent chain of compare-and-select; the pursuit takes one argmax over all n atoms per iteration."""
    n = g.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = g[0]
    q = 0
    while q + 8 <= n:
        m0 = g[q] if g[q] > m0 else m0
        m1 = g[q + 1] if g[q + 1] > m1 else m1
        m2 = g[q + 2] if g[q + 2] > m2 else m2
        m3 = g[q + 3] if g[q + 3] > m3 else m3
        m4 = g[q + 4] if g[q + 4] > m4 else m4
        m5 = g[q + 5] if g[q + 5] > m5 else m5
        m6 = g[q + 6] if g[q + 6] > m6 else m6
        m7 = g[q + 7] if g[q + 7] > m7 else m7
        q += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for r in range(q, n):
        m = g[r] if g[r] > m else m
    j = 0
    while j < n and g[j] != m:
        j += 1
    return j if j < n else np.argmax(g)  # only a NaN hides m: never read past the end


@numba.njit(parallel=True, cache=True)
def _pursue(g_all, gram, D, l0, idx_out, w_out, threads):  # pragma: no cover - compiled; its iterates are tested
    """The loop of the module docstring for every token (row of ``g_all``, its gradient sDᵀ at w = 0, updated in
    place), one token at a time on each of ``threads`` parallel parts (the result does not depend on their number).
    A token's slots hold its atoms in order of entry (an atom clipped to 0 keeps its slot and may come back), with
    their Gram rows copied from ``gram`` (or computed from ``D`` when ``gram`` has no rows)."""
    N, n = g_all.shape
    width = idx_out.shape[1]
    have_gram = gram.shape[0] == n
    for part in numba.prange(threads):  # contiguous token ranges: each thread allocates its buffers once
        rows = np.empty((width, n), g_all.dtype)
        w = np.zeros(width, g_all.dtype)
        g_hat = np.zeros(width, g_all.dtype)
        delta = np.zeros(width, g_all.dtype)
        idx = np.zeros(width, np.int64)
        moved = np.zeros(width, np.int64)
        for i in range(part * N // threads, (part + 1) * N // threads):
            g = g_all[i]
            w[:] = 0
            idx[:] = 0  # padding slots: index 0, value 0
            filled = 0
            j = _argmax(g)
            for _ in range(l0[i]):
                chosen = filled  # the chosen atom's slot: its own if it has one, else the next free one
                for s in range(filled):
                    if idx[s] == j:
                        chosen = s
                        break
                if chosen == filled:
                    idx[filled] = j
                    if have_gram:
                        rows[filled] = gram[j]
                    else:
                        rows[filled] = D @ D[j]
                    filled += 1
                num = 0.0  # ⟨c, r⟩ = ‖ĝ‖², ĝ = g on S = {w ≠ 0} ∪ {chosen}
                for s in range(filled):
                    g_hat[s] = g[idx[s]] if (w[s] != 0 or s == chosen) else 0
                    num += g_hat[s] * g_hat[s]
                den = 0.0  # ⟨c, c⟩ = ĝ G_SS ĝᵀ
                for a in range(filled):
                    if g_hat[a] != 0:
                        acc = 0.0
                        for b in range(filled):
                            acc += rows[a, idx[b]] * g_hat[b]
                        den += g_hat[a] * acc
                alpha = num / den if den > 0 else 0.0
                m = 0
                for s in range(filled):
                    new = max(w[s] + alpha * g_hat[s], 0.0)
                    delta[s] = new - w[s]
                    w[s] = new
                    if delta[s] != 0:
                        moved[m] = s
                        m += 1
                # g −= Σ_s Δw_s G[idx_s], four rows per pass over g (g is read and written once per four)
                s4 = 0
                while s4 + 4 <= m:
                    a0, a1, a2, a3 = moved[s4], moved[s4 + 1], moved[s4 + 2], moved[s4 + 3]
                    d0, d1, d2, d3 = delta[a0], delta[a1], delta[a2], delta[a3]
                    for q in range(n):
                        g[q] -= d0 * rows[a0, q] + d1 * rows[a1, q] + d2 * rows[a2, q] + d3 * rows[a3, q]
                    s4 += 4
                for s in range(s4, m):
                    d0, a0 = delta[moved[s]], moved[s]
                    for q in range(n):
                        g[q] -= d0 * rows[a0, q]
                j = _argmax(g)
            idx_out[i] = idx
            w_out[i] = w

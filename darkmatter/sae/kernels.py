"""Fast CPU autograd functions for SAE training: sparse TopK encoder/decoder and JumpReLU straight-through estimators.

A top-k SAE step is dominated by the encoder GEMM (2·N·d_in·d_sae FLOPs). A dense autograd implementation runs
five GEMMs of that size (encoder forward and weight gradient; decoder forward, input and weight gradient); here
only the encoder forward is a GEMM, everything else touches the selected (token, latent) pairs only:

- decoder: x_hat = Σ_j acts[j]·W_dec[cols[j]] is an ``embedding_bag`` with per-sample weights (sparsify),
  fused with the squared error so that autograd does not chain elementwise passes over [N, d_in];
- encoder backward: the gradient reaches the pre-activations only at selected entries (nnz = N·k), so
  ∂W_enc[:, i] = Σ_{t selected i} g_t·x_c[row_t] and ∂W_dec[i] = Σ_{t selected i} acts_t·∂x_hat[row_t] are again
  embedding bags, one bag per latent, over the entries sorted by latent (never the dense [N, d_sae] gradient;
  sparsify instead materialises [N·k, d_in] contributions and index_adds them);
- ∂b_dec through x_c = x − b_dec is −W_enc·∂b_enc, a GEMV, because x itself needs no gradient;
- the top-k itself is an exact pyramid of group maxima (:func:`topk_rows`), ~2x cheaper than torch.topk.

Selections are stored flat in CSR order (entries sorted by token), so TopK (k per token) and BatchTopK (a variable
number per token) share the same kernels. AuxK's dead latents are few columns chosen before the step: for them
the encoder returns the dense pre-activation columns and the aux decoder is a small GEMM (embedding bags reach
~3 GFLOP/s here, a GEMM ~80, so dense wins until the dead latents number ~25·k_aux).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_SUM = 0  # embedding_bag mode code for "sum" in the ATen per-sample-weight backward


class Selection:
    """A sparse set of (token, latent) entries in CSR order: ``rows`` non-decreasing.

    rows [nnz] int64; offsets [N] int64 = index of each token's first entry (embedding_bag offsets);
    cols [nnz] int64 = latent of each entry.
    ``by_latent()`` gives the same entries grouped by latent (cached; both backward passes reuse it).
    """

    def __init__(self, rows: Tensor, offsets: Tensor, cols: Tensor, d_sae: int):
        self.rows, self.offsets, self.cols, self.d_sae = rows, offsets, cols, d_sae
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def nnz(self) -> int:
        return self.cols.numel()

    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order [nnz], rows[order] [nnz], latent_offsets [d_sae]): ``cols[order]`` is sorted (stable), so the
        entries of latent i are order[latent_offsets[i] : latent_offsets[i + 1]]."""
        if self._by_latent is None:
            self._by_latent = _group_by(self.cols, self.rows, self.d_sae)
        return self._by_latent


# Index bookkeeping on the nnz entries runs in numpy on the CPU: single-threaded, it costs well under a millisecond,
# while each tiny parallel torch op waits for both cores (milliseconds when the machine is shared). On a GPU
# (darkmatter.device) the same bookkeeping runs as torch ops where the tensors are, with the same results (a
# stable sort and counts are unique), instead of a round trip to the host every step.


def on_host(t: Tensor) -> bool:
    """Whether ``t`` lives in host memory, where the bookkeeping runs in numpy (the one test of that choice)."""
    return t.device.type == "cpu"


def _group_by(keys: Tensor, rows: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable argsort of ``keys`` (values in [0, n)), ``rows`` in that order and each key's start offset."""
    if not on_host(keys):
        return _group_by_torch(keys, rows, n)
    k = keys.numpy()
    # numpy's stable sort is a radix sort for 16-bit keys: ~20x faster than a comparison sort of int64
    order = np.argsort(k.astype(np.uint16) if n <= 2**16 else k, kind="stable")
    counts = np.bincount(k, minlength=n)
    offsets = np.cumsum(counts) - counts
    return (torch.from_numpy(order.astype(np.int64)), torch.from_numpy(np.take(rows.numpy(), order)),
            torch.from_numpy(offsets.astype(np.int64)))


def _group_by_torch(keys: Tensor, rows: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_group_by` in torch ops, on the tensors' device."""
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=n)
    return order, rows[order], torch.cumsum(counts, 0) - counts


def _csr(rows: Tensor, n_rows: int) -> Tensor:
    if not on_host(rows):
        return _csr_torch(rows, n_rows)
    counts = np.bincount(rows.numpy(), minlength=n_rows)
    return torch.from_numpy((np.cumsum(counts) - counts).astype(np.int64))


def _csr_torch(rows: Tensor, n_rows: int) -> Tensor:
    """:func:`_csr` in torch ops, on the tensor's device."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def topk_rows(x: Tensor, k: int, group: int = 8) -> tuple[Tensor, Tensor]:
    """Exact per-row top-k values and indices of x [N, n] (unsorted), ~2x cheaper than torch.topk for n >> k.

    torch's CPU topk spends ~15 ns per element (it copies each row into (value, index) pairs). Instead, build a
    pyramid of group maxima (level l+1 = max over ``group`` strided columns of level l, one vectorised pass),
    take the top k at the small top level and descend: the k groups with the largest maxima contain every
    value of the row's top k (at most k groups hold a value above the k-th largest, and every group holding one
    outranks every group that does not), so each level only inspects k·group candidates. Values equal
    torch.topk's exactly, ties included; with tied values the chosen indices may differ.
    """
    n_rows, n = x.shape
    levels = [x]
    while levels[-1].shape[1] % group == 0 and levels[-1].shape[1] // group >= 2 * k:
        width = levels[-1].shape[1] // group
        levels.append(levels[-1].reshape(n_rows, group, width).amax(1))  # column j of the next level: max of j + m·width
    vals, idx = levels[-1].topk(k, dim=1, sorted=False)
    for level in range(len(levels) - 2, -1, -1):
        width = levels[level + 1].shape[1]
        cand = (idx[:, :, None] + width * torch.arange(group, device=x.device)).view(n_rows, k * group)
        vals, pick = levels[level].gather(1, cand).topk(k, dim=1, sorted=False)
        idx = cand.gather(1, pick)
    return vals, idx


# ---------------------------------------------------------------------------------------------- selections


def _widen(vals: Tensor) -> Tensor:
    """Selected values in at least float32 (after a bf16 GEMM: its rounded pre-activations, widened)."""
    return vals.float() if vals.dtype in (torch.bfloat16, torch.float16) else vals


@functools.lru_cache(maxsize=8)
def _fixed_rows(n_tok: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """rows and offsets of a selection with exactly k entries per token (read-only, shared between steps)."""
    return (torch.arange(n_tok, device=device).repeat_interleave(k),
            torch.arange(0, n_tok * k, k, device=device))


def topk_select(pre: Tensor, k: int) -> tuple[Selection, Tensor]:
    """Top k pre-activations of every token: (selection with k entries per row, their values [N·k])."""
    n_tok, d_sae = pre.shape
    vals, idx = topk_rows(pre, k)
    return Selection(*_fixed_rows(n_tok, k, pre.device), cols=idx.reshape(-1), d_sae=d_sae), _widen(vals.reshape(-1))


def batch_topk_select(pre: Tensor, k: int, candidates: int = 4) -> tuple[Selection, Tensor]:
    """Top k·N pre-activations of the whole batch (BatchTopK, Bussmann et al. 2024).

    Exact and cheap: the batch winners are taken among each token's top ``candidates``·k values; if some token
    has all of its candidates selected (it might have more winners) the full flattened top-k is used instead.
    """
    n_tok, d_sae = pre.shape
    total = k * n_tok
    c = min(d_sae, candidates * k)
    cand_vals, cand_idx = topk_rows(pre, c)
    top = cand_vals.reshape(-1).topk(total, sorted=False)
    pool, pool_idx = cand_vals, cand_idx.reshape(-1)
    if c < d_sae and bool((cand_vals.amin(dim=1) >= top.values.min()).any()):
        pool, pool_idx, c = pre, None, d_sae  # a token may have more winners than candidates: go exact
        top = pre.reshape(-1).topk(total, sorted=False)
    flat = top.indices.sort().values  # token-major (CSR) order
    rows = torch.div(flat, c, rounding_mode="floor")
    cols = flat - rows * c if pool_idx is None else pool_idx[flat]
    vals = pool.reshape(-1)[flat]
    return Selection(rows, _csr(rows, n_tok), cols, d_sae), _widen(vals)


SelectFn = Callable[[Tensor], tuple[Selection, Tensor]]


# ---------------------------------------------------------------------------------------------- encoder

_WORKSPACE: dict[str, Tensor] = {}


def _workspace(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch buffer kept between calls (one per name; reallocated when the shape, dtype or device changes).

    The pre-activations are hundreds of MB per step; a fresh allocation is returned to the OS when freed and
    page-faulted in again on the next step, which costs about a third of a write pass over it.
    """
    buf = _WORKSPACE.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        _WORKSPACE.pop(name, None)
        buf = _WORKSPACE[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf



class _SparseEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, select: SelectFn,
                dense_cols: Tensor | None, bf16: bool, out_sel: list[Selection]) -> tuple[Tensor, Tensor]:
        x_c = x - b_dec if b_dec is not None else x
        n_tok, (d_in, d_sae), on = x.shape[0], W_enc.shape, W_enc.device
        if bf16:  # the one big GEMM in bf16 (fp32 accumulation inside oneDNN; outputs rounded to bf16)
            # b_enc rides in the GEMM as an extra input column of ones: no [N, d_sae] bias broadcast pass
            # (measured ~25% faster than addmm here); W_enc needs a bf16 copy anyway
            x_c = x_c.bfloat16()
            W_aug = _workspace("W_aug", (d_sae, d_in + 1), torch.bfloat16, on)  # [W_encᵀ | b_enc], W_enc_T's layout
            W_aug[:, :d_in].copy_(W_enc.t())
            W_aug[:, d_in].copy_(b_enc)
            x_aug = _workspace("x_aug", (n_tok, d_in + 1), torch.bfloat16, on)
            x_aug[:, :d_in].copy_(x_c)
            x_aug[:, d_in] = 1
            pre = torch.mm(x_aug, W_aug.t(), out=_workspace("pre", (n_tok, d_sae), torch.bfloat16, on))
        else:  # (fp32: the ones column made MKL's GEMM slower than the broadcast)
            pre = torch.addmm(b_enc, x_c, W_enc, out=_workspace("pre", (n_tok, d_sae), W_enc.dtype, on))
        sel, vals = select(pre)
        cols = dense_cols if dense_cols is not None else torch.empty(0, dtype=torch.long, device=on)
        dense = _widen(pre.index_select(1, cols))
        del pre
        out_sel.append(sel)
        ctx.sel, ctx.cols, ctx.has_b_dec = sel, cols, b_dec is not None
        # in bf16 mode x_c is kept in bf16: the weight-gradient bags then read half the bytes (2x faster)
        ctx.save_for_backward(x_c, W_enc)
        return vals, dense

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor | None, g_dense: Tensor | None) -> tuple[Tensor | None, ...]:
        x_c, W_enc = ctx.saved_tensors
        sel: Selection = ctx.sel
        cols: Tensor = ctx.cols
        d_in, d_sae = W_enc.shape
        if g_dense is not None and cols.numel() == 0:
            g_dense = None
        grad_x = grad_b_dec = grad_W = grad_b = None
        grad_b_enc = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device)
        if g_vals is not None:
            g_vals = g_vals.to(W_enc.dtype)
            grad_b_enc.index_add_(0, sel.cols, g_vals)
        if g_dense is not None:
            g_dense = g_dense.to(W_enc.dtype)
            grad_b_enc.index_add_(0, cols, g_dense.sum(0))
        if ctx.needs_input_grad[2]:
            if g_vals is not None:
                order, rows, lat_off = sel.by_latent()
                # [d_sae, d_in]: bag i = Σ over entries selecting latent i of g·x_c[row]
                grad_W_T = F.embedding_bag(rows, x_c, lat_off, mode="sum",
                                           per_sample_weights=g_vals[order].to(x_c.dtype))
            else:
                grad_W_T = torch.zeros(d_sae, d_in, dtype=W_enc.dtype, device=W_enc.device)
            if g_dense is not None:  # the dense columns: one GEMM [m, N]·[N, d_in] (bf16 in bf16 mode)
                grad_W_T = grad_W_T.to(W_enc.dtype)
                grad_W_T.index_add_(0, cols, (g_dense.t().to(x_c.dtype) @ x_c).to(W_enc.dtype))
            # returned in W_enc's own layout: free for Sae.W_enc (a view of the contiguous W_enc_T), one
            # transposing copy for a contiguous [d_in, d_sae] tensor
            grad_W = grad_W_T.to(W_enc.dtype).t()
            if grad_W.stride() != W_enc.stride():
                grad_W = grad_W.contiguous()
        if ctx.needs_input_grad[3]:
            grad_b = grad_b_enc
        if ctx.has_b_dec and ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(x_c.shape, dtype=W_enc.dtype, device=W_enc.device)
            if g_vals is not None:
                grad_x += F.embedding_bag(sel.cols, W_enc.t().contiguous(), sel.offsets, mode="sum",
                                          per_sample_weights=g_vals)
            if g_dense is not None:
                grad_x += g_dense @ W_enc.t().index_select(0, cols)
        return grad_x, grad_b_dec, grad_W, grad_b, None, None, None, None


def sparse_encode(x: Tensor, b_dec: Tensor | None, W_enc: Tensor, b_enc: Tensor, select: SelectFn,
                  bf16: bool = False, dense_cols: Tensor | None = None) -> tuple[Selection, Tensor, Tensor]:
    """Pre-activations of the selected entries (and optionally of a few whole columns), with a sparse backward.

    x [N, d_in] (normally without gradient), b_dec [d_in] or None (not subtracted), W_enc [d_in, d_sae],
    b_enc [d_sae]; ``select(pre)`` returns (Selection, values [nnz]) (TopK, BatchTopK). ``dense_cols`` [m]
    (AuxK's dead latents) also returns pre[:, dense_cols] [N, m] as a dense tensor: for a small set of columns
    a GEMM is ~25x faster per entry than the embedding bags. Returns (selection, values, dense [N, m], m = 0
    without ``dense_cols``), values and dense in float32 or wider and differentiable w.r.t. x, b_dec, W_enc,
    b_enc.
    """
    out: list[Selection] = []
    vals, dense = _SparseEncode.apply(x, b_dec, W_enc, b_enc, select, dense_cols, bf16, out)
    return out[0], vals, dense


# ---------------------------------------------------------------------------------------------- decoder


class _SparseSquaredError(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, vals: Tensor, W_dec: Tensor, b_dec: Tensor | None, target: Tensor,
                sel: Selection) -> tuple[Tensor, Tensor]:
        x_hat = F.embedding_bag(sel.cols, W_dec, sel.offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype))
        err = torch.sub(target, x_hat, out=x_hat)  # in place: one [N, d_in] buffer for x_hat and the error
        if b_dec is not None:
            err.sub_(b_dec)
        flat = err.reshape(-1)
        sse = torch.dot(flat, flat)
        ctx.sel, ctx.has_b_dec = sel, b_dec is not None
        ctx.save_for_backward(vals, W_dec, err)
        ctx.mark_non_differentiable(err)
        return sse, err

    @staticmethod
    def backward(ctx: Any, g_sse: Tensor, _g_err: Tensor | None) -> tuple[Tensor | None, ...]:
        vals, W_dec, err = ctx.saved_tensors
        sel: Selection = ctx.sel
        g = err * (-2 * g_sse)  # ∂sse/∂x_hat
        grad_vals = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            # ∂vals_t = ⟨g[row_t], W_dec[col_t]⟩: ATen's per-sample-weight backward loops over entries without
            # gathering an [nnz, d_in] copy of the decoder rows
            grad_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g, W_dec, sel.cols, sel.offsets, sel.rows, _SUM, -1
            ).to(vals.dtype)
        if ctx.needs_input_grad[1]:
            order, rows, lat_off = sel.by_latent()
            grad_W = F.embedding_bag(rows, g, lat_off, mode="sum",
                                     per_sample_weights=vals[order].to(g.dtype))
        if ctx.has_b_dec and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        grad_target = -g if ctx.needs_input_grad[3] else None
        return grad_vals, grad_W, grad_b, grad_target, None


def sparse_squared_error(vals: Tensor, sel: Selection, W_dec: Tensor, b_dec: Tensor | None,
                         target: Tensor) -> tuple[Tensor, Tensor]:
    """Sparse decode and squared error in one pass: x_hat = Σ_j vals[j]·W_dec[cols[j]] (+ b_dec) per token.

    Returns (sse = Σ‖target − x_hat‖², a scalar differentiable w.r.t. vals, W_dec, b_dec and target;
    err = target − x_hat [N, d_in], without gradient). Fusing the loss saves ~6 full-size elementwise passes
    of autograd's chain (add, sub, pow, sum and their backward).
    """
    return _SparseSquaredError.apply(vals, W_dec, b_dec, target, sel)


# ---------------------------------------------------------------------------------------------- JumpReLU


def _rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1[|u| < 1/2] (Rajamanoharan et al. 2024, eq. 11)."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """f = z·1[z > θ] with the straight-through gradient of Rajamanoharan et al. 2024 (Gemma Scope):

    ∂f/∂z = 1[z > θ]; ∂f/∂θ = −(θ/ε)·K((z − θ)/ε). θ [d_sae] is the parameter itself (not log θ: under Adam a
    log-parameterised threshold barely moves, SAELens issues #494/#382, fixed by parameterising θ in PR #718).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        z, th = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_th = (-(th / eps) * _rectangle((z - th) / eps) * g).sum(0)
        return g * (z > th), grad_th, None


class Step(torch.autograd.Function):
    """H(z − θ) with ∂/∂θ = −(1/ε)·K((z − θ)/ε) and no gradient to z (the L0 penalty's estimator, same paper)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None]:
        z, th = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, (-(1.0 / eps) * _rectangle((z - th) / eps) * g).sum(0), None

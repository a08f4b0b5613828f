r"""Linear/nonlinear decomposition of a whole SAE family from sparse codes, in one pass over x.

SAEs given by sparse codes, x_hat = z·W_dec + b_dec with k nonzeros per row. The x statistics and the
factorisation are shared by the family (:class:`darkmatter.regression.Design`); per SAE, Σx̃ᵀe = Σx̃ᵀx̃ +
Σx̃·(s − b_dec)ᵀ − (Σx̃ᵀz)·W_dec, where x̃ = x − s and Σx̃ᵀz [d, d_sae] is a sparse product (N·k·d multiply-adds
instead of the dense N·d²). The error is decoded once (``embedding_bag``, N·k·d) for Σe, Σe² and ‖e‖². On a CPU the
sparse product (a scatter into random rows of a [d_sae, d] accumulator) is memory-bound, so it beats the dense GEMM
only when d/k is large; ``method="auto"`` decides per SAE (:func:`choose_method`, measured in bench/regression.py).
Per SAE the chunk goes through in cache-resident tiles whose sums are float32 within a tile and float64 across
tiles, while the shared x statistics stay float64. The results are :class:`darkmatter.decompose.ErrorFit` objects, as
for a dense error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.decompose import ErrorFit, Split, _check_mask, _sibling_without_intercept, error_fit
from darkmatter.regression import (
    _DEFAULTS,
    CHUNK_ROWS,
    ArrayLike,
    Design,
    MomentStream,
    TargetMoments,
    XMoments,
    row_chunks,
    split_mask,
)

log = logging.getLogger(__name__)

Method = Literal["auto", "sparse", "dense"]
# "auto" rule, measured on 2 AVX-512 cores (bench/regression.py, d = 576, k = 32): the sparse product does d/k
# times fewer multiply-adds than the dense GEMM, but scipy's single-threaded scatter into random rows of a
# [d_sae, d] float64 accumulator is far less efficient than the 2-thread float32 GEMM: at d/k = 18 the sparse
# route fits the family about 3× slower, so it could only break even near d/k ≈ 50. "auto" takes it only from
# d ≥ 64·k (e.g. d = 2304 and k ≤ 36), and while its two accumulators stay within memory reason.
SPARSE_MIN_D_OVER_K = 64
SPARSE_MAX_ACCUMULATOR_BYTES = 128 * 2**20
CROSS_BLOCK_ROWS = 2048  # rows per tile of a family fit: float32 sums within, float64 across (_SaeSums)

# --------------------------------------------------------------------------------------------- SAE codes


def _f32(a: ArrayLike) -> Tensor:
    """A chunk as a float32 CPU tensor (np.array copies: torch cannot wrap a read-only memmap slice)."""
    return a.detach().cpu().float() if isinstance(a, Tensor) else torch.from_numpy(np.array(a, dtype=np.float32))


@dataclass(frozen=True)
class SparseCodes:
    """An SAE's reconstruction of N tokens in sparse form: x_hat = Σ_j top_values[:, j]·W_dec[top_indices[:, j]] + b_dec.

    top_indices [N, k] integer latent ids; top_values [N, k] float (zeros are fine: a TopK ReLU zero, or padding
    for SAEs with a variable L0); W_dec [d_sae, d]; b_dec [d]. Arrays may be numpy (memmaps) or torch.
    """

    top_indices: ArrayLike
    top_values: ArrayLike
    W_dec: ArrayLike
    b_dec: ArrayLike

    @property
    def d_sae(self) -> int:
        return int(self.W_dec.shape[0])

    def rows(self, sl: slice) -> tuple[Tensor, Tensor]:
        """(indices int64 [n, k], values float32 [n, k]) of the rows ``sl``."""
        idx, val = self.top_indices[sl], self.top_values[sl]
        idx = idx.long() if isinstance(idx, Tensor) else torch.from_numpy(np.array(idx, dtype=np.int64))
        val = val.float() if isinstance(val, Tensor) else torch.from_numpy(np.array(val, dtype=np.float32))
        return idx, val

    def decode(self, idx: Tensor, val: Tensor) -> Tensor:
        """z·W_dec float32 [n, d] (no b_dec) from codes [n, k]: an ``embedding_bag``, N·k·d, no dense latents."""
        return F.embedding_bag(idx, torch.as_tensor(self.W_dec, dtype=torch.float32), per_sample_weights=val,
                               mode="sum")

    def x_hat(self, sl: slice) -> Tensor:
        """Reconstructions x_hat = z·W_dec + b_dec, float32 [n, d], of the rows ``sl``."""
        return self.decode(*self.rows(sl)).add_(torch.as_tensor(self.b_dec, dtype=torch.float32))

    def error_of(self, x32: Tensor, idx: Tensor, val: Tensor) -> Tensor:
        """SaeError = x − x_hat = x − (z·W_dec + b_dec), float32 [n, d] (formed in float32, as errors are stored)."""
        x_hat = self.decode(idx, val).add_(torch.as_tensor(self.b_dec, dtype=torch.float32))
        return torch.sub(x32, x_hat, out=x_hat)  # in place: one [n, d] buffer

    def error(self, x: ArrayLike, sl: slice) -> Tensor:
        """SaeError of the rows ``sl`` of x, float32 [n, d]."""
        return self.error_of(_f32(x[sl]), *self.rows(sl))


# --------------------------------------------------------------------------------------------- sparse route


def choose_method(method: Method, k: int, d_sae: int, d: int) -> Literal["sparse", "dense"]:
    """Resolve ``auto`` (see :data:`SPARSE_MIN_D_OVER_K`): sparse when d ≥ 64·k and the float64 accumulator
    [d_sae, d] is at most 128 MiB, else the dense GEMM."""
    if method != "auto":
        return method
    sparse = d >= SPARSE_MIN_D_OVER_K * k and d_sae * d * 8 <= SPARSE_MAX_ACCUMULATOR_BYTES
    return "sparse" if sparse else "dense"


def _add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    """Add ``value`` (float32 or float64) into the float64 accumulator ``sums[key]``, in place."""
    if key in sums:
        sums[key] += value  # mixed dtypes are cast element by element: no float64 copy of value
    else:
        sums[key] = value.double()


class _SaeSums:
    """One SAE's float64 sums over each split, fed chunk by chunk by :func:`family_moments`.

    The target is the row [e, ‖e‖²] ∈ R^(d+1) about its first tile's mean [t, t_n]: the error vector and the
    scalar norm target share every pass (one GEMM gives both cross moments, one reduction both sums).
    """

    def __init__(self, codes: SparseCodes, use: Literal["sparse", "dense"], n_splits: int):
        self.codes, self.sparse = codes, use == "sparse"
        self.n = [0] * n_splits
        self.sums: list[dict[str, Tensor]] = [{} for _ in range(n_splits)]
        self.shift: Tensor | None = None  # [t, t_n] (d + 1)

    def add_chunk(self, sl: slice, order: Tensor | None, x32: Tensor, xt: Tensor, xt32: Tensor,
                  splits: list[slice], buf: Tensor) -> None:
        """x32 [n, d] float32, xt = x − s [n, d] float64 and xt32 = its float32 rounding, rows reordered by
        ``order`` so that each split is the contiguous slice ``splits[i]``; ``buf`` a float32 scratch
        [CROSS_BLOCK_ROWS, d + 1].

        Each split goes through in tiles of ``CROSS_BLOCK_ROWS`` rows: the decoded error, its target row and their
        sums are a few passes over a tile that stays in cache, instead of passes over the whole chunk in memory.
        """
        idx, val = self.codes.rows(sl)
        if order is not None:
            idx, val = idx[order], val[order]
        for i, rows in enumerate(splits):
            start, stop, _ = rows.indices(x32.shape[0])
            for first in range(start, stop, CROSS_BLOCK_ROWS):
                tile = slice(first, min(first + CROSS_BLOCK_ROWS, stop))
                self._add_tile(i, x32[tile], xt[tile], xt32[tile], idx[tile], val[tile], buf)

    def _add_tile(self, split: int, x32: Tensor, xt: Tensor, xt32: Tensor, idx: Tensor, val: Tensor,
                  buf: Tensor) -> None:
        n, d = x32.shape
        e32 = self.codes.error_of(x32, idx, val)
        norm_sq = torch.linalg.vector_norm(e32, dim=1).square_()  # ‖e‖², float32 like the target it goes into
        if self.shift is None:  # rounded to float32 so that the float32 target below is exactly "about" it
            self.shift = torch.cat([e32.mean(0, dtype=torch.float64),
                                    norm_sq.mean(dtype=torch.float64)[None]]).float().double()
        target = buf[:n]  # [n, d + 1] = [e, ‖e‖²] − shift, float32
        torch.sub(e32, self.shift[:d].float(), out=target[:, :d])
        torch.sub(norm_sq, float(self.shift[d]), out=target[:, d])
        sums = self.sums[split]
        self.n[split] += n
        # float32 within the tile (≤ CROSS_BLOCK_ROWS terms per sum: relative error ~ √rows · 2⁻²⁴ of its Σ|a||b|
        # with centred rows), float64 across tiles, so the error does not grow with N; a float32 GEMM runs at twice
        # the float64 rate and a float64 reduction would first copy the tile to float64
        _add(sums, "sum", target.sum(0))
        _add(sums, "sum_sq", (target * target).sum(0))
        if not self.sparse:
            _add(sums, "cross", xt32.T @ target)  # [d, d + 1]: the error's and the norm's cross moments
        else:  # Σ_rows z_rowᵀ x̃_row [d_sae, d]: scipy's CSC product touches only the k nonzeros of each row
            z = scipy.sparse.csr_matrix((val.double().reshape(-1).numpy(), idx.reshape(-1).numpy(),
                                         np.arange(0, idx.numel() + 1, idx.shape[1])), shape=(n, self.codes.d_sae))
            _add(sums, "zx", torch.from_numpy(z.T @ xt.numpy()))
            _add(sums, "n_cross", xt.T @ target[:, d:].double())

    def moments(self, xms: list[XMoments]) -> tuple[Split, Split]:
        """(vector, norm_sq) moments of every split; ``xms`` = the x moments of the same splits."""
        if self.shift is None:
            raise ValueError("x has no rows.")
        d = self.shift.shape[0] - 1
        t = self.shift[:d]
        vector, norm_sq = [], []
        for n, s, xm in zip(self.n, self.sums, xms, strict=True):
            if self.sparse:
                # Σx̃ᵀ(e − t) with e = x̃ + s − z·W_dec − b_dec (x̃ = x − s), every term from statistics
                W_dec = torch.as_tensor(self.codes.W_dec).double()
                b_dec = torch.as_tensor(self.codes.b_dec).double()
                shift = torch.from_numpy(xm.shift)
                cross = (torch.from_numpy(xm.gram) + torch.outer(torch.from_numpy(xm.sum), shift - b_dec - t)
                         - s["zx"].T @ W_dec)
                n_cross = s["n_cross"]
            else:
                cross, n_cross = s["cross"][:, :d], s["cross"][:, d:]  # one GEMM gave both
            both = TargetMoments(n, self.shift.numpy(), s["sum"].numpy(), s["sum_sq"].numpy(),
                                 torch.cat([cross, n_cross], dim=1).numpy())
            vector.append(both.select(slice(0, d)))
            norm_sq.append(both.select(slice(d, d + 1)))
        if len(xms) == 1:
            return (vector[0], None), (norm_sq[0], None)
        return (vector[0], vector[1]), (norm_sq[0], norm_sq[1])


def family_moments(x: ArrayLike, saes: Sequence[SparseCodes], mask: np.ndarray | None, *,
                   design: Design | None = None, method: Method = "auto", chunk_rows: int = CHUNK_ROWS,
                   progress: bool = False) -> tuple[list[XMoments], list[tuple[Split, Split]]]:
    """One pass over x for a whole family: the x moments of each split and, per SAE, the (vector, norm_sq)
    moments (each (fit, test)) of its error e = x − x_hat and of ‖e‖².

    Per chunk, x is converted, shifted (s: the design's shift, else the first chunk's mean) and reordered so that
    the fit rows come first — once, for every SAE. ``design`` given: its x moments are reused (same rows and
    mask!), else they are accumulated in the same pass. The cross moment Σx̃ᵀ(e − t) [d, d] comes from the sparse
    codes (``method="sparse"``: Σx̃ᵀx̃ + Σx̃·(s − b_dec − t)ᵀ − (Σx̃ᵀz)·W_dec, float64) or from float32 GEMMs
    with the decoded error, tile by tile, summed in float64 (``"dense"``); ``"auto"`` chooses per SAE
    (:func:`choose_method`). Σ(e − t), Σ(e − t)² and ‖e‖² use the error decoded in float32, summed in float32
    within a tile and in float64 across tiles. Memory: O(d² + d·d_sae) per
    SAE (sparse: two [d_sae, d] float64 accumulators), independent of N.
    """
    n, d = x.shape
    for i, codes in enumerate(saes):
        if codes.top_indices.shape[0] != n:
            raise ValueError(f"SAE {i} has codes for {codes.top_indices.shape[0]} tokens but x has {n}.")
    n_splits = 1 if mask is None else 2
    accs = [_SaeSums(c, choose_method(method, int(c.top_indices.shape[1]), c.d_sae, d), n_splits) for c in saes]
    shift = None if design is None else torch.from_numpy(design.shift)
    streams: list[MomentStream] = []
    xt_buf = torch.empty(min(chunk_rows, n), d, dtype=torch.float64)  # reused: fresh 75 MB buffers page-fault
    xt32_buf = torch.empty(min(chunk_rows, n), d, dtype=torch.float32)
    target_buf = torch.empty(min(CROSS_BLOCK_ROWS, n), d + 1, dtype=torch.float32)
    bar = tqdm(total=n, unit="tok", unit_scale=True, disable=not progress, desc=f"family moments ({len(saes)} SAEs)")
    raw_buf = torch.empty(min(chunk_rows, n), d, dtype=torch.float32)
    x32_buf = torch.empty_like(raw_buf)
    for sl in row_chunks(n, chunk_rows):
        rows_x = x[sl]
        raw = raw_buf[: sl.stop - sl.start]
        if isinstance(rows_x, Tensor):
            raw.copy_(rows_x)
        else:
            raw.numpy()[:] = rows_x  # numpy casts and copies (a memmap slice included) into the reused buffer
        x32, order, splits = raw, None, [slice(None)]
        if mask is not None:
            m = np.asarray(mask[sl])
            order = torch.from_numpy(np.argsort(~m, kind="stable"))  # fit rows first
            x32, n_fit = torch.index_select(raw, 0, order, out=x32_buf[: raw.shape[0]]), int(m.sum())
            splits = [slice(0, n_fit), slice(n_fit, None)]
        if shift is None:
            shift = x32.mean(0, dtype=torch.float64)
        xt = xt_buf[: x32.shape[0]]
        xt.copy_(x32).sub_(shift)
        xt32 = xt32_buf[: x32.shape[0]]
        xt32.copy_(xt)
        if design is None:
            streams = streams or [MomentStream(shift.numpy()) for _ in splits]
            for stream, rows in zip(streams, splits, strict=True):
                stream.update(xt[rows])
        for acc in accs:
            acc.add_chunk(sl, order, x32, xt, xt32, splits, target_buf)
        bar.update(sl.stop - sl.start)
    bar.close()
    if design is None:
        if not streams:
            raise ValueError("x has no rows.")
        xms = [st.x_moments() for st in streams]
    else:
        xms = [design.fit] if mask is None else [design.fit, design.test]  # type: ignore[list-item]
    return xms, [acc.moments(xms) for acc in accs]


def sae_error_moments(x: ArrayLike, codes: SparseCodes, design: Design, mask: np.ndarray | None, *,
                      method: Method = "auto", chunk_rows: int = CHUNK_ROWS, progress: bool = False
                      ) -> tuple[Split, Split]:
    """(vector, norm_sq) moments, each (fit, test), of one SAE's error (see :func:`family_moments`); ``design``
    must hold the x moments of the same rows and ``mask``."""
    return family_moments(x, [codes], mask, design=design, method=method, chunk_rows=chunk_rows,
                          progress=progress)[1][0]


def decompose_family(x: ArrayLike, saes: Sequence[SparseCodes], *, design: Design | None = None,
                     mask: np.ndarray | None = None, fit_tokens: int = _DEFAULTS.fit_tokens,
                     seed: int = _DEFAULTS.seed, intercept: bool = _DEFAULTS.intercept,
                     ridge: float = _DEFAULTS.ridge, method: Method = "auto", chunk_rows: int = CHUNK_ROWS,
                     progress: bool = False) -> list[ErrorFit]:
    """:class:`ErrorFit` (b*, R² of error and ‖error‖², FVUs) of every SAE of a family on the same activations.

    One pass over x and the codes (:func:`family_moments`); the x statistics and the factorisations (with and
    without intercept) are shared. ``design`` may be passed in together with the ``mask`` it was built on.
    """
    if mask is None:
        mask = split_mask(x.shape[0], fit_tokens, seed)
    if design is not None:
        _check_mask(design, mask)
    xms, moments = family_moments(x, saes, mask, design=design, method=method, chunk_rows=chunk_rows,
                                  progress=progress)
    if design is None:
        design = Design(xms[0], xms[1], intercept=intercept, ridge=ridge)
    no_intercept = _sibling_without_intercept(design)
    out = []
    for i, ((vector, norms), codes) in enumerate(zip(moments, saes, strict=True)):
        out.append(error_fit(design, vector, norms, no_intercept))
        log.info("SAE %d/%d (d_sae=%d): FVU %.4f, nonlinear %.4f, R² vector %.4f", i + 1, len(saes), codes.d_sae,
                 out[-1].fvu_total, out[-1].fvu_nonlinear,
                 out[-1].r2_vector.r2_mean_dims if out[-1].r2_vector else float("nan"))
    return out

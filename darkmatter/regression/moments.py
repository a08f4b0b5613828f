"""The sufficient statistics of least squares, streamed over rows in chunks: one engine for every fit.

Model: ``y ≈ x·B + b0`` with ``x [N, d]`` and ``y [N, p]``. The normal equations need only n, Σx, Σxᵀx, Σy, Σxᵀy (and
Σy² for R²), so memory is O(d·(d + p)) whatever N is, and rows can be streamed from a memmap. Sums are taken about
shifts (x̃ = x − s, ỹ = y − t; s and t the mean of the first rows seen), so the centred Gram Σx̃ᵀx̃ − n·m̃m̃ᵀ does not
cancel catastrophically when |mean| ≫ spread (residual streams have such dimensions; Chan, Golub & LeVeque 1983).

The engine (:func:`chunks`, :class:`XSums`, :class:`TargetSums`) reads x once per chunk for any number of targets:
each chunk is converted once, shifted, and its rows reordered so that the fit rows of a split mask come first —
every split is then a contiguous slice and no masked copies are made. The x side (Σx̃, Σx̃ᵀx̃) is float64. A target
goes through in tiles of :data:`TILE_ROWS` rows, produced on demand (an SAE's error is decoded tile by tile, so it
stays in cache): within a tile its sums and its cross product with x̃ run in the target's own dtype (a float32
target: a float32 GEMM, twice the float64 rate, with relative error ~√TILE_ROWS·2⁻²⁴ of Σ|x̃||ỹ| per tile), across
tiles they are added in float64, so the error does not grow with N. A float64 target keeps float64 throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from darkmatter.config import DecompositionConfig

ArrayLike = np.ndarray | Tensor

DEFAULTS = DecompositionConfig()  # the one source of defaults (fit_tokens, intercept, ridge, seed)
CHUNK_ROWS = 16_384  # rows per streamed chunk: a float64 chunk of 576-dim rows is 75 MB
TILE_ROWS = 2_048  # rows per target tile: a float32 [2048, 577] tile and its products stay in cache


def row_chunks(n_rows: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_rows`` rows covering ``range(n_rows)``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    for start in range(0, n_rows, chunk_rows):
        yield slice(start, min(start + chunk_rows, n_rows))


def as_tensor(a: ArrayLike, dtype: torch.dtype | None = None) -> Tensor:
    """A chunk (numpy array, memmap or tensor) as a CPU tensor of ``dtype`` (default: float64 stays float64, every
    other dtype becomes float32); a vector becomes a column [n, 1]. numpy input is always copied (torch cannot wrap
    a read-only memmap)."""
    if isinstance(a, Tensor):
        t = a.detach().cpu()
        t = t.to(dtype or (t.dtype if t.dtype == torch.float64 else torch.float32))
    else:
        arr = np.asarray(a)
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype] if dtype else \
            (np.float64 if arr.dtype == np.float64 else np.float32)
        t = torch.from_numpy(np.array(arr, dtype=np_dtype))
    return t[:, None] if t.ndim == 1 else t


def as_f64(a: ArrayLike) -> Tensor:
    """:func:`as_tensor` in float64."""
    return as_tensor(a, torch.float64)


def split_mask(n_rows: int, fit_tokens: int = DEFAULTS.fit_tokens, seed: int = DEFAULTS.seed) -> np.ndarray:
    """Boolean ``[n_rows]``, True on the fit rows of the protocol (fit on a shuffled prefix, score on the rest).

    Rows are shuffled by ``np.random.default_rng(seed).permutation(n_rows)``; the first ``fit_tokens`` rows of the
    permutation are the fit split, the rest the test split. Least squares ignores row order, so fitting on the
    masked rows is fitting on the shuffled prefix.
    """
    if not 0 < fit_tokens < n_rows:
        raise ValueError(f"fit_tokens={fit_tokens} must be between 1 and n_rows - 1 = {n_rows - 1} so that both "
                         "the fit split and the test split are non-empty.")
    mask = np.zeros(n_rows, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n_rows)[:fit_tokens]] = True
    return mask


class LazyRows:
    """A lazily computed [n_rows, width] array: ``rows[sl]`` calls ``get(sl)`` (a slice, or sorted row ids when
    ``ids`` is given: then row i of this array is row ``ids[i]`` of the function's domain); ``dtype``: what ``get``
    returns."""

    def __init__(self, n_rows: int, width: int, get: Callable, ids: np.ndarray | None = None,
                 dtype: np.dtype | type = np.float32):
        self.shape = (n_rows if ids is None else len(ids), width)
        self.ndim, self.dtype = 2, np.dtype(dtype)
        self._get, self._ids = get, ids

    def __getitem__(self, sl: slice):
        return self._get(sl if self._ids is None else self._ids[sl])


# --------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class XMoments:
    """Float64 sums over one set of rows of x about the shift s: the design side of a regression.

    n; shift [d] = s; sum [d] = Σ(x − s); gram [d, d] = Σ(x − s)ᵀ(x − s).
    """

    n: int
    shift: np.ndarray
    sum: np.ndarray
    gram: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """x̄ [d]."""
        return self.shift + self.sum / self.n

    @property
    def centred_gram(self) -> np.ndarray:
        """Σ(x − x̄)ᵀ(x − x̄) [d, d]."""
        return self.gram - np.outer(self.sum, self.sum) / self.n

    @property
    def raw_gram(self) -> np.ndarray:
        """Σxᵀx [d, d] (about zero: the no-intercept normal matrix)."""
        s, m = self.shift, self.sum
        return self.gram + np.outer(m, s) + np.outer(s, m) + self.n * np.outer(s, s)

    @property
    def total_ss(self) -> float:
        """Σ‖x − x̄‖² (the FVU denominator, from these sums)."""
        return float(np.trace(self.gram) - self.sum @ self.sum / self.n)

    def columns(self, cols: np.ndarray) -> XMoments:
        """The moments of the design columns ``cols`` only: designs that are column subsets of one streamed design
        share its pass."""
        return XMoments(self.n, self.shift[cols], self.sum[cols], self.gram[np.ix_(cols, cols)])

    def __add__(self, other: XMoments) -> XMoments:
        """The moments of the union of two disjoint row sets (same shift)."""
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cannot add XMoments taken about different shifts.")
        return XMoments(self.n + other.n, self.shift, self.sum + other.sum, self.gram + other.gram)


@dataclass(frozen=True)
class TargetMoments:
    """Float64 sums over one set of rows of a target y, about the shift t (x about the design's shift s).

    n; shift [p] = t; sum [p] = Σ(y − t); sum_sq [p] = Σ(y − t)² per output dimension;
    cross [d, p] = Σ(x − s)ᵀ(y − t).
    """

    n: int
    shift: np.ndarray
    sum: np.ndarray
    sum_sq: np.ndarray
    cross: np.ndarray

    @property
    def ss_tot(self) -> np.ndarray:
        """Σ(y_j − ȳ_j)² per output dimension [p] (ȳ = the mean over these rows)."""
        return np.maximum(self.sum_sq - self.sum**2 / self.n, 0.0)

    @property
    def norm_sq_sum(self) -> float:
        """Σ‖y‖² over the rows (about zero)."""
        t = self.shift
        return float(np.sum(self.sum_sq + 2 * t * self.sum + self.n * t**2))

    def select(self, cols: slice) -> TargetMoments:
        """The moments of the output columns ``cols`` only (targets stacked side by side share one pass)."""
        return TargetMoments(self.n, self.shift[cols], self.sum[cols], self.sum_sq[cols],
                             np.ascontiguousarray(self.cross[:, cols]))

    def on_columns(self, cols: np.ndarray) -> TargetMoments:
        """The target's moments against the design columns ``cols`` only (:meth:`XMoments.columns`)."""
        return TargetMoments(self.n, self.shift, self.sum, self.sum_sq, np.ascontiguousarray(self.cross[cols]))

    def __add__(self, other: TargetMoments) -> TargetMoments:
        if not np.array_equal(self.shift, other.shift):
            raise ValueError("cannot add TargetMoments taken about different shifts.")
        return TargetMoments(self.n + other.n, self.shift, self.sum + other.sum, self.sum_sq + other.sum_sq,
                             self.cross + other.cross)


# --------------------------------------------------------------------------------------------- the engine


class Chunk:
    """One chunk of x (rows ``sl``), converted once for every target: ``x`` [n, d] (float64 when x is, else
    float32) with its rows reordered by ``order`` (fit rows first; None without a mask) so that split i is the
    contiguous slice ``splits[i]``; ``xt`` = x − s in float64 and ``xt32`` its float32 rounding (what float32
    targets are multiplied with)."""

    def __init__(self, sl: slice, order: Tensor | None, splits: list[slice], x: Tensor, xt: Tensor, xt32: Tensor,
                 shift: Tensor):
        self.sl, self.order, self.splits = sl, order, splits
        self.x, self.xt, self.xt32, self.shift = x, xt, xt32, shift

    def reorder(self, rows: Tensor) -> Tensor:
        """Per-row data of this chunk (dim 0 in original row order) in the chunk's order."""
        return rows if self.order is None else rows[self.order]

    def tiles(self, split: int, tile_rows: int | None = None) -> Iterator[slice]:
        """Slices of at most ``tile_rows`` (default :data:`TILE_ROWS`) rows covering split ``split`` (in the
        chunk's order)."""
        tile_rows = tile_rows or TILE_ROWS
        start, stop, _ = self.splits[split].indices(self.x.shape[0])
        for first in range(start, stop, tile_rows):
            yield slice(first, min(first + tile_rows, stop))


def chunks(x: ArrayLike, mask: np.ndarray | None, shift: np.ndarray | None = None, *,
           chunk_rows: int = CHUNK_ROWS, progress: bool = False, desc: str = "moments") -> Iterator[Chunk]:
    """Stream x [N, d] as :class:`Chunk` s; ``mask`` [N] bool marks the fit rows (None: one split of every row);
    ``shift`` s [d] (default: the mean of the first chunk). Buffers are reused between chunks (fresh 75 MB buffers
    page-fault on every chunk), so a chunk is valid only until the next one is drawn."""
    n, d = x.shape
    if mask is not None and np.shape(mask) != (n,):
        raise ValueError(f"the split mask has shape {np.shape(mask)}, expected ({n},).")
    if n == 0:
        raise ValueError("x has no rows.")
    size = min(chunk_rows, n)
    dtype = torch.float64 if x.dtype in (np.float64, torch.float64) else torch.float32  # keep float64 input exact
    raw_buf, x_buf = torch.empty(size, d, dtype=dtype), torch.empty(size, d, dtype=dtype)
    xt32_buf, xt_buf = torch.empty(size, d), torch.empty(size, d, dtype=torch.float64)
    s = None if shift is None else torch.from_numpy(np.asarray(shift, dtype=np.float64))
    bar = tqdm(total=n, unit="tok", unit_scale=True, disable=not progress, desc=desc)
    for sl in row_chunks(n, chunk_rows):
        rows = x[sl]
        raw = raw_buf[: sl.stop - sl.start]
        if isinstance(rows, Tensor):
            raw.copy_(rows)
        else:
            raw.numpy()[:] = rows  # numpy casts and copies (a memmap slice included) into the reused buffer
        xc, order, splits = raw, None, [slice(None)]
        if mask is not None:
            m = np.asarray(mask[sl])
            order = torch.from_numpy(np.argsort(~m, kind="stable"))  # fit rows first, each split in row order
            xc, n_fit = torch.index_select(raw, 0, order, out=x_buf[: raw.shape[0]]), int(m.sum())
            splits = [slice(0, n_fit), slice(n_fit, None)]
        if s is None:
            s = xc.mean(0, dtype=torch.float64)
        xt = xt_buf[: xc.shape[0]].copy_(xc).sub_(s)
        xt32 = xt32_buf[: xc.shape[0]].copy_(xt)
        yield Chunk(sl, order, splits, xc, xt, xt32, s)
        bar.update(sl.stop - sl.start)
    bar.close()


class XSums:
    """Float64 Σx̃ and Σx̃ᵀx̃ of each split of a chunk stream (the design side)."""

    def __init__(self) -> None:
        self.n: list[int] = []
        self._sum: list[Tensor] = []
        self._gram: list[Tensor] = []
        self.shift: np.ndarray | None = None

    def add(self, chunk: Chunk) -> None:
        if self.shift is None:
            self.shift = chunk.shift.numpy()
            d = chunk.x.shape[1]
            self.n = [0] * len(chunk.splits)
            self._sum = [torch.zeros(d, dtype=torch.float64) for _ in chunk.splits]
            self._gram = [torch.zeros(d, d, dtype=torch.float64) for _ in chunk.splits]
        xt = chunk.xt
        for i, rows in enumerate(chunk.splits):
            part = xt[rows]
            self.n[i] += part.shape[0]
            self._sum[i] += part.sum(0)
            self._gram[i].addmm_(part.T, part)

    def moments(self) -> list[XMoments]:
        """One :class:`XMoments` per split (fit first)."""
        if self.shift is None or not all(self.n):
            raise ValueError("a split received no rows.")
        return [XMoments(n, self.shift, s.numpy(), g.numpy()) for n, s, g in zip(self.n, self._sum, self._gram,
                                                                                 strict=True)]


class TargetSums:
    """Float64 sums of one target over each split, fed tile by tile (module docstring): n, Σ(y − t), Σ(y − t)² and
    Σx̃ᵀ(y − t) (only of the columns ``cross_cols``, when another route supplies the rest). The shift t is the
    first tile's mean, rounded to the target's dtype so that y − t is formed exactly "about" it."""

    def __init__(self, n_splits: int, cross_cols: slice = slice(None)):
        self.cross_cols = cross_cols
        self.n = [0] * n_splits
        self.sums: list[dict[str, Tensor]] = [{} for _ in range(n_splits)]
        self.shift: Tensor | None = None
        self._square: Tensor | None = None  # scratch for (y − t)², reused: a fresh buffer per tile page-faults

    def add_chunk(self, chunk: Chunk, tile: Callable[[slice], Tensor]) -> None:
        """Add every tile of ``chunk``; ``tile(rows)`` gives the target rows [n, p] at those rows of the chunk's
        order (float32 or float64)."""
        for split in range(len(chunk.splits)):
            for rows in chunk.tiles(split):
                self.add_tile(split, chunk, rows, tile(rows))

    def add_tile(self, split: int, chunk: Chunk, rows: slice, y: Tensor, owned: bool = False) -> None:
        """Add the target rows ``y`` [n, p] at ``rows`` of the chunk's order; ``owned``: y is the caller's scratch
        and may be shifted in place."""
        if self.shift is None:
            self.shift = y.mean(0, dtype=torch.float64).to(y.dtype).double()
        shift = self.shift.to(y.dtype)
        yt = y.sub_(shift) if owned else y - shift
        if self._square is None or self._square.dtype != yt.dtype or self._square.shape[1:] != yt.shape[1:] \
                or self._square.shape[0] < yt.shape[0]:
            self._square = torch.empty_like(yt)
        square = torch.mul(yt, yt, out=self._square[: yt.shape[0]])
        xt = chunk.xt32[rows] if y.dtype == torch.float32 else chunk.xt[rows]
        sums = self.sums[split]
        self.n[split] += y.shape[0]
        for key, value in (("sum", yt.sum(0)), ("sum_sq", square.sum(0)), ("cross", xt.T @ yt[:, self.cross_cols])):
            if key in sums:
                sums[key] += value  # mixed dtypes are cast element by element: no float64 copy of value
            else:
                sums[key] = value.double()

    def moments(self) -> list[TargetMoments]:
        """One :class:`TargetMoments` per split (fit first)."""
        if self.shift is None or not all(self.n):
            raise ValueError("a split received no target rows.")
        t = self.shift.numpy()
        return [TargetMoments(n, t, s["sum"].numpy(), s["sum_sq"].numpy(), s["cross"].numpy())
                for n, s in zip(self.n, self.sums, strict=True)]


@dataclass(frozen=True)
class Moments:
    """What :func:`stream_moments` returns: x moments per split (None when not asked) and target moments per split
    (None without a target); lists are [fit, test] with a mask, [all] without."""

    x: list[XMoments] | None
    y: list[TargetMoments] | None


def stream_moments(x: ArrayLike, y: ArrayLike | None = None, mask: np.ndarray | None = None, *,
                   shift_x: np.ndarray | None = None, gram: bool = True, chunk_rows: int = CHUNK_ROWS,
                   progress: bool = False, desc: str = "moments") -> Moments:
    """Moments of ``x [N, d]`` (``gram``) and of a dense target ``y [N, p]`` or ``[N]`` in one pass.

    ``mask`` [N] bool selects the fit rows (None: one split of all rows). Both splits use the same shifts, so their
    moments add up to those of all rows. ``y`` float64 (numpy or torch) is summed in float64 exactly; float32 in
    float32 tiles (module docstring).
    """
    n = x.shape[0]
    if y is not None and y.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}; they must be aligned row by row.")
    xs = XSums() if gram else None
    ys = None if y is None else TargetSums(1 if mask is None else 2)
    for chunk in chunks(x, mask, shift_x, chunk_rows=chunk_rows, progress=progress, desc=desc):
        if xs is not None:
            xs.add(chunk)
        if ys is not None:
            rows = chunk.reorder(as_tensor(y[chunk.sl]))  # type: ignore[index]
            ys.add_chunk(chunk, rows.__getitem__)
    return Moments(None if xs is None else xs.moments(), None if ys is None else ys.moments())


def save_moments(path: str | Path, moments: dict[str, XMoments]) -> None:
    """Write named :class:`XMoments` (e.g. fit and test) to one safetensors file."""
    from safetensors.numpy import save_file

    arrays = {}
    for name, m in moments.items():
        arrays |= {f"{name}.n": np.array([m.n], dtype=np.int64), f"{name}.shift": m.shift, f"{name}.sum": m.sum,
                   f"{name}.gram": np.ascontiguousarray(m.gram)}
    save_file(arrays, str(path))


def load_moments(path: str | Path) -> dict[str, XMoments]:
    """The :class:`XMoments` written by :func:`save_moments`, by name."""
    from darkmatter.io import load_safetensors

    arrays = load_safetensors(path, numpy=True)
    names = sorted({key.rsplit(".", 1)[0] for key in arrays})
    return {name: XMoments(int(arrays[f"{name}.n"][0]), arrays[f"{name}.shift"], arrays[f"{name}.sum"],
                           arrays[f"{name}.gram"]) for name in names}

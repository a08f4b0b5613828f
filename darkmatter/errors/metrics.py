"""Reconstruction and sparsity metrics of an SAE: the one place each metric is defined.

Notation (docs/science.md): ``x [N, d_in]`` SAE inputs, ``x_hat [N, d_in]`` reconstructions, ``latents [N, d_sae]``
dense latent activations, ``error = x - x_hat``. Per-token functions return float64 tensors ``[N]``; every sum
is taken in float64 because evaluation sets reach 250k × 576 entries, where float32 sums lose digits.

The accumulators (:class:`FvuAccumulator`, :class:`LatentAccumulator`, :class:`ReconstructionAccumulator`) take
the evaluation set chunk by chunk and give the same numbers as one pass over all of it, so a large split never
has to sit in memory. Inputs may be torch tensors or numpy arrays (memmaps included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray

DENSE_THRESHOLD = 0.1  # a latent active on more than 10% of tokens is "dense" (SAEBench freq_over_10_percent)
L0_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _f64(a: ArrayLike) -> Tensor:
    """A float64 CPU tensor view/copy of ``a`` (numpy memmaps are copied: torch cannot wrap read-only memory)."""
    if isinstance(a, Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64)
    arr = np.asarray(a, dtype=np.float64)  # float32 input is copied here; a float64 memmap stays a view
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _pair(x: ArrayLike, x_hat: ArrayLike) -> tuple[Tensor, Tensor]:
    x64, xh64 = _f64(x), _f64(x_hat)
    if x64.ndim != 2 or x64.shape != xh64.shape:
        raise ValueError(f"x and x_hat must both have shape [N, d_in]; got {tuple(x64.shape)} and "
                         f"{tuple(xh64.shape)}.")
    return x64, xh64


# --------------------------------------------------------------------------------------------- per token


@dataclass(frozen=True)
class TokenSums:
    """Per-token ‖x‖², ‖x̂‖², ⟨x, x̂⟩ and ‖x − x̂‖² [n]: every per-token metric is defined from these once (in
    float64, whatever precision the sums were taken in)."""

    x_norm_sq: Tensor
    x_hat_norm_sq: Tensor
    x_dot_x_hat: Tensor
    error_norm_sq: Tensor

    @property
    def nmse(self) -> Tensor:
        """‖x − x̂‖² / ‖x‖² (*not* centred; inf or NaN where ‖x‖ = 0)."""
        return self.error_norm_sq.double() / self.x_norm_sq.double()

    @property
    def cosine(self) -> Tensor:
        """⟨x, x̂⟩ / (‖x‖ ‖x̂‖); 0 where either vector is zero (as torch's cosine_similarity, which clamps)."""
        denom = (self.x_norm_sq.double() * self.x_hat_norm_sq.double()).sqrt()
        return torch.where(denom > 0, self.x_dot_x_hat.double() / torch.where(denom > 0, denom, 1.0), 0.0)

    @property
    def l2_ratio(self) -> Tensor:
        """Shrinkage ‖x̂‖ / ‖x‖."""
        return (self.x_hat_norm_sq.double() / self.x_norm_sq.double()).sqrt()


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_i, b_i⟩ per row of a, b [n, d] in their dtype (a batched BLAS dot: several times faster than
    ``vecdot`` or an elementwise product and sum on a CPU)."""
    return torch.bmm(a[:, None, :], b[:, :, None]).view(-1)


def token_sums(x: ArrayLike, x_hat: ArrayLike) -> TokenSums:
    """:class:`TokenSums` of ``x, x_hat [N, d_in]`` in float64."""
    x64, xh64 = _pair(x, x_hat)
    err = x64 - xh64
    return TokenSums(row_dot(x64, x64), row_dot(xh64, xh64), row_dot(x64, xh64), row_dot(err, err))


def error_norm_sq(x: ArrayLike, x_hat: ArrayLike) -> Tensor:
    """‖x − x̂‖² per token: ``[N]`` float64."""
    return token_sums(x, x_hat).error_norm_sq


def nmse_per_token(x: ArrayLike, x_hat: ArrayLike) -> Tensor:
    """Per-token normalised MSE ‖x − x̂‖² / ‖x‖² (*not* centred): ``[N]`` float64.

    The OpenAI README's "normalized MSE"; the reference code's ``normalized_mse`` is its mean over tokens. Unlike
    :func:`fvu` the denominator is the squared norm about zero, so a large shared mean direction in ``x`` makes
    it small. Infinite or NaN for a token with ‖x‖ = 0.
    """
    return token_sums(x, x_hat).nmse


def cosine_per_token(x: ArrayLike, x_hat: ArrayLike) -> Tensor:
    """cos(x, x̂) = ⟨x, x̂⟩ / (‖x‖ ‖x̂‖) per token: ``[N]`` float64; 0 where either vector is zero."""
    return token_sums(x, x_hat).cosine


def l2_ratio_per_token(x: ArrayLike, x_hat: ArrayLike) -> Tensor:
    """Shrinkage ‖x̂‖ / ‖x‖ per token (SAEBench ``l2_ratio`` is its mean): ``[N]`` float64."""
    return token_sums(x, x_hat).l2_ratio


def _latents_np(latents: ArrayLike, d_sae: int | None = None) -> np.ndarray:
    """``latents`` as a numpy array [N, d_sae], shape-checked.

    Counting goes through numpy: np.count_nonzero over a [1024, 16384] chunk is several times faster than
    torch's reductions over a boolean mask on CPU (measured), and these counts run on every evaluation chunk.
    """
    if isinstance(latents, Tensor):
        t = latents.detach().cpu()
        f = (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
    else:
        f = np.asarray(latents)
    if f.ndim != 2 or (d_sae is not None and f.shape[1] != d_sae):
        raise ValueError(f"latents must have shape [N, {d_sae or 'd_sae'}]; got {tuple(f.shape)}.")
    return f


def l0_per_token(latents: ArrayLike) -> Tensor:
    """Number of nonzero latents per token: ``[N]`` int64.

    Counts f ≠ 0 (SAEBench, dictionary_learning); SAELens counts f > 0, the same for ReLU-family SAEs.
    """
    return torch.from_numpy(np.count_nonzero(_latents_np(latents), axis=1).astype(np.int64))


# --------------------------------------------------------------------------------------------- FVU


class FvuAccumulator:
    """Pooled fraction of variance unexplained, streamed over chunks of tokens.

    FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − μ‖², μ = mean of x over *all* tokens of the evaluation set, pooled over
    tokens and dimensions (docs/science.md; the reference code's ``fraction_variance_unexplained``). Not the variance about
    zero that SAELens 6.18 / SAEBench 0.6.0 ``explained_variance`` uses (docs/science.md explains why not).

    The denominator is merged chunk by chunk with Chan et al.'s pairwise update in float64 (each chunk centred
    on its own mean first): unlike Σ‖x‖² − N‖μ‖² it does not cancel catastrophically when ‖μ‖ ≫ spread.
    """

    def __init__(self) -> None:
        self.n_tokens = 0
        self.mean: Tensor | None = None  # [d_in] float64
        self.total_ss = 0.0  # Σ‖x − μ‖² so far
        self.error_ss = 0.0  # Σ‖x − x̂‖² so far

    def update(self, x: ArrayLike, x_hat: ArrayLike) -> FvuAccumulator:
        """Add a chunk ``x, x_hat [n, d_in]``; returns ``self``."""
        x64, xh64 = _pair(x, x_hat)
        n_b = x64.shape[0]
        if n_b == 0:
            return self
        mean_b = x64.mean(0)
        ss_b = float((x64 - mean_b).pow(2).sum())
        self.error_ss += float((x64 - xh64).pow(2).sum())
        self._merge(n_b, mean_b, ss_b)
        return self

    def merge(self, other: FvuAccumulator) -> FvuAccumulator:
        """Fold another accumulator (e.g. from another worker) into this one; returns ``self``."""
        if other.n_tokens:
            assert other.mean is not None
            self.error_ss += other.error_ss
            self._merge(other.n_tokens, other.mean, other.total_ss)
        return self

    def _merge(self, n_b: int, mean_b: Tensor, ss_b: float) -> None:
        if self.mean is None:
            self.n_tokens, self.mean, self.total_ss = n_b, mean_b.clone(), ss_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"chunk has d_in={mean_b.shape[0]} but earlier chunks had d_in={self.mean.shape[0]}.")
        n_a = self.n_tokens
        n = n_a + n_b
        delta = mean_b - self.mean
        # Chan, Golub & LeVeque (1979): M2 = M2_a + M2_b + ‖δ‖² n_a n_b / n.
        self.total_ss += ss_b + float(delta.pow(2).sum()) * n_a * n_b / n
        self.mean += delta * (n_b / n)
        self.n_tokens = n

    @property
    def fvu(self) -> float:
        """The pooled FVU of everything seen so far (ValueError when undefined: no tokens or zero variance)."""
        if self.n_tokens == 0:
            raise ValueError("FVU is undefined: no tokens were accumulated.")
        if self.total_ss <= 0:
            raise ValueError("FVU is undefined: the activations have zero variance about their mean.")
        return self.error_ss / self.total_ss


def fvu(x: ArrayLike, x_hat: ArrayLike) -> float:
    """Pooled FVU = Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − mean(x)‖² over ``x, x_hat [N, d_in]`` (see :class:`FvuAccumulator`)."""
    return FvuAccumulator().update(x, x_hat).fvu


# --------------------------------------------------------------------------------------------- latents


def _hist_quantile(hist: np.ndarray, q: float) -> int:
    """Quantile of integer data given its histogram (numpy ``method="inverted_cdf"``: an observed value)."""
    n = int(hist.sum())
    rank = max(int(np.ceil(q * n)), 1)  # 1-based rank of the order statistic
    return int(np.searchsorted(np.cumsum(hist), rank, side="left"))


class LatentAccumulator:
    """Per-latent firing counts, activation sums and the L0 histogram, streamed over chunks of ``latents``.

    Feature density = fraction of tokens on which a latent is nonzero (SAELens/SAEBench ``feature_density``).
    A latent is *dead* when it never fires on the evaluation set and *dense* when its density exceeds
    ``DENSE_THRESHOLD`` (SAEBench ``freq_over_10_percent``). L0 quantiles are exact (from a histogram).
    """

    def __init__(self, d_sae: int) -> None:
        self.d_sae = d_sae
        self.n_tokens = 0
        self.fire_count = np.zeros(d_sae, dtype=np.int64)
        self.activation_sum = np.zeros(d_sae, dtype=np.float64)  # Σ_t f_t (for mean activation rankings)
        self.l0_hist = np.zeros(d_sae + 1, dtype=np.int64)  # l0_hist[v] = number of tokens with L0 = v

    def update(self, latents: ArrayLike) -> LatentAccumulator:
        """Add a chunk ``latents [n, d_sae]``; returns ``self``."""
        f = _latents_np(latents, self.d_sae)
        self.n_tokens += f.shape[0]
        self.fire_count += np.count_nonzero(f, axis=0)
        self.activation_sum += f.sum(0, dtype=np.float64)
        self.l0_hist += np.bincount(np.count_nonzero(f, axis=1), minlength=self.d_sae + 1)
        return self

    def update_codes(self, indices: ArrayLike, values: ArrayLike) -> LatentAccumulator:
        """Add a chunk given as sparse codes (indices, values [n, L]; zero values are padding or inactive)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices).reshape(len(indices), -1)
        val = np.asarray(values.cpu() if isinstance(values, Tensor) else values).reshape(len(values), -1)
        active = val != 0
        self.n_tokens += idx.shape[0]
        self.fire_count += np.bincount(idx[active], minlength=self.d_sae)
        self.activation_sum += np.bincount(idx.reshape(-1), weights=val.reshape(-1).astype(np.float64),
                                           minlength=self.d_sae)
        self.l0_hist += np.bincount(active.sum(1), minlength=self.d_sae + 1)
        return self

    @property
    def feature_density(self) -> np.ndarray:
        """[d_sae] float64: fraction of tokens on which each latent fires."""
        return self.fire_count / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """[d_sae] float64: mean activation over all tokens (zeros included)."""
        return self.activation_sum / max(self.n_tokens, 1)

    @property
    def mean_when_active(self) -> np.ndarray:
        """[d_sae] float64: mean activation over the tokens where the latent fires (NaN if it never fires)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.activation_sum / self.fire_count

    @property
    def dead(self) -> np.ndarray:
        """[d_sae] bool: never active on the tokens seen."""
        return self.fire_count == 0

    def dense(self, threshold: float = DENSE_THRESHOLD) -> np.ndarray:
        """[d_sae] bool: active on more than ``threshold`` of the tokens seen."""
        return self.feature_density > threshold

    @property
    def l0_mean(self) -> float:
        """Mean number of active latents per token."""
        return float(np.dot(np.arange(self.d_sae + 1, dtype=np.float64), self.l0_hist) / max(self.n_tokens, 1))

    def l0_quantiles(self, qs: Sequence[float] = L0_QUANTILES) -> dict[float, int]:
        """Exact L0 quantiles (an observed L0 value each; numpy ``inverted_cdf``)."""
        if self.n_tokens == 0:
            raise ValueError("L0 quantiles are undefined: no tokens were accumulated.")
        return {q: _hist_quantile(self.l0_hist, q) for q in qs}


# --------------------------------------------------------------------------------------------- all together


class ReconstructionAccumulator:
    """Every reconstruction and sparsity metric of one SAE over an evaluation set, streamed in chunks.

    Per-token quantities (nmse, cosine, l2 ratio) are averaged over tokens; FVU and the relative reconstruction
    bias are ratios of pooled sums (a ratio of means, not a mean of ratios). :meth:`update` takes x, x_hat and the
    latents (dense, or sparse codes); the workflow, which already holds the per-token sums and the variance of x,
    uses :meth:`add` and passes the variance to :meth:`summary`.
    """

    def __init__(self, d_sae: int | None = None) -> None:
        self.fvu_acc = FvuAccumulator()
        self.latents = LatentAccumulator(d_sae) if d_sae is not None else None
        self.n_tokens = 0
        self._sums = dict.fromkeys(("error_norm_sq", "nmse_per_token", "cosine", "l2_ratio", "x_hat_norm_sq",
                                    "x_dot_x_hat"), 0.0)

    def update(self, x: ArrayLike, x_hat: ArrayLike, latents: ArrayLike | None = None,
               codes: tuple[ArrayLike, ArrayLike] | None = None) -> ReconstructionAccumulator:
        """Add a chunk: ``x, x_hat [n, d_in]`` and ``latents [n, d_sae]`` or ``codes`` (indices, values [n, L]);
        returns ``self``."""
        x64, xh64 = _pair(x, x_hat)
        self.fvu_acc.update(x64, xh64)
        self.add(token_sums(x64, xh64))
        if self.latents is not None:
            if latents is not None:
                if latents.shape[0] != x64.shape[0]:
                    raise ValueError(f"latents has {latents.shape[0]} rows but x has {x64.shape[0]}.")
                self.latents.update(latents)
            elif codes is not None:
                self.latents.update_codes(*codes)
        return self

    def add(self, t: TokenSums) -> TokenSums:
        """Add a chunk's per-token sums (no latents, no variance of x); returns ``t``."""
        s = self._sums
        self.n_tokens += int(t.x_norm_sq.shape[0])
        for key, value in (("error_norm_sq", t.error_norm_sq), ("nmse_per_token", t.nmse), ("cosine", t.cosine),
                           ("l2_ratio", t.l2_ratio), ("x_hat_norm_sq", t.x_hat_norm_sq),
                           ("x_dot_x_hat", t.x_dot_x_hat)):
            s[key] += float(value.sum(dtype=torch.float64))
        return t

    def summary(self, total_ss: float | None = None, dense_threshold: float = DENSE_THRESHOLD,
                quantiles: Sequence[float] = L0_QUANTILES) -> dict[str, float | int]:
        """Headline numbers as a flat JSON-able mapping (names carry their definition).

        ``total_ss`` = Σ‖x − x̄‖² over the same tokens (default: from the x seen by :meth:`update`);
        ``relative_reconstruction_bias`` = E‖x̂‖² / E⟨x, x̂⟩ (Gated-SAE paper, eq. 10; 1 = no shrinkage).
        """
        n = self.n_tokens
        if n == 0:
            raise ValueError("no tokens were accumulated.")
        if total_ss is None:
            total_ss = self.fvu_acc.total_ss
        if total_ss <= 0:
            raise ValueError("FVU is undefined: the activations have zero variance about their mean.")
        s = self._sums
        out: dict[str, float | int] = {
            "n_tokens": n,
            "fvu": s["error_norm_sq"] / total_ss,
            "error_norm_sq_mean": s["error_norm_sq"] / n,
            "total_variance_per_token": total_ss / n,
            "nmse_per_token_mean": s["nmse_per_token"] / n,
            "cosine_mean": s["cosine"] / n,
            "l2_ratio_mean": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["x_hat_norm_sq"] / s["x_dot_x_hat"],
        }
        lat = self.latents
        if lat is not None and lat.n_tokens:
            dead, dense = lat.dead, lat.dense(dense_threshold)
            out |= {"d_sae": lat.d_sae, "l0_mean": lat.l0_mean, "dead_count": int(dead.sum()),
                    "dead_fraction": float(dead.mean()), "dense_count": int(dense.sum()),
                    "dense_fraction": float(dense.mean()), "dense_threshold": dense_threshold}
            out |= {f"l0_p{100 * q:g}": v for q, v in lat.l0_quantiles(quantiles).items()}
        return out

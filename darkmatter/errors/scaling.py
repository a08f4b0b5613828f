"""The scaling law of SAE error with width, and the decomposition of Figure 1 (docs/science.md, experiment 2; Engels et al.).

    FVU_total(W) = c + a·W^(−m),  a, c, m > 0

fitted by nonlinear least squares (``scipy.optimize.curve_fit``, trust-region reflective with bounds). c is the
asymptote: the part of the error that does not shrink as the SAE widens (the "dark matter"). The amplitude is
fitted as α = a·W₀^(−m) at the geometric-mean width W₀ (a and m are nearly collinear in the raw parametrisation;
α is the FVU above the asymptote at W₀) and reported as a = α·W₀^m with the delta-method covariance.

Confidence intervals:

- ``"t"``: θ̂ ± t_{(1+confidence)/2, n−3}·SE, SE from the linearised covariance σ̂²(JᵀJ)⁻¹ (residual variance
  σ̂² = RSS/(n − 3)); n ≥ 4 points so that σ̂² exists.
- ``"bootstrap"``: percentile intervals of the residual bootstrap (resample the fit's residuals, rescaled by
  √(n/(n−3)), add them to the fitted curve, refit; Davison & Hinkley 1997, §6.3). With 5–8 widths the case
  bootstrap would drop whole widths and is not used.

Figure-1 regions at each width (:func:`scaling_decomposition`): "absent features" = curve − c; "linear error" =
c − mean FVU_nonlinear; "nonlinear error" = FVU_nonlinear. The paper claims FVU_nonlinear lies under c; when it
does not, "linear error" is negative and reported as such (a finding, not clipped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from scipy import optimize, stats

log = logging.getLogger(__name__)

MIN_POINTS = 4  # three parameters plus at least one degree of freedom for the residual variance
M_MAX = 10.0  # upper bound on the exponent (keeps the optimiser away from a step function)


def power_law(widths: np.ndarray, a: float, c: float, m: float) -> np.ndarray:
    """c + a·W^(−m) [len(widths)]."""
    return c + a * np.asarray(widths, dtype=np.float64) ** (-m)


def _scaled(w_rel: np.ndarray, alpha: float, c: float, m: float) -> np.ndarray:
    return c + alpha * w_rel ** (-m)


@dataclass(frozen=True)
class PowerLawFit:
    """FVU_total(W) = c + a·W^(−m) with confidence intervals.

    a, c, m: estimates; a_ci, c_ci, m_ci: (low, high) at ``confidence`` by ``ci_method``; cov [3, 3]: linearised
    covariance of (a, c, m); amplitude_at_ref: α = a·W₀^(−m) at width_ref W₀; residual_std: √(RSS/dof);
    n_boot_failed: bootstrap refits that did not converge (bootstrap only).
    """

    a: float
    c: float
    m: float
    a_ci: tuple[float, float]
    c_ci: tuple[float, float]
    m_ci: tuple[float, float]
    cov: np.ndarray
    confidence: float
    ci_method: str
    width_ref: float
    amplitude_at_ref: float
    residual_std: float
    dof: int
    widths: np.ndarray
    fvu_total: np.ndarray
    n_boot_failed: int = 0

    def predict(self, widths: Sequence[float] | np.ndarray) -> np.ndarray:
        """Fitted FVU_total at ``widths``."""
        return power_law(np.asarray(widths, dtype=np.float64), self.a, self.c, self.m)

    def summary(self) -> dict[str, float]:
        """Headline numbers (JSON-able)."""
        return {"a": self.a, "c": self.c, "m": self.m, "c_ci_low": self.c_ci[0], "c_ci_high": self.c_ci[1],
                "a_ci_low": self.a_ci[0], "a_ci_high": self.a_ci[1], "m_ci_low": self.m_ci[0],
                "m_ci_high": self.m_ci[1], "confidence": self.confidence, "residual_std": self.residual_std,
                "dof": self.dof}


def _validate(widths: Sequence[float] | np.ndarray, fvu_total: Sequence[float] | np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(widths, dtype=np.float64).reshape(-1)
    y = np.asarray(fvu_total, dtype=np.float64).reshape(-1)
    if w.shape != y.shape:
        raise ValueError(f"widths has {w.size} values but fvu_total has {y.size}; give one FVU per width.")
    if w.size < MIN_POINTS:
        raise ValueError(f"fitting c + a·W^(−m) needs at least {MIN_POINTS} (width, FVU) points (3 parameters and "
                         f"a residual degree of freedom), got {w.size}.")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"widths must be finite and > 0, got {w.tolist()}.")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"fvu_total must be finite, got {y.tolist()}.")
    if np.unique(w).size < MIN_POINTS:
        raise ValueError(f"the law needs at least {MIN_POINTS} distinct widths, got {np.unique(w).tolist()}.")
    return w, y


def _initial(w_rel: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Starting point: c₀ just under the smallest FVU, then (α, m) from a log-log line through y − c₀."""
    c0 = max(0.5 * float(y.min()), 1e-6)
    excess = np.maximum(y - c0, 1e-9)
    slope, intercept = np.polyfit(np.log(w_rel), np.log(excess), 1)
    return float(np.exp(intercept)), c0, float(np.clip(-slope, 0.05, M_MAX / 2))


def _fit(w_rel: np.ndarray, y: np.ndarray, p0: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    lower, upper = [1e-12, 0.0, 1e-6], [np.inf, np.inf, M_MAX]
    p0c = np.clip(p0, np.array(lower) + 1e-9, np.minimum(upper, 1e12))
    # tight tolerances: three parameters, a handful of points; scipy's 1e-8 defaults stop 1e-9 short on exact data
    popt, pcov = optimize.curve_fit(_scaled, w_rel, y, p0=p0c, bounds=(lower, upper), method="trf",
                                    max_nfev=20_000, ftol=1e-12, xtol=1e-12, gtol=1e-12)
    return popt, pcov


def fit_power_law(widths: Sequence[float] | np.ndarray, fvu_total: Sequence[float] | np.ndarray, *,
                  confidence: float = 0.95, ci: Literal["t", "bootstrap"] = "t", n_boot: int = 1000,
                  seed: int = 0) -> PowerLawFit:
    """Fit FVU_total(W) = c + a·W^(−m) (a, c, m > 0) to one FVU per width (≥ 4 distinct widths).

    ``ci="t"`` gives linearised t intervals, ``"bootstrap"`` residual-bootstrap percentile intervals
    (``n_boot`` refits, ``np.random.default_rng(seed)``).
    """
    w, y = _validate(widths, fvu_total)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}.")
    w0 = float(np.exp(np.mean(np.log(w))))
    w_rel = w / w0
    popt, pcov = _fit(w_rel, y, _initial(w_rel, y))
    alpha, c, m = (float(v) for v in popt)
    dof = w.size - 3
    resid = y - _scaled(w_rel, *popt)
    residual_std = float(np.sqrt(resid @ resid / dof))
    # (α, c, m) → (a, c, m) with a = α·W₀^m: Jacobian rows ∂a = (W₀^m, 0, a·ln W₀)
    a = alpha * w0**m
    jac = np.array([[w0**m, 0.0, a * math.log(w0)], [0, 1, 0], [0, 0, 1]])
    cov = jac @ pcov @ jac.T
    if ci == "t":
        half = stats.t.ppf((1 + confidence) / 2, dof) * np.sqrt(np.maximum(np.diag(cov), 0))
        cis = [(float(v - h), float(v + h)) for v, h in zip((a, c, m), half, strict=True)]
        failed = 0
    elif ci == "bootstrap":
        cis, failed = _bootstrap(w_rel, w0, popt, resid, confidence, n_boot, seed)
    else:
        raise ValueError(f"ci must be 't' or 'bootstrap', got {ci!r}.")
    if c <= 1e-9 or m >= M_MAX * 0.999:
        log.warning("the power-law fit sits on a bound (c=%.3g, m=%.3g); its intervals are unreliable.", c, m)
    return PowerLawFit(a=a, c=c, m=m, a_ci=cis[0], c_ci=cis[1], m_ci=cis[2], cov=cov, confidence=confidence,
                       ci_method=ci, width_ref=w0, amplitude_at_ref=alpha, residual_std=residual_std, dof=dof,
                       widths=w, fvu_total=y, n_boot_failed=failed)


def _bootstrap(w_rel: np.ndarray, w0: float, popt: np.ndarray, resid: np.ndarray, confidence: float, n_boot: int,
               seed: int) -> tuple[list[tuple[float, float]], int]:
    """Residual-bootstrap percentile intervals of (a, c, m) and the number of failed refits."""
    if n_boot < 20:
        raise ValueError(f"n_boot must be >= 20 for percentile intervals, got {n_boot}.")
    rng = np.random.default_rng(seed)
    n = resid.size
    scaled = (resid - resid.mean()) * math.sqrt(n / (n - 3))  # leverage-free rescaling (Davison & Hinkley 6.3)
    fitted = _scaled(w_rel, *popt)
    draws, failed = [], 0
    for _ in range(n_boot):
        y_star = fitted + scaled[rng.integers(0, n, n)]
        try:
            p, _ = _fit(w_rel, y_star, tuple(popt))
        except (RuntimeError, ValueError):
            failed += 1
            continue
        draws.append((p[0] * w0 ** p[2], p[1], p[2]))
    if len(draws) < n_boot // 2:
        raise RuntimeError(f"only {len(draws)} of {n_boot} bootstrap refits converged; the law does not fit.")
    lo, hi = np.quantile(np.array(draws), [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return [(float(lo[i]), float(hi[i])) for i in range(3)], failed


def scaling_decomposition(fit: PowerLawFit, widths: Sequence[float] | np.ndarray,
                          fvu_nonlinear: Sequence[float] | np.ndarray) -> pl.DataFrame:
    """The stacked regions of Figure 1 at each width (all in FVU units, i.e. fractions of Σ‖x − x̄‖²).

    Columns: width, fvu_total_fit (the curve), asymptote (c), absent_features (curve − c), fvu_nonlinear (as
    measured), fvu_nonlinear_mean (its mean over widths), linear_error (c − mean FVU_nonlinear, the same at every
    width), nonlinear_error (FVU_nonlinear of that width).
    """
    w = np.asarray(widths, dtype=np.float64)
    nl = np.asarray(fvu_nonlinear, dtype=np.float64)
    if w.shape != nl.shape:
        raise ValueError(f"widths has {w.size} values but fvu_nonlinear has {nl.size}; give one per width.")
    curve = fit.predict(w)
    nl_mean = float(nl.mean())
    return pl.DataFrame({
        "width": w,
        "fvu_total_fit": curve,
        "asymptote": np.full(w.size, fit.c),
        "absent_features": curve - fit.c,
        "fvu_nonlinear": nl,
        "fvu_nonlinear_mean": np.full(w.size, nl_mean),
        "linear_error": np.full(w.size, fit.c - nl_mean),
        "nonlinear_error": nl,
    })

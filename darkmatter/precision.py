"""Compute precision: bf16 autocast only where the machine runs bf16 matmuls fast.

CPUs with AVX-512 BF16 (or AMX) run a bf16 GEMM at about twice the float32 rate; CPUs with AVX2 only emulate it
and run it 40 to 180 times *slower* (measured: 0.5 vs 87 GFLOP/s on 2 AVX2 cores). Every step that can use bf16
(harvesting, SAE training) therefore takes a ``precision`` setting:

- ``float32`` / ``bfloat16`` force the choice;
- ``auto`` (the default) measures both once per process on a small GEMM of the workflow's shape (warm-up, then
  the best of :data:`PROBE_REPEATS` calls each; well under a second even where bf16 is slow) and takes bf16 only
  when it is at least :data:`BF16_MIN_SPEEDUP` times faster. On a CUDA device (darkmatter.device) ``auto`` takes
  bf16 when the GPU runs it natively (compute capability 8.0, Ampere, and later: at least twice float32's
  tensor-core rate; older GPUs only emulate it), without measuring.

The resolved choice, the measured ratio and the CPU capability are recorded in each artifact's provenance, so a
result always says which precision made it. bf16 changes activations by about 1% and eval FVU by about 1e-4
(measured on the default experiment); results must not depend on the choice beyond such tolerances.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

Precision = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
BF16_MIN_SPEEDUP = 1.25  # AVX-512 BF16 machines measure ~2x, AVX2 ones ~0.01x: the threshold sits far from both
PROBE_SHAPE = (128, 576, 576)  # rows x d_model x d_model of the embedded model: 85 MFLOP per GEMM
PROBE_REPEATS = 3


@dataclass(frozen=True)
class PrecisionChoice:
    """A resolved ``precision`` setting: ``dtype`` is ``float32`` or ``bfloat16``; ``bf16_speedup`` is the measured
    bf16/float32 throughput ratio (None when the setting forced the choice)."""

    setting: str
    dtype: str
    bf16_speedup: float | None
    cpu_capability: str

    @property
    def autocast_bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def record(self) -> dict[str, Any]:
        """JSON-able, for provenance and metadata."""
        return asdict(self)


def _best_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    a @ b  # warm-up: oneDNN creates its bf16 primitive on the first call
    best = float("inf")
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def measure_bf16_speedup(seed: int = 0) -> float:
    """float32 seconds / bf16 seconds of the same CPU GEMM (> 1: bf16 is faster); measured once per process."""
    n, k, m = PROBE_SHAPE
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, k, generator=gen), torch.randn(k, m, generator=gen)
    fp32 = _best_seconds(a, b)
    bf16 = _best_seconds(a.bfloat16(), b.bfloat16())
    return fp32 / max(bf16, 1e-12)


def resolve_precision(setting: str, device: torch.device | str = "cpu") -> PrecisionChoice:
    """Turn a ``precision`` setting (``auto``, ``float32``, ``bfloat16``) into the dtype this machine will use on
    ``device`` (a resolved device, darkmatter.device)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {setting!r}.")
    capability = torch.backends.cpu.get_cpu_capability()
    if setting != "auto":
        return PrecisionChoice(setting, setting, None, capability)
    if torch.device(device).type == "cuda":
        native = torch.cuda.get_device_capability(device) >= (8, 0)
        return PrecisionChoice(setting, "bfloat16" if native else "float32", None, capability)
    speedup = measure_bf16_speedup()
    dtype = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return PrecisionChoice(setting, dtype, round(speedup, 4), capability)


def autocast(bf16: bool, device_type: str = "cpu"):
    """Autocast to bf16 on ``device_type`` (``cpu`` or ``cuda``: a ``torch.device``'s ``type``) when ``bf16``, else
    a no-op context."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

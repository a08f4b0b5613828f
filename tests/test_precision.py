"""Precision: forced settings pass through, ``auto`` follows the measured bf16/float32 speed ratio."""

from __future__ import annotations

import math

import pytest
import torch

from darkmatter import precision
from darkmatter.precision import BF16_MIN_SPEEDUP, autocast, resolve_precision


@pytest.mark.parametrize("setting", ["float32", "bfloat16"])
def test_a_forced_setting_is_used_without_measuring(setting, monkeypatch):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: pytest.fail("measured a forced setting"))
    choice = resolve_precision(setting)
    assert choice.dtype == setting and choice.bf16_speedup is None
    assert choice.autocast_bf16 == (setting == "bfloat16")
    assert choice.record()["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize(("speedup", "dtype"), [(0.01, "float32"), (BF16_MIN_SPEEDUP * 0.99, "float32"),
                                                (BF16_MIN_SPEEDUP, "bfloat16"), (2.0, "bfloat16")])
def test_auto_takes_bf16_only_when_it_is_measured_faster(speedup, dtype, monkeypatch):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: speedup)
    choice = resolve_precision("auto")
    assert choice.dtype == dtype and choice.bf16_speedup == pytest.approx(speedup, rel=1e-3)


def test_the_probe_measures_a_finite_positive_ratio_once_per_process():
    ratio = precision.measure_bf16_speedup()
    assert math.isfinite(ratio) and ratio > 0
    assert precision.measure_bf16_speedup() == ratio  # cached: every step of one process sees the same choice


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="'fp16'"):
        resolve_precision("fp16")


def test_autocast_runs_matmuls_in_bf16_only_when_asked():
    a = torch.randn(4, 8)
    with autocast(True):
        assert (a @ a.T).dtype == torch.bfloat16
    with autocast(False):
        assert (a @ a.T).dtype == torch.float32

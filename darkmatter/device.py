"""Where the tensor work runs: the ``device`` setting (``auto``, ``cpu``, ``cuda`` or ``cuda:<i>``), resolved once.

``auto`` takes the first CUDA GPU when torch sees one, else the CPU. The setting is a top-level key of the
experiment config; the workflow hands it to every step through the environment variable :data:`ENV_VAR` (read as
the default of the CLI's ``--device``), not through the steps' ``--params``, so that — like the number of threads —
it never reruns a finished step: the device changes results only by float rounding, and each artifact's provenance
records the device that made it (:func:`device_record`).

What runs on the device: the language model's forward passes (harvest, the CE splices), SAE training (also of the
error SAEs), encoding, and the GEMMs of gradient pursuit. Each moves its results to the CPU only to write them. What
stays on the CPU, whatever the setting: the error measurement (float64 moments and SciPy sparse products,
darkmatter.errors.decompose), gradient pursuit's per-token loop (a compiled CPU kernel), and the analyses.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from darkmatter.config import ConfigError
from darkmatter.config.validate import DEVICE_RE

ENV_VAR = "DARKMATTER_DEVICE"
KEY = "device"


def check_setting(setting: str, key: str = KEY) -> str:
    """``setting`` if it is a valid ``device`` value (whatever this machine has), else a one-sentence ConfigError."""
    if not isinstance(setting, str) or DEVICE_RE.fullmatch(setting) is None:
        raise ConfigError(f"key '{key}' must be auto, cpu, cuda or cuda:<index>, got {setting!r}.")
    return setting


def resolve_device(setting: str = "auto", key: str = KEY) -> torch.device:
    """The ``torch.device`` that ``setting`` names on this machine (the one place a device setting is read).

    ``auto``: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``. Asking for a CUDA device this machine does
    not have is a one-sentence ConfigError naming ``key``."""
    check_setting(setting, key)
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"key '{key}' is {setting!r} but torch sees no CUDA GPU on this machine "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use auto or cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"key '{key}' is {setting!r} but this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}.")
    return device


def default_setting() -> str:
    """The device setting a step uses when none is given: ``$DARKMATTER_DEVICE`` (set by the workflow), else auto."""
    return os.environ.get(ENV_VAR) or "auto"


def device_record(device: torch.device, setting: str | None = None) -> dict[str, Any]:
    """JSON-able facts about ``device`` for provenance: the setting, the resolved device and what it is."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name, capability = torch.cuda.get_device_name(index), ".".join(map(str, torch.cuda.get_device_capability(index)))
        return {"setting": setting, "device": f"cuda:{index}", "name": name, "compute_capability": capability,
                "cuda": torch.version.cuda}
    return {"setting": setting, "device": str(device), "name": torch.backends.cpu.get_cpu_capability()}

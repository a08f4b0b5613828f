"""Fixtures shared by every test: seeding, a single torch thread for tiny tensors, tiny random models on disk."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from darkmatter.config import RandomModelConfig
from darkmatter.data.models import build_random_model, load_model
from tests.chromium import INSTALL_HINT, find_chromium
from tests.helpers import REPO, torch_threads

__all__ = ["REPO"]


@pytest.fixture(autouse=True)
def seeded(request) -> int:
    """Every test starts from the same global torch RNG state, derived from its id (so a test that draws from
    torch's global generator is reproducible on its own and in any order); the seed is also available as a fixture
    for tests that make their own generators (numpy code here always takes an explicit Generator)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def rng(seeded: int) -> np.random.Generator:
    """A numpy generator seeded like :func:`seeded`."""
    return np.random.default_rng(seeded)


@pytest.fixture
def one_thread():
    """Tiny tensors: a second torch thread only adds synchronisation (and waits, on a shared 2-core machine)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return build_random_model(RandomModelConfig(architecture="llama", n_layers=3, d_model=32, n_heads=4, d_ff=64),
                              tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_random_model(RandomModelConfig(architecture="gpt2", n_layers=3, d_model=32, n_heads=4, d_ff=64),
                              tmp_path_factory.mktemp("gpt2") / "hf")


@pytest.fixture(scope="session")
def llama(llama_dir):
    return load_model(str(llama_dir))


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return load_model(str(gpt2_dir))


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    """The headless Chromium of the browser tests (the report, the hostile-corpus check)."""
    binary = find_chromium()
    if binary is None:
        message = f"Chromium is not installed; {INSTALL_HINT}."
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the browser tests, never pass without them
        pytest.skip(message)
    return binary

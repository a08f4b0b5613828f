"""Shared fixtures: tiny random models saved to disk and loaded through the same path as real checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkmatter.config import RandomModelConfig
from darkmatter.data.models import build_random_model, load_model

REPO = Path(__file__).resolve().parent.parent


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

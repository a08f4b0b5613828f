"""Sparse codes: the one encoder loop equals the dense forward pass for every architecture, decodes to the same
reconstruction, does not depend on the chunking, and round-trips through its folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from darkmatter.sae.architectures import ARCHITECTURES
from darkmatter.sae.codes import encode, encode_to_folder, load_codes, sparse_codes
from tests.helpers import random_sae

D_IN, D_SAE, K = 12, 40, 5
U32 = np.finfo(np.float32).eps / 2


def dense_latents(codes_idx: np.ndarray, codes_val: np.ndarray) -> torch.Tensor:
    """Codes back to dense latents (added, not set: padding entries are (latent 0, value 0))."""
    return torch.zeros(len(codes_idx), D_SAE).scatter_add_(1, torch.from_numpy(codes_idx).long(),
                                                           torch.from_numpy(codes_val))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_codes_equal_the_dense_forward_pass(arch, rng):
    sae = random_sae(arch, D_IN, D_SAE, K, seed=3)
    x = torch.from_numpy(rng.normal(size=(300, D_IN)).astype(np.float32) * 2)
    idx, val = encode(sae, x.numpy(), chunk_tokens=64)
    with torch.no_grad():
        out = sae(x)
    assert idx.dtype == np.int32 and val.dtype == np.float32 and idx.shape == val.shape
    if arch == "topk":
        assert idx.shape[1] == K
    else:  # variable L0: the width is the largest L0, shorter rows are zero-padded
        assert idx.shape[1] == int((out.latents != 0).sum(1).max())
    # the same latents with the same values (the top-k values are exact; ties do not occur with continuous data)
    assert torch.equal(dense_latents(idx, val), out.latents)
    codes = sparse_codes(sae, x.numpy())
    # decoding sums L0 products in another order than the dense GEMM over d_sae: each entry within
    # (d_sae + 1)·u·(Σ|f_i||W_dec[i]| + |b_dec|) of it
    bound = (D_SAE + 1) * U32 * (out.latents.abs() @ sae.W_dec.detach().abs() + sae.b_dec.detach().abs())
    assert ((codes.x_hat(slice(None)) - out.x_hat).abs() <= bound).all()


def test_codes_do_not_depend_on_the_chunking(rng):
    """The same latents whatever the chunk size; values only as far as the encoder GEMM's blocking (which follows
    the number of rows) moves its float32 rounding: within (d_in + 2)·u·(|x − b_dec|·|W_enc| + |b_enc|)."""
    sae = random_sae("topk", D_IN, D_SAE, K, seed=1)
    x = rng.normal(size=(257, D_IN)).astype(np.float32)
    (ia, va), (ib, vb) = encode(sae, x, chunk_tokens=7), encode(sae, x)
    assert np.array_equal(np.sort(ia, axis=1), np.sort(ib, axis=1))
    order_a, order_b = np.argsort(ia, axis=1), np.argsort(ib, axis=1)
    va, vb = np.take_along_axis(va, order_a, 1), np.take_along_axis(vb, order_b, 1)
    scale = np.abs(x - sae.b_dec.detach().numpy()) @ sae.W_enc.detach().abs().numpy() + sae.b_enc.detach().abs().numpy()
    bound = (D_IN + 2) * U32 * np.take_along_axis(scale, np.sort(ia, axis=1), 1)
    assert (np.abs(va - vb) <= bound).all()


def test_folder_round_trip_and_checks(tmp_path, rng):
    sae = random_sae("topk", D_IN, D_SAE, K)
    x = rng.normal(size=(50, D_IN)).astype(np.float32)
    record = encode_to_folder(sae, x, tmp_path / "codes", {"sae_id": "topk-w40-k5-s0", "hook": "h"}, progress=False)
    assert sorted(p.name for p in (tmp_path / "codes").iterdir()) == ["codes.json", "provenance.json",
                                                                      "top_indices.npy", "top_values.npy"]
    assert (record["rows"], record["width"], record["d_sae"], record["k"]) == (50, K, D_SAE, K)
    loaded = load_codes(tmp_path / "codes", sae)
    idx, val = encode(sae, x)
    assert np.array_equal(loaded.top_indices, idx) and np.array_equal(loaded.top_values, val)
    rows = np.array([3, 7, 49])
    assert torch.equal(loaded.x_hat(rows), sparse_codes(sae, x).x_hat(slice(None))[rows])
    with pytest.raises(ValueError, match="d_sae=40, not 41"):
        load_codes(tmp_path / "codes", random_sae("topk", D_IN, D_SAE + 1, K))
    with pytest.raises(ValueError, match="d_in=12"):
        encode(sae, x[:, :5])

"""The workflow's pursuit steps (darkmatter.errors.pursuit): which tokens, how many iterations, the codes folder against
gradient_pursuit itself, and the side-by-side measurement against the decomposition run on the subset directly."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from darkmatter.errors.measure import METRICS, ROWS, SPLIT, TOKEN_ERRORS
from darkmatter.errors.parts import decompose_error
from darkmatter.errors.pursuit import (
    measure_pursuit,
    pursue_to_folder,
    pursuit_l0,
    pursuit_reconstruction,
    pursuit_rows,
)
from darkmatter.io import InputError
from darkmatter.regression import split_mask
from darkmatter.sae import save_sae
from darkmatter.sae.codes import encode_to_folder, load_codes
from darkmatter.sae.pursuit import gradient_pursuit
from tests.helpers import HOOK, random_sae, write_activation_store

D_IN, D_SAE, K = 10, 32, 4
N_CTX, KEEP, MIN_POS = 16, 40, 2
FIT = 400


def test_pursuit_rows_are_whole_seeded_contexts():
    contexts = np.repeat(np.arange(10), 7)
    rows = pursuit_rows(contexts, 4, seed=3)
    assert np.all(np.diff(rows) > 0)  # sorted, no repeats
    chosen = np.unique(contexts[rows])
    assert len(chosen) == 4 and len(rows) == 4 * 7  # every row of each chosen context, and no other
    assert np.array_equal(rows, pursuit_rows(contexts, 4, seed=3))
    assert not np.array_equal(rows, pursuit_rows(contexts, 4, seed=4))
    for n in (None, 10, 11):
        assert np.array_equal(pursuit_rows(contexts, n, seed=0), np.arange(70))


def test_pursuit_l0_multiple_fixed_and_capped():
    l0 = torch.tensor([0, 3, 5, 9])
    assert pursuit_l0(l0, 12).tolist() == [0, 3, 5, 9]
    assert pursuit_l0(l0, 12, multiple=2).tolist() == [0, 6, 10, 12]  # capped at the width
    assert pursuit_l0(l0, 12, fixed=7).tolist() == [7, 7, 7, 7]
    assert pursuit_l0(l0, 5, fixed=7).tolist() == [5, 5, 5, 5]


@pytest.fixture
def setup(tmp_path, rng):
    x = (rng.normal(size=(N_CTX * KEEP, D_IN)) + 2).astype(np.float32)
    contexts = np.repeat(np.arange(N_CTX), KEEP)
    store = write_activation_store(tmp_path / "eval", x, contexts, MIN_POS)
    saes, codes, pursuits = [], [], []
    for i, k in enumerate((K, 2 * K)):
        sae = random_sae("topk", D_IN, D_SAE, k, seed=i)
        path = tmp_path / "saes" / f"topk-w{D_SAE}-k{k}-s0"
        save_sae(sae, path)
        encode_to_folder(sae, x, tmp_path / "codes" / path.name, {"sae_id": path.name}, progress=False)
        saes.append(path)
        codes.append(tmp_path / "codes" / path.name)
        pursuits.append(tmp_path / "pursuit" / path.name)
    return x, contexts, store, saes, codes, pursuits


def test_pursuit_folder_holds_gradient_pursuit_of_the_chosen_rows(setup):
    x, contexts, store, saes, codes, pursuits = setup
    record = pursue_to_folder(saes[0], codes[0], store, HOOK, pursuits[0], contexts=6, seed=1, l0_multiple=2,
                              progress=False)
    rows = np.load(pursuits[0] / ROWS)
    assert np.array_equal(rows, pursuit_rows(contexts, 6, 1))
    assert record["rows"] == len(rows) and record["l0_multiple"] == 2
    sae = random_sae("topk", D_IN, D_SAE, K, seed=0)
    enc = load_codes(codes[0], sae)
    l0 = torch.from_numpy((np.asarray(enc.top_values[rows]) != 0).sum(1)) * 2
    want = gradient_pursuit(torch.from_numpy(x[rows]), sae.W_dec.detach(), sae.b_dec.detach(), l0)
    got = load_codes(pursuits[0], sae)
    assert torch.equal(got.x_hat(slice(None)), want.x_hat)  # the same kernel on the same rows: bitwise
    assert np.array_equal(np.asarray(got.top_indices), want.indices.numpy())
    assert (np.asarray(got.top_values) >= 0).all()


def test_measure_pursuit_equals_the_decomposition_of_the_subset(setup):
    x, contexts, store, saes, codes, pursuits = setup
    for sae, code, out in zip(saes, codes, pursuits, strict=True):
        pursue_to_folder(sae, code, store, HOOK, out, contexts=8, seed=0, progress=False)
    out = pursuits[0].parent.parent / "pursuit_errors"
    records = measure_pursuit(saes, codes, pursuits, store, HOOK, out, fit_tokens=FIT, seed=5, intercept=True,
                              ridge=0.0, progress=False)
    rows = np.load(out / ROWS)
    mask = split_mask(len(x), FIT, 5)[rows]  # the decomposition's split, restricted to the pursued rows
    assert np.array_equal(np.load(out / SPLIT), mask)
    assert sorted(records) == sorted(f"{m}/{s.name}" for m in ("encoder", "pursuit") for s in saes)
    for i, path in enumerate(saes):
        sae = random_sae("topk", D_IN, D_SAE, (K, 2 * K)[i], seed=i)
        for method, recon in (("encoder", load_codes(codes[i], sae).x_hat(rows)),  # the full codes' rows
                              ("pursuit", load_codes(pursuits[i], sae).x_hat(slice(None)))):
            ref = decompose_error(x[rows], recon.numpy(), mask=mask, intercept=True, ridge=0.0)
            record = json.loads((out / method / path.name / METRICS).read_text())
            assert record["method"] == method and record["n_tokens"] == len(rows)
            for key, want in (("fvu", ref.fit.fvu_total), ("fvu_nonlinear", ref.fit.fvu_nonlinear)):
                assert record[key] == pytest.approx(want, rel=1e-9), (method, key)  # same float64 moments
            table = pl.read_parquet(out / method / path.name / TOKEN_ERRORS)
            assert np.array_equal(table["row"].to_numpy(), rows)  # eval rows, joinable with tokens
            assert np.array_equal(table["fit"].to_numpy(), mask)


def test_measure_pursuit_rejects_folders_of_different_rows(setup):
    x, contexts, store, saes, codes, pursuits = setup
    pursue_to_folder(saes[0], codes[0], store, HOOK, pursuits[0], contexts=4, seed=0, progress=False)
    pursue_to_folder(saes[1], codes[1], store, HOOK, pursuits[1], contexts=4, seed=1, progress=False)
    with pytest.raises(InputError, match="pursued other eval rows"):
        measure_pursuit(saes, codes, pursuits, store, HOOK, pursuits[0].parent / "errors", fit_tokens=FIT, seed=0,
                        intercept=True, ridge=0.0, progress=False)
    with pytest.raises(InputError, match="give one of each per SAE"):
        measure_pursuit(saes, codes[:1], pursuits, store, HOOK, pursuits[0].parent / "errors", fit_tokens=FIT,
                        seed=0, intercept=True, ridge=0.0, progress=False)


def test_pursuit_reconstruction_pursues_each_token_for_its_encoder_l0(rng):
    sae = random_sae("topk", D_IN, D_SAE, K, seed=2)
    x = torch.from_numpy(rng.normal(size=(50, D_IN)).astype(np.float32))
    l0 = (sae.encode(x) != 0).sum(1)
    want = gradient_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), 3 * l0).x_hat
    assert torch.equal(pursuit_reconstruction(sae, l0_multiple=3)(x), want)

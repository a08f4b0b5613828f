"""The error-measurement step: its folder, its numbers against independent references (a dense forward pass and
darkmatter.errors.metrics, scikit-learn), the commands that run it, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from darkmatter import cli
from darkmatter.errors.measure import DESIGN, METRICS, SPLIT, TEST_SUMS, TOKEN_ERRORS, measure_hook
from darkmatter.errors.metrics import ReconstructionAccumulator
from darkmatter.io import InputError
from darkmatter.regression import GroupSums, load_moments, split_mask
from darkmatter.sae import save_sae
from darkmatter.sae.codes import encode_to_folder
from darkmatter.store.schema import TABLES
from tests.helpers import HOOK, REPO, random_sae, write_activation_store

D_IN, D_SAE, K = 8, 24, 3
N_CTX, KEEP, MIN_POS = 20, 30, 2
FIT = 360


@pytest.fixture
def setup(tmp_path, rng):
    x = (rng.normal(size=(N_CTX * KEEP, D_IN)) + 3).astype(np.float32)  # a mean far from zero
    store = write_activation_store(tmp_path / "eval", x, np.repeat(np.arange(N_CTX), KEEP), MIN_POS)
    saes, codes = [], []
    for i, arch in enumerate(("topk", "relu")):
        sae = random_sae(arch, D_IN, D_SAE, K, seed=i)
        path = tmp_path / "saes" / f"{arch}-w{D_SAE}-k{K}-s0"
        save_sae(sae, path)
        encode_to_folder(sae, x, tmp_path / "codes" / path.name, {"sae_id": path.name}, progress=False)
        saes.append(path)
        codes.append(tmp_path / "codes" / path.name)
    return x, store, saes, codes, tmp_path / "errors"


def test_folder_and_numbers_against_independent_references(setup):
    x, store, saes, codes, out = setup
    records = measure_hook(saes, codes, store, HOOK, out, fit_tokens=FIT, seed=0, intercept=True, ridge=0.0,
                           progress=False)
    mask = split_mask(len(x), FIT, 0)
    assert np.array_equal(np.load(out / SPLIT), mask)
    design = load_moments(out / DESIGN)
    assert (design["fit"].n, design["test"].n) == (FIT, len(x) - FIT)
    x64 = x.astype(np.float64)
    for path in saes:
        folder = out / path.name
        assert sorted(p.name for p in folder.iterdir()) == ["linear_map.safetensors", METRICS, TEST_SUMS,
                                                           TOKEN_ERRORS]
        record = json.loads((folder / METRICS).read_text())
        assert record == records[path.name]
        sae = random_sae(path.name.split("-")[0], D_IN, D_SAE, K, seed=saes.index(path))
        with torch.no_grad():
            out_dense = sae(torch.from_numpy(x))
        ref = ReconstructionAccumulator(D_SAE)
        ref.update(x, out_dense.x_hat, latents=out_dense.latents)
        for key, value in ref.summary().items():  # the dense forward pass and the codes: float32 rounding apart
            assert record[key] == pytest.approx(value, rel=1e-5), key
        e = x64 - out_dense.x_hat.double().numpy()
        sk = LinearRegression().fit(x64[mask], e[mask])
        assert record["r2_vector_mean_dims"] == pytest.approx(r2_score(e[~mask], sk.predict(x64[~mask])), abs=1e-5)
        nsq = (e**2).sum(1)
        sk_n = LinearRegression().fit(x64[mask], nsq[mask])
        assert record["r2_norm_sq"] == pytest.approx(r2_score(nsq[~mask], sk_n.predict(x64[~mask])), abs=1e-5)
        assert record["fvu_linear"] + record["fvu_nonlinear"] == pytest.approx(record["fvu"], rel=1e-12)
        tokens = pl.read_parquet(folder / TOKEN_ERRORS)
        assert tokens.columns == [c.name for c in TABLES["token_errors"]] and tokens.height == len(x)
        assert tokens["fit"].to_numpy().tolist() == mask.tolist()
        sums = GroupSums.load(folder / TEST_SUMS)
        assert sums.n.sum() == len(x) - FIT and len(sums.groups) == N_CTX


def test_d_in_mismatch_names_both_sizes(setup, tmp_path):
    x, store, saes, codes, out = setup
    other = tmp_path / "wide"
    save_sae(random_sae("topk", D_IN + 1, D_SAE, K), other)
    with pytest.raises(InputError, match=r"d_in=9 but the activations of .* have d_model=8"):
        measure_hook([other], codes[:1], store, HOOK, out, fit_tokens=FIT, seed=0, intercept=True, ridge=0.0)
    assert not out.exists()  # nothing half-written under the final name


def test_commands_encode_and_measure(setup):
    x, store, saes, codes, out = setup
    for path in saes:  # encode again through the command, into a fresh folder
        cli.main(["--threads", "1", "encode-sae", "--params", "{}", "--sae", str(path), "--activations", str(store),
                  "--hook", HOOK, "--out", str(path.parent.parent / "cli-codes" / path.name)])
    fresh = [path.parent.parent / "cli-codes" / path.name for path in saes]
    for a, b in zip(codes, fresh, strict=True):
        assert np.array_equal(np.load(a / "top_indices.npy"), np.load(b / "top_indices.npy"))
    params = json.dumps({"decomposition": {"fit_tokens": FIT, "intercept": True, "ridge": 0.0, "seed": 0}})
    cli.main(["--threads", "1", "measure-errors", "--params", params, "--activations", str(store), "--hook", HOOK,
              "--saes", *map(str, saes), "--codes", *map(str, fresh), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(p.name for p in saes)


def test_bad_input_is_one_line_with_exit_code_2(setup, tmp_path):
    x, store, saes, codes, out = setup
    params = json.dumps({"decomposition": {"fit_tokens": FIT, "intercept": True, "ridge": 0.0, "seed": 0}})
    res = subprocess.run([sys.executable, "-m", "darkmatter.cli", "measure-errors", "--params", params,
                          "--activations", str(store), "--hook", HOOK, "--saes", *map(str, saes), "--codes",
                          str(codes[0]), "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: got 2 SAE folders but 1 codes folders; give one each."], res.stderr
    assert not out.exists()

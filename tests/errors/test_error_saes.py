"""SAEs trained on error components: joint training equals training each alone, bit for bit; a planted sparse
NonlinearError gives its dictionary back; the eval FVU about the target's mean agrees with a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from darkmatter.config import SaeTrainingConfig
from darkmatter.errors.error_saes import (
    COMPONENTS,
    ErrorComponents,
    component_fvu,
    component_rows,
    evaluate,
    train_error_saes_to_folder,
    train_jointly,
)
from darkmatter.sae.codes import load_codes
from darkmatter.sae.families import SaeSpec
from darkmatter.sae.formats import load_sae
from darkmatter.sae.train import Trainer
from tests.helpers import linear_sae, planted_atoms


def planted(n_rows: int = 60_000, seed: int = 0) -> tuple[np.ndarray, ErrorComponents, torch.Tensor]:
    """x = [u | s]: u dense Gaussian (16 dims), s a sparse combination of 24 unit atoms (16 dims). The base "SAE"
    reconstructs nothing (SaeError = x) and the linear map is the projector on u's dims, so LinearError = [u | 0]
    and NonlinearError = [0 | s]: the nonlinear error is exactly the planted sparse signal."""
    s, atoms = planted_atoms(n_rows=n_rows, d=16, n_atoms=24, seed=seed)
    u = np.random.default_rng(seed).standard_normal((n_rows, 16)).astype(np.float32) * 5
    x = np.concatenate([u, s], axis=1)
    coef = torch.zeros(32, 32)
    coef[:16, :16] = torch.eye(16)
    return x, ErrorComponents(linear_sae(np.zeros((32, 32))), coef, torch.zeros(32)), atoms


def cfg(tokens: int) -> SaeTrainingConfig:
    return SaeTrainingConfig(tokens=tokens, batch_size=1024, warmup_steps=10, buffer_tokens=16_384,
                             dead_tokens=20_000, log_every=10, checkpoint_every=50, precision="float32")


def test_components_sum_to_the_error_and_split_as_planted():
    x, comps, _ = planted(2000)
    ys = comps(torch.from_numpy(x))
    torch.testing.assert_close(ys["sae_error"], torch.from_numpy(x))
    torch.testing.assert_close(ys["linear_error"] + ys["nonlinear_error"], ys["sae_error"], rtol=0, atol=0)
    assert float(ys["linear_error"][:, 16:].abs().max()) == 0.0 and float(ys["nonlinear_error"][:, :16].abs().max()) == 0.0
    np.testing.assert_array_equal(component_rows(x, comps, "nonlinear_error")[np.array([3, 7])][:, 16:], x[[3, 7], 16:])


def test_joint_training_equals_training_each_alone_bitwise():
    x, comps, _ = planted(8000)
    c = cfg(1024 * 12)
    names = ["linear_error", "nonlinear_error"]
    spec = SaeSpec("topk", 48, 3, 0)
    alone = [Trainer(component_rows(x, comps, n), spec, c).run(progress=False) for n in names]
    joint = train_jointly([Trainer(component_rows(x, comps, n), spec, c) for n in names], x, comps, names,
                          progress=False)
    for a, j in zip(alone, joint, strict=True):
        for name, t in a.sae.tensors().items():
            assert torch.equal(t, j.sae.tensors()[name]), name


def test_a_planted_sparse_nonlinear_error_gives_its_dictionary_back(tmp_path):
    x, comps, atoms = planted(60_000)
    contexts = np.repeat(np.arange(60), 1000)
    specs = {name: SaeSpec("topk", 48, 3, 0) for name in COMPONENTS}
    out = tmp_path / "error_saes"
    records = train_error_saes_to_folder(x[:50_000], x[50_000:], contexts[50_000:], comps, {"sae_id": "none"},
                                         specs, cfg(400_000), out, progress=False)
    sae = load_sae(out / "saes" / "nonlinear_error")
    cos = (atoms @ sae.W_dec.detach()[:, 16:].T).max(dim=1).values  # each atom's best decoder row
    assert float(cos.mean()) >= 0.9
    assert records["nonlinear_error"]["fvu"] < 0.2 < records["linear_error"]["fvu"]  # u is dense: no sparse code
    assert records["nonlinear_error"]["l0_mean"] == pytest.approx(3.0, abs=0.05)
    codes = load_codes(out / "codes" / "nonlinear_error", sae)
    assert codes.n_rows == 10_000
    assert not (tmp_path / ".error_saes.ckpt").exists()


def test_component_fvu_from_context_sums_matches_a_direct_computation():
    x, comps, _ = planted(3000)
    contexts = np.repeat(np.arange(6), 500)
    sae = Trainer(component_rows(x, comps, "sae_error"), SaeSpec("topk", 48, 3, 0), cfg(2048)).run(progress=False).sae
    codes, sums = evaluate({"sae_error": sae}, x, contexts, comps, progress=False)
    with torch.no_grad():
        y = torch.from_numpy(x).double()
        resid = (y - sae(torch.from_numpy(x)).x_hat.double()).square().sum()
        direct = float(resid / (y - y.mean(0)).square().sum())
    assert component_fvu(sums, "sae_error")[0] == pytest.approx(direct, rel=1e-5)
    w = np.array([2, 0, 1, 0, 3, 0])  # a resample of contexts: weighted rows
    rows = np.repeat(np.arange(3000), w[contexts])
    with torch.no_grad():
        yw, xw = y[rows], torch.from_numpy(x[rows])
        direct_w = float((yw - sae(xw).x_hat.double()).square().sum() / (yw - yw.mean(0)).square().sum())
    assert component_fvu(sums, "sae_error", w[None])[0] == pytest.approx(direct_w, rel=1e-5)
    assert codes["sae_error"][0].shape == (3000, 3)

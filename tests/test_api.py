"""The public API: every advertised name resolves, and the README's example works on a user's own arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import darkmatter


def test_every_public_name_resolves():
    for name in darkmatter.__all__:
        assert getattr(darkmatter, name) is not None
    with pytest.raises(AttributeError):
        darkmatter.no_such_thing  # noqa: B018


def test_readme_example_on_user_arrays(tmp_path):
    rng = np.random.default_rng(0)
    d, n = 16, 4000
    x = (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0).astype(np.float32)
    w_dec = torch.nn.functional.normalize(torch.randn(64, d, generator=torch.Generator().manual_seed(0)), dim=1)
    cfg = {"architecture": "topk", "d_in": d, "d_sae": 64, "k": 4}
    sae = darkmatter.Sae.from_tensors(cfg, {"W_enc": w_dec.T.contiguous(), "W_dec": w_dec,
                                            "b_enc": torch.zeros(64), "b_dec": torch.zeros(d)})
    darkmatter.save_sae(sae, tmp_path / "sae")
    sae = darkmatter.load_sae_any(tmp_path / "sae")
    with torch.no_grad():
        x_hat = sae(torch.from_numpy(x)).x_hat.numpy()
    total = darkmatter.fvu(x, x_hat)
    res = darkmatter.decompose_error(x, x_hat, fit_tokens=3000, seed=0)
    # One FVU definition: the metric and the decomposition agree; the parts add up.
    assert res.fit.fvu_total == pytest.approx(total, rel=1e-9)
    assert res.fit.fvu_linear + res.fit.fvu_nonlinear == pytest.approx(total, rel=1e-12)
    assert 0 < res.fit.fvu_nonlinear < total
    assert 0 < res.fit.r2_vector.r2_mean_dims < 1

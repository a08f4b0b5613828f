"""The public API: every advertised name resolves, and the README's example works on a user's own arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import darkmatter


def test_every_public_name_resolves_to_a_documented_object():
    for name in darkmatter.__all__:
        obj = getattr(darkmatter, name)
        if callable(obj):  # functions and classes: the public API says what it does
            assert (obj.__doc__ or "").strip(), name
        else:
            assert name == "ARCHITECTURES" and set(obj) == {"topk", "batchtopk", "relu", "jumprelu"}
    assert "load_sae" in dir(darkmatter)
    with pytest.raises(AttributeError, match="no_such_thing"):
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
    sae = darkmatter.load_sae(tmp_path / "sae")
    with torch.no_grad():
        x_hat = sae(torch.from_numpy(x)).x_hat.numpy()
    total = darkmatter.fvu(x, x_hat)
    codes = darkmatter.sparse_codes(sae, x)  # the SAE's encoder, once; everything else decodes the codes
    res = darkmatter.decompose_error(x, codes, fit_tokens=3000, seed=0)
    dense = darkmatter.decompose_error(x, x_hat, fit_tokens=3000, seed=0)
    # One FVU definition: the metric and the decomposition agree (float32 decoding and tile sums: 1e-5), the parts
    # add up, and codes and a dense x_hat are the same reconstruction.
    for r in (res, dense):
        assert r.fit.fvu_total == pytest.approx(total, rel=1e-5)
        assert r.fit.fvu_linear + r.fit.fvu_nonlinear == pytest.approx(r.fit.fvu_total, rel=1e-12)
        assert 0 < r.fit.fvu_nonlinear < total and 0 < r.fit.r2_vector.r2_mean_dims < 1
    assert res.parts.metrics["l0_mean"] == pytest.approx(4, abs=0.01) and "l0_mean" not in dense.parts.metrics
    family = darkmatter.decompose_family(x, [codes, x_hat], fit_tokens=3000, seed=0)
    assert family.fits[0].fvu_nonlinear == pytest.approx(dense.fit.fvu_nonlinear, rel=1e-5)

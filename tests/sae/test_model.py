"""SAE architectures: inference semantics, bad input, folding, bit-exact save/load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from darkmatter.sae.architectures import ARCHITECTURES
from darkmatter.sae.formats import load_sae
from darkmatter.sae.model import Sae, default_cfg, fold, read_sae, save_sae
from tests import helpers

D_IN, D_SAE, K = 12, 40, 5


def random_sae(arch: str, seed: int = 0, unit_decoder: bool = False) -> Sae:
    return helpers.random_sae(arch, D_IN, D_SAE, K, seed=seed, unit_decoder=unit_decoder)


def test_encode_rejects_wrong_d_in_naming_both_sizes():
    sae = random_sae("topk")
    with pytest.raises(ValueError, match=r"13 features.*d_in = 12"):
        sae.encode(torch.randn(3, 13))


def test_unknown_architecture_and_bad_k_are_rejected():
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        Sae(default_cfg("gated", D_IN, D_SAE))
    with pytest.raises(ValueError, match="'k' must be an integer"):
        Sae(default_cfg("topk", D_IN, D_SAE, D_SAE + 1))


def test_topk_has_exactly_k_active_latents_per_token():
    sae = random_sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: the ReLU removes none of the k selected
    latents = sae.encode(torch.randn(200, D_IN))
    assert torch.equal((latents != 0).sum(1), torch.full((200,), K))


def test_inference_semantics_per_architecture():
    x = torch.randn(50, D_IN)
    for arch in ARCHITECTURES:
        sae = random_sae(arch)
        out = sae(x)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        # the same float32 operations: bitwise equal, up to the GEMM's blocking (a few roundings of Σ|terms|)
        bound = (D_IN + 2) * torch.finfo(torch.float32).eps * ((x - sae.b_dec).abs() @ sae.W_enc.abs() + sae.b_enc.abs())
        assert ((out.pre - pre).abs() <= bound).all()
        if arch == "relu":
            expected = pre.relu()
        elif arch == "topk":
            expected = torch.zeros_like(pre).scatter_(1, pre.topk(K, dim=1).indices, pre.topk(K, dim=1).values.relu())
        else:  # jumprelu, batchtopk at inference: thresholded ReLU
            expected = pre.relu() * (pre > sae.threshold)
        assert torch.equal(out.latents, expected), arch
        assert torch.equal(out.x_hat, sae.decode(out.latents))
        assert 0 < int((out.latents > 0).sum()) < out.latents.numel()  # neither all zero nor dense


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip_is_bit_exact(tmp_path, arch):
    sae = random_sae(arch)
    save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    loaded = read_sae(tmp_path / "sae")
    assert loaded.architecture == arch and loaded.cfg == sae.cfg
    original = sae.tensors()
    assert set(loaded.tensors()) == set(original)
    for name, t in loaded.tensors().items():
        assert t.dtype == original[name].dtype and torch.equal(t, original[name]), name
    x = torch.randn(20, D_IN)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # on disk under SAELens' name, so that SAELens opens it (bench/interop.py: SAELens itself reads these folders)
    assert cfg["architecture"] == {"relu": "standard"}.get(arch, arch) and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folded_sae_on_raw_inputs_reproduces_the_scaled_one(tmp_path, arch):
    # Trained on x / s with free decoder norms (top-k variants keep unit rows, as training does); the folded,
    # saved and reloaded copy on raw x must give s·x_hat(x / s) with unit-norm decoder rows. Folding multiplies
    # by s and n_i, so both sides differ only by float32 rounding of sums of ~d_sae products (~1e-7 relative):
    # 1e-5 of the largest |x_hat| entry.
    s = 37.5
    sae = random_sae(arch, unit_decoder=arch in ("topk", "batchtopk"))
    save_sae(fold(sae, input_scale=s), tmp_path / "folded")
    loaded = read_sae(tmp_path / "folded")
    x = torch.randn(100, D_IN) * s + 3 * s
    with torch.no_grad():
        expected = s * sae(x / s).x_hat
        got = loaded(x).x_hat
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert torch.equal(loaded(x).latents > 0, sae(x / s).latents > 0)  # the same latents fire
        norms = loaded.W_dec.norm(dim=1)
        assert (norms - 1).abs().max() <= 1e-6
        if arch in ("relu", "jumprelu"):
            assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 0.1  # the norms really were folded


def test_load_sae_reads_saelens_names(tmp_path):
    # SAELens writes "standard" for a ReLU SAE and may store a JumpReLU's log_threshold
    sae = random_sae("jumprelu")
    folder = tmp_path / "saelens"
    folder.mkdir()
    tensors = sae.tensors()
    tensors["log_threshold"] = tensors.pop("threshold").log()
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE}))
    loaded = load_sae(folder)
    assert torch.allclose(loaded.threshold, sae.threshold, rtol=1e-6, atol=0)
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE}))
    assert load_sae(folder).architecture == "relu"


def test_from_tensors_and_load_report_bad_input(tmp_path):
    tensors = random_sae("topk").tensors()
    tensors["W_dec"] = tensors["W_dec"][:, :-1]
    with pytest.raises(ValueError, match=r"'W_dec' has shape \(40, 11\); expected \(40, 12\)"):
        Sae.from_tensors(default_cfg("topk", D_IN, D_SAE, K), tensors)
    with pytest.raises(ValueError, match=r"lack \['threshold'\]"):
        Sae.from_tensors(default_cfg("jumprelu", D_IN, D_SAE), random_sae("topk").tensors())
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        read_sae(tmp_path / "nowhere")

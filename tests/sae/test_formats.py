"""Foreign SAE formats: files built here with random weights load into an Sae that reconstructs exactly like the
reference formula of the source library, written out in numpy below."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from darkmatter.sae.formats import (
    SaeFormatError,
    detect_format,
    find_saes,
    load_sae,
    load_saelens_pretrained,
)
from darkmatter.sae.model import Sae, default_cfg, save_sae
from tests.sae import foreign
from tests.sae.foreign import write_saelens

D_IN, D_SAE, K = 6, 20, 4
U32 = np.finfo(np.float32).eps / 2  # unit roundoff of float32


def make_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return foreign.random_weights(D_IN, D_SAE, seed)


def inputs(n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32) * 2


def np_topk(pre: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's k largest pre-activations, then ReLU (SAELens TopK; sparsify ReLU-then-TopK is equal)."""
    f = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    f[rows, idx] = np.maximum(pre[rows, idx], 0)
    return f


def check(sae, x: np.ndarray, f_ref: np.ndarray, x_hat_ref: np.ndarray) -> None:
    """The float32 SAE against the float64 reference, entry by entry within the textbook rounding bound of the
    computation it performs: a float32 dot product of n terms plus an addend is off by at most
    (n + 2)·u·(Σ|a_i||b_i| + |c|) (u = float32 unit roundoff), and each stored weight may carry one more rounding
    of its own (a format whose scale factors were folded into float32 weights): n + 4 below. The latents' error
    then propagates into x_hat through |W_dec|."""
    out = sae(torch.from_numpy(x))
    f, x_hat = out.latents.detach().double().numpy(), out.x_hat.detach().double().numpy()
    assert f.shape == f_ref.shape and x_hat.shape == x_hat_ref.shape
    w = {k: v.detach().double().abs().numpy() for k, v in sae.tensors().items()}
    x_in = np.abs(x - (sae.b_dec.detach().numpy() if sae.apply_b_dec_to_input else 0))
    bound_f = (D_IN + 4) * U32 * (x_in @ w["W_enc"] + w["b_enc"])
    bound_x_hat = (D_SAE + 4) * U32 * (np.abs(f) @ w["W_dec"] + w["b_dec"]) + bound_f @ w["W_dec"]
    assert (np.abs(f - f_ref) <= bound_f).all(), np.abs(f - f_ref).max()
    assert (np.abs(x_hat - x_hat_ref) <= bound_x_hat).all(), (np.abs(x_hat - x_hat_ref) / bound_x_hat).max()
    assert (f != 0).sum(1).tolist() == (f_ref != 0).sum(1).tolist()


# --------------------------------------------------------------------------------------------- Gemma Scope


def gemma_reference(w: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    pre = x @ w["W_enc"] + w["b_enc"]  # no b_dec subtraction (apply_b_dec_to_input = False)
    f = np.maximum(pre, 0) * (pre > w["threshold"])
    return f, f @ w["W_dec"] + w["b_dec"]


def test_gemma_scope_npz(tmp_path):
    w = make_weights()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **w)
    x = inputs()
    for path in (folder, folder / "params.npz"):
        sae = load_sae(path)
        assert sae.architecture == "jumprelu"
        assert sae.cfg["apply_b_dec_to_input"] is False
        assert sae.cfg["hook_name"] == "blocks.12.hook_resid_post"
        assert sae.cfg["model_name"] == "gemma-2-2b"
        assert sae.cfg["metadata"]["average_l0"] == 82
        assert (sae.cfg["d_in"], sae.cfg["d_sae"]) == (D_IN, D_SAE)
        check(sae, x, *gemma_reference(w, x))
        f_ref, _ = gemma_reference(w, x)
        assert 0 < (f_ref != 0).sum() < f_ref.size  # the threshold really cuts some positive pre-activations


def test_gemma_scope_old_key_names_and_no_pickles(tmp_path):
    w = make_weights()
    np.savez(tmp_path / "old.npz", w_enc=w["W_enc"], w_dec=w["W_dec"], b_enc=w["b_enc"], b_dec=w["b_dec"],
             threshold=w["threshold"])
    x = inputs()
    check(load_sae(tmp_path / "old.npz"), x, *gemma_reference(w, x))
    np.savez(tmp_path / "evil.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(SaeFormatError, match="without pickles"):
        load_sae(tmp_path / "evil.npz")


# --------------------------------------------------------------------------------------------- sparsify


def write_sparsify(folder: Path, w: dict[str, np.ndarray], **cfg_overrides) -> Path:
    return foreign.write_sparsify(folder, w, K, **cfg_overrides)


def test_sparsify_folder(tmp_path):
    w = make_weights()
    folder = write_sparsify(tmp_path / "run" / "layers.3", w)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m"}))
    x = inputs()
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg["k"] == K
    assert sae.cfg["apply_b_dec_to_input"] is True
    assert sae.cfg["hook_name"] == "blocks.3.hook_resid_post"
    assert sae.cfg["model_name"] == "EleutherAI/pythia-160m"
    # sparsify: ReLU((x − b_dec)·encoder.weightᵀ + encoder.bias), top-k, decode f·W_dec + b_dec
    enc_w = w["W_enc"].T.astype(np.float64)
    pre = np.maximum((x - w["b_dec"]) @ enc_w.T + w["b_enc"], 0)
    f = np_topk(pre, K)
    check(sae, x, f, f @ w["W_dec"] + w["b_dec"])


def test_sparsify_refuses_transcoders_and_skip_connections(tmp_path):
    w = make_weights()
    with pytest.raises(SaeFormatError, match="transcode"):
        load_sae(write_sparsify(tmp_path / "a" / "layers.1", w, transcode=True))
    with pytest.raises(SaeFormatError, match="groupmax"):
        load_sae(write_sparsify(tmp_path / "b" / "layers.1", w, activation="groupmax"))
    with pytest.raises(SaeFormatError, match="d_in=7"):
        load_sae(write_sparsify(tmp_path / "c" / "layers.1", w, d_in=7))


# --------------------------------------------------------------------------------------------- SAELens


def saelens_cfg(**fields) -> dict:
    return {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.2.hook_resid_post",
                         "model_name": "gpt2", "context_size": 128}, **fields}


def test_saelens_v6_topk_with_decoder_norm_rescaling(tmp_path):
    w = make_weights()
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    folder = write_saelens(tmp_path / "topk", saelens_cfg(architecture="topk", k=K, rescale_acts_by_decoder_norm=True),
                           tensors)
    x = inputs()
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg["k"] == K
    assert sae.cfg["hook_name"] == "blocks.2.hook_resid_post" and sae.cfg["model_name"] == "gpt2"
    # SAELens TopKSAE: pre = (x − b_dec)·W_enc + b_enc, scaled by ‖W_dec_i‖; TopK; decode (f/‖W_dec_i‖)·W_dec + b_dec
    norms = np.linalg.norm(w["W_dec"].astype(np.float64), axis=1)
    pre = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * norms
    f = np_topk(pre, K)
    x_hat = (f / norms) @ w["W_dec"] + w["b_dec"]
    # Folding moves the norm into the latents (pre·‖W_dec_i‖ = f) and out of the decoder rows
    check(sae, x, f, x_hat)
    assert ((sae(torch.from_numpy(x)).latents.detach().numpy() != 0) == (f != 0)).all()


def test_saelens_v6_jumprelu_and_standard(tmp_path):
    w = make_weights()
    x = inputs()
    jr = load_sae(write_saelens(tmp_path / "jr", saelens_cfg(architecture="jumprelu", apply_b_dec_to_input=False), w))
    check(jr, x, *gemma_reference(w, x))
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    std = load_sae(write_saelens(tmp_path / "std", saelens_cfg(architecture="standard"), tensors))
    assert std.architecture == "relu"
    f = np.maximum((x - w["b_dec"]) @ w["W_enc"].astype(np.float64) + w["b_enc"], 0)
    check(std, x, f, f @ w["W_dec"] + w["b_dec"])


def test_saelens_pre_v6_topk_config_in_bfloat16(tmp_path):
    w = make_weights()
    tensors = {k: torch.from_numpy(w[k]).to(torch.bfloat16) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    folder = tmp_path / "old"
    folder.mkdir()
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "bfloat16", "hook_point": "blocks.4.hook_resid_pre",
           "model_name": "pythia-70m", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "normalize_activations": False, "sae_lens_training_version": "3.5.0"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file as save_torch

    save_torch(tensors, str(folder / "sae_weights.safetensors"))
    sae = load_sae(folder)
    assert sae.architecture == "topk" and sae.cfg["k"] == K
    assert sae.cfg["hook_name"] == "blocks.4.hook_resid_pre" and sae.cfg["model_name"] == "pythia-70m"
    assert sae.cfg["apply_b_dec_to_input"] is True  # the pre-v6 default
    assert sae.cfg["metadata"]["source_dtype"] == "bfloat16"
    wb = {k: v.to(torch.float64).numpy() for k, v in tensors.items()}  # the reference uses the stored bf16 values
    x = inputs()
    f = np_topk((x - wb["b_dec"]) @ wb["W_enc"] + wb["b_enc"], K)
    check(sae, x, f, f @ wb["W_dec"] + wb["b_dec"])


def test_saelens_expected_average_norm_scaling_is_folded(tmp_path):
    w = make_weights()
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    s = 0.37
    folder = write_saelens(tmp_path / "scaled", saelens_cfg(architecture="standard",
                                                            normalize_activations="expected_average_only_in",
                                                            norm_scaling_factor=s), tensors)
    x = inputs()
    # SAELens at run time: encode s·x, decode, divide the output by s.
    f = np.maximum((s * x.astype(np.float64) - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
    check(load_sae(folder), x, f, (f @ w["W_dec"] + w["b_dec"]) / s)


def test_saelens_unsupported_features_are_refused(tmp_path):
    w = make_weights()
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    with pytest.raises(SaeFormatError, match="'gated' is not supported"):
        load_sae(write_saelens(tmp_path / "g", saelens_cfg(architecture="gated"), tensors))
    with pytest.raises(SaeFormatError, match="constant_norm_rescale"):
        load_sae(write_saelens(tmp_path / "c", saelens_cfg(architecture="standard",
                                                           normalize_activations="constant_norm_rescale"), tensors))
    bad = {**tensors, "b_dec": np.zeros(D_IN + 1, dtype=np.float32)}
    with pytest.raises(SaeFormatError, match=r"b_dec has shape \(7,\), expected \(6,\)"):
        load_sae(write_saelens(tmp_path / "s", saelens_cfg(architecture="standard"), bad))
    with pytest.raises(SaeFormatError, match="needs k"):
        load_sae(write_saelens(tmp_path / "k", saelens_cfg(architecture="topk"), tensors))


def test_d_in_mismatch_is_a_clear_error(tmp_path):
    w = make_weights()
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **w)
    sae = load_sae(folder)
    with pytest.raises(ValueError) as err:
        sae.encode(torch.zeros(3, D_IN + 1))
    assert str(D_IN) in str(err.value) and str(D_IN + 1) in str(err.value)


# --------------------------------------------------------------------------------------------- our own


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "relu", "jumprelu"])
def test_own_saes_round_trip_exactly(tmp_path, architecture):
    w = make_weights()
    tensors = {k: torch.from_numpy(v) for k, v in w.items()
               if k != "threshold" or architecture in ("batchtopk", "jumprelu")}
    cfg = default_cfg(architecture, D_IN, D_SAE, k=K if architecture in ("topk", "batchtopk") else None,
                      hook_name="blocks.1.hook_resid_post", metadata={"family": "width", "seed": 0})
    sae = Sae.from_tensors(cfg, tensors)
    save_sae(sae, tmp_path / architecture)
    loaded = load_sae(tmp_path / architecture)
    assert loaded.architecture == architecture and loaded.cfg.get("k") == sae.cfg.get("k")
    assert loaded.cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert loaded.cfg["metadata"]["family"] == "width" and loaded.cfg["metadata"]["seed"] == 0
    x = torch.from_numpy(inputs())
    with torch.inference_mode():
        a, b = sae(x), loaded(x)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.x_hat, b.x_hat)  # bit-exact


# --------------------------------------------------------------------------------------------- detection


def test_detection_and_discovery(tmp_path):
    w = make_weights()
    (tmp_path / "zoo" / "gs").mkdir(parents=True)
    np.savez(tmp_path / "zoo" / "gs" / "params.npz", **w)
    write_sparsify(tmp_path / "zoo" / "sp" / "layers.0", w)
    write_saelens(tmp_path / "zoo" / "sl", saelens_cfg(architecture="jumprelu"), w)
    (tmp_path / "zoo" / "empty").mkdir()
    assert find_saes(tmp_path / "zoo") == [tmp_path / "zoo" / "gs", tmp_path / "zoo" / "sl",
                                           tmp_path / "zoo" / "sp" / "layers.0"]
    assert [detect_format(p) for p in find_saes(tmp_path / "zoo")] == ["gemma_scope", "saelens", "sparsify"]
    with pytest.raises(SaeFormatError) as err:
        load_sae(tmp_path / "zoo" / "empty")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "zoo" / "empty")) and msg.count(". ") == 0 and msg.endswith(".")
    with pytest.raises(SaeFormatError, match="does not exist"):
        load_sae(tmp_path / "nowhere")


def test_saelens_pretrained_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # makes `import sae_lens` fail
    with pytest.raises(SaeFormatError, match="needs the optional package sae_lens"):
        load_saelens_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    with pytest.raises(SaeFormatError, match="needs the optional package sae_lens"):
        load_sae("sae_lens:gpt2-small-res-jb:blocks.8.hook_resid_pre")
    with pytest.raises(SaeFormatError, match="expected 'sae_lens:<release>:<sae_id>'"):
        load_sae("sae_lens:only-a-release")

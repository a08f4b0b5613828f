"""Pretrained SAEs as family members: sae_ids read from headers match the loaded SAEs in every format, families
with a source expand to members, and the import step checks and writes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from darkmatter.config import ConfigError, SaeFamilyConfig, load_config
from darkmatter.sae.families import expand_families
from darkmatter.sae.formats import SaeFormatError, load_sae
from darkmatter.sae.model import Sae, default_cfg, read_sae, save_sae
from darkmatter.sae.sources import describe, expand_sources, import_sae, source_members
from tests.sae.foreign import random_weights, write_gemma_scope, write_saelens, write_sparsify

D_IN, HOOK = 8, "blocks.1.hook_resid_post"


def write_every_format(root):
    """One SAE per format under ``root``, each of a different width; returns {format: (path, (arch, d_sae, k))}."""
    w = {d: random_weights(D_IN, d, seed=d) for d in (24, 28, 32, 36)}
    ours = Sae.from_tensors(default_cfg("topk", D_IN, 24, k=5), {
        n: torch.from_numpy(w[24][n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
    save_sae(ours, root / "ours")
    saelens = write_saelens(root / "saelens_l0_7", {
        "architecture": "jumprelu", "d_in": D_IN, "d_sae": 28, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.18.0"}}, w[28])
    sparsify = write_sparsify(root / "sparsify" / "layers.1", w[32], k=6)
    gemma = write_gemma_scope(root / "gemma" / "average_l0_9", w[36])
    return {"ours": (root / "ours", ("topk", 24, 5)), "saelens": (saelens, ("jumprelu", 28, 7)),
            "sparsify": (sparsify, ("topk", 32, 6)), "gemma_scope": (gemma, ("jumprelu", 36, 9))}


def test_headers_describe_what_loading_finds(tmp_path):
    for fmt, (path, expected) in write_every_format(tmp_path).items():
        assert describe(str(path)) == expected, fmt
        sae = load_sae(path)
        assert (sae.architecture, sae.d_sae) == expected[:2], fmt
        if sae.architecture == "topk":
            assert sae.cfg["k"] == expected[2], fmt


def test_a_folder_of_saes_expands_to_each_in_path_order(tmp_path):
    saes = write_every_format(tmp_path)
    every = expand_sources([str(tmp_path)])
    assert sorted(every) == every and sorted(every) == sorted(str(p) for p, _ in saes.values())
    with pytest.raises(SaeFormatError, match="holds no SAE"):
        expand_sources([str(tmp_path / "missing")])


def test_source_families_become_members_with_their_ids(tmp_path):
    saes = write_every_format(tmp_path)
    fams = [SaeFamilyConfig(name="width", widths=(16,), ks=(4,)),
            SaeFamilyConfig(name="pretrained", source=(str(tmp_path),))]
    members = expand_families(fams, HOOK)
    imported = {m.sae_id: m.source for m in members if m.source}
    assert imported == {f"{a}-w{d}-k{k}-s0": str(p) for p, (a, d, k) in saes.values()}
    assert [m.families for m in members] == [("width",)] + [("pretrained",)] * 4
    # an imported SAE cannot take the id of a trained one
    clash = [SaeFamilyConfig(name="pretrained", source=(str(saes["ours"][0]),)),
             SaeFamilyConfig(name="width", widths=(24,), ks=(5,))]
    with pytest.raises(ValueError, match="topk-w24-k5-s0 .*an sae_id names one SAE"):
        expand_families(clash, HOOK)


def test_sae_lens_sources_take_width_and_l0_from_the_family_and_unlabelled_l0_is_refused(tmp_path):
    ids = ("sae_lens:gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82",
           "sae_lens:gemma-scope-2b-pt-res:layer_12/width_65k/average_l0_72")
    got = source_members(ids, "jumprelu", (16384, 65536), (82, 72))
    assert got == [("jumprelu", 16384, 82, ids[0]), ("jumprelu", 65536, 72, ids[1])]
    with pytest.raises(SaeFormatError, match="2 sae_lens sources need as many widths and ks"):
        source_members(ids, "jumprelu", (16384,), (82,))
    w = random_weights(D_IN, 20)
    np.savez(tmp_path / "params.npz", **w)  # a Gemma Scope file whose name states no L0
    with pytest.raises(SaeFormatError, match="cannot tell the L0 of jumprelu SAE .*params.npz"):
        source_members([str(tmp_path / "params.npz")], "topk", (), ())


def test_import_writes_an_identical_sae_and_checks_it(tmp_path):
    saes = write_every_format(tmp_path / "src")
    path, (arch, d_sae, k) = saes["gemma_scope"]
    out = tmp_path / "saes" / HOOK / f"{arch}-w{d_sae}-k{k}-s0"
    import_sae(str(path), out, HOOK, D_IN, (arch, d_sae, k), params={"source": str(path)})
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(0))
    assert torch.equal(read_sae(out)(x).x_hat, load_sae(path)(x).x_hat)
    assert json.loads((out / "provenance.json").read_text())["source"] == str(path)
    bad_out = tmp_path / "bad"
    with pytest.raises(SaeFormatError, match=f"has d_in={D_IN} but hook {HOOK} has d_model=16"):
        import_sae(str(path), bad_out, HOOK, 16, (arch, d_sae, k))
    with pytest.raises(SaeFormatError, match="described it as jumprelu with d_sae=99"):
        import_sae(str(path), bad_out, HOOK, D_IN, (arch, 99, k))
    w = random_weights(D_IN, 12)
    w["W_dec"][3, 2] = np.nan
    nan_sae = write_gemma_scope(tmp_path / "nan" / "l0_3", w)
    with pytest.raises(SaeFormatError, match=r"tensors \['W_dec'\] hold NaN or infinite values"):
        import_sae(str(nan_sae), bad_out, HOOK, D_IN, ("jumprelu", 12, 3))
    assert not bad_out.exists() and not list(tmp_path.glob(".bad*"))  # nothing half-written


def test_config_reads_sources_and_refuses_a_missing_one(tmp_path):
    saes = write_every_format(tmp_path)
    one = {"families": [{"name": "width", "widths": [64], "ks": [8]},
                        {"name": "pre", "source": [str(saes["sparsify"][0])]}]}
    cfg = load_config(data=one)
    assert cfg.families[1].source == (str(saes["sparsify"][0]),)
    missing = {"families": [{"name": "pre", "source": [str(tmp_path / "nowhere")]}]}
    with pytest.raises(ConfigError, match=r"families: source '.*nowhere' holds no SAE"):
        load_config(data=missing)

"""CE contributions: conditions are what they claim to be, on a tiny model with planted reconstructions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from darkmatter.downstream.ce import SplicedSae, _flat, conditions, measure_ce, summarize_ce
from darkmatter.downstream.contexts import context_subset

D = 32


def _tokens():
    toks = np.random.default_rng(0).integers(3, 250, (6, 40)).astype(np.int32)
    toks[:, 0] = 1
    return toks


def test_planted_linear_error_is_fully_recovered(llama):
    """Sae(x) = 0.5 x has error 0.5 x, exactly linear: Sae + LinearError restores x (100%), Sae + Nonlinear = Sae (0%)."""
    model, _ = llama
    half = torch.eye(D) * 0.5
    noise = torch.randn(D, D, generator=torch.Generator().manual_seed(0)) * 0.3
    saes = {
        "half": SplicedSae(lambda x: x @ half, half, torch.zeros(D)),
        "noisy": SplicedSae(lambda x: x @ (torch.eye(D) + noise), -noise, torch.zeros(D)),
    }
    table = measure_ce(model, _tokens(), np.array([0, 2, 3, 5]), "blocks.1.hook_resid_post", 8,
                       conditions(saes, torch.zeros(D)), progress=False)
    assert table.height == 4 * 31 * (3 + 3 * 2)  # contexts x scored positions x conditions
    summary = {r["sae_id"]: r for r in summarize_ce(table).iter_rows(named=True)}
    for sae_id in saes:  # in both, the planted map is the exact error: Sae + LinearError = x
        assert summary[sae_id]["percent_recovered_linear"] == pytest.approx(100.0, abs=1e-2)
        assert summary[sae_id]["percent_recovered_nonlinear"] == pytest.approx(0.0, abs=1e-2)
        assert summary[sae_id]["ce_sae_linear"] == pytest.approx(summary[sae_id]["ce_clean"], abs=1e-5)
    # The zero-ablation baseline is shared by all SAEs; CE score of a perfect splice is 1.
    assert summary["half"]["ce_zero"] == summary["noisy"]["ce_zero"]
    clean = table.filter(pl.col("condition") == "clean")
    assert (clean["kl"] == 0).all()


def test_context_subset_covers_as_many_documents_as_it_can():
    docs = np.array(["a"] * 30 + ["b"] * 5 + ["c"] * 2 + ["d"])  # one long document, three short ones
    four = context_subset(docs, 4, seed=0)
    assert sorted(set(docs[four])) == ["a", "b", "c", "d"]  # one context of each
    nine = context_subset(docs, 9, seed=0)
    assert len(nine) == 9 and len(set(nine)) == 9 and np.all(np.diff(nine) > 0)
    assert {d: int((docs[nine] == d).sum()) for d in "abcd"} == {"a": 3, "b": 3, "c": 2, "d": 1}  # round robin
    np.testing.assert_array_equal(context_subset(docs, 9, seed=0), nine)  # seeded
    assert not np.array_equal(context_subset(docs, 9, seed=1), nine)
    np.testing.assert_array_equal(context_subset(docs[:3], 10, seed=0), [0, 1, 2])


def test_under_bf16_autocast_ce_and_kl_are_float32_and_the_identity_splice_is_clean(llama):
    """The model runs under bf16 autocast after a bf16 harvest (and on a GPU): KL's dot products still run in float32
    (before, they came out in bf16, which cannot even be written out), and splicing x back in changes nothing beyond
    bf16 rounding."""
    model, _ = llama
    identity = {"id|sae": _flat(lambda x: x)}
    f32 = measure_ce(model, _tokens(), np.array([0, 4]), "blocks.1.hook_resid_post", 8, identity, progress=False)
    bf16 = measure_ce(model, _tokens(), np.array([0, 4]), "blocks.1.hook_resid_post", 8, identity,
                      autocast_bf16=True, progress=False)
    assert bf16["ce"].dtype == bf16["kl"].dtype == pl.Float32 and bf16.height == f32.height
    spliced = bf16.filter(pl.col("condition") == "sae")
    assert float(spliced["kl"].abs().max()) <= 1e-3
    assert float((bf16["ce"] - f32["ce"]).abs().max()) <= 0.01  # bf16 rounding of a 5.6-nat CE (measured 9e-4)
    assert float((bf16["ce"] - f32["ce"]).abs().max()) > 0  # the autocast did run in bf16

"""The measure_ce step's per-SAE cache: a run that reuses entries writes exactly what a run without it writes, only
the SAEs it does not hold are spliced, and any change to what the rows depend on makes it splice again."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file

import darkmatter.downstream.ce as ce_module
from darkmatter.downstream.cache import CeCache
from darkmatter.downstream.ce import measure_ce_to_folder
from darkmatter.errors.measure import DESIGN, LINEAR_MAP
from darkmatter.io import read_parquet
from darkmatter.regression import save_moments, stream_moments
from darkmatter.sae.model import save_sae
from tests.helpers import random_sae

D, HOOK, MIN_POS = 32, "blocks.1.hook_resid_post", 8


@pytest.fixture
def experiment(tmp_path, llama_dir):
    """A tiny model's eval tokens (6 contexts of 40 tokens, 3 documents), three SAEs and their linear maps."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 250, (6, 40)).astype(np.int32)
    tokens[:, 0] = 1
    np.save(tmp_path / "eval_tokens.npy", tokens)
    pl.DataFrame({"context": range(6), "doc_id": ["a", "a", "b", "b", "c", "c"]}).write_parquet(
        tmp_path / "eval_contexts.parquet")
    errors = tmp_path / "errors"
    errors.mkdir()
    fit, test = stream_moments(rng.normal(size=(200, D)), mask=np.arange(200) < 120).x  # type: ignore[misc]
    save_moments(errors / DESIGN, {"fit": fit, "test": test})
    saes = []
    for i in range(3):
        sae_id = f"topk-w64-k4-s{i}"
        save_sae(random_sae(d_in=D, d_sae=64, k=4, seed=i), tmp_path / "saes" / sae_id)
        (errors / sae_id).mkdir()
        gen = torch.Generator().manual_seed(10 + i)
        save_file({"coef": torch.randn(D, D, generator=gen) * 0.1, "intercept": torch.randn(D, generator=gen)},
                  str(errors / sae_id / LINEAR_MAP))
        saes.append(str(tmp_path / "saes" / sae_id))
    return tmp_path, str(llama_dir), saes


@pytest.fixture
def spliced(monkeypatch) -> list[list[str]]:
    """The SAEs of each splicing pass of measure_ce_to_folder, in order."""
    passes: list[list[str]] = []
    real = ce_module.measure_ce

    def spy(model, tokens, contexts, hook, min_pos, reps, **kw):
        passes.append(sorted({key.split("|")[0] for key in reps if "|" in key}))
        return real(model, tokens, contexts, hook, min_pos, reps, **{**kw, "progress": False})

    monkeypatch.setattr(ce_module, "measure_ce", spy)
    return passes


def _run(root, model, saes, out, cache=True, contexts=4):
    measure_ce_to_folder(model, root / "eval_tokens.npy", root / "errors", HOOK, saes, root / out,
                         contexts=contexts, batch_contexts=2, min_pos=MIN_POS, cache=root / "cache" if cache else None)
    return read_parquet(root / out / "token_ce.parquet"), read_parquet(root / out / "summary.parquet")


def test_an_added_sae_is_the_only_one_spliced_and_the_output_equals_a_run_without_the_cache(experiment, spliced):
    root, model, saes = experiment
    _run(root, model, saes[:2], "first")
    assert spliced == [["topk-w64-k4-s0", "topk-w64-k4-s1"]] and len(list((root / "cache").iterdir())) == 2
    table, summary = _run(root, model, saes, "second")
    assert spliced[1] == ["topk-w64-k4-s2"]  # the two held ones are read back, not spliced
    fresh, fresh_summary = _run(root, model, saes, "fresh", cache=False)
    assert table.equals(fresh) and summary.equals(fresh_summary)  # bit for bit
    assert table.height == 4 * (40 - MIN_POS - 1) * (3 + 3 * 3)  # contexts x scored positions x conditions
    _run(root, model, saes, "third")
    assert spliced[3] == []  # everything held: only the clean pass and the global ablations run


@pytest.mark.parametrize("change", ["sae", "linear_map", "contexts"])
def test_a_change_to_what_the_rows_depend_on_splices_again(experiment, spliced, change):
    root, model, saes = experiment
    _run(root, model, saes[:1], "first")
    if change == "sae":  # another SAE under the same sae_id and folder
        save_sae(random_sae(d_in=D, d_sae=64, k=4, seed=99), saes[0])
    elif change == "linear_map":
        lin = root / "errors" / "topk-w64-k4-s0" / LINEAR_MAP
        save_file({"coef": torch.zeros(D, D), "intercept": torch.zeros(D)}, str(lin))
    contexts = 3 if change == "contexts" else 4
    table, _ = _run(root, model, saes[:1], "second", contexts=contexts)
    assert spliced[1] == ["topk-w64-k4-s0"]
    fresh, _ = _run(root, model, saes[:1], "fresh", cache=False, contexts=contexts)
    assert table.equals(fresh)


def test_an_entry_measured_against_another_clean_pass_is_spliced_again(experiment, spliced):
    """The second guard: an entry whose key matches but whose clean rows differ from this run's (here planted by
    editing them) is not used; the SAE is spliced again and the entry replaced."""
    root, model, saes = experiment
    first, _ = _run(root, model, saes[:1], "first")
    (entry,) = (root / "cache").iterdir()
    rows = read_parquet(entry)
    rows.with_columns(ce=pl.when(pl.col("condition") == "clean").then(pl.col("ce") + 1e-6).otherwise(pl.col("ce"))
                      ).write_parquet(entry)
    second, _ = _run(root, model, saes[:1], "second")
    assert spliced == [["topk-w64-k4-s0"], [], ["topk-w64-k4-s0"]]  # the held pass, then the stale SAE alone
    assert second.equals(first)
    assert read_parquet(entry).equals(rows)  # the entry was rewritten with the true clean rows


def test_a_damaged_entry_is_a_miss_not_a_failure(experiment, spliced, caplog):
    root, model, saes = experiment
    first, _ = _run(root, model, saes[:1], "first")
    (entry,) = (root / "cache").iterdir()
    entry.write_bytes(b"not parquet")
    second, _ = _run(root, model, saes[:1], "second")
    assert second.equals(first) and "unreadable entry" in caplog.text


def test_the_key_changes_with_the_setting(tmp_path, llama_dir):
    contexts = np.array([0, 2])
    base = {"model_path": str(llama_dir), "contexts": contexts, "min_pos": 8, "batch_contexts": 2,
            "autocast_bf16": False, "device": "cpu"}
    setting = CeCache.for_run(tmp_path, **base).setting
    assert CeCache.for_run(tmp_path, **base).setting == setting  # deterministic
    for name, value in [("contexts", np.array([0, 3])), ("min_pos", 9), ("batch_contexts", 1),
                        ("autocast_bf16", True)]:
        assert CeCache.for_run(tmp_path, **{**base, name: value}).setting != setting, name

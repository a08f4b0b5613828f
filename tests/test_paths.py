"""Result paths are named once: the rules' patterns and the library's lookups agree, and a store finds its tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkmatter.paths import ExperimentPaths


def test_layout_and_round_trips(tmp_path):
    p = ExperimentPaths.of("exp", tmp_path)
    assert p.root == tmp_path / "results" / "exp" and p.reports == tmp_path / "reports" / "exp"
    assert ExperimentPaths.at(p.root) == p == ExperimentPaths.from_database(p.database)
    assert p.sae("blocks.1.hook_resid_post", "topk-w8-k2-s0") == p.root / "saes/blocks.1.hook_resid_post/topk-w8-k2-s0"
    assert p.sae_errors("h", "s").parent == p.errors("h") and p.codes("h", "s").parts[-3:] == ("codes", "h", "s")
    assert p.report_index.parent == p.report_browser.parent == p.reports
    # logs: one per step, or one per wildcard value, whatever dots the last value holds
    assert p.log("harvest_eval") == p.root / "logs" / "harvest_eval.log"
    assert p.log("train_sae", "blocks.1.hook_resid_post", "topk-w8-k2-s0").name == "topk-w8-k2-s0.log"
    assert p.log("measure_errors", "blocks.1.hook_resid_post").name == "blocks.1.hook_resid_post.log"


def test_snakemake_patterns_come_from_the_same_methods():
    p = ExperimentPaths.of("default")
    assert str(p.sae("{hook}", "{sae_id}")) == "results/default/saes/{hook}/{sae_id}"
    assert str(p.activations("{split}")) == "results/default/activations/{split}"


def test_a_file_that_is_not_a_store_is_refused():
    with pytest.raises(ValueError, match="not an experiment's store"):
        ExperimentPaths.from_database(Path("results/x/other.duckdb"))

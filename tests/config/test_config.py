"""Config: defaults, YAML round trip, one clear sentence for every bad value, every key documented, step slices."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from darkmatter.config import (
    STEP_KEYS,
    ConfigError,
    ConfigSlice,
    ExperimentConfig,
    HarvestConfig,
    SaeFamilyConfig,
    load_config,
    step_slice,
    to_dict,
)
from darkmatter.sae.families import expand_families
from tests.helpers import REPO


def test_default_yaml_equals_dataclass_defaults():
    """Except the one key that names the default's companion experiment (a default for every experiment would
    show the default's budget study in theirs)."""
    default = ExperimentConfig()
    named = dataclasses.replace(default, analysis=dataclasses.replace(default.analysis, budget_study="budget"))
    assert load_config(REPO / "config" / "config.yaml") == named


def test_budget_config_shares_the_defaults_data_and_trains_one_grid_at_several_budgets():
    cfg = load_config(REPO / "config" / "budget.yaml")
    default = load_config(REPO / "config" / "config.yaml")
    assert cfg.share_data_from == "default"
    for step in ("prepare-model", "prepare-corpus", "harvest-train", "harvest-eval"):  # what it shares is equal
        assert step_slice(cfg, step) == step_slice(default, step)
    ids = [m.sae_id for m in expand_families(cfg.families, cfg.primary_hook)]
    both = [f"topk-w{w}-k32-s0-t{t}" for t in ("500k", "1M", "2M", "4M", "8M") for w in (4096, 16384)]
    assert ids == both + ["topk-w4096-k32-s1-t2M", "topk-w16384-k32-s1-t2M"]  # and a second seed at 2M
    assert cfg.analysis.training_budget.reference_tokens == default.training.tokens


def test_smoke_config_loads_and_round_trips():
    cfg = load_config(REPO / "config" / "smoke.yaml")
    assert cfg.model.source == "random"
    assert load_config(data=to_dict(cfg)) == cfg
    assert cfg.hash() == load_config(data=to_dict(cfg)).hash()


def test_a_small_eval_split_keeps_the_default_pursuit_and_ce():
    """pursuit.contexts (60) and downstream.contexts (48) above the split's contexts mean all of them, so a small
    experiment needs no edit."""
    cfg = load_config(data={"harvest": {"eval_contexts": 20}, "decomposition": {"fit_tokens": 10_000}})
    assert cfg.pursuit.contexts == 60 and cfg.downstream.contexts == 48 and cfg.harvest.eval_contexts == 20


def _bad(tmp_path, data: dict) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg  # names the file
    assert msg.count("\n") == 0 and msg.endswith("."), msg  # one sentence
    return msg


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"harvest": {"min_ps": 3}}, "harvest.min_ps", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"harvest": {"min_pos": "200"}}, "harvest.min_pos", "an integer"),
        ({"harvest": {"precision": "fp16"}}, "harvest.precision", "one of 'auto', 'float32', 'bfloat16'"),
        ({"harvest": {"autocast_bf16": True}}, "harvest.autocast_bf16", "replaced by harvest.precision"),
        ({"analysis": {"ce_contexts": 4}}, "analysis.ce_contexts", "replaced by downstream.contexts"),
        ({"analysis": {"probe_mechanism": {"tokens": 1}}}, "analysis.probe_mechanism.tokens", ">= 2"),
        ({"families": [{"name": "g", "architecture": "gated"}]}, "families[0].architecture", "one of topk"),
        ({"downstream": {"contexts": 0}}, "downstream.contexts", ">= 1"),
        ({"families": [{"name": "w", "hook": "blocks.13.hook_resid_post"}]}, "families[0].hook", "one of harvest.hooks"),
        ({"harvest": {"hooks": ["blocks.15.hook_resid_post", "blocks.14.hook_resid_post"]},
          "families": [{"name": "a", "widths": [64]}, {"name": "b", "hook": "blocks.14.hook_resid_post", "widths": [64]}]},
         "families", "SAEs on different hooks to differ"),
        ({"error_saes": {"base": "topk-w7-k32-s0"}}, "error_saes.base", "an SAE of the families"),
        ({"analysis": {"error_component_saes": {"judge": {"endpoint": "ftp://x"}}}},
         "analysis.error_component_saes.judge.endpoint", "an http(s):// URL"),
        ({"pursuit": {"contexts": 0}}, "pursuit.contexts", "null or >= 1"),
        ({"pursuit": {"l0_multiple": 0}}, "pursuit.l0_multiple", ">= 1"),
        ({"pursuit": {"l0": -1}}, "pursuit.l0", "null or >= 0"),
        ({"harvest": {"hooks": "blocks.1.hook_resid_post"}}, "harvest.hooks", "a list"),
        ({"model": {"source": "cloud"}}, "model.source", "one of"),
        ({"harvest": {"hooks": ["blocks.30.hook_resid_post"]}}, "harvest.hooks[0]", "below the model's 30 blocks"),
        ({"harvest": {"hooks": ["blocks.3.resid"]}}, "harvest.hooks[0]", "unknown hook"),
        ({"harvest": {"min_pos": 1024}}, "harvest.min_pos", "context_size - 2"),
        ({"harvest": {"train_min_pos": 0}}, "harvest.train_min_pos", "attention sink"),
        ({"corpus": {"eval_fraction": 1.0}}, "corpus.eval_fraction", "between 0 and 1"),
        ({"corpus": {"shuffle_window": 0}}, "corpus.shuffle_window", ">= 1 (documents)"),
        ({"corpus": {"hf_config": ""}}, "corpus.hf_config", "null or a non-empty string"),
        ({"corpus": {"hf_revision": ""}}, "corpus.hf_revision", "null or a non-empty string"),
        ({"corpus": {"hf_split": ""}}, "corpus.hf_split", "a non-empty string"),
        ({"training": {"lr_base": 0}}, "training.lr_base", "> 0"),
        ({"families": [{"name": "w", "widths": [0]}]}, "families[0].widths", ">= 1"),
        ({"families": [{"name": "w", "widths": [16], "ks": [32]}]}, "families[0].ks", "k=32 > width 16"),
        ({"families": [{"name": "w"}, {"name": "w"}]}, "families", "distinct names"),
        ({"families": [{"name": "w", "tokens": 10}]}, "families[0].tokens", "at least training.batch_size"),
        ({"share_data_from": "default"}, "share_data_from", "another experiment"),
        ({"share_data_from": "../x"}, "share_data_from", "another experiment"),
        ({"analysis": {"budget_study": "a/b"}}, "analysis.budget_study", "an experiment name"),
        ({"analysis": {"training_budget": {"reference_tokens": 0}}}, "analysis.training_budget.reference_tokens",
         ">= 1"),
        ({"model": {"source": "random", "random": {"n_layers": 2}}, "harvest": {"hooks": ["blocks.2.hook_mlp_out"]}},
         "harvest.hooks[0]", "below the model's 2 blocks"),
        ({"model": {"source": "local", "path": "/nonexistent/model"}}, "model.path", "does not exist"),
    ],
)
def test_bad_values_fail_with_one_sentence_naming_the_key(tmp_path, data, key, expected):
    msg = _bad(tmp_path, data)
    assert f"'{key}'" in msg or key in msg, msg
    assert expected in msg, msg


def test_an_hf_source_without_the_datasets_package_is_one_sentence(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else find_spec(name, *a))
    msg = _bad(tmp_path, {"corpus": {"sources": ["sotu", "hf:allenai/c4"]}})
    assert "'corpus.sources'" in msg and "'hf:allenai/c4' needs the package 'datasets' (pip install datasets)" in msg
    load_config(data={"corpus": {"sources": ["sotu"]}})  # only an hf: source needs it


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("harvest: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of a config section, dotted (nested sections recursed; families as families[].<key>)."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
        elif f.name == "families":
            keys += config_keys(SaeFamilyConfig, "families[].")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_config_key_is_documented_once_in_docs_configuration():
    doc = (REPO / "docs" / "configuration.md").read_text()
    keys = config_keys(ExperimentConfig)
    assert len(keys) > 70
    missing = [k for k in keys if doc.count(f"| `{k}` |") != 1]
    assert not missing, missing
    documented = set(re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M))
    assert documented == set(keys), documented ^ set(keys)  # and nothing that is not a key


def test_step_slices_hold_exactly_the_declared_keys():
    cfg = ExperimentConfig()
    for step, sections in STEP_KEYS.items():
        got = step_slice(cfg, step, analysis="synthetic_validation" if step == "run-analysis" else None)
        assert set(got) == set(sections), step
        for section, keys in sections.items():
            if keys is not None:
                extra = {"synthetic_validation"} if (step, section) == ("run-analysis", "analysis") else set()
                assert set(got[section]) == set(keys) | extra, (step, section)
    # an analysis without options gets only the shared keys
    assert set(step_slice(cfg, "run-analysis", analysis="norm_test")["analysis"]) == {"bootstrap", "confidence"}


def test_a_step_cannot_read_a_key_it_was_not_given():
    harvest = ConfigSlice(HarvestConfig, {"min_pos": 10}, "params.harvest")
    assert harvest.min_pos == 10
    with pytest.raises(ConfigError, match="was not given key 'hooks'"):
        harvest.hooks  # noqa: B018
    with pytest.raises(ConfigError, match=r"was not given keys \['batch_contexts'"):
        harvest.whole()

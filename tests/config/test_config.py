"""Config: defaults, YAML round trip, and one clear sentence for every bad value."""

from __future__ import annotations

import pytest
import yaml

from darkmatter.config import ConfigError, ExperimentConfig, load_config, to_dict
from tests.helpers import REPO


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(REPO / "config" / "config.yaml") == ExperimentConfig()


def test_smoke_config_loads_and_round_trips():
    cfg = load_config(REPO / "config" / "smoke.yaml")
    assert cfg.model.source == "random"
    assert load_config(data=to_dict(cfg)) == cfg
    assert cfg.hash() == load_config(data=to_dict(cfg)).hash()


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
        ({"downstream": {"contexts": 301}}, "downstream.contexts", "between 1 and harvest.eval_contexts"),
        ({"harvest": {"hooks": "blocks.1.hook_resid_post"}}, "harvest.hooks", "a list"),
        ({"model": {"source": "cloud"}}, "model.source", "one of"),
        ({"harvest": {"hooks": ["blocks.30.hook_resid_post"]}}, "harvest.hooks[0]", "below the model's 30 blocks"),
        ({"harvest": {"hooks": ["blocks.3.resid"]}}, "harvest.hooks[0]", "unknown hook"),
        ({"harvest": {"min_pos": 1024}}, "harvest.min_pos", "context_size - 2"),
        ({"harvest": {"train_min_pos": 0}}, "harvest.train_min_pos", "attention sink"),
        ({"corpus": {"eval_fraction": 1.0}}, "corpus.eval_fraction", "between 0 and 1"),
        ({"training": {"lr_base": 0}}, "training.lr_base", "> 0"),
        ({"families": [{"name": "w", "widths": [0]}]}, "families[0].widths", ">= 1"),
        ({"families": [{"name": "w", "widths": [16], "ks": [32]}]}, "families[0].ks", "k=32 > width 16"),
        ({"families": [{"name": "w"}, {"name": "w"}]}, "families", "distinct names"),
        ({"model": {"source": "random", "random": {"n_layers": 2}}, "harvest": {"hooks": ["blocks.2.hook_mlp_out"]}},
         "harvest.hooks[0]", "below the model's 2 blocks"),
        ({"model": {"source": "local", "path": "/nonexistent/model"}}, "model.path", "does not exist"),
    ],
)
def test_bad_values_fail_with_one_sentence_naming_the_key(tmp_path, data, key, expected):
    msg = _bad(tmp_path, data)
    assert f"'{key}'" in msg or key in msg, msg
    assert expected in msg, msg


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

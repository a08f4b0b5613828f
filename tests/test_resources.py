"""Scheduler resources per workflow step (darkmatter.resources): model shapes, planted sizes, the conda
environment's dependency list."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib

import pytest
import yaml

from darkmatter.config import ExperimentConfig, load_config
from darkmatter.config.sections import ModelConfig, RandomModelConfig
from darkmatter.resources import (
    BASE_MB,
    MB,
    MEMORY_MARGIN,
    MIN_RUNTIME,
    RUNTIME_MARGIN,
    SAE_S,
    UNKNOWN,
    ModelShape,
    model_shape,
    step_resources,
)
from tests.helpers import REPO

SMOKE = load_config(REPO / "config" / "smoke.yaml")


def _with(cfg: ExperimentConfig, **sections) -> ExperimentConfig:
    from dataclasses import replace

    return replace(cfg, **{name: replace(getattr(cfg, name), **values) for name, values in sections.items()})


def test_random_model_shape_is_the_config_and_the_byte_tokenizer():
    from darkmatter.data.models import byte_tokenizer

    shape = model_shape(ModelConfig(source="random", random=RandomModelConfig(n_layers=3, d_model=48, n_heads=4,
                                                                              d_ff=96)))
    assert shape == ModelShape(d_model=48, n_layers=3, n_heads=4, d_ff=96, vocab_size=len(byte_tokenizer()))


@pytest.mark.parametrize("keys", ["llama", "gpt2"])
def test_local_model_shape_reads_config_json(tmp_path, keys):
    cfg = ({"hidden_size": 96, "num_hidden_layers": 5, "num_attention_heads": 6, "intermediate_size": 200,
            "vocab_size": 1000} if keys == "llama" else
           {"n_embd": 96, "n_layer": 5, "n_head": 6, "n_inner": None, "vocab_size": 1000})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = model_shape(ModelConfig(source="local", path=str(tmp_path)))
    assert shape == ModelShape(96, 5, 6, 200 if keys == "llama" else 4 * 96, 1000)
    assert shape.n_params == 1000 * 96 + 5 * (4 * 96 ** 2 + 3 * 96 * shape.d_ff)


def test_unknown_models_get_the_documented_upper_bound(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert model_shape(ModelConfig(source="local", path=str(tmp_path / "missing"))) == ModelShape(**UNKNOWN)
    assert model_shape(ModelConfig(source="hub", name="nobody/not-cached")) == ModelShape(**UNKNOWN)


# The embedded model's shape is checked against its converted config in tests/data/test_models.py.


def test_sae_training_memory_and_runtime_from_planted_sizes():
    """Hand-computed: d_model 64, width 1024, batch 1024, buffer 262,144 tokens."""
    shape = model_shape(SMOKE.model)
    assert shape.d_model == 64
    res = step_resources(SMOKE, "train-sae", shape, sae_id="topk-w1024-k8-s0", hook=SMOKE.primary_hook)
    params = 2 * 1024 * 64 + 1024 + 64
    work = 4 * params * 4 + 3 * 1024 * 1024 * 4 + 2 * 32_768 * 64 * 8 + 2 * 262_144 * 64 * 4
    assert res["mem_mb"] == math.ceil((BASE_MB + MEMORY_MARGIN * work / MB) / 256) * 256 == 1536
    assert res["runtime"] == MIN_RUNTIME  # 60k tokens: seconds of work
    assert res["gpu"] == 0
    # a billion training tokens: the runtime is the work's, with its margin
    big = _with(SMOKE, training={"tokens": 10 ** 9})
    runtime = step_resources(big, "train-sae", shape, sae_id="topk-w1024-k8-s0")["runtime"]
    assert runtime == math.ceil(RUNTIME_MARGIN * 10 ** 9 * 64 * 1024 * SAE_S / 60) == 94


def test_estimates_grow_with_the_sizes_they_read():
    shape = model_shape(SMOKE.model)
    hooks = len(SMOKE.harvest.hooks)
    harvest = step_resources(SMOKE, "harvest", shape, split="train")
    assert harvest["disk_mb"] == math.ceil(60_000 * 64 * 4 * hooks / MB) + 1024  # the pool: tokens × d × 4 B × hooks
    more = _with(SMOKE, harvest={"train_tokens": 6_000_000})
    assert step_resources(more, "harvest", shape, split="train")["disk_mb"] == math.ceil(6e6 * 64 * 4 * hooks / MB) + 1024
    # measure-errors holds the eval pool 4 times: 10x the eval contexts add ~10x that much
    base = step_resources(SMOKE, "measure-errors", shape, hook=SMOKE.primary_hook)["mem_mb"]
    wide = _with(SMOKE, harvest={"eval_contexts": 2400})
    rows = 2400 * (128 - 16) - 24 * (128 - 16)
    grown = step_resources(wide, "measure-errors", shape, hook=SMOKE.primary_hook)["mem_mb"]
    assert 4 * rows * 64 * 4 * MEMORY_MARGIN / MB <= grown - base + 256 and grown > base
    # a wider SAE needs more memory to train and to encode
    for step in ("train-sae", "encode-sae", "pursue"):
        narrow = step_resources(SMOKE, step, shape, sae_id="topk-w1024-k8-s0")
        wider = step_resources(SMOKE, step, shape, sae_id="topk-w1048576-k8-s0")
        assert wider["mem_mb"] > narrow["mem_mb"], step


def test_default_experiment_estimates_are_in_range():
    """The default run on 2 AVX2 cores: harvest eval 23 min, the CE step 67 min, the widest SAE about 10 min;
    every estimate at least what was measured and at most 5x it."""
    cfg = load_config(REPO / "config" / "config.yaml")
    shape = model_shape(cfg.model)
    measured = {("harvest", "eval"): 23.3, ("measure-ce", None): 66.7, ("train-error-saes", None): 36}
    for (step, split), minutes in measured.items():
        kw = {"split": split} if split else {"hook": cfg.primary_hook}
        runtime = step_resources(cfg, step, shape, **kw)["runtime"]
        assert minutes <= runtime <= 5 * minutes, (step, runtime)


def test_every_workflow_step_has_an_estimate():
    from darkmatter.config import STEP_KEYS

    shape = model_shape(SMOKE.model)
    steps = {s.removesuffix("-eval").removesuffix("-train") for s in STEP_KEYS}
    for step in steps:
        kw = {"split": "eval"} if step == "harvest" else {}
        kw |= {"sae_id": "topk-w256-k8-s0"} if step in ("train-sae", "encode-sae", "pursue") else {}
        res = step_resources(SMOKE, step, shape, hook=SMOKE.primary_hook, **kw)
        assert res["mem_mb"] >= BASE_MB and res["runtime"] >= MIN_RUNTIME and res["gpu"] == 0, step
    with pytest.raises(ValueError, match="no resource estimate for step 'nonsense'"):
        step_resources(SMOKE, "nonsense", shape)
    on_gpu = dataclasses.replace(SMOKE, device="cuda:1")  # a GPU for the torch steps only
    asked = {step: step_resources(on_gpu, step, shape, hook=SMOKE.primary_hook,
                                  **({"split": "train"} if step == "harvest" else {}))["gpu"]
             for step in ("harvest", "measure-ce", "train-error-saes", "measure-errors", "build-database")}
    assert asked == {"harvest": 1, "measure-ce": 1, "train-error-saes": 1, "measure-errors": 0, "build-database": 0}


def test_conda_env_lists_every_runtime_dependency():
    """workflow/envs/darkmatter.yaml installs exactly pyproject's dependencies, less snakemake (it runs outside)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "workflow" / "envs" / "darkmatter.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = [line for line in pip if not line.startswith("-")]
    assert sorted(listed) == sorted(d for d in deps if not d.startswith("snakemake"))
    assert not any(line.startswith(("-e", "--editable")) or line.startswith(".") for line in pip)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"] == ">=" + python[7:]


def test_slurm_submission_carries_the_estimates():
    """The SLURM executor's sbatch line for a default train_sae job: memory, time limit, CPUs, and GPUs once
    a step asks for one (no SLURM needed: the plugin's own command builder)."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    cfg = load_config(REPO / "config" / "config.yaml")
    res = step_resources(cfg, "train-sae", model_shape(cfg.model), sae_id="topk-w16384-k32-s0")
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "",
              "workdir": None}
    call = get_submit_command(SimpleNamespace(resources=Resources(res), threads=16), params)
    assert f"--mem {res['mem_mb']}" in call and f"-t {res['runtime']}" in call and "--cpus-per-task=16" in call
    assert set_gres_string(SimpleNamespace(resources=Resources(res))) == ""  # gpu 0: no --gpus
    assert "--gpus=1" in set_gres_string(SimpleNamespace(resources=Resources(res | {"gpu": 1})))

"""The ``device`` setting: its resolution on machines with and without CUDA (torch.cuda monkeypatched: CI has no
GPU), its one-sentence errors, the CLI steps that honour it, the GPU path of the training bookkeeping (run on the
CPU), and that an explicit CPU device changes no result bit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from darkmatter import cli
from darkmatter.config import ConfigError, SaeTrainingConfig, load_config
from darkmatter.data.activations import ActivationStore
from darkmatter.data.harvest import HarvestSpec, harvest
from darkmatter.device import ENV_VAR, default_setting, device_record, resolve_device
from darkmatter.precision import autocast, resolve_precision
from darkmatter.sae import kernels
from darkmatter.sae.families import SaeSpec
from darkmatter.sae.train import Trainer, train_to_folder
from tests.helpers import planted_atoms

CPU = torch.device("cpu")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees ``n`` CUDA devices (0: none) of compute ``capability``."""
    def set_gpus(n: int, capability: tuple[int, int] = (9, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return set_gpus


# --------------------------------------------------------------------------------------------- resolution


def test_each_setting_resolves_to_its_device(gpus):
    gpus(0)
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU  # asked for, even where a GPU is there


def test_an_unavailable_or_malformed_device_is_one_sentence_naming_the_key(gpus):
    gpus(0)
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=r"^key 'device' is 'cuda(:0)?' but torch sees no CUDA GPU .*; use auto "
                                              r"or cpu\.$"):
            resolve_device(setting)
    gpus(2)
    with pytest.raises(ConfigError, match=r"^key 'device' is 'cuda:2' but this machine has 2 CUDA device\(s\), "
                                          r"cuda:0 to cuda:1\.$"):
        resolve_device("cuda:2")
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", "mps"):
        with pytest.raises(ConfigError, match=r"^key 'device' must be auto, cpu, cuda or cuda:<index>, got "):
            resolve_device(bad)


def test_the_config_key_is_checked_when_the_file_loads():
    assert load_config(data={}).device == "auto"
    assert load_config(data={"device": "cuda:3"}).device == "cuda:3"  # availability is the step's machine's business
    with pytest.raises(ConfigError, match=r"key 'device' must be auto, cpu, cuda or cuda:<index>, got 'gpu'"):
        load_config(data={"device": "gpu"})


def test_the_default_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_setting() == "auto"
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert default_setting() == "cpu"


def test_precision_auto_on_a_gpu_is_bf16_where_it_runs_natively(gpus):
    gpus(1, (8, 0))  # Ampere
    assert resolve_precision("auto", torch.device("cuda")).dtype == "bfloat16"
    assert resolve_precision("float32", torch.device("cuda")).dtype == "float32"  # a forced choice stays
    gpus(1, (7, 5))  # Turing: bf16 only emulated
    assert resolve_precision("auto", "cuda:0").dtype == "float32"
    assert resolve_precision("bfloat16", "cuda:0").dtype == "bfloat16"
    assert resolve_precision("auto", "cuda:0").bf16_speedup is None  # nothing measured on a GPU


def test_autocast_follows_the_device_type():
    x = torch.ones(2, 2)
    with autocast(True, "cpu"):
        assert (x @ x).dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(False, "cuda"):  # off: a no-op for any device type
        assert (x @ x).dtype == torch.float32


def test_the_cpu_record():
    record = device_record(CPU, "auto")
    assert record == {"setting": "auto", "device": "cpu", "name": torch.backends.cpu.get_cpu_capability()}


# --------------------------------------------------------------------------------------------- the CLI steps


DEVICE_STEPS = {  # every step that honours the device, with dummy arguments (the device is resolved first)
    "harvest": ["--model", "m.json", "--corpus", "c", "--split", "eval", "--out", "o"],
    "train-sae": ["--activations", "a", "--model", "m.json", "--hook", "h", "--sae-id", "topk-w8-k2-s0", "--out", "o"],
    "encode-sae": ["--sae", "s", "--activations", "a", "--hook", "h", "--out", "o"],
    "measure-ce": ["--model", "m", "--tokens", "t", "--errors", "e", "--hook", "h", "--activations", "a",
                   "--out", "o", "--saes", "s"],
    "pursue": ["--sae", "s", "--codes", "c", "--activations", "a", "--hook", "h", "--out", "o"],
    "measure-pursuit-ce": ["--model", "m", "--tokens", "t", "--sae", "s", "--hook", "h", "--activations", "a",
                           "--out", "o"],
    "measure-sources-ce": ["--model", "m", "--tokens", "t", "--errors", "e", "--activations", "a", "--hook", "h",
                           "--sae", "s", "--codes", "c", "--source-hook", "g", "--source-sae", "p", "--source-codes",
                           "q", "--out", "o"],
    "train-error-saes": ["--train-activations", "a", "--eval-activations", "b", "--sae", "s", "--errors", "e",
                         "--hook", "h", "--out", "o"],
}


@pytest.mark.parametrize("via", ["flag", "environment"])
@pytest.mark.parametrize("step", DEVICE_STEPS)
def test_every_device_step_resolves_the_device_and_refuses_a_missing_gpu(step, via, gpus, monkeypatch, capsys,
                                                                         tmp_path):
    gpus(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_VAR, "cuda" if via == "environment" else "cpu")
    flag = ["--device", "cuda"] if via == "flag" else []
    with pytest.raises(SystemExit) as exit_:
        cli.main([*flag, step, "--params", "{}", *DEVICE_STEPS[step]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: key 'device' is 'cuda' but torch sees no CUDA GPU") and "\n" not in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------- the GPU code path


def test_group_by_and_csr_in_torch_equal_the_numpy_bookkeeping():
    gen = torch.Generator().manual_seed(0)
    for n in (50, 70_000):  # numpy sorts 16-bit keys by radix, wider ones otherwise
        keys = torch.randint(0, n, (5000,), generator=gen)
        rows = torch.randint(0, 300, (5000,), generator=gen).sort().values
        for a, b in zip(kernels._group_by(keys, rows, n), kernels._group_by_torch(keys, rows, n), strict=True):
            assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
        assert torch.equal(kernels._csr(rows, 300), kernels._csr_torch(rows, 300))


def _small_run(arch: str) -> tuple[np.ndarray, SaeSpec, SaeTrainingConfig]:
    """10 steps with AuxK active (dead_tokens = one batch)."""
    data, _ = planted_atoms(n_rows=3000, d=16, n_atoms=24, seed=1)
    cfg = SaeTrainingConfig(tokens=256 * 10, batch_size=256, warmup_steps=3, buffer_tokens=1024, dead_tokens=256,
                            log_every=5, precision="float32")
    return data, SaeSpec(arch, 96, 3, 0), cfg


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_with_the_gpu_bookkeeping_equals_the_cpu_one_bitwise(arch, monkeypatch, one_thread):
    """The torch bookkeeping a GPU runs (sort, bincount, cumsum where the tensors are), forced on CPU tensors, trains
    exactly the weights of the numpy bookkeeping."""
    data, spec, cfg = _small_run(arch)
    host = Trainer(data, spec, cfg).run(progress=False)
    monkeypatch.setattr(kernels, "on_host", lambda t: False)
    device_path = Trainer(data, spec, cfg).run(progress=False)
    assert host is not None and device_path is not None
    for name, value in host.sae.tensors().items():
        assert torch.equal(value, device_path.sae.tensors()[name]), name
    assert host.log.equals(device_path.log)


# --------------------------------------------------------------------------------------------- the CPU stays as it was


def test_an_explicit_cpu_device_trains_the_default_weights_and_is_recorded(tmp_path, one_thread):
    data, spec, cfg = _small_run("topk")
    cfg = dataclasses.replace(cfg, checkpoint_every=4)
    default = Trainer(data, spec, cfg).run(progress=False)
    record = device_record(resolve_device("cpu"), "cpu")
    explicit = train_to_folder(data, spec, cfg, tmp_path / "sae", progress=False, device=resolve_device("cpu"),
                               device_info=record)
    assert default is not None
    for name, value in default.sae.tensors().items():
        assert torch.equal(value, explicit.sae.tensors()[name]), name
    provenance = json.loads((tmp_path / "sae" / "provenance.json").read_text())
    assert provenance["device"] == record and provenance["device"]["device"] == "cpu"


def test_an_explicit_cpu_harvest_equals_the_default_one_and_is_recorded(llama, llama_dir, tmp_path):
    from darkmatter.data.models import load_model

    model_cpu, _ = load_model(str(llama_dir), device=resolve_device("cpu"))
    tokens = np.random.default_rng(0).integers(3, 250, (4, 24)).astype(np.int32)
    spec = HarvestSpec(("blocks.1.hook_resid_post",), 4, 2, False, True)
    record = device_record(CPU, "cpu")
    stores = [ActivationStore(harvest(m, tokens, spec, tmp_path / name, progress=False, device_info=info))
              for m, name, info in ((llama[0], "default", None), (model_cpu, "cpu", record))]
    assert np.array_equal(stores[0].activations("blocks.1.hook_resid_post"),
                          stores[1].activations("blocks.1.hook_resid_post"))
    assert np.array_equal(stores[0].index()["loss"].to_numpy(), stores[1].index()["loss"].to_numpy(), equal_nan=True)
    assert stores[1].meta["device"] == record
    assert json.loads((tmp_path / "cpu" / "provenance.json").read_text())["device"] == record

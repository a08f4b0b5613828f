"""evaluate-sae: streamed metrics equal one-shot metrics, the JSON record, min_pos, CLI and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import save_file

from darkmatter import cli
from darkmatter.config import load_config
from darkmatter.errors.evaluate import EvaluationError, evaluate_sae, evaluate_to_file
from darkmatter.io import write_json
from darkmatter.errors.metrics import ReconstructionAccumulator, fvu
from darkmatter.sae.formats import load_any
from tests.conftest import REPO

HOOK = "blocks.1.hook_resid_post"
D_IN, D_SAE, K = 8, 24, 3
N_CTX, CTX, MIN_POS = 5, 12, 2  # the store keeps positions 2..11: 5 × 10 = 50 rows


def write_store(folder: Path, ctx: int = CTX, min_pos: int = MIN_POS, seed: int = 0) -> np.ndarray:
    """An activation store in darkmatter.data.activations' layout, with random activations (mean far from 0)."""
    folder.mkdir(parents=True)
    keep = ctx - min_pos
    x = (np.random.default_rng(seed).normal(size=(N_CTX * keep, D_IN)) + 3).astype(np.float32)
    np.save(folder / f"{HOOK}.npy", x)
    pl.DataFrame({
        "row": np.arange(len(x)), "context": np.repeat(np.arange(N_CTX), keep),
        "position": np.tile(np.arange(min_pos, ctx), N_CTX), "token_id": np.zeros(len(x), dtype=np.int32),
        "loss": np.full(len(x), np.nan, dtype=np.float32),
    }).write_parquet(folder / "index.parquet")
    write_json(folder / "meta.json", {"hooks": [HOOK], "d_model": {HOOK: D_IN}, "n_contexts": N_CTX,
                                      "context_size": ctx, "min_pos": min_pos, "rows": len(x), "with_loss": False})
    return x


def write_sae(folder: Path, d_in: int = D_IN, seed: int = 1) -> Path:
    """A SAELens-layout TopK SAE with random weights."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d_in, "d_sae": D_SAE, "k": K, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "dtype": "float32",
        "metadata": {"sae_lens_version": "6.18.0", "hook_name": HOOK}}))
    save_file({"W_enc": rng.normal(size=(d_in, D_SAE)).astype(np.float32),
               "b_enc": rng.normal(size=D_SAE).astype(np.float32),
               "W_dec": (0.3 * rng.normal(size=(D_SAE, d_in))).astype(np.float32),
               "b_dec": np.full(d_in, 3.0, dtype=np.float32)}, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.fixture
def setup(tmp_path):
    x = write_store(tmp_path / "activations" / "eval")
    sae_dir = write_sae(tmp_path / "saes" / HOOK / "topk-w24-k3-s0")
    return tmp_path, x, sae_dir


def test_streamed_evaluation_equals_one_shot(setup):
    _, x, sae_dir = setup
    sae = load_any(sae_dir)
    with torch.inference_mode():
        out = sae(torch.from_numpy(x))
    one_shot = ReconstructionAccumulator(D_SAE).update(x, out.x_hat, out.latents).summary()
    for chunk in (7, 50, 1000):
        streamed = evaluate_sae(sae, np.load(sae_dir.parent.parent.parent / "activations" / "eval" / f"{HOOK}.npy",
                                             mmap_mode="r"), chunk_tokens=chunk, progress=False)
        assert streamed.keys() == one_shot.keys()
        for key, want in one_shot.items():
            # The float32 SAE matmul rounds differently per batch size (BLAS blocking), so x_hat itself differs
            # at ~1e-7; the accumulation alone is exact to 1e-12 (tests/test_metrics.py).
            assert abs(float(streamed[key]) - float(want)) <= 1e-6 * max(1.0, abs(float(want))), (chunk, key)
    assert abs(one_shot["fvu"] - fvu(x, out.x_hat)) <= 1e-12
    assert one_shot["n_tokens"] == 50 and one_shot["l0_mean"] <= K


def test_metrics_file_and_min_pos(setup):
    root, x, sae_dir = setup
    out = root / "metrics" / HOOK / "topk-w24-k3-s0.json"
    params = {"harvest": {"min_pos": MIN_POS}}
    record = evaluate_to_file(sae_dir, root / "activations" / "eval", HOOK, out, params=params, progress=False)
    on_disk = json.loads(out.read_text())
    for key in ("fvu", "nmse_per_token_mean", "l0_mean", "l0_p50", "dead_count", "dead_fraction", "dense_count",
                "dense_fraction", "cosine_mean", "n_tokens"):
        assert key in on_disk, key
    assert on_disk["n_tokens"] == 50 and on_disk["min_pos"] == MIN_POS
    assert on_disk["architecture"] == "topk" and on_disk["k"] == K and on_disk["hook"] == HOOK
    assert on_disk["sae_id"] == "topk-w24-k3-s0"
    assert on_disk["provenance"]["params"] == params and "git_sha" in on_disk["provenance"]
    assert abs(on_disk["fvu"] - record["fvu"]) <= 1e-15
    # A stricter min_pos than the store's keeps only those positions: 5 contexts × positions 6..11.
    strict = evaluate_to_file(sae_dir, root / "activations" / "eval", HOOK, root / "strict.json",
                              params={"harvest": {"min_pos": 6}}, progress=False)
    assert strict["n_tokens"] == 30 and strict["min_pos"] == 6
    rows = np.flatnonzero(np.tile(np.arange(MIN_POS, CTX), N_CTX) >= 6)
    sae = load_any(sae_dir)
    with torch.inference_mode():
        assert abs(strict["fvu"] - fvu(x[rows], sae(torch.from_numpy(x[rows])).x_hat)) <= 1e-12


def test_d_in_mismatch_names_both_sizes(setup):
    root, _, _ = setup
    bad = write_sae(root / "saes" / HOOK / "wrong", d_in=D_IN + 2)
    with pytest.raises(EvaluationError) as err:
        evaluate_to_file(bad, root / "activations" / "eval", HOOK, root / "x.json", progress=False)
    msg = str(err.value)
    assert f"d_in={D_IN + 2}" in msg and f"d_model={D_IN}" in msg
    assert not (root / "x.json").exists()


def test_cli_evaluate_sae(setup, capsys):
    root, _, sae_dir = setup
    out = root / "metrics" / "m.json"
    params = json.dumps({"harvest": {"min_pos": MIN_POS}})
    base = ["evaluate-sae", "--params", params, "--activations", str(root / "activations" / "eval"),
            "--hook", HOOK]
    cli.main([*base, "--sae", str(sae_dir), "--out", str(out)])
    assert json.loads(out.read_text())["n_tokens"] == 50
    for bad_sae in (root / "nowhere", root / "activations"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*base, "--sae", str(bad_sae), "--out", str(root / "bad.json")])
        assert exit_info.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and str(bad_sae) in err[0]
    assert not (root / "bad.json").exists()


def test_snakemake_rule_evaluates_one_sae(tmp_path):
    """The evaluate_sae rule on the smoke config, given an SAE folder and an eval store (nothing else runs)."""
    smoke = load_config(REPO / "config" / "smoke.yaml")
    hook, results = smoke.harvest.hooks[0], tmp_path / "results" / smoke.name
    assert hook == HOOK
    write_store(results / "activations" / "eval", ctx=smoke.harvest.min_pos + 4, min_pos=smoke.harvest.min_pos)
    write_sae(results / "saes" / HOOK / "topk-w24-k3-s0")
    target = f"results/{smoke.name}/metrics/{HOOK}/topk-w24-k3-s0.json"
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
                          "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "smoke.yaml"),
                          "--allowed-rules", "evaluate_sae", "--", target], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / target).read_text())
    assert record["n_tokens"] == N_CTX * 4 and record["min_pos"] == smoke.harvest.min_pos
    assert record["provenance"]["params"]["harvest"]["min_pos"] == smoke.harvest.min_pos

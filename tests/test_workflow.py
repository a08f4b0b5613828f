"""The Snakemake workflow: dry runs, lint, CLI errors, and the whole smoke experiment end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _run(args: list[str], cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("configfile", [None, "config/smoke.yaml"])
def test_dry_run_plans_every_step(configfile, tmp_path):
    args = [*SNAKEMAKE, "-n", "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    if configfile:
        args += ["--configfile", str(REPO / configfile)]
    else:
        (tmp_path / "config").symlink_to(REPO / "config")
    res = _run(args)
    assert res.returncode == 0, res.stderr
    for rule in ("prepare_model", "prepare_corpus", "harvest"):
        assert rule in res.stdout


def test_lint_is_clean():
    res = _run([*SNAKEMAKE, "--lint"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Congratulations" in res.stdout + res.stderr


def test_typo_in_config_fails_at_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nharvest: {min_poss: 3}\n")
    res = _run([*SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(bad)])
    assert res.returncode != 0
    assert "unknown key 'harvest.min_poss'" in res.stdout + res.stderr


def test_cli_bad_model_path_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "model" / "model.json"
    params = json.dumps({"model": {"source": "local", "path": str(tmp_path / "missing")}})
    res = _run([sys.executable, "-m", "darkmatter.cli", "prepare-model", "--params", params, "--out", str(out)])
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is not a Hugging Face model folder" in err[0], res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_smoke_workflow_end_to_end(tmp_path):
    args = [*SNAKEMAKE, "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(REPO / "config" / "smoke.yaml")]
    res = _run(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = tmp_path / "results" / "smoke"
    for split in ("train", "eval"):
        meta = json.loads((results / "activations" / split / "meta.json").read_text())
        assert meta["hooks"] == ["blocks.1.hook_resid_post"]
        assert (results / "activations" / split / "provenance.json").is_file()
    # A second run has nothing to do.
    again = _run([*args, "-n"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

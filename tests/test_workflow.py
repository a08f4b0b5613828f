"""The Snakemake workflow: dry runs, lint, CLI errors, and the whole smoke experiment end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from darkmatter.config import load_config
from darkmatter.device import resolve_device
from darkmatter.sae.families import expand_families, widest
from darkmatter.store.build import connect
from tests.helpers import REPO

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


def test_unlock_works_as_typed(tmp_path):
    """After a kill Snakemake recommends `snakemake --unlock`: it must work without --cores."""
    (tmp_path / "config").symlink_to(REPO / "config")
    res = _run([*SNAKEMAKE, "--unlock", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path)])
    assert res.returncode == 0 and "Unlocked working directory" in res.stdout + res.stderr, res.stderr


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
    cfg = load_config(REPO / "config" / "smoke.yaml")
    for split in ("train", "eval"):
        meta = json.loads((results / "activations" / split / "meta.json").read_text())
        assert meta["hooks"] == list(cfg.harvest.hooks)
        # the config's device reached the step (through the environment) and is recorded
        assert meta["device"]["setting"] == cfg.device
        assert meta["device"]["device"].startswith(resolve_device(cfg.device).type)
        assert (results / "activations" / split / "provenance.json").is_file()
    members = expand_families(cfg.families, cfg.primary_hook)
    n_saes, primary = len(members), [m for m in members if m.hook == cfg.primary_hook]
    assert len(primary) < n_saes  # SAEs on the other harvested hooks too
    n_hooks = len(cfg.harvest.hooks)
    with connect(results / "darkmatter.duckdb") as con:
        n_tokens = con.execute("SELECT count(*) FROM tokens").fetchone()[0]
        assert n_tokens == cfg.harvest.eval_contexts * (cfg.harvest.context_size - cfg.harvest.min_pos)
        assert con.execute("SELECT count(*) FROM token_errors").fetchone()[0] == n_tokens * n_saes
        fvu = dict(con.execute("SELECT sae_id, fvu FROM saes").fetchall())
        assert len(fvu) == n_saes and all(0 < v < 1 for v in fvu.values())
        assert con.execute("SELECT count(DISTINCT sae_id) FROM token_ce WHERE sae_id <> ''").fetchone()[0] == len(primary)
        pursued = cfg.pursuit.contexts * (cfg.harvest.context_size - cfg.harvest.min_pos)
        assert con.execute("SELECT count(*) FROM pursuit_errors").fetchone()[0] == 2 * n_saes * pursued
        spliced = con.execute("SELECT DISTINCT sae_id FROM token_ce WHERE condition = 'pursuit'").fetchall()
        assert spliced == [(widest(primary).sae_id,)]
        hooks = dict(con.execute("SELECT hook, count(*) FROM saes GROUP BY hook").fetchall())
        assert hooks == {cfg.primary_hook: len(primary)} | {h: 1 for h in cfg.harvest.hooks[1:]}
        error_saes = con.execute("SELECT component, base_sae_id, width, fvu FROM error_saes ORDER BY 1").fetchall()
        assert [r[:3] for r in error_saes] == [(c, "topk-w512-k8-s0", 4 * 64) for c in
                                               ("linear_error", "nonlinear_error", "sae_error")]
        assert all(0 < r[3] < 1.5 for r in error_saes)
    for name in cfg.analysis.names:
        summary = json.loads((results / "analyses" / name / "summary.json").read_text())
        numbers = [v for v in summary.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert numbers, name
    index = (tmp_path / "reports" / "smoke" / "index.html").read_text()
    assert all(f'id="analysis-{name}"' in index for name in cfg.analysis.names)
    assert (tmp_path / "reports" / "smoke" / "browser.html").is_file()
    # A second run has nothing to do.
    again = _run([*args, "-n"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # Editing a key reruns exactly the steps that read it, and what depends on their outputs.
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    analysis_edit = smoke | {"analysis": smoke["analysis"] | {"synthetic_validation": {"tokens": 500}}}
    assert planned_jobs(args, analysis_edit, tmp_path) == {"run_analysis": 1, "render_report": 1, "all": 1}
    fit_edit = smoke | {"decomposition": smoke["decomposition"] | {"fit_tokens": 1200}}
    assert planned_jobs(args, fit_edit, tmp_path) == {
        "measure_errors": n_hooks, "measure_ce": 1, "measure_pursuit": n_hooks, "train_error_saes": 1, "build_database": 1,
        "run_analysis": len(cfg.analysis.names), "render_report": 1, "all": 1}  # no harvest, training, encoding, pursuit
    # (the error SAEs learn the errors b* splits: a new b* retrains them)
    pursuit_edit = smoke | {"pursuit": {"contexts": 8}}
    assert planned_jobs(args, pursuit_edit, tmp_path) == {
        "pursue": n_saes, "measure_pursuit": n_hooks, "build_database": 1, "run_analysis": len(cfg.analysis.names),
        "render_report": 1, "all": 1}  # the encoders' measurement and both CE steps stay
    # the device reaches the steps through the environment, not their parameters: moving a run reruns nothing
    edited = tmp_path / "device.yaml"
    edited.write_text(yaml.safe_dump(smoke | {"device": "cpu"}))
    moved = _run([*args[:-1], str(edited), "-n"])
    assert moved.returncode == 0 and "Nothing to be done" in moved.stdout + moved.stderr, moved.stderr[-3000:]
    error_sae_edit = smoke | {"error_saes": smoke["error_saes"] | {"expansion": 2}}
    assert planned_jobs(args, error_sae_edit, tmp_path) == {
        "train_error_saes": 1, "build_database": 1, "run_analysis": len(cfg.analysis.names), "render_report": 1,
        "all": 1}


def planned_jobs(args: list[str], config: dict, tmp_path) -> dict[str, int]:
    """``snakemake -n`` with an edited config: the jobs it would run, by rule (its "Job stats" table)."""
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    res = _run([*args[:-1], str(edited), "-n"])
    assert res.returncode == 0, res.stderr[-3000:]
    table = (res.stdout + res.stderr).split("Job stats:")[1].split("\n\n")[0]
    jobs = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) == 2 and parts[0] != "total":
            jobs[parts[0]] = int(parts[1])
    return jobs

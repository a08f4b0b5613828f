"""The Snakemake workflow: dry runs, lint, CLI errors, and the whole smoke experiment end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from darkmatter.config import load_config
from darkmatter.device import resolve_device
from darkmatter.downstream.ce import SOURCE_CONDITION, SOURCE_CONDITION_WITH_LINEAR
from darkmatter.paths import ExperimentPaths
from darkmatter.resources import model_shape, step_resources
from darkmatter.sae.families import expand_families, widest
from darkmatter.sae.model import Sae, default_cfg, save_sae
from darkmatter.store.build import connect
from tests.helpers import REPO
from tests.test_security import guarded_env

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _run(args: list[str], cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Every Python process the test starts (Snakemake and each step it runs) refuses and logs any network access
    (tests/netguard); afterwards the log must not exist."""
    log = tmp_path / "network_attempts.log"
    env = guarded_env(log)
    for key in ("PYTHONPATH", "DARKMATTER_NETGUARD_LOG"):
        monkeypatch.setenv(key, env[key])
    yield log
    assert not log.exists(), log.read_text()  # no step tried to reach the network


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


def test_budget_config_shares_the_defaults_data_or_says_to_run_it_first(tmp_path):
    """config/budget.yaml plans its 12 SAEs on the default experiment's data, linked, never harvested again; before
    the default has run, it stops with one sentence."""
    args = [*SNAKEMAKE, "-n", "-p", "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory",
            str(tmp_path), "--configfile", str(REPO / "config" / "budget.yaml")]
    res = _run(args)
    assert res.returncode != 0 and "share_data_from: default: results/default/model/model.json does not exist; " \
        "run that experiment first" in res.stdout + res.stderr, res.stdout[-2000:]
    _default_made(tmp_path)
    plan = _run(args)
    assert plan.returncode == 0, plan.stderr[-2000:]
    jobs = _jobs(plan.stdout)
    cfg = load_config(REPO / "config" / "budget.yaml")
    ids = [m.sae_id for m in expand_families(cfg.families, cfg.primary_hook)]
    assert len(ids) == 12 and sorted(k for k in jobs if k.startswith("train_sae/")) == sorted(
        f"train_sae/hook={cfg.primary_hook}, sae_id={i}" for i in ids)
    assert plan.stdout.count("darkmatter.cli share-data --step") == 4  # model, corpus, two activation splits
    assert "darkmatter.cli --threads 2 harvest" not in plan.stdout and "cli prepare-corpus" not in plan.stdout


def _plan(args: list[str], tmp_path) -> str:
    """``snakemake -n`` of the default experiment from an empty folder: the printed plan."""
    (tmp_path / "config").symlink_to(REPO / "config")
    res = _run([*SNAKEMAKE, "-n", *args, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _jobs(plan: str) -> dict[str, dict[str, str]]:
    """Each planned job's printed fields (threads, resources, benchmark, ...), by ``rule/wildcards``."""
    blocks, current = [], None
    for line in plan.splitlines():
        if line.startswith(("rule ", "localrule ")) and line.endswith(":"):
            current = {"rule": line.split()[1][:-1]}
            blocks.append(current)
        elif current is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            current[key] = value
        elif not line.startswith("    "):
            current = None
    return {f"{b['rule']}/{b.get('wildcards', '')}": b for b in blocks}


def _resources(fields: dict[str, str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in fields["resources"].split(", "))


def test_slurm_profile_plans_with_each_jobs_resources(tmp_path):
    """profiles/slurm as a workflow profile (it replaces profiles/default): 16 threads per heavy job, and each
    job's memory, runtime and GPUs from darkmatter.resources for the job's own SAE, split or hook."""
    plan = _plan(["--workflow-profile", str(REPO / "profiles" / "slurm")], tmp_path)
    assert "workflow specific profile" in plan and "profiles/slurm" in plan
    jobs = _jobs(plan)
    cfg = load_config(REPO / "config" / "config.yaml")
    shape = model_shape(cfg.model)
    hook = cfg.primary_hook
    expected = {
        "harvest/split=train": step_resources(cfg, "harvest", shape, split="train"),
        f"train_sae/hook={hook}, sae_id=topk-w16384-k32-s0": step_resources(
            cfg, "train-sae", shape, sae_id="topk-w16384-k32-s0"),
        f"pursue/hook={hook}, sae_id=topk-w4096-k128-s0": step_resources(
            cfg, "pursue", shape, sae_id="topk-w4096-k128-s0"),
        "measure_ce/": step_resources(cfg, "measure-ce", shape),
        f"train_error_saes/hook={hook}": step_resources(cfg, "train-error-saes", shape, hook=hook),
        "build_database/": step_resources(cfg, "build-database", shape),
    }
    for job, want in expected.items():
        got = _resources(jobs[job])
        assert {k: int(got[k]) for k in want} == want, job
    assert jobs["harvest/split=train"]["threads"] == "16" and "threads" not in jobs["render_report/"]
    assert jobs[f"train_sae/hook={hook}, sae_id=topk-w16384-k32-s0"]["benchmark"] == (
        f"results/default/benchmarks/train_sae/{hook}/topk-w16384-k32-s0.tsv")
    # the widest SAE trains longer and in more memory than the narrowest
    narrow = _resources(jobs[f"train_sae/hook={hook}, sae_id=topk-w1024-k32-s0"])
    wide = _resources(jobs[f"train_sae/hook={hook}, sae_id=topk-w16384-k32-s0"])
    assert int(wide["mem_mb"]) > int(narrow["mem_mb"]) and int(wide["runtime"]) > int(narrow["runtime"])


def test_gemma_config_plans_on_slurm(tmp_path):
    """config/gemma-2-2b.yaml (Gemma Scope SAEs through SAELens, a corpus streamed from the hub) plans with the
    SLURM profile without the network: every SAE is imported, only the error-component SAEs train."""
    plan = _plan(["--workflow-profile", str(REPO / "profiles" / "slurm"),
                  "--configfile", str(REPO / "config" / "gemma-2-2b.yaml")], tmp_path)
    jobs = _jobs(plan)
    rules = Counter(job["rule"] for job in jobs.values())
    assert _resources(jobs["harvest/split=train"])["gpu"] == "1" and _resources(jobs["build_database/"])["gpu"] == "0"
    # 6 widths + 5 L0s sharing the 16k L0-22 SAE, and the previous layer's
    assert (rules["import_sae"], rules["train_sae"], rules["train_error_saes"]) == (11, 0, 1)
    assert rules["encode_sae"] == rules["pursue"] == 11 and rules["measure_errors"] == 2


def test_slurm_profile_plans_as_a_global_profile(tmp_path):
    """`--profile profiles/slurm` also plans, but profiles/default, which Snakemake loads by itself, still applies
    on top of it (the workflow profile wins per key): its `cores: all`, here this machine's, sets every heavy job's
    threads; light steps keep one."""
    plan = _plan(["--profile", str(REPO / "profiles" / "slurm")], tmp_path)
    assert "profiles/slurm" in plan and "profiles/default" in plan
    jobs = _jobs(plan)
    assert len(jobs) == 82  # 81 jobs and `all`, as the Job stats table counts them
    assert int(jobs["harvest/split=eval"].get("threads", 1)) == os.cpu_count()
    assert "threads" not in jobs["build_database/"]


def _stand_in_conda(root: Path) -> dict[str, str]:
    """A `conda` that answers Snakemake's checks and "creates" each environment as a folder whose `python` logs
    the PYTHONPATH it sees, then runs this interpreter (which has the dependencies); the environment for it."""
    (root / "bin").mkdir(parents=True)
    files = {
        "bin/conda": f"""#!/bin/sh
            case "$1" in
              --version) echo 'conda 24.11.0';;
              info) echo '{{"conda_prefix": "{root}", "root_prefix": "{root}", "envs_dirs": ["{root}/envs"],
                           "platform": "linux-64"}}';;
              config) echo '{{"get": {{"channel_priority": "strict"}}}}';;
              env) prev=""; for a in "$@"; do
                     if [ "$prev" = "--prefix" ]; then mkdir -p "$a/bin"; cp "{root}/python" "$a/bin/python"; fi
                     prev="$a"; done;;
              clean) ;;
              *) exit 1;;
            esac
            """,
        "bin/activate": 'export PATH="$1/bin:$PATH"\n',
        "python": f"""#!/bin/sh
            echo "PYTHONPATH=$PYTHONPATH python=$0" >> "{root}/python.log"
            exec "{sys.executable}" "$@"
            """,
    }
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
        (root / name).chmod(0o755)
    return os.environ | {"PATH": f"{root / 'bin'}:{os.environ['PATH']}"}


def test_conda_deployment_runs_the_environments_interpreter(tmp_path):
    """With --sdm conda the jobs call `python` (the activated environment's) with the workflow's checkout on
    PYTHONPATH and, without it, this interpreter by its absolute path. A stand-in conda: no real one needed."""
    env = _stand_in_conda(tmp_path / "conda")
    base = [*SNAKEMAKE, "-p", "--cores", "1", "--snakefile", str(REPO / "Snakefile"), "--configfile",
            str(REPO / "config" / "smoke.yaml")]
    commands = {}
    for sdm in ([], ["--sdm", "conda"]):
        res = subprocess.run([*base, "-n", *sdm, "--directory", str(tmp_path / f"run{len(sdm)}")], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        commands[bool(sdm)] = [line.split(": ", 1)[1] for line in (res.stdout + res.stderr).splitlines()
                               if line.startswith("Shell command: ") and line != "Shell command: None"]
    host = str(Path(sys.prefix) / "bin" / "python3")
    assert len(commands[False]) == len(commands[True]) > 30
    assert [c for c in commands[False] if not c.startswith(f"{host} -m ")] == []
    assert [c for c in commands[True] if not c.startswith("python -m ")] == []
    # One job for real: Snakemake drops the caller's PYTHONPATH for conda jobs; the rule sets the checkout's.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(tmp_path / "elsewhere")]))
    run = tmp_path / "run2"
    res = subprocess.run([*base, "--sdm", "conda", "--directory", str(run), "results/smoke/model/model.json"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (line,) = (tmp_path / "conda" / "python.log").read_text().splitlines()
    assert line.startswith(f"PYTHONPATH={REPO} python={run / '.snakemake' / 'conda'}"), line
    assert json.loads((run / "results" / "smoke" / "model" / "model.json").read_text())["d_model"] == 64


def _default_made(root: Path) -> None:
    """Empty stand-ins for the default experiment's data folders under ``root``, which the budget config shares."""
    default = ExperimentPaths.of("default", root)
    for folder in (default.model_json.parent, default.corpus, default.activations("train"), default.activations("eval")):
        folder.mkdir(parents=True)
    default.model_json.write_text("{}")


@pytest.mark.parametrize("budget", [False, True], ids=["default", "budget"])
def test_lint_is_clean(budget, tmp_path):
    args = [*SNAKEMAKE, "--lint"]
    if budget:  # the config whose data rules share another experiment's folders
        _default_made(tmp_path)
        args += ["--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--configfile",
                 str(REPO / "config" / "budget.yaml")]
    res = _run(args)
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


def write_pretrained(root) -> dict[str, tuple[str, int, int]]:
    """SAEs 'trained elsewhere' for the smoke model's primary hook (d_model 64), one in each format the workflow
    imports, tied random weights (a reconstruction better than nothing); {format: (architecture, width, k)}."""
    from tests.sae.foreign import random_weights, write_gemma_scope, write_saelens, write_sparsify

    def tied(d_sae, seed):
        w = random_weights(64, d_sae, seed)
        w["W_dec"] = np.ascontiguousarray(w["W_enc"].T / np.linalg.norm(w["W_enc"], axis=0)[:, None])
        w["b_dec"][:] = 0
        return w

    save_sae(Sae.from_tensors(default_cfg("topk", 64, 192, k=8), {
        n: torch.from_numpy(v) for n, v in tied(192, 1).items() if n != "threshold"}), root / "ours")
    write_saelens(root / "saelens_l0_12", {"architecture": "jumprelu", "d_in": 64, "d_sae": 160, "dtype": "float32",
                                           "apply_b_dec_to_input": True, "normalize_activations": "none",
                                           "metadata": {"sae_lens_version": "6.18.0"}}, tied(160, 2))
    write_sparsify(root / "sparsify" / "layers.1", tied(224, 3), k=8)
    write_gemma_scope(root / "gemma" / "average_l0_10", tied(96, 4))
    return {"ours": ("topk", 192, 8), "saelens": ("jumprelu", 160, 12), "sparsify": ("topk", 224, 8),
            "gemma_scope": ("jumprelu", 96, 10)}


@pytest.mark.slow
@pytest.mark.usefixtures("no_network")
def test_smoke_workflow_end_to_end(tmp_path):
    """The smoke experiment plus a family of SAEs trained elsewhere (one per format), to the report."""
    imported = write_pretrained(tmp_path / "pretrained")
    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    smoke["families"].append({"name": "pretrained", "source": [str(tmp_path / "pretrained")]})
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(smoke))
    args = [*SNAKEMAKE, "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
            "--configfile", str(tmp_path / "smoke.yaml")]
    res = _run(args, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    results = tmp_path / "results" / "smoke"
    cfg = load_config(tmp_path / "smoke.yaml")
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
        assert len(fvu) == n_saes and all(0 < fvu[m.sae_id] < 1 for m in members if not m.source)
        pretrained = con.execute("SELECT architecture, width, k, fvu FROM saes WHERE families = 'pretrained' "
                                 "ORDER BY width").fetchall()
        assert [r[:3] for r in pretrained] == sorted(imported.values(), key=lambda r: r[1])
        assert all(np.isfinite(r[3]) and r[3] > 0 for r in pretrained)
        assert con.execute("SELECT count(DISTINCT sae_id) FROM token_ce WHERE sae_id <> ''").fetchone()[0] == len(primary)
        pursued = cfg.pursuit.contexts * (cfg.harvest.context_size - cfg.harvest.min_pos)
        assert con.execute("SELECT count(*) FROM pursuit_errors").fetchone()[0] == 2 * n_saes * pursued
        spliced = con.execute("SELECT DISTINCT sae_id FROM token_ce WHERE condition = 'pursuit'").fetchall()
        assert spliced == [(widest(primary).sae_id,)]
        # the previous layer's SAE predicts part of the widest SAE's NonlinearError: spliced for that SAE only
        for condition in (SOURCE_CONDITION, SOURCE_CONDITION_WITH_LINEAR):
            sourced = con.execute("SELECT DISTINCT sae_id FROM token_ce WHERE condition = ?", [condition]).fetchall()
            assert sourced == [(widest(primary).sae_id,)]
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
    sources = json.loads((results / "analyses" / "error_sources" / "summary.json").read_text())
    for part in ("nonlinear_from_previous_layer", "nonlinear_from_previous_layer_given_linear"):
        assert np.isfinite(sources[f"ce_recovered_{part}_pct"])
    assert sources["ce_contexts"] == cfg.downstream.contexts
    # every heavy job's benchmark: one row with its wall time and peak memory
    for bench in [results / "benchmarks" / "harvest" / "train.tsv", results / "benchmarks" / "measure_ce.tsv",
                  results / "benchmarks" / "train_sae" / primary[0].hook / f"{primary[0].sae_id}.tsv"]:
        rows = bench.read_text().splitlines()
        header, values = rows[0].split("\t"), rows[1].split("\t")
        assert len(rows) == 2 and float(values[header.index("s")]) > 0 and float(values[header.index("max_rss")]) > 0
    index = (tmp_path / "reports" / "smoke" / "index.html").read_text()
    assert all(f'id="analysis-{name}"' in index for name in cfg.analysis.names)
    assert (tmp_path / "reports" / "smoke" / "browser.html").is_file()
    # A second run has nothing to do.
    again = _run([*args, "-n"])
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # Editing a key reruns exactly the steps that read it, and what depends on their outputs.
    analysis_edit = smoke | {"analysis": smoke["analysis"] | {"synthetic_validation": {"tokens": 500}}}
    assert planned_jobs(args, analysis_edit, tmp_path) == {"run_analysis": 1, "render_report": 1, "all": 1}
    fit_edit = smoke | {"decomposition": smoke["decomposition"] | {"fit_tokens": 1200}}
    assert planned_jobs(args, fit_edit, tmp_path) == {
        "measure_errors": n_hooks, "measure_ce": 1, "measure_sources_ce": 1, "measure_pursuit": n_hooks,
        "train_error_saes": 1, "build_database": 1,
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

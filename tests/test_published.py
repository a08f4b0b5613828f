"""The committed results of the published runs (results/<exp>/, reports/<exp>/: the default and the training-budget
study): present, unchanged since they were published (darkmatter/report/publish.py), and readable by the current
code, so they cannot silently rot."""

from __future__ import annotations

import importlib
import json

import pytest

from darkmatter.analysis import load_outputs
from darkmatter.config import load_config
from darkmatter.io import sha256
from darkmatter.paths import ExperimentPaths
from darkmatter.report.publish import MANIFEST, published_files
from darkmatter.sae.families import expand_families
from darkmatter.store.schema import TABLES
from tests.helpers import REPO

CONFIGS = {"default": "config.yaml", "budget": "budget.yaml"}  # each published experiment and its config
RUNS = [(name, ExperimentPaths.of(name, REPO), load_config(REPO / "config" / file)) for name, file in CONFIGS.items()]


@pytest.fixture(params=RUNS, ids=list(CONFIGS))
def run(request) -> tuple[str, ExperimentPaths, object, dict]:
    """(name, paths, config, manifest) of one published run."""
    name, paths, config = request.param
    return name, paths, config, json.loads((paths.root / MANIFEST).read_text())


def test_every_published_file_is_there_and_unchanged(run):
    name, paths, _, manifest = run
    files = {entry["path"]: entry for entry in manifest["files"]}
    assert f"reports/{name}/index.html" in files and f"reports/{name}/browser.html" in files
    for path, entry in files.items():
        assert (REPO / path).is_file(), path
        assert sha256(REPO / path) == entry["sha256"], f"{path} changed since it was published (make publish)"
    on_disk = {p.relative_to(REPO).as_posix() for p in published_files(paths)}  # what make publish would list
    assert on_disk <= set(files), sorted(on_disk - set(files))  # nothing unlisted beside them


@pytest.mark.parametrize(("paths", "name"), [(p, n) for _, p, c, in RUNS for n in c.analysis.names],
                         ids=[f"{e}-{n}" for e, _, c in RUNS for n in c.analysis.names])
def test_each_analysis_still_fits_the_contract(paths, name):
    out = load_outputs(paths.analysis(name))
    module = importlib.import_module(f"analyses.{name}")
    meta, summary = out["meta"], out["summary"]
    assert meta["name"] == name and meta["question"].endswith("?")
    missing = [k for k in module.HEADLINE if k not in summary]
    assert not missing, f"{name}: the published summary lacks the headline keys {missing}; republish"
    assert set(meta["figures"]) == set(out["figures"]) and out["table"].height > 0


def test_the_sae_table_has_the_current_schema(run):
    _, _, config, manifest = run
    columns = [c.name for c in TABLES["saes"]]
    members = expand_families(config.families, config.primary_hook)
    assert sorted(row["sae_id"] for row in manifest["saes"]) == sorted(m.sae_id for m in members)
    for row in manifest["saes"]:
        assert sorted(row) == sorted(columns), row["sae_id"]  # the manifest is written with sorted keys
        assert 0 < row["fvu_nonlinear"] < row["fvu"] < 1 and row["l0_mean"] == pytest.approx(row["k"], abs=0.5)


def test_the_report_shows_every_analysis_and_links_its_browser(run):
    _, paths, config, _ = run
    index = paths.report_index.read_text()
    assert all(f'id="analysis-{name}"' in index for name in config.analysis.names)
    assert 'href="browser.html"' in index and paths.report_browser.stat().st_size > 100_000


def test_the_default_report_carries_the_budget_studys_robustness():
    """Each verdict the budget study tested shows its robustness word in the default's published report."""
    (_, default, config), (_, budget, _) = RUNS
    summary = load_outputs(budget.analysis("training_budget"))["summary"]
    index = default.report_index.read_text()
    assert config.analysis.budget_study == "budget"
    for name in config.analysis.names:
        if f"robustness_{name}" in summary:
            assert ("robust to budget)" in index or "with budget)" in index
                    or "(budget study undetermined)" in index), name

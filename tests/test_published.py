"""The committed results of the default run (results/default/, reports/default/): present, unchanged since they were
published (darkmatter/report/publish.py), and readable by the current code, so they cannot silently rot."""

from __future__ import annotations

import importlib
import json

import pytest

from darkmatter.analysis import load_outputs
from darkmatter.config import load_config
from darkmatter.paths import ExperimentPaths
from darkmatter.report.publish import MANIFEST, published_files, sha256
from darkmatter.sae.families import expand_families
from darkmatter.store.schema import TABLES
from tests.helpers import REPO

PATHS = ExperimentPaths.of("default", REPO)
CONFIG = load_config(REPO / "config" / "config.yaml")


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((PATHS.root / MANIFEST).read_text())


def test_every_published_file_is_there_and_unchanged(manifest):
    files = {entry["path"]: entry for entry in manifest["files"]}
    assert "reports/default/index.html" in files and "reports/default/browser.html" in files
    for path, entry in files.items():
        assert (REPO / path).is_file(), path
        assert sha256(REPO / path) == entry["sha256"], f"{path} changed since it was published (make publish)"
    on_disk = {p.relative_to(REPO).as_posix() for p in published_files(PATHS)}  # what make publish would list
    assert on_disk <= set(files), sorted(on_disk - set(files))  # nothing unlisted beside them


@pytest.mark.parametrize("name", CONFIG.analysis.names)
def test_each_analysis_still_fits_the_contract(name):
    out = load_outputs(PATHS.analysis(name))
    module = importlib.import_module(f"analyses.{name}")
    meta, summary = out["meta"], out["summary"]
    assert meta["name"] == name and meta["question"].endswith("?")
    missing = [k for k in module.HEADLINE if k not in summary]
    assert not missing, f"{name}: the published summary lacks the headline keys {missing}; republish"
    assert set(meta["figures"]) == set(out["figures"]) and out["table"].height > 0


def test_the_sae_table_has_the_current_schema(manifest):
    columns = [c.name for c in TABLES["saes"]]
    members = expand_families(CONFIG.families, CONFIG.primary_hook)
    assert sorted(row["sae_id"] for row in manifest["saes"]) == sorted(m.sae_id for m in members)
    for row in manifest["saes"]:
        assert sorted(row) == sorted(columns), row["sae_id"]  # the manifest is written with sorted keys
        assert 0 < row["fvu_nonlinear"] < row["fvu"] < 1 and row["l0_mean"] == pytest.approx(row["k"], abs=0.5)


def test_the_report_shows_every_analysis_and_links_its_browser():
    index = PATHS.report_index.read_text()
    assert all(f'id="analysis-{name}"' in index for name in CONFIG.analysis.names)
    assert 'href="browser.html"' in index and PATHS.report_browser.stat().st_size > 100_000

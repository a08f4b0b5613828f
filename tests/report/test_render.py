"""The HTML report without a browser: sections, figures, offline-only resources, browser-data limits, "not run"."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
import zipfile
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest
import yaml

from darkmatter.analysis.contract import AnalysisContext, load_outputs, run
from darkmatter.cli import main as cli_main
from darkmatter.config import load_config, stable_hash
from darkmatter.paths import ExperimentPaths
from darkmatter.report.browser import BrowserLimits, quantise, sample_contexts
from darkmatter.report.render import render_report
from darkmatter.report.tables import fmt
from darkmatter.store.build import connect
from tests.helpers import REPO, fake_analysis_module
from tests.helpers import REPORT_ANALYSES as ANALYSES
from tests.helpers import REPORT_SAE_IDS as SAE_IDS
from tests.helpers import ReportExperiment as Experiment
from tests.helpers import make_report_experiment as make_experiment


class Page(HTMLParser):
    """Every tag with its attributes, and the text inside each element carrying an id (nested ones included)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._open: list[tuple[str, list[str]]] = []
        self.text: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag not in ("img", "meta", "br", "wbr", "input"):
            self._open.append((a.get("id") or "", []))

    def handle_endtag(self, tag):
        if tag in ("img", "meta", "br", "wbr", "input") or not self._open:
            return
        ident, parts = self._open.pop()
        joined = "".join(parts)
        if ident:
            self.text[ident] = joined
        if self._open:
            self._open[-1][1].append(joined)

    def handle_data(self, data):
        if self._open:
            self._open[-1][1].append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Experiment:
    exp = make_experiment(tmp_path_factory.mktemp("report"))
    render_report(exp.paths, exp.analyses, exp.config)
    return exp


def embedded_data(browser_html: str) -> dict:
    match = re.search(r'<script type="application/json" id="dm-data">(.*?)</script>', browser_html, re.S)
    assert match, "browser.html has no embedded data"
    return json.loads(match.group(1))


def test_report_has_every_section_figure_and_number(experiment):
    html = experiment.out.read_text()
    page = Page(html)
    sections = [a["id"] for a in page.find("section")]
    assert sections == ["summary", *[f"analysis-{n}" for n in ANALYSES], "saes", "browser"]  # config order
    assert page.find("footer", id="provenance")
    for name in ANALYSES[:2]:
        outputs = load_outputs(experiment.paths.root / "analyses" / name)
        body = page.text[f"analysis-{name}"]
        assert outputs["meta"]["question"] in body and outputs["meta"]["paper_claim"] in body
        summary = dict(outputs["summary"])
        verdict, basis = summary.pop("verdict", None), summary.pop("verdict_basis", None)
        for key, value in summary.items():
            assert key in body and fmt(value) in body
        if verdict is not None:  # shown beside the claim, in the section and in the top table
            assert f"Here: {verdict} {basis}" in " ".join(body.split())
            assert f"{verdict} {basis}" in " ".join(page.text["summary"].split())
        for fig, png in outputs["figures"].items():
            (img,) = [a for a in page.find("img", **{"data-figure": fig}) if name in (a.get("alt") or "")]
            prefix = "data:image/png;base64,"
            assert img["src"].startswith(prefix) and base64.b64decode(img["src"][len(prefix):]) == png.read_bytes()
    # A table longer than 15 rows is cut, and says so; strings are escaped, never interpreted.
    assert "first 15 of 36 rows" in page.text["analysis-per_token_shares"]
    assert html.count("<tr>", html.index('id="analysis-per_token_shares"'), html.index('id="analysis-unfinished"')) == 16
    assert "synthetic &lt;data&gt; &amp; co" in html and "<data>" not in html
    # The SAE table lists every SAE with its dead % (fraction x 100) and FVU.
    saes = page.text["saes"]
    assert all(s in saes for s in SAE_IDS) and "dead %" in saes and "FVU nonlinear" in saes
    assert "CE score" not in saes  # the store has no CE column: no empty column either
    summary = page.text["summary"]
    # the top table leads with each analysis's HEADLINE keys, in its order, then the rest alphabetically
    assert summary.index("saes") < summary.index("r2_norm_sq_median") < summary.index("fvu_min")
    assert "random llama (3 blocks, d_model 64)" in summary and "blocks.1.hook_resid_post" in summary
    assert "720 eval tokens in 12 contexts, 3 SAEs" in summary
    footer = page.text["provenance"]
    assert stable_hash(experiment.config) in footer and "duckdb" in footer
    assert re.search(r"activations\s*2\s*25", footer), "run time per stage: two 12.5 s harvests"


def test_report_loads_nothing_from_the_network(experiment):
    for path in (experiment.out, experiment.out.parent / "browser.html"):
        html = path.read_text()
        page = Page(html)
        urls = [a[k] for _, a in page.tags for k in ("src", "href", "srcset", "data") if a.get(k)]
        assert not [u for u in urls if re.match(r"\s*(https?:)?//", u)], path
        assert not page.find("link") and not [a for t, a in page.tags if t == "script" and a.get("src")]
        assert not re.search(r"url\(\s*['\"]?(https?:)?//|@import", html), path
        # Only local links: the report's browser link, and the browser's way back.
        assert {u for u in urls if not u.startswith(("data:", "#"))} <= {"browser.html", "index.html"}


def test_headline_keys_missing_from_the_summary_are_left_out(tmp_path):
    module = fake_analysis_module("degraded", "Q?\n\nM.", "claim", lambda ctx: pl.DataFrame({"a": [1]}),
                                  lambda t: {"a": 1.0, "b": 2.0}, lambda t: {}, headline=("b", "c", "a"))
    run(module, AnalysisContext(ExperimentPaths.at(tmp_path), {}), tmp_path / "out")
    assert load_outputs(tmp_path / "out")["meta"]["headline"] == ["b", "a"]


def test_missing_analyses_show_not_run(experiment, tmp_path):
    broken = experiment.paths.root / "analyses" / "half_written"
    broken.mkdir(exist_ok=True)
    (broken / "summary.json").write_text("{}")
    out = tmp_path / "index.html"
    render_report(experiment.paths, ["unfinished", "half_written", "error_predictability"], experiment.config,
                  out=out)
    page = Page(out.read_text())
    assert [a["data-status"] for a in page.find("section", **{"class": "analysis not-run"})] == ["not run"] * 2
    assert "no output folder" in page.text["analysis-unfinished"]
    assert "incomplete outputs" in page.text["analysis-half_written"]
    assert page.find("section", id="analysis-error_predictability", **{"data-status": "ok"})


def test_missing_database_still_renders(experiment, tmp_path):
    out = tmp_path / "index.html"
    render_report(ExperimentPaths.at(tmp_path / "results" / "nothing"), [], experiment.config, out=out)
    page = Page(out.read_text())
    assert "does not exist yet" in page.text["saes"] and not (tmp_path / "browser.html").exists()
    assert "No analyses are configured" in page.text["summary"]


def test_interrupted_write_leaves_the_old_report(experiment, tmp_path, monkeypatch):
    out = tmp_path / "index.html"
    out.write_text("old")

    def interrupted(*_):
        raise OSError("disk full")

    monkeypatch.setattr("darkmatter.io.os.replace", interrupted)
    with pytest.raises(OSError, match="disk full"):
        render_report(experiment.paths, [], experiment.config, out=out)
    assert out.read_text() == "old" and not (tmp_path / "browser.html").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["index.html"]  # no temporary file left behind


def test_browser_data_respects_limits_and_matches_the_store(experiment, tmp_path):
    limits = BrowserLimits(max_contexts=5, top_k=7, contexts_per_page=2, digits=3)
    out = tmp_path / "index.html"
    render_report(experiment.paths, [], experiment.config, limits, out=out)
    data = embedded_data((tmp_path / "browser.html").read_text())
    assert data["limits"] == {"max_contexts": 5, "top_k": 7, "contexts_per_page": 2, "digits": 3}
    assert [c["id"] for c in data["contexts"]] == [0, 3, 6, 8, 11]  # evenly spaced, first and last kept
    assert [s["sae_id"] for s in data["saes"]] == list(SAE_IDS)  # widths ascending
    assert len(data["vocab"]) == len(set(data["vocab"]))  # each token string stored once
    with connect(experiment.db) as con:
        for ctx in data["contexts"]:
            want = con.execute("SELECT token_text FROM tokens WHERE context = ? ORDER BY position",
                               [ctx["id"]]).fetchall()
            assert [data["vocab"][i] for i in ctx["tokens"]] == [w for (w,) in want]
        for sid in SAE_IDS:
            for kind, arr in data["norms"][sid].items():
                q = np.array([v for per in arr["q"] for v in per], dtype=float)
                rows = con.execute(f"SELECT {kind} FROM token_errors_in_context WHERE sae_id = ? AND "
                                   "list_contains(?, context) ORDER BY context, position",
                                   [sid, [c["id"] for c in data["contexts"]]]).fetchall()
                truth = np.array([v for (v,) in rows])
                assert arr["step"] <= truth.max() / 10 ** (limits.digits - 1)  # 3 significant digits of the max
                np.testing.assert_allclose(q * arr["step"], truth, rtol=0, atol=arr["step"] / 2 + 1e-9)
                worst = data["worst"][sid][kind]
                assert len(worst) == limits.top_k
                values = [v for _, _, v in worst]
                assert values == sorted(values, reverse=True) and values[0] == q.max()
                assert sorted(truth)[-limits.top_k] <= (values[-1] + 0.5) * arr["step"]
    assert "NaN" not in json.dumps(data)


def test_browser_defaults_bound_the_page():
    limits = BrowserLimits()
    assert (limits.max_contexts, limits.top_k) == (20, 50)
    with pytest.raises(ValueError, match="BrowserLimits.top_k must be an integer >= 1, got 0"):
        BrowserLimits(top_k=0)


@pytest.mark.parametrize(("value", "text"), [
    (None, "—"), (float("nan"), "—"), (True, "yes"), (1234567, "1,234,567"), (np.int64(-42), "-42"),
    (0.123456, "0.123"), (np.float32(0.5), "0.5"), (12.345, "12.3"), (12345.6, "12,346"), (0.0, "0"),
    (1.5e-5, "1.50e-5"), (2.5e7, "2.50e7"), (math.inf, "∞"), ("a <b>", "a <b>"), ([1, 2], "[1, 2]"),
])
def test_fmt(value, text):
    assert fmt(value) == text


def test_quantise_and_sample():
    step, q = quantise(np.array([0.0, 1.23456, 98.7654, math.nan]), 3)
    assert step == 0.1 and q == [0, 12, 988, None]
    assert quantise(np.zeros(3), 3) == (1.0, [0, 0, 0])
    assert sample_contexts(list(range(10)), 20) == list(range(10))
    assert sample_contexts(list(range(300)), 4) == [0, 100, 199, 299]


def test_cli_render_report(experiment, tmp_path):
    out = tmp_path / "reports" / "synthetic" / "index.html"
    cli_main(["render-report", "--params", json.dumps(experiment.config), "--db", str(experiment.db),
              "--analyses", *ANALYSES, "--out", str(out), "--max-contexts", "3", "--top-k", "4"])
    assert 'id="analysis-unfinished"' in out.read_text()
    data = embedded_data((out.parent / "browser.html").read_text())
    assert len(data["contexts"]) == 3 and len(data["worst"][SAE_IDS[0]]["error_norm"]) == 4


@pytest.mark.slow
def test_snakemake_rule_and_snakemake_report(tmp_path):
    """The render_report rule runs on an existing store, and `snakemake --report` packs the pages."""
    exp = make_experiment(tmp_path, analyses=False)
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text()) | {"name": "synthetic"}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # Whatever analyses the config lists: an empty folder each (the report shows them as not run).
    for a in load_config(data=cfg).analysis.names:
        (exp.paths.root / "analyses" / a).mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(tmp_path), "--configfile", str(tmp_path / "cfg.yaml"),
            "--allowed-rules", "render_report"]
    target = "reports/synthetic/index.html"
    for extra in ([], ["--report", str(tmp_path / "report.zip")]):
        res = subprocess.run([*base, *extra, "--", target], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "reports" / "synthetic" / "browser.html").is_file()
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(n.endswith("/index.html") for n in names) and any(n.endswith("/browser.html") for n in names)
    assert (exp.paths.root / "logs" / "render_report.log").is_file()


def test_verdicts_carry_the_budget_studys_robustness(experiment, tmp_path):
    """With analysis.budget_study, each verdict whose claim the study tested says whether it held as the SAEs
    trained longer; a named study that has not run leaves the verdicts as they are."""
    study = experiment.paths.root.parent / "budget-of-report" / "analyses" / "training_budget"
    study.mkdir(parents=True)
    (study / "summary.json").write_text(json.dumps({
        "budgets": "500k, 2M, 8M", "robustness_error_predictability": "moves toward the paper",
        "robustness_error_predictability_basis": "R² 0.760 at 2M → 0.850 at 8M"}))
    config = {**experiment.config, "analysis": {"budget_study": "budget-of-report"}}
    out = render_report(experiment.paths, experiment.analyses, config, out=tmp_path / "index.html")
    summary = " ".join(Page(out.read_text()).text["summary"].split())
    assert "(moves toward the paper with budget)" in summary
    assert "training budgets 500k, 2M, 8M: R² 0.760 at 2M → 0.850 at 8M" in summary
    assert summary.count("with budget)") == 1  # only the claim the study tested
    # a study whose own verdict at its reference budget is not this run's cannot tell: undetermined
    (study / "summary.json").write_text(json.dumps({  # (the section's own verdict is not "agrees")
        "budgets": "2M, 8M", "reference_tokens": 2_000_000, "verdict_error_predictability_at_2M": "agrees",
        "robustness_error_predictability": "robust", "robustness_error_predictability_basis": "inside"}))
    out = render_report(experiment.paths, experiment.analyses, config, out=tmp_path / "other.html")
    summary = " ".join(Page(out.read_text()).text["summary"].split())
    assert "(budget study undetermined)" in summary and "verdict at 2M is agrees, not " in summary
    config = {**experiment.config, "analysis": {"budget_study": "never-ran"}}
    out = render_report(experiment.paths, experiment.analyses, config, out=tmp_path / "plain.html")
    assert "with budget" not in out.read_text() and "robust to budget" not in out.read_text()

"""The report in a real browser (headless Chromium over the DevTools protocol, tests/chromium.py).

Both pages must load from file:// with no console error and no network request, show every section and
figure, and the token browser must react to real mouse clicks: switching the error kind re-shades the
tokens, a worst token opens its page, scrolls into view and is highlighted. Screenshots are written to
``reports/<exp>/screenshots/`` in the test's folder and copied to ``tests/artifacts/``, with the measured
sizes and load times in ``tests/artifacts/report_metrics*.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from darkmatter.report.browser import BrowserLimits
from darkmatter.report.render import render_report
from tests.chromium import Chromium
from tests.helpers import REPO
from tests.helpers import REPORT_ANALYSES as ANALYSES
from tests.helpers import REPORT_SAE_IDS as SAE_IDS
from tests.helpers import ReportExperiment as Experiment
from tests.helpers import make_report_experiment as make_experiment

ARTIFACTS = REPO / "tests" / "artifacts"
# Every token span's background, and its text (the planted peaks: numbers for the total, capitals for the
# nonlinear error; see tests/helpers.py).
SPANS_JS = """[...document.querySelectorAll('#contexts span[data-t]')].map(s =>
    [s.textContent, getComputedStyle(s).backgroundColor])"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Experiment:
    exp = make_experiment(tmp_path_factory.mktemp("browser"))
    render_report(exp.paths, exp.analyses, exp.config)
    return exp


@pytest.fixture
def browser(chromium_binary, tmp_path):
    with Chromium(chromium_binary, tmp_path / "profile") as chromium:  # a fresh profile per test
        yield chromium


def save_screenshot(chromium: Chromium, exp: Experiment, name: str, full_page: bool) -> Path:
    path = chromium.screenshot(exp.out.parent / "screenshots" / name, full_page=full_page)
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def save_metrics(name: str, metrics: dict) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_text(json.dumps(metrics, indent=2) + "\n")


def assert_clean(chromium: Chromium) -> None:
    """No console error, warning or uncaught exception, and nothing fetched except the file and data: URIs."""
    problems = [m for m in chromium.console if m["level"] in ("error", "exception", "warning", "assert")]
    assert not problems, problems
    remote = [u for u in chromium.requests if not u.startswith(("file://", "data:"))]
    assert not remote, remote


def darkness(colour: str) -> int:
    """0 for white, up to 765 for black, from a computed 'rgb(r, g, b)' (transparent counts as white)."""
    if not colour.startswith("rgb(") or colour == "rgba(0, 0, 0, 0)":
        return 0
    return 765 - sum(int(c) for c in colour[4:-1].split(","))


def mean_darkness(spans: list[list[str]], which) -> float:
    values = [darkness(bg) for text, bg in spans if which(text.strip())]
    assert values, "no such tokens on the page"
    return sum(values) / len(values)


def is_number(text: str) -> bool:
    return text.isdigit()


def is_capital(text: str) -> bool:
    return text[:1].isupper()


def test_index_page_in_chromium(browser, rendered):
    seconds = browser.open(rendered.out.as_uri())
    timing = browser.js("performance.getEntriesByType('navigation')[0].toJSON()")
    assert browser.js("[...document.querySelectorAll('section')].map(s => s.id)") == [
        "summary", *[f"analysis-{n}" for n in ANALYSES], "saes", "browser"]
    assert browser.js("!!document.getElementById('provenance')")
    images = browser.js("[...document.images].map(i => [i.dataset.figure, i.complete, i.naturalWidth])")
    assert sorted(name for name, _, _ in images) == ["fvu", "r2_norm_sq", "shares"]
    assert all(complete and width > 0 for _, complete, width in images), images
    assert browser.js("document.getElementById('analysis-unfinished').dataset.status") == "not run"
    assert "not run" in browser.js("document.getElementById('analysis-unfinished').innerText")
    browser.click('nav.toc a[href="#saes"]')
    assert browser.js("location.hash") == "#saes"
    assert browser.js("document.querySelector('#browser a.button').getAttribute('href')") == "browser.html"
    assert_clean(browser)
    save_screenshot(browser, rendered, "index.png", full_page=True)
    save_metrics("report_metrics.json", {
        "fixture": "tests/helpers.py: 12 contexts x 60 tokens, 3 SAEs, 3 analyses (1 not run)",
        "index_bytes": rendered.out.stat().st_size,
        "browser_bytes": (rendered.out.parent / "browser.html").stat().st_size,
        "index_load_seconds_wall": round(seconds, 3),
        "index_load_event_ms": round(timing["loadEventEnd"], 1),
    })


def test_browser_page_switches_views_and_reveals_worst_tokens(browser, rendered):
    seconds = browser.open((rendered.out.parent / "browser.html").as_uri())
    render_ms = browser.js("darkmatterBrowser.renderMs")
    per_page = BrowserLimits().contexts_per_page
    assert browser.js("document.querySelectorAll('#contexts .ctx').length") == per_page
    # Text is shown literally: HTML-special characters in tokens are not markup.
    assert "<special>" in browser.js("document.getElementById('contexts').innerText")

    total = browser.js(SPANS_JS)
    assert mean_darkness(total, is_number) > 1.2 * mean_darkness(total, is_capital)
    save_screenshot(browser, rendered, "browser_total.png", full_page=False)

    browser.click('#kind-buttons button[data-kind="nonlinear_error_norm"]')
    nonlinear = browser.js(SPANS_JS)
    assert [t for t, _ in nonlinear] == [t for t, _ in total]
    assert sum(a[1] != b[1] for a, b in zip(total, nonlinear, strict=True)) > len(total) // 2
    assert mean_darkness(nonlinear, is_capital) > 1.2 * mean_darkness(nonlinear, is_number)
    assert browser.js("document.querySelector('#kind-buttons .active').dataset.kind") == "nonlinear_error_norm"
    assert "nonlinear" in browser.js("document.getElementById('worst-note').textContent")
    save_screenshot(browser, rendered, "browser_nonlinear.png", full_page=False)

    # One scale for all kinds: the nonlinear shading is then measured against the (larger) total error.
    browser.click("#shared-scale")
    shared = browser.js(SPANS_JS)
    assert mean_darkness(shared, lambda t: True) < mean_darkness(nonlinear, lambda t: True)
    browser.click("#shared-scale")

    legend = browser.js("document.getElementById('legend-hi').textContent")
    browser.click(f'#sae-buttons button[data-sae="{SAE_IDS[2]}"]')
    assert browser.js("document.querySelector('#sae-buttons .active').dataset.sae") == SAE_IDS[2]
    assert browser.js("document.getElementById('legend-hi').textContent") != legend  # its own colour scale
    assert SAE_IDS[2] in browser.js("document.getElementById('sae-stats').textContent")

    # A worst token on a later page: clicking it turns the page, scrolls to the token and highlights it.
    items = browser.js("[...document.querySelectorAll('#worst-list button')].map(b => [+b.dataset.c, +b.dataset.t,"
                       " b.querySelector('.tok').textContent])")
    rank = next(i for i, (c, _, _) in enumerate(items) if c >= per_page)
    ci, ti, label = items[rank]
    browser.click(f"#worst-list li:nth-child({rank + 1}) button")
    state = browser.js(f"""(() => {{ const el = document.getElementById('t-{ci}-{ti}');
        const r = el.getBoundingClientRect();
        return {{hl: [...document.querySelectorAll('.hl')].map(e => e.id), top: r.top, bottom: r.bottom,
                 height: innerHeight, text: el.textContent, pager: document.getElementById('pager-top').innerText,
                 info: document.getElementById('info').innerText}}; }})()""")
    assert state["hl"] == [f"t-{ci}-{ti}"]
    assert state["top"] >= 0 and state["bottom"] <= state["height"], state
    assert f"page {ci // per_page + 1} of" in state["pager"]
    assert state["text"].strip() == label.replace("·", " ").strip()
    assert label in state["info"]
    save_screenshot(browser, rendered, "browser_worst_token.png", full_page=False)

    browser.press("1")  # keyboard: back to the total error
    assert browser.js("document.querySelector('#kind-buttons .active').dataset.kind") == "error_norm"
    assert_clean(browser)
    save_metrics("report_metrics_browser.json", {"browser_load_seconds_wall": round(seconds, 3),
                                                 "browser_render_ms": round(render_ms, 1)})


def test_browser_page_with_an_empty_store(browser, tmp_path):
    """A store with tokens but no SAE yet: the contexts show unshaded, without a JavaScript error."""
    exp = make_experiment(tmp_path, sae_ids=(), analyses=False)
    render_report(exp.paths, [], exp.config)
    browser.open((exp.out.parent / "browser.html").as_uri())
    assert browser.js("document.querySelectorAll('#contexts span[data-t]').length") == 5 * 60
    assert browser.js("document.getElementById('info').textContent") == "The store has no SAEs yet."
    assert_clean(browser)


@pytest.mark.slow
def test_default_sized_browser_stays_responsive(browser, tmp_path):
    """The default experiment's size (300 contexts x 824 tokens, 11 SAEs) at the default limits."""
    sae_ids = tuple(f"topk-w{64 * 2**i}-k4-s0" for i in range(11))
    exp = make_experiment(tmp_path, n_contexts=300, n_positions=824, name="default-sized", sae_ids=sae_ids,
                          analyses=False)
    render_report(exp.paths, [], exp.config)
    page = exp.out.parent / "browser.html"
    seconds = browser.open(page.as_uri())
    render_ms = browser.js("darkmatterBrowser.renderMs")
    timed = """(sel => { const t = performance.now(); document.querySelector(sel).click();
                        return performance.now() - t; })"""
    switch_ms = browser.js(f"{timed}('#kind-buttons button[data-kind=\"nonlinear_error_norm\"]')")
    sae_ms = browser.js(f"{timed}('#sae-buttons button[data-sae=\"{sae_ids[-1]}\"]')")
    page_ms = browser.js(f"{timed}('#worst-list li:last-child button')")
    assert_clean(browser)
    metrics = {
        "fixture": "300 contexts x 824 tokens (247,200 tokens), 11 SAEs, default BrowserLimits",
        "browser_bytes": page.stat().st_size, "index_bytes": exp.out.stat().st_size,
        "browser_load_seconds_wall": round(seconds, 3), "browser_render_ms": round(render_ms, 1),
        "switch_kind_ms": round(switch_ms, 1), "switch_sae_ms": round(sae_ms, 1),
        "open_worst_token_ms": round(page_ms, 1),
    }
    save_metrics("report_metrics_default_sized.json", metrics)
    assert metrics["browser_bytes"] < 4_000_000, metrics
    # Generous bounds: 2 shared CPU cores; measured ~0.4 s load and 20-170 ms per click on an idle machine.
    assert seconds < 5 and max(switch_ms, sae_ms, page_ms) < 1000, metrics

"""Security checks: no code path that unpickles or evaluates text, a hostile corpus renders inertly in the report,
and the network guard that the smoke workflow runs under (tests/test_workflow.py) really catches a connection.

Loading a pickle (``pickle``, ``torch.load`` without ``weights_only=True``, ``np.load`` without
``allow_pickle=False``, ``yaml.load`` without a safe loader) or ``eval``/``exec`` runs code from a file; the scan
parses every module (Snakemake files through Snakemake's own parser) instead of grepping, so strings and comments
never count and aliases do.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import polars as pl

from darkmatter.analysis import AnalysisContext, run
from darkmatter.report.render import render_report
from tests import helpers
from tests.chromium import Chromium
from tests.helpers import REPO, fake_analysis_module, make_report_experiment

NETGUARD = REPO / "tests" / "netguard"
SCANNED = ("darkmatter", "analyses", "bench", "workflow")

# --------------------------------------------------------------------------------------------- unsafe loading


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for every unsafe import or call in ``source`` (module docstring)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in ("pickle", "dill",
                                                                                              "cloudpickle")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("pickle", "dill",
                                                                                        "cloudpickle"):
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if isinstance(f, ast.Name) and name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            elif owner == "pickle" and name in ("load", "loads"):
                found.append(f"{where}: pickle.{name}()")
            elif owner == "torch" and name == "load" and not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{where}: torch.load() without weights_only=True")
            elif owner in ("np", "numpy") and name == "load" and not _is_const(_keyword(node, "allow_pickle"), False):
                found.append(f"{where}: np.load() without allow_pickle=False")
            elif owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                safe = isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")
                if not safe:
                    found.append(f"{where}: yaml.{name}() without a safe loader")
    return found


def snakemake_python(path: Path) -> str:
    """A Snakefile or .smk file as the Python Snakemake compiles it to (rules become decorated functions)."""
    import snakemake.api  # noqa: F401  (snakemake.workflow must be imported after it)
    from snakemake.parser import parse
    from snakemake.sourcecache import LocalSourceFile

    class Files:  # the one thing of a Workflow that the parser uses
        def open(self, source):
            return open(source.get_path_or_uri(secret_free=True), encoding="utf-8")

    return parse(LocalSourceFile(str(path)), types.SimpleNamespace(sourcecache=Files()), {})[0]


def test_no_unpickling_or_eval_anywhere():
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py"))]
    snakefiles = [REPO / "Snakefile", *sorted((REPO / "workflow").rglob("*.smk"))]
    assert len(files) > 50 and len(snakefiles) > 5  # the scan found the code
    found = [hit for p in files for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    found += [hit for p in snakefiles for hit in unsafe_calls(snakemake_python(p), str(p.relative_to(REPO)))]
    assert not found, found


def test_the_scan_catches_every_unsafe_pattern():
    planted = """
import pickle
from pickle import loads
import numpy as np, torch, yaml
pickle.load(f); pickle.loads(b)
torch.load("m.pt"); torch.load("m.pt", weights_only=False)
np.load("a.npy"); np.load("a.npy", allow_pickle=True)
yaml.load(text); yaml.load(text, Loader=yaml.Loader); yaml.unsafe_load(text)
eval("1 + 1"); exec("x = 1")
"""
    hits = unsafe_calls(planted)
    assert [int(h.split(":")[1]) for h in hits] == [2, 3, 5, 5, 6, 6, 7, 7, 8, 8, 8, 9, 9], hits
    safe = """
import numpy as np, torch, yaml
torch.load("m.pt", weights_only=True); np.load("a.npy", allow_pickle=False, mmap_mode="r")
yaml.safe_load(text); yaml.load(text, Loader=yaml.SafeLoader); model.eval()
s = "eval(x) exec(y) import pickle"  # a string, not code
"""
    assert unsafe_calls(safe) == []
    assert unsafe_calls(snakemake_python(REPO / "Snakefile")) == []
    assert "def __rule_all" in snakemake_python(REPO / "Snakefile")  # rules really were compiled to Python

# --------------------------------------------------------------------------------------------- hostile corpus

HOSTILE = ("</script>", "<img src=x onerror=alert(1)>", "<script>alert(1)</script>", "{{ 7*7 }}")
# alert() sets a canary instead of opening a dialog (a dialog would block the page)
CANARY = "window.__alerted = []; window.alert = (m) => window.__alerted.push(String(m));"


def _hostile_report(root: Path, monkeypatch) -> helpers.ReportExperiment:
    """The synthetic report experiment with every context made of the hostile strings, which also reach index.html
    through an analysis table and summary (as the error-component SAEs' top contexts do) and the corpus sources."""
    text = " . ".join(HOSTILE) + " . "
    monkeypatch.setattr(helpers, "PROSE", text)  # token_frame cuts its contexts from these two texts
    monkeypatch.setattr(helpers, "CODE", text)
    exp = make_report_experiment(root, n_contexts=4, n_positions=24, analyses=False)

    def tokens(ctx: AnalysisContext) -> pl.DataFrame:
        with ctx.connect() as con:
            return con.sql("SELECT context, string_agg(token_text, '' ORDER BY position) AS text FROM tokens "
                           "GROUP BY context ORDER BY context").pl()

    module = fake_analysis_module("hostile_text", "Which texts does the store hold?\n\nRead them back.",
                                  HOSTILE[2], tokens, lambda t: {"first_context": t["text"][0]}, lambda t: {},
                                  headline=("first_context",))
    run(module, AnalysisContext(exp.paths, {"seed": 0}, "hostile_text"), exp.paths.analysis("hostile_text"))
    config = exp.config | {"corpus": exp.config["corpus"] | {"sources": list(HOSTILE)}}
    render_report(exp.paths, ["hostile_text"], config)
    return exp


def test_hostile_corpus_renders_inertly_in_chromium(chromium_binary, tmp_path, monkeypatch):
    exp = _hostile_report(tmp_path, monkeypatch)
    with Chromium(chromium_binary, tmp_path / "profile") as browser:
        browser.call("Page.addScriptToEvaluateOnNewDocument", source=CANARY)
        for page, own_scripts in ((exp.out, 0), (exp.out.parent / "browser.html", 2)):  # browser.html: code, data
            browser.open(page.as_uri())
            assert browser.js("window.__alerted") == [], page.name  # no injected script ran
            assert browser.js("document.querySelectorAll('script').length") == own_scripts, page.name
            assert browser.js("document.querySelectorAll('img[src=\"x\"], img[onerror]').length") == 0
            text = browser.js("document.body.innerText")
            for s in HOSTILE:  # shown literally; "{{ 7*7 }}" was never evaluated into 49
                assert s in text, (page.name, s)
            assert "alert(1)</script> . 49" not in text
        problems = [m for m in browser.console if m["level"] in ("error", "exception")]
        assert not problems, problems
        assert not [u for u in browser.requests if not u.startswith(("file://", "data:")) or u.endswith("/x")]


# --------------------------------------------------------------------------------------------- network guard


def guarded_env(log: Path) -> dict[str, str]:
    """The environment under which every Python subprocess (and theirs) refuses network access, logging to ``log``
    (tests/netguard/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(NETGUARD), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path, "DARKMATTER_NETGUARD_LOG": str(log)}


def test_network_guard_records_and_blocks_every_attempt(tmp_path):
    log = tmp_path / "net.log"
    code = """
import socket, subprocess, sys
for attempt in (lambda: socket.create_connection(("example.com", 80), timeout=1),
                lambda: socket.socket().connect(("127.0.0.1", 9)),
                lambda: socket.socket(socket.AF_INET6).connect_ex(("::1", 9))):
    try:
        attempt()
        print("CONNECTED")
    except OSError as e:
        print("blocked:", e)
# a grandchild inherits the guard
subprocess.run([sys.executable, "-c", "import socket; socket.getaddrinfo('pypi.org', 443)"])
a, b = socket.socketpair()  # local IPC stays allowed
a.sendall(b"ok"); print(b.recv(2).decode())
"""
    res = subprocess.run([sys.executable, "-c", code], env=guarded_env(log), capture_output=True, text=True,
                         timeout=60)
    assert "CONNECTED" not in res.stdout and res.stdout.count("blocked:") == 3, res.stdout + res.stderr
    assert res.stdout.strip().endswith("ok")
    lines = log.read_text().splitlines()
    assert [line.split(": ", 1)[1].split(" ")[0] for line in lines] == [
        "getaddrinfo", "connect", "connect_ex", "getaddrinfo"], lines
    assert "'pypi.org'" in lines[-1]
    # without the log variable the folder on PYTHONPATH changes nothing
    quiet = subprocess.run([sys.executable, "-c", "import socket; print(socket.getaddrinfo.__module__)"],
                           env=guarded_env(log) | {"DARKMATTER_NETGUARD_LOG": ""}, capture_output=True, text=True)
    assert quiet.stdout.strip() == "socket" and json.dumps(len(lines)) == "4"

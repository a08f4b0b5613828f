"""Provenance: the git state recorded beside every artifact says whether the code or config differ from the commit."""

from __future__ import annotations

import subprocess

from darkmatter.provenance import git_state


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def test_rewritten_outputs_do_not_make_the_code_dirty(tmp_path):
    """The default run's outputs are committed (results/, reports/); a run rewrites them as it goes, and the steps
    after the first must still record a clean tree. A changed source file, or a new one, is dirty."""
    _git(tmp_path, "init", "-q")
    for path in ("code.py", "results/default/summary.json", "reports/default/index.html"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    state = git_state(tmp_path)
    assert len(state["git_sha"]) == 40 and state["git_dirty"] is False
    (tmp_path / "results/default/summary.json").write_text("v2\n")
    (tmp_path / "reports/default/index.html").write_text("v2\n")
    (tmp_path / "results/default/new.png").write_text("new\n")
    assert git_state(tmp_path)["git_dirty"] is False
    (tmp_path / "code.py").write_text("v2\n")
    assert git_state(tmp_path)["git_dirty"] is True
    (tmp_path / "code.py").write_text("v1\n")
    (tmp_path / "config.yaml").write_text("new\n")
    assert git_state(tmp_path)["git_dirty"] is True
    assert git_state(tmp_path / "nowhere") == {"git_sha": None, "git_dirty": None}

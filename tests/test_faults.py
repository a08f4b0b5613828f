"""Kill injection (bench/faults.py) on a reduced smoke experiment: a harvest and an SAE training SIGKILLed half-way
resume from their checkpoints, a training killed inside its final write leaves nothing under the final name, and
every rerun ends with the outputs of an uninterrupted run, byte for byte."""

from __future__ import annotations

import pytest

from bench.faults import campaign


@pytest.mark.slow
def test_killed_steps_resume_and_match_an_uninterrupted_run(tmp_path):
    result = campaign(quick=True, steps=None, points=("mid", "final"), root=tmp_path, out=None, log=lambda *_: None)
    cases = {(o["step"].split("[")[0], o["point"]): o for o in result["outcomes"]}
    assert set(cases) == {("harvest", "mid"), ("train_sae", "mid"), ("train_sae", "final")}
    for (rule, point), o in cases.items():
        label = f"{rule} killed at {point}: {o}"
        assert o["landed"], label
        assert o["partial_under_final_name"] == [], label
        assert o["rerun_ok"] and o["rerun_jobs"] == 1, label  # that job alone reran
        assert o["identical"] and o["differing_files"] == [], label
        assert o["left_beside_after_rerun"] == [], label  # checkpoints and temporaries cleaned up
    # half-way kills found a checkpoint and the reruns resumed exactly from it
    for rule in ("harvest", "train_sae"):
        o = cases[(rule, "mid")]
        assert o["checkpoint_at_kill"] and o["resumed_correctly"] is True, o
    # inside the final write, the temporary output was complete but not yet in place
    final = cases[("train_sae", "final")]
    assert final["complete_output_at_kill"] == [] and final["resumed_correctly"] is True, final
    assert result["kills_tried"] == result["kills_survived"] == 3

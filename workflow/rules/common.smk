# Shared names for every rule: the experiment's results folder, the interpreter, config slices as JSON.
import json
import sys

from darkmatter.config import step_params, to_dict

RESULTS = f"results/{EXP.name}"
PY = sys.executable


def params_json(*sections):
    """The named config sections as one JSON mapping (a rule reruns when any value in them changes)."""
    return json.dumps({s: EXP.section(s) for s in sections}, sort_keys=True)

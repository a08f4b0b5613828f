# Shared names for every rule: the experiment's paths (darkmatter.paths, also used by the library), the
# interpreter, the SAEs to train, and wildcard patterns. Each rule passes its step's config slice
# (darkmatter.config.steps) so that it reruns only when a value it reads changes.
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

from darkmatter.config import step_params
from darkmatter.device import ENV_VAR as DEVICE_ENV_VAR
from darkmatter.paths import ExperimentPaths
from darkmatter.sae.families import error_sae_base, expand_families, widest

P = ExperimentPaths.of(EXP.name)
# every step's device (the default of the CLI's --device, darkmatter.device): through the environment, not --params,
# so that moving a run to a GPU (or back) reruns nothing; each job re-reads this file, also on a cluster node
os.environ[DEVICE_ENV_VAR] = EXP.device
# the environment's interpreter by one stable name (`snakemake` runs as python3, `python -m snakemake` as python):
# it is a parameter of every rule, and must not differ between two ways of starting the same workflow
PY = str(Path(sys.prefix) / "bin" / "python3")
try:  # the threads of every heavy rule; commands that run no job (--unlock, --lint, -n without --cores) set none
    CORES = workflow.cores
except WorkflowError:
    CORES = 1
MEMBERS = expand_families(EXP.families, EXP.primary_hook)  # unique SAEs to train, in config order
HOOKS = list(dict.fromkeys(m.hook for m in MEMBERS))  # hooks that have SAEs


def members_of(hook):
    return [m for m in MEMBERS if m.hook == hook]


wildcard_constraints:
    hook=r"blocks\.\d+\.hook_[a-z_]+",
    sae_id=r"[a-z]+-w\d+-k\d+-s\d+",
    split="train|eval",

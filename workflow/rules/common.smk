# Shared names for every rule: the experiment's paths (darkmatter.paths, also used by the library), the
# interpreter, the SAEs to train, and wildcard patterns. Each rule passes its step's config slice
# (darkmatter.config.steps) so that it reruns only when a value it reads changes.
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

from darkmatter.config import previous_residual, step_params
from darkmatter.device import ENV_VAR as DEVICE_ENV_VAR
from darkmatter.resources import model_shape, step_resources
from darkmatter.errors.sources import SOURCE_K
from darkmatter.paths import ExperimentPaths
from darkmatter.sae.families import error_sae_base, expand_families, widest

P = ExperimentPaths.of(EXP.name)
# every step's device (the default of the CLI's --device, darkmatter.device): through the environment, not --params,
# so that moving a run to a GPU (or back) reruns nothing; each job re-reads this file, also on a cluster node
os.environ[DEVICE_ENV_VAR] = EXP.device
CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
if CONDA:  # --sdm conda: the job's environment (workflow/envs/darkmatter.yaml) is activated first on PATH
    PY = "python"
    # That environment holds the dependencies only; the package runs from this checkout. Snakemake clears
    # PYTHONPATH for conda jobs, so the job's shell sets it (after bash's strict mode, which a prefix replaces).
    shell.prefix(f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}; ".replace("{", "{{").replace("}", "}}"))
else:
    # the environment's interpreter by one stable name (`snakemake` runs as python3, `python -m snakemake` as
    # python): it is a parameter of every rule, and must not differ between two ways of starting the same workflow
    PY = str(Path(sys.prefix) / "bin" / "python3")
try:  # the threads of every heavy job (--cores, or the profile's cores); commands that run no job (--unlock,
    CORES = workflow.cores  # --lint, -n without --cores) set none
except WorkflowError:
    CORES = 1
MEMBERS = expand_families(EXP.families, EXP.primary_hook)  # unique SAEs, in config order
# an SAE folder is written by train_sae, or by import_sae for a family's source: each rule matches only its own ids
SOURCE_OF = {(m.hook, m.sae_id): m.source for m in MEMBERS if m.source}


def only(ids):
    """A wildcard pattern matching exactly ``ids`` (nothing when empty)."""
    return "|".join(re.escape(i) for i in sorted(set(ids))) or "(?!)"


SHAPE = model_shape(EXP.model)  # d_model, layers, vocabulary: known offline, sizes every job's resources


SIZED = ("split", "sae_id", "hook")  # the wildcards that change a job's sizes


def resources_of(step):
    """The scheduler resources of a step (darkmatter.resources): mem_mb, runtime (minutes), gpu and, for the
    harvest, disk_mb; each job's wildcards (split, sae_id, hook) pick its sizes."""

    def estimate(key):
        return lambda wildcards: step_resources(EXP, step, SHAPE, **{k: v for k, v in wildcards.items() if k in SIZED})[key]

    keys = ("mem_mb", "runtime", "gpu") + (("disk_mb",) if step == "harvest" else ())
    return {key: estimate(key) for key in keys}


def share_shell(step, source="{input:q}", out="{output:q}"):
    """The command of a data rule that links another experiment's folder (share_data_from) instead of making it."""
    return (f"{{params.py:q}} -m darkmatter.cli share-data --step {step} --params {{params.settings:q}} "
            f"--source {source} --out {out} > {{log:q}} 2>&1")


HOOKS = list(dict.fromkeys(m.hook for m in MEMBERS))  # hooks that have SAEs


def members_of(hook):
    return [m for m in MEMBERS if m.hook == hook]


# the CE splice of the error_sources analysis (measure_sources_ce): the primary hook's widest k = 32 SAE and the
# previous layer's, when the experiment has an SAE there
_PREVIOUS = members_of(previous_residual(EXP.primary_hook))
SOURCES_CE = ((error_sae_base(members_of(EXP.primary_hook), None, SOURCE_K), error_sae_base(_PREVIOUS, None, SOURCE_K))
              if _PREVIOUS else None)


wildcard_constraints:
    hook=r"blocks\.\d+\.hook_[a-z_]+",
    sae_id=r"[a-z]+-w\d+-k\d+-s\d+(-t\d+[kM]?)?",
    split="train|eval",

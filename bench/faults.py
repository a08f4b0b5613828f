"""Kill injection: SIGKILL every step of the workflow at several points and check that a rerun recovers.

Users run the workflow for hours and jobs get pre-empted (SIGKILL, no chance to clean up). For each step (rule)
of the smoke experiment this runs its job in a copy of a finished reference run (``.snakemake/`` metadata and
mtimes included) with that job's outputs deleted, SIGKILLs the whole process tree at a kill point, records what
is left (a file under a final output name? a checkpoint?), and reruns the job as a user would (``snakemake``;
``snakemake --unlock`` when Snakemake asks for it). It then checks that a step with checkpoints resumed from
its last one and that the job's outputs equal the reference run's.

Kill points, each measured from the moment the job's process started:

- ``early``: a quarter of the step's reference duration (on the smoke experiment mostly start-up: imports and
  loading inputs);
- ``mid``: for a step that checkpoints (harvest, train_sae, train_error_saes), the first moment its progress
  record shows at least half the work done; for the others the first moment its temporary output exists (it is
  computing or writing it), or half the step's reference duration, whichever comes first;
- ``final``: inside the final write: the process is paused (bench/faults_hook/sitecustomize.py) just before
  it renames its completed temporary output onto the final name, then killed.

The smoke config runs with ``training.checkpoint_every: 10`` (smoke's 58 training steps would otherwise never
checkpoint; the default run's ~490 steps checkpoint every 100). Outputs are compared byte for byte, except
the wall-clock fields of JSON records (``finished_at``, ``seconds``, ``*_seconds``, throughputs; and the git
state in provenance.json), the report's render time and code version, and the DuckDB store, compared table by
table (its file layout is not a result).

    python -m bench.faults [--quick] [--steps harvest,train_sae] [--points early,mid,final]

writes bench/out/faults.json and prints a table. ``--quick``: a reduced smoke config and three cases (what
tests/test_faults.py runs in CI).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
HOOK_DIR = Path(__file__).resolve().parent / "faults_hook"
POINTS = ("early", "mid", "final")
# the steps that checkpoint, and where their progress record sits relative to the job's (first) output
RESUMABLE = ("harvest", "train_sae", "train_error_saes")
# clocks, timings and throughputs
VOLATILE_JSON = {"finished_at", "seconds", "train_seconds", "eval_seconds", "bf16_speedup", "tokens_per_s"}
VOLATILE_PROVENANCE = {"git_sha", "git_dirty"}  # fixes committed during the campaign change these only
# the report's render time and the code version it was rendered with (its results come from the store)
VOLATILE_HTML = (r"Rendered \d{4}-\d\d-\d\d \d\d:\d\d UTC", r"<dt>code</dt><dd>.*?</dd>")
POLL_S = 0.002


# ---------------------------------------------------------------------------------------------- configuration

def smoke_config(quick: bool = False) -> dict:
    """The smoke experiment with checkpoints every 10 steps; ``quick``: a reduced one (one hook, one SAE, fewer
    tokens) that still checkpoints its harvest and its training several times."""
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    cfg["training"] = dict(cfg.get("training") or {}, checkpoint_every=10)
    if quick:
        cfg["harvest"] = cfg["harvest"] | {"hooks": cfg["harvest"]["hooks"][:1], "train_tokens": 30_000,
                                           "eval_contexts": 16}
        cfg["training"] |= {"tokens": 30_000, "checkpoint_every": 5}
        cfg["families"] = [{"name": "width", "architecture": "topk", "widths": [128], "ks": [8], "seeds": [0]}]
        cfg["pursuit"] = {"contexts": 4}
    return cfg


def snakemake_args(workdir: Path, configfile: Path, targets: list[str] | None = None) -> list[str]:
    """``snakemake [targets] --cores 2 ...`` (targets first: --configfile takes every value after it)."""
    return [sys.executable, "-m", "snakemake", *(targets or []), "--cores", "2", "--snakefile",
            str(REPO / "Snakefile"), "--directory", str(workdir), "--configfile", str(configfile)]


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------- reference run

@dataclass
class Job:
    """One job of the reference run: its rule, outputs (relative to the working directory), log and duration."""

    rule: str
    outputs: list[str]
    log: str | None
    seconds: float
    start: float  # the epoch time it started in the reference run

    @property
    def label(self) -> str:
        wild = re.sub(r"^results/[^/]+/", "", self.outputs[0])
        return f"{self.rule}[{wild}]"


def reference_jobs(workdir: Path) -> list[Job]:
    """The reference run's jobs, from Snakemake's per-output metadata (outputs of one job share its start time)."""
    jobs: dict[tuple[str, float], Job] = {}
    for f in sorted((workdir / ".snakemake" / "metadata").iterdir()):
        meta = json.loads(f.read_text())
        output = base64.b64decode(f.name.replace("@", "/")).decode()
        key = (meta["rule"], meta["starttime"])
        if key in jobs:
            jobs[key].outputs.append(output)
        else:
            logs = meta.get("log") or [None]
            jobs[key] = Job(meta["rule"], [output], logs[0], meta["endtime"] - meta["starttime"], meta["starttime"])
    return sorted(jobs.values(), key=lambda j: j.start)


def pick_cases(jobs: list[Job], steps: list[str] | None) -> list[Job]:
    """One job per rule (its longest, so that its kill points are furthest apart), both harvest splits (the eval
    harvest also records per-token losses)."""
    by_rule: dict[str, list[Job]] = {}
    for job in jobs:
        by_rule.setdefault(job.rule, []).append(job)
    picked = []
    for rule, rjobs in by_rule.items():
        if steps and rule not in steps:
            continue
        picked += rjobs if rule == "harvest" else [max(rjobs, key=lambda j: j.seconds)]
    return sorted(picked, key=lambda j: j.start)  # the workflow's order


# ---------------------------------------------------------------------------------------------- processes

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def job_process(root: int) -> int | None:
    """The step's own process among Snakemake's descendants (``python -m darkmatter.cli`` or ``-m analyses.``)."""
    for pid in descendants(root)[1:]:
        argv = cmdline(pid).split(" ")
        if Path(argv[0]).name.startswith("python") and argv[1:2] == ["-m"] and (
                argv[2:3] == ["darkmatter.cli"] or "".join(argv[2:3]).startswith("analyses.")):
            return pid
    return None


def kill_tree(proc: subprocess.Popen, job_pid: int | None = None) -> None:
    """SIGKILL Snakemake's process group and every descendant (a pre-emption gives nobody time to clean up): the
    group and the step's process at once, then anything that left the group (scanning /proc takes a while)."""
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), lambda: job_pid and os.kill(job_pid, signal.SIGKILL)):
        with contextlib.suppress(ProcessLookupError):
            kill()
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------------------- progress records

def progress(workdir: Path, job: Job) -> dict[str, float]:
    """Fraction done per checkpoint of a resumable job (harvest: contexts; training: steps), {} when none."""
    out = workdir / job.outputs[0]
    fractions: dict[str, float] = {}
    try:
        if job.rule == "harvest":
            state = json.loads((out.with_name(f".{out.name}.progress.json")).read_text())
            fractions["harvest"] = state["done_contexts"] / state["key"]["shape"][0]
        elif job.rule in ("train_sae", "train_error_saes"):
            ckpt = out.with_name(f".{out.name}.ckpt")
            states = [ckpt / "state.json"] if job.rule == "train_sae" else sorted(ckpt.glob("*/state.json"))
            for s in states:
                fractions[s.parent.name] = json.loads(s.read_text())["step"] / n_steps(workdir)
    except (OSError, ValueError, KeyError):  # not there yet, or being replaced right now
        pass
    return fractions


def checkpoint_positions(workdir: Path, job: Job) -> list[int]:
    """The position each checkpoint of ``job`` holds (contexts harvested / steps trained), sorted."""
    out = workdir / job.outputs[0]
    if job.rule == "harvest":
        p = out.with_name(f".{out.name}.progress.json")
        return [json.loads(p.read_text())["done_contexts"]] if p.is_file() else []
    if job.rule in ("train_sae", "train_error_saes"):
        ckpt = out.with_name(f".{out.name}.ckpt")
        states = [ckpt / "state.json"] if job.rule == "train_sae" else sorted(ckpt.glob("*/state.json"))
        return sorted(json.loads(s.read_text())["step"] for s in states if s.is_file())
    return []


def n_steps(workdir: Path) -> int:
    cfg = yaml.safe_load((workdir / "config.yaml").read_text())["training"]
    return cfg["tokens"] // cfg["batch_size"]


def resumed_positions(log_text: str, rule: str) -> list[int]:
    """Where the rerun's log says it resumed (darkmatter.data.harvest and darkmatter.sae.train log it), sorted."""
    pattern = r"resuming the harvest of \S+ at context (\d+)/" if rule == "harvest" else r"resumed \S+ at step (\d+)/"
    return sorted(int(m.group(1)) for m in re.finditer(pattern, log_text))


# ---------------------------------------------------------------------------------------------- comparison

def _mask(obj, volatile: set[str]):
    if isinstance(obj, dict):
        return {k: _mask(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [_mask(v, volatile) for v in obj]
    return obj


def same_file(a: Path, b: Path) -> bool:
    if a.read_bytes() == b.read_bytes():
        return True
    if a.suffix == ".json":
        volatile = VOLATILE_JSON | (VOLATILE_PROVENANCE if a.name == "provenance.json" else set())
        try:
            return _mask(json.loads(a.read_text()), volatile) == _mask(json.loads(b.read_text()), volatile)
        except ValueError:
            return False
    if a.suffix == ".duckdb":
        return duckdb_tables(a) == duckdb_tables(b)
    if a.suffix == ".html":
        return _mask_html(a.read_text()) == _mask_html(b.read_text())
    return False


def _mask_html(text: str) -> str:
    for pattern in VOLATILE_HTML:
        text = re.sub(pattern, "", text, flags=re.S)
    return text


def duckdb_tables(path: Path) -> dict[str, list]:
    """Every table's rows (NaN as a string, so that equal tables compare equal), in stored order."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        return {n: [tuple("nan" if isinstance(v, float) and v != v else v for v in row)
                    for row in con.execute(f'SELECT * FROM "{n}"').fetchall()] for n in names}
    finally:
        con.close()


def differing(ref: Path, got: Path) -> list[str]:
    """Files of output ``ref`` (a file or folder) missing from, extra in, or different in ``got``."""
    if not got.exists():
        return [f"{got.name} (missing)"]
    if ref.is_file():
        return [] if got.is_file() and same_file(ref, got) else [got.name]
    # .snakemake_timestamp: Snakemake's mark of a finished directory output, not part of the step's output
    files = {p.relative_to(ref) for p in ref.rglob("*") if p.is_file() and p.name != ".snakemake_timestamp"}
    other = {p.relative_to(got) for p in got.rglob("*") if p.is_file() and p.name != ".snakemake_timestamp"}
    diffs = [f"{p} (missing)" for p in sorted(files - other)] + [f"{p} (extra)" for p in sorted(other - files)]
    return diffs + [str(p) for p in sorted(files & other) if not same_file(ref / p, got / p)]


def writing(workdir: Path, job: Job) -> bool:
    """Whether a temporary output of ``job`` (darkmatter.io's ``.<name>.tmp-<pid>``) exists."""
    return any(any((workdir / rel).parent.glob(f".{(workdir / rel).name}.tmp-*")) for rel in job.outputs)


def hidden_siblings(workdir: Path, job: Job) -> list[str]:
    """Temporary, partial and checkpoint siblings (``.<name>.*``) of the job's outputs."""
    found = []
    for rel in job.outputs:
        out = workdir / rel
        if out.parent.is_dir():
            found += sorted(str(p.relative_to(workdir)) for p in out.parent.glob(f".{out.name}.*"))
    return found


# ---------------------------------------------------------------------------------------------- one case

@dataclass
class Outcome:
    step: str
    point: str
    landed: bool = False  # the kill hit the step's process while it was running
    killed_at_s: float | None = None  # since the step's process started
    checkpoint_at_kill: list[int] = field(default_factory=list)  # contexts harvested / steps trained
    partial_under_final_name: list[str] = field(default_factory=list)
    complete_output_at_kill: list[str] = field(default_factory=list)
    left_beside_after_kill: list[str] = field(default_factory=list)
    user_sees: str = ""  # the first error line of a plain rerun right after the kill
    rerun_ok: bool = False
    rerun_jobs: int = 0
    resumed_from: list[int] = field(default_factory=list)
    resumed_correctly: bool | None = None  # None: nothing to resume from
    identical: bool = False
    differing_files: list[str] = field(default_factory=list)
    left_beside_after_rerun: list[str] = field(default_factory=list)
    rerun_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def survived(self) -> bool:
        return (self.landed and self.rerun_ok and self.identical and not self.partial_under_final_name
                and self.resumed_correctly is not False and not self.left_beside_after_rerun)


def run_case(ref: Path, config: Path, job: Job, point: str, root: Path, fraction: float | None = None,
             as_typed: bool = True) -> Outcome:
    """Copy the reference run, delete ``job``'s outputs, run it, SIGKILL it at ``point``, rerun and compare.

    ``as_typed``: rerun as a user would (plain ``snakemake``, then ``snakemake --unlock`` when it asks for it and
    ``snakemake`` again); else remove Snakemake's stale lock files directly (what ``--unlock`` does) and rerun
    once, saving two Snakemake start-ups per case on a busy machine.
    """
    res = Outcome(job.label, point)
    work = root / f"{job.label}-{point}".replace("/", "_")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ref, work, symlinks=True)  # copy2 keeps every mtime, so nothing else looks outdated
    for rel in job.outputs:
        target = work / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    marker = work / ".faults-paused"
    final = work / job.outputs[0]
    if job.rule == "render_report":  # index.html is written last
        final = work / next(o for o in job.outputs if o.endswith("index.html"))
    env = environment(PYTHONPATH=os.pathsep.join((str(HOOK_DIR), str(REPO), os.environ.get("PYTHONPATH", ""))))
    if point == "final":
        env |= {"DARKMATTER_FAULTS_RENAME_TO": str(final.resolve()), "DARKMATTER_FAULTS_MARKER": str(marker)}
    if fraction is None:
        fraction = {"early": 0.25, "mid": 0.5}.get(point, 0.0)
    args = snakemake_args(work, config, job.outputs)
    with open(work / ".faults-kill-run.log", "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    started = None
    pid = None
    deadline = time.monotonic() + 10 * job.seconds + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if pid is None:
            pid = job_process(proc.pid)
            if pid is not None:
                started = time.monotonic()
        if pid is not None:
            elapsed = time.monotonic() - started
            if point == "final":
                fire = marker.exists()
            elif point == "mid" and job.rule in RESUMABLE:
                done = progress(work, job)
                fire = bool(done) and min(done.values()) >= 0.5 if job.rule != "train_error_saes" else (
                    len(done) == 3 and min(done.values()) >= 0.5)
            else:
                fire = elapsed >= fraction * job.seconds or (point == "mid" and writing(work, job))
            if fire:
                res.landed = alive(pid)
                res.killed_at_s = round(elapsed, 3)
                kill_tree(proc, pid)
                break
        time.sleep(POLL_S)
    if proc.poll() is None:  # never reached its kill point
        kill_tree(proc)
        res.notes.append("timed out before the kill point")
    if not res.landed:
        res.notes.append("the kill did not land inside the step (it had finished or not started)")
        return res

    # what the kill left
    res.checkpoint_at_kill = checkpoint_positions(work, job)
    for rel in job.outputs:
        if (work / rel).exists():
            diff = differing(ref / rel, work / rel)
            (res.partial_under_final_name if diff else res.complete_output_at_kill).append(rel)
    res.left_beside_after_kill = hidden_siblings(work, job)

    # the user reruns
    if not as_typed:
        for lock in (work / ".snakemake" / "locks").glob("*"):
            lock.unlink()
    t0 = time.monotonic()
    rerun = subprocess.run(args, capture_output=True, text=True, env=environment())
    res.rerun_seconds = round(time.monotonic() - t0, 1)
    text = rerun.stdout + rerun.stderr
    if rerun.returncode != 0:
        res.user_sees = next((line.strip() for line in text.splitlines() if "Error" in line or "error" in line),
                             text.strip().splitlines()[-1] if text.strip() else "")
        if "unlock" in text:
            subprocess.run([*snakemake_args(work, config), "--unlock"], capture_output=True, text=True,
                           env=environment(), check=True)
            t0 = time.monotonic()
            rerun = subprocess.run(args, capture_output=True, text=True, env=environment())
            res.rerun_seconds = round(time.monotonic() - t0, 1)
            text = rerun.stdout + rerun.stderr
    res.rerun_ok = rerun.returncode == 0
    res.rerun_jobs = len(re.findall(r"^Finished jobid", text, flags=re.M))
    if not res.rerun_ok:
        res.notes.append("rerun failed: " + " | ".join(text.strip().splitlines()[-5:]))
        (work / ".faults-rerun.log").write_text(text)
        return res
    if "incomplete" in text.lower():
        res.notes.append("Snakemake reported the killed job's output as incomplete and reran it")
    if job.log and (work / job.log).is_file():
        res.resumed_from = resumed_positions((work / job.log).read_text(errors="replace"), job.rule)
    if job.rule in RESUMABLE and any(res.checkpoint_at_kill):
        expect = [v for v in res.checkpoint_at_kill if v]
        res.resumed_correctly = res.resumed_from == expect
        if not res.resumed_correctly:
            res.notes.append(f"checkpoint at kill {expect}, rerun resumed from {res.resumed_from or 'nothing'}")
    elif res.resumed_from:
        res.notes.append(f"resumed from {res.resumed_from} without a checkpoint seen at the kill")
    for rel in job.outputs:
        res.differing_files += [f"{rel}: {d}" for d in differing(ref / rel, work / rel)]
    res.identical = not res.differing_files
    res.left_beside_after_rerun = hidden_siblings(work, job)
    if res.left_beside_after_rerun:
        res.notes.append("left beside the output after the rerun: " + ", ".join(res.left_beside_after_rerun))
    return res


# ---------------------------------------------------------------------------------------------- campaign

def make_reference(root: Path, cfg: dict, targets: list[str] | None = None) -> tuple[Path, Path, float]:
    """Run the experiment (or ``targets``) once uninterrupted in ``root/reference``."""
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ref = root / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    shutil.copy(config, ref / "config.yaml")  # n_steps reads it from every copy
    t0 = time.monotonic()
    res = subprocess.run(snakemake_args(ref, config, targets), capture_output=True, text=True,
                         env=environment())
    if res.returncode != 0:
        raise SystemExit("error: the reference run failed:\n" + (res.stdout + res.stderr)[-3000:])
    return ref, config, time.monotonic() - t0


def table(outcomes: list[Outcome]) -> str:
    rows = ["| step | kill point | killed at (s) | resumed correctly | outputs identical | notes |",
            "|---|---|---|---|---|---|"]
    for o in outcomes:
        resumed = {True: "yes", False: "**no**", None: "n/a"}[o.resumed_correctly]
        if o.resumed_correctly and o.resumed_from:
            resumed += " (from " + ", ".join(map(str, o.resumed_from)) + ")"
        notes = list(o.notes)
        if o.partial_under_final_name:
            notes.insert(0, "PARTIAL under final name: " + ", ".join(o.partial_under_final_name))
        if o.complete_output_at_kill:
            notes.insert(0, "complete output in place at the kill")
        rows.append(f"| {o.step} | {o.point} | {o.killed_at_s if o.landed else '-'} | {resumed} | "
                    f"{'yes' if o.identical else '**no**' if o.landed else '-'} | {'; '.join(notes)} |")
    tried = sum(o.landed for o in outcomes)
    rows.append(f"\nkills tried (landed inside the step): {tried}; survived: {sum(o.survived for o in outcomes)}")
    return "\n".join(rows)


QUICK_CASES = (("harvest", "mid"), ("train_sae", "mid"), ("train_sae", "final"))


def campaign(quick: bool, steps: list[str] | None, points: tuple[str, ...], root: Path, out: Path | None,
             log=print, reference: Path | None = None) -> dict:
    cfg = smoke_config(quick)
    targets = None
    if quick:  # only what the quick cases need: the train harvest and one SAE
        targets = ["results/smoke/activations/train", "results/smoke/saes/blocks.1.hook_resid_post/topk-w128-k8-s0"]
    if reference is None:
        ref, config, ref_seconds = make_reference(root, cfg, targets)
        log(f"reference run: {ref_seconds:.0f} s")
    else:  # a finished reference run of this same config (make_reference's folder), reused
        ref, config, ref_seconds = reference, reference / "config.yaml", None
        if yaml.safe_load(config.read_text()) != cfg:
            sys.exit(f"error: {config} is not the config this campaign runs (bench.faults.smoke_config).")
    jobs = pick_cases(reference_jobs(ref), steps)
    cases = [(j, p) for p in points for j in jobs]  # each point over every step first: a cut-short run still covers all
    if quick:
        cases = [(j, p) for j, p in cases if (j.rule, p) in QUICK_CASES and j.label != "harvest[activations/eval]"]
    outcomes: list[Outcome] = []

    def record() -> dict:
        result = {
            "config": cfg, "reference_seconds": None if ref_seconds is None else round(ref_seconds, 1),
            "reference_jobs": [asdict(j) for j in reference_jobs(ref)],
            "points": list(points),
            "comparison": {"bitwise": "every file byte for byte, except:",
                           "json_ignored_keys": sorted(VOLATILE_JSON),
                           "provenance_ignored_keys": sorted(VOLATILE_PROVENANCE),
                           "html_ignored": list(VOLATILE_HTML),
                           "duckdb": "compared table by table, row by row"},
            "outcomes": [asdict(o) | {"survived": o.survived} for o in outcomes],
            "cases_planned": len(cases),
            "kills_tried": sum(o.landed for o in outcomes),
            "kills_survived": sum(o.survived for o in outcomes),
            "machine": "AVX2, 2 cores, shared with other agents",
        }
        if out is not None:  # after every case: a campaign cut short keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
        return result

    for job, point in cases:
        t0 = time.monotonic()
        typed = not outcomes and not quick  # the first case reruns as a user would; the rest skip --unlock
        o = run_case(ref, config, job, point, root, as_typed=typed)
        if not o.landed and point in ("early", "mid") and job.rule not in RESUMABLE:  # too late: once earlier
            o = run_case(ref, config, job, point, root, fraction={"early": 0.1, "mid": 0.3}[point], as_typed=typed)
            o.notes.append("kill point moved earlier after a first try finished before it")
        outcomes.append(o)
        log(f"{o.step:55s} {point:6s} killed at {o.killed_at_s}s landed={o.landed} resumed={o.resumed_correctly} "
            f"identical={o.identical} ({time.monotonic() - t0:.0f} s) {'; '.join(o.notes)}")
        if o.landed and o.survived:  # keep a failed case's folder to look into
            shutil.rmtree(root / f"{job.label}-{point}".replace("/", "_"), ignore_errors=True)
        record()
    log(table(outcomes))
    return record()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced smoke config, three cases (CI)")
    ap.add_argument("--steps", help="comma-separated rule names (default: every rule)")
    ap.add_argument("--points", default=",".join(POINTS), help="comma-separated kill points")
    ap.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--out", default="bench/out/faults.json")
    ap.add_argument("--reference", help="reuse this finished reference run (the 'reference' folder of a --work)")
    args = ap.parse_args()
    points = tuple(args.points.split(","))
    if bad := [p for p in points if p not in POINTS]:
        sys.exit(f"error: --points: unknown kill point {bad[0]!r}; expected some of {', '.join(POINTS)}.")
    steps = args.steps.split(",") if args.steps else None
    reference = Path(args.reference).resolve() if args.reference else None
    if args.work:
        campaign(args.quick, steps, points, Path(args.work).resolve(), Path(args.out), reference=reference)
    else:
        with tempfile.TemporaryDirectory(prefix="darkmatter-faults-") as tmp:
            campaign(args.quick, steps, points, Path(tmp), Path(args.out), reference=reference)


if __name__ == "__main__":
    main()

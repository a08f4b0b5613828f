# Per-SAE error measurement (x_hat, b*, per-token errors), CE with the error parts spliced in, and the store.
import os

from darkmatter.families import expand_families

MEMBERS = expand_families(EXP)
HOOK_RE = r"blocks\.\d+\.hook_[a-z_]+"


rule measure_errors:
    input:
        sae=f"{RESULTS}/saes/{{hook}}/{{sae_id}}",
        activations=f"{RESULTS}/activations/eval",
    output:
        directory(f"{RESULTS}/errors/{{hook}}/{{sae_id}}"),
    wildcard_constraints:
        hook=HOOK_RE,
        sae_id=r"[^/]+",
    params:
        py=PY,
        decomposition=params_json("decomposition"),
    threads: workflow.cores
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/measure_errors/{{hook}}/{{sae_id}}.log",
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} measure-errors --params {params.decomposition:q} "
        "--sae {input.sae:q} --activations {input.activations:q} --hook {wildcards.hook:q} --out {output:q} "
        "> {log:q} 2>&1"


rule measure_ce:
    input:
        model=rules.prepare_model.output[0],
        corpus=rules.prepare_corpus.output[0],
        activations=f"{RESULTS}/activations/eval",
        saes=[f"{RESULTS}/saes/{m.path}" for m in MEMBERS],
        errors=[f"{RESULTS}/errors/{m.path}" for m in MEMBERS],
    output:
        directory(f"{RESULTS}/ce"),
    params:
        py=PY,
        hook=EXP.harvest.hooks[0],
        ce=params_json("harvest", "analysis"),
    threads: workflow.cores
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/measure_ce.log",
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} measure-ce --params {params.ce:q} "
        "--model {input.model:q} --corpus {input.corpus:q} --activations {input.activations:q} "
        "--hook {params.hook:q} --saes {input.saes:q} --errors {input.errors:q} --out {output:q} > {log:q} 2>&1"


rule build_database:
    input:
        model=rules.prepare_model.output[0],
        corpus=rules.prepare_corpus.output[0],
        activations=f"{RESULTS}/activations/eval",
        metrics=[f"{RESULTS}/metrics/{m.path}.json" for m in MEMBERS],
        errors=[f"{RESULTS}/errors/{m.path}" for m in MEMBERS],
        ce=rules.measure_ce.output[0],
    output:
        f"{RESULTS}/darkmatter.duckdb",
    params:
        py=PY,
        config=json.dumps(to_dict(EXP), sort_keys=True),
        # results/<exp>, derived from an input path (results/<exp>/model/model.json)
        results=lambda wildcards, input: os.path.dirname(os.path.dirname(input.model)),
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/build_database.log",
    shell:
        "{params.py:q} -m darkmatter.cli build-database --params {params.config:q} --results {params.results:q} "
        "--out {output:q} > {log:q} 2>&1"

# Reconstruction and sparsity metrics of every SAE on the evaluation split (darkmatter.evaluate).
# The metrics live beside, not inside, the SAE folder: that folder is another rule's directory output.
from darkmatter.families import expand_families

# One metrics file per SAE trained by this experiment (every family member, darkmatter.families).
METRICS = [f"{RESULTS}/metrics/{m.path}.json" for m in expand_families(EXP)]


rule evaluate_sae:
    input:
        sae=f"{RESULTS}/saes/{{hook}}/{{sae_id}}",
        activations=f"{RESULTS}/activations/eval",
    output:
        f"{RESULTS}/metrics/{{hook}}/{{sae_id}}.json",
    wildcard_constraints:
        hook=r"blocks\.\d+\.hook_[a-z_]+",
        sae_id=r"[^/]+",
    params:
        py=PY,
        evaluate=params_json("harvest"),
    threads: workflow.cores
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/evaluate_sae/{{hook}}/{{sae_id}}.log",
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} evaluate-sae --params {params.evaluate:q} "
        "--sae {input.sae:q} --activations {input.activations:q} --hook {wildcards.hook:q} --out {output:q} "
        "> {log:q} 2>&1"


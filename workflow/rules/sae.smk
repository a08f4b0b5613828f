# SAE training: one job per unique family member (darkmatter.families builds and parses the sae_id).
# Output folder (SAELens layout): cfg.json, sae_weights.safetensors, train_log.parquet, provenance.json.
# An interrupted job resumes from its checkpoint in the hidden sibling folder .<sae_id>.ckpt.
from darkmatter.families import expand_families

SAES = [f"{RESULTS}/saes/{m.path}" for m in expand_families(EXP)]


rule train_sae:
    input:
        activations=f"{RESULTS}/activations/train",
        model=rules.prepare_model.output[0],
    output:
        directory(f"{RESULTS}/saes/{{hook}}/{{sae_id}}"),
    wildcard_constraints:
        hook=r"blocks\.\d+\.hook_[a-z_]+",
        sae_id=r"[a-z]+-w\d+-k\d+-s\d+",
    params:
        py=PY,
        training=step_params(EXP, "train-sae"),
    threads: workflow.cores
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/train_sae/{{hook}}/{{sae_id}}.log",
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} train-sae --params {params.training:q} "
        "--activations {input.activations:q} --model {input.model:q} --hook {wildcards.hook:q} "
        "--sae-id {wildcards.sae_id:q} --out {output:q} > {log:q} 2>&1"

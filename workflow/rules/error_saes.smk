# SAEs trained on the linear and nonlinear error (and the whole error) of the primary hook's base SAE
# (darkmatter.errors.error_saes): trained jointly on one stream of the train pool, evaluated on the eval split.
# An interrupted run resumes from the per-component checkpoints in the hidden sibling .<hook>.ckpt.

ERROR_SAE_BASE = error_sae_base(members_of(EXP.primary_hook), EXP.error_saes.base, EXP.error_saes.k)


rule train_error_saes:
    input:
        train=str(P.activations("train")),
        eval=str(P.activations("eval")),
        sae=str(P.sae("{hook}", ERROR_SAE_BASE.sae_id)),
        errors=str(P.errors("{hook}")),
    output:
        directory(str(P.error_saes("{hook}"))),
    params:
        py=PY,
        training=step_params(EXP, "train-error-saes"),
    threads: CORES
    resources:
        **resources_of("train-error-saes"),
    benchmark:
        str(P.benchmark("train_error_saes", "{hook}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("train_error_saes", "{hook}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} train-error-saes --params {params.training:q} "
        "--train-activations {input.train:q} --eval-activations {input.eval:q} --sae {input.sae:q} "
        "--errors {input.errors:q} --hook {wildcards.hook:q} --out {output:q} > {log:q} 2>&1"

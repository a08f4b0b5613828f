# SAE training, one job per unique family member (darkmatter.sae.families builds and parses the sae_id), and each
# SAE's codes of the eval tokens (darkmatter.sae.codes: the one pass of its encoder over the eval split).
# An interrupted training resumes from its checkpoint in the hidden sibling folder .<sae_id>.ckpt.


rule train_sae:
    input:
        activations=str(P.activations("train")),
        model=rules.prepare_model.output[0],
    output:
        directory(str(P.sae("{hook}", "{sae_id}"))),
    params:
        py=PY,
        training=step_params(EXP, "train-sae"),
    threads: CORES
    resources:
        **resources_of("train-sae"),
    benchmark:
        str(P.benchmark("train_sae", "{hook}", "{sae_id}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("train_sae", "{hook}", "{sae_id}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} train-sae --params {params.training:q} "
        "--activations {input.activations:q} --model {input.model:q} --hook {wildcards.hook:q} "
        "--sae-id {wildcards.sae_id:q} --out {output:q} > {log:q} 2>&1"


rule encode_sae:
    input:
        sae=str(P.sae("{hook}", "{sae_id}")),
        activations=str(P.activations("eval")),
    output:
        directory(str(P.codes("{hook}", "{sae_id}"))),
    params:
        py=PY,
        encode=step_params(EXP, "encode-sae"),
    threads: CORES
    resources:
        **resources_of("encode-sae"),
    benchmark:
        str(P.benchmark("encode_sae", "{hook}", "{sae_id}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("encode_sae", "{hook}", "{sae_id}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} encode-sae --params {params.encode:q} "
        "--sae {input.sae:q} --activations {input.activations:q} --hook {wildcards.hook:q} --out {output:q} "
        "> {log:q} 2>&1"

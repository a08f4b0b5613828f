# SAE training, one job per unique family member (darkmatter.sae.families builds and parses the sae_id), or its
# import when the family names SAEs trained elsewhere (darkmatter.sae.sources); and each SAE's codes of the eval
# tokens (darkmatter.sae.codes: the one pass of its encoder over the eval split).
# An interrupted training resumes from its checkpoint in the hidden sibling folder .<sae_id>.ckpt.


rule train_sae:
    input:
        activations=str(P.activations("train")),
        model=rules.prepare_model.output[0],
    output:
        directory(str(P.sae("{hook}", "{sae_id}"))),
    wildcard_constraints:
        sae_id=only(m.sae_id for m in MEMBERS if not m.source),
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


rule import_sae:
    input:
        activations=str(P.activations("eval")),
        # a local source is an input, so replacing its files reimports it (a sae_lens id is only a parameter)
        source=lambda w: [] if SOURCE_OF[(w.hook, w.sae_id)].startswith("sae_lens:") else [SOURCE_OF[(w.hook, w.sae_id)]],
    output:
        directory(str(P.sae("{hook}", "{sae_id}"))),
    wildcard_constraints:
        sae_id=only(m.sae_id for m in MEMBERS if m.source),
    params:
        py=PY,
        source=lambda w: SOURCE_OF[(w.hook, w.sae_id)],
    resources:
        **resources_of("import-sae"),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("import_sae", "{hook}", "{sae_id}")),
    shell:
        "{params.py:q} -m darkmatter.cli import-sae --source {params.source:q} --activations {input.activations:q} "
        "--hook {wildcards.hook:q} --sae-id {wildcards.sae_id:q} --out {output:q} > {log:q} 2>&1"


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

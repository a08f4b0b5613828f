# Model, corpus and activation harvesting (darkmatter.data).


rule prepare_model:
    output:
        str(P.model_json),
    params:
        py=PY,
        model=step_params(EXP, "prepare-model"),
    threads: 1
    resources:
        **resources_of("prepare-model"),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("prepare_model")),
    shell:
        "{params.py:q} -m darkmatter.cli prepare-model --params {params.model:q} --out {output:q} > {log:q} 2>&1"


rule prepare_corpus:
    input:
        model=rules.prepare_model.output[0],
    output:
        directory(str(P.corpus)),
    params:
        py=PY,
        corpus=step_params(EXP, "prepare-corpus"),
    threads: 1
    resources:
        **resources_of("prepare-corpus"),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("prepare_corpus")),
    shell:
        "{params.py:q} -m darkmatter.cli prepare-corpus --params {params.corpus:q} --model {input.model:q} "
        "--out {output:q} > {log:q} 2>&1"


rule harvest:
    input:
        model=rules.prepare_model.output[0],
        corpus=rules.prepare_corpus.output[0],
    output:
        directory(str(P.activations("{split}"))),
    params:
        py=PY,
        harvest=lambda wildcards: step_params(EXP, f"harvest-{wildcards.split}"),
    threads: CORES
    resources:
        **resources_of("harvest"),
    benchmark:
        str(P.benchmark("harvest", "{split}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("harvest_{split}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} harvest --params {params.harvest:q} --model {input.model:q} "
        "--corpus {input.corpus:q} --split {wildcards.split} --out {output:q} > {log:q} 2>&1"

# Gradient pursuit with every SAE's decoder on a subset of eval tokens (darkmatter.errors.pursuit): the pursuit
# codes per SAE, the encoder's and the pursuit's errors side by side per hook, and the widest SAE's pursuit CE.


rule pursue:
    input:
        sae=str(P.sae("{hook}", "{sae_id}")),
        codes=str(P.codes("{hook}", "{sae_id}")),
        activations=str(P.activations("eval")),
    output:
        directory(str(P.pursuit_codes("{hook}", "{sae_id}"))),
    params:
        py=PY,
        pursuit=step_params(EXP, "pursue"),
    threads: CORES
    resources:
        **resources_of("pursue"),
    benchmark:
        str(P.benchmark("pursue", "{hook}", "{sae_id}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("pursue", "{hook}", "{sae_id}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} pursue --params {params.pursuit:q} --sae {input.sae:q} "
        "--codes {input.codes:q} --activations {input.activations:q} --hook {wildcards.hook:q} --out {output:q} "
        "> {log:q} 2>&1"


rule measure_pursuit:
    input:
        saes=lambda wildcards: [str(P.sae(m.hook, m.sae_id)) for m in members_of(wildcards.hook)],
        codes=lambda wildcards: [str(P.codes(m.hook, m.sae_id)) for m in members_of(wildcards.hook)],
        pursuits=lambda wildcards: [str(P.pursuit_codes(m.hook, m.sae_id)) for m in members_of(wildcards.hook)],
        activations=str(P.activations("eval")),
    output:
        directory(str(P.pursuit_errors("{hook}"))),
    params:
        py=PY,
        decomposition=step_params(EXP, "measure-pursuit"),
    threads: CORES
    resources:
        **resources_of("measure-pursuit"),
    benchmark:
        str(P.benchmark("measure_pursuit", "{hook}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("measure_pursuit", "{hook}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} measure-pursuit --params {params.decomposition:q} "
        "--activations {input.activations:q} --hook {wildcards.hook:q} --saes {input.saes:q} "
        "--codes {input.codes:q} --pursuits {input.pursuits:q} --out {output:q} > {log:q} 2>&1"


rule measure_pursuit_ce:
    input:
        model=rules.prepare_model.output[0],
        corpus=rules.prepare_corpus.output[0],
        activations=str(P.activations("eval")),
        sae=str(P.sae(EXP.primary_hook, widest(members_of(EXP.primary_hook)).sae_id)),
    output:
        directory(str(P.pursuit_ce)),
    params:
        py=PY,
        ce=step_params(EXP, "measure-pursuit-ce"),
        hook=EXP.primary_hook,
        tokens=str(P.tokens("eval")),
    threads: CORES
    resources:
        **resources_of("measure-pursuit-ce"),
    benchmark:
        str(P.benchmark("measure_pursuit_ce")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("measure_pursuit_ce")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} measure-pursuit-ce --params {params.ce:q} "
        "--model {input.model:q} --tokens {params.tokens:q} --sae {input.sae:q} --hook {params.hook:q} --activations {input.activations:q} "
        "--out {output:q} > {log:q} 2>&1"

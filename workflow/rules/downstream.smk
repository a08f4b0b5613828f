# CE and KL with every SAE's reconstruction and error parts spliced in at the primary hook (darkmatter.downstream).


rule measure_ce:
    input:
        model=rules.prepare_model.output[0],
        corpus=rules.prepare_corpus.output[0],
        activations=str(P.activations("eval")),
        errors=str(P.errors(EXP.primary_hook)),
        saes=[str(P.sae(m.hook, m.sae_id)) for m in members_of(EXP.primary_hook)],
    output:
        directory(str(P.ce)),
    params:
        py=PY,
        ce=step_params(EXP, "measure-ce"),
        hook=EXP.primary_hook,
        tokens=str(P.tokens("eval")),
        cache=str(P.ce_cache),
    threads: CORES
    resources:
        **resources_of("measure-ce"),
    benchmark:
        str(P.benchmark("measure_ce")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("measure_ce")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} measure-ce --params {params.ce:q} "
        "--model {input.model:q} --tokens {params.tokens:q} --errors {input.errors:q} --hook {params.hook:q} --activations {input.activations:q} "
        "--saes {input.saes:q} --cache {params.cache:q} --out {output:q} > {log:q} 2>&1"


if SOURCES_CE is not None:

    rule measure_sources_ce:
        input:
            model=rules.prepare_model.output[0],
            corpus=rules.prepare_corpus.output[0],
            activations=str(P.activations("eval")),
            errors=str(P.errors(EXP.primary_hook)),
            sae=str(P.sae(EXP.primary_hook, SOURCES_CE[0].sae_id)),
            codes=str(P.codes(EXP.primary_hook, SOURCES_CE[0].sae_id)),
            source_sae=str(P.sae(SOURCES_CE[1].hook, SOURCES_CE[1].sae_id)),
            source_codes=str(P.codes(SOURCES_CE[1].hook, SOURCES_CE[1].sae_id)),
        output:
            directory(str(P.sources_ce)),
        params:
            py=PY,
            ce=step_params(EXP, "measure-sources-ce"),
            hook=EXP.primary_hook,
            source_hook=SOURCES_CE[1].hook,
            tokens=str(P.tokens("eval")),
        threads: CORES
        resources:
            **resources_of("measure-sources-ce"),
        benchmark:
            str(P.benchmark("measure_sources_ce")),
        conda:
            "../envs/darkmatter.yaml"
        log:
            str(P.log("measure_sources_ce")),
        shell:
            "{params.py:q} -m darkmatter.cli --threads {threads} measure-sources-ce --params {params.ce:q} "
            "--model {input.model:q} --tokens {params.tokens:q} --errors {input.errors:q} "
            "--activations {input.activations:q} --hook {params.hook:q} --sae {input.sae:q} --codes {input.codes:q} "
            "--source-hook {params.source_hook:q} --source-sae {input.source_sae:q} "
            "--source-codes {input.source_codes:q} --out {output:q} > {log:q} 2>&1"

# The experiment's DuckDB store (darkmatter.store; its only writer).


rule build_database:
    input:
        model=rules.prepare_model.output[0],
        corpus=rules.prepare_corpus.output[0],
        activations=str(P.activations("eval")),
        errors=[str(P.errors(hook)) for hook in HOOKS],
        ce=rules.measure_ce.output[0],
        pursuit=[str(P.pursuit_errors(hook)) for hook in HOOKS],
        pursuit_ce=rules.measure_pursuit_ce.output[0],
        sources_ce=[str(P.sources_ce)] if SOURCES_CE is not None else [],
        error_saes=[str(P.error_saes(EXP.primary_hook))] if EXP.error_saes.enabled else [],
    output:
        str(P.database),
    params:
        py=PY,
        store=step_params(EXP, "build-database"),
    threads: 1
    resources:
        **resources_of("build-database"),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("build_database")),
    shell:
        "{params.py:q} -m darkmatter.cli build-database --params {params.store:q} --out {output:q} > {log:q} 2>&1"

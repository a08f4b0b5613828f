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
        "--saes {input.saes:q} --out {output:q} > {log:q} 2>&1"

# Every SAE of a hook measured from its codes on the eval split (darkmatter.errors.measure): metrics, the linear
# error map b*, per-token errors and per-context test sums, with the x statistics shared by the hook's SAEs.


rule measure_errors:
    input:
        saes=lambda wildcards: [str(P.sae(m.hook, m.sae_id)) for m in members_of(wildcards.hook)],
        codes=lambda wildcards: [str(P.codes(m.hook, m.sae_id)) for m in members_of(wildcards.hook)],
        activations=str(P.activations("eval")),
    output:
        directory(str(P.errors("{hook}"))),
    params:
        py=PY,
        decomposition=step_params(EXP, "measure-errors"),
    threads: CORES
    resources:
        **resources_of("measure-errors"),
    benchmark:
        str(P.benchmark("measure_errors", "{hook}")),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("measure_errors", "{hook}")),
    shell:
        "{params.py:q} -m darkmatter.cli --threads {threads} measure-errors --params {params.decomposition:q} "
        "--activations {input.activations:q} --hook {wildcards.hook:q} --saes {input.saes:q} "
        "--codes {input.codes:q} --out {output:q} > {log:q} 2>&1"

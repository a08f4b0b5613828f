# One generic rule runs every analysis module (analyses/<name>.py) against the experiment's results.


rule run_analysis:
    input:
        db=rules.build_database.output[0],
    output:
        report(
            directory(str(P.analysis("{name}"))),
            patterns=["{figure}.png"],
            caption="../report/analysis.rst",
            category="Analyses",
            subcategory="{name}",
            labels={"analysis": "{name}", "figure": "{figure}"},
        ),
    wildcard_constraints:
        name="|".join(EXP.analysis.names),
    params:
        py=PY,
        analysis=lambda wildcards: step_params(EXP, "run-analysis", wildcards.name),
    threads: 1
    resources:
        **resources_of("run-analysis"),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("analyses", "{name}")),
    shell:
        "{params.py:q} -m analyses.{wildcards.name} --threads {threads} --db {input.db:q} --params {params.analysis:q} "
        "--out {output:q} > {log:q} 2>&1"

# One generic rule runs every analysis module (analyses/<name>.py) against the store (opened read-only).


rule run_analysis:
    input:
        db=rules.build_database.output[0],
    output:
        report(
            directory(f"{RESULTS}/analyses/{{name}}"),
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
        analysis=lambda wildcards: json.dumps(
            {
                **EXP.section("analysis"),
                "name": wildcards.name,
                "results": RESULTS,
                "seed": EXP.seed,
                "decomposition": EXP.section("decomposition"),
                "families": EXP.section("families"),
                "hook": EXP.harvest.hooks[0],
                "min_pos": EXP.harvest.min_pos,
            },
            sort_keys=True,
        ),
    threads: 1
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/analyses/{{name}}.log",
    shell:
        "{params.py:q} -m analyses.{wildcards.name} --threads {threads} --db {input.db:q} "
        "--params {params.analysis:q} --out {output:q} > {log:q} 2>&1"

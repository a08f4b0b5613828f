# The report: reports/<exp>/index.html (and browser.html beside it), assembled by darkmatter.report from the
# DuckDB store and the analysis folders. `snakemake --report` includes it as a secondary artifact.


# The analyses in the order the report shows them, and the config sections it prints (a change re-renders it).
REPORT_ANALYSES = list(EXP.analysis.names)
REPORT_SECTIONS = ("name", "seed", "model", "corpus", "harvest", "training", "families", "decomposition", "analysis")


rule render_report:
    input:
        db=f"{RESULTS}/darkmatter.duckdb",
        analyses=[f"{RESULTS}/analyses/{name}" for name in REPORT_ANALYSES],
    output:
        index=report(
            f"reports/{EXP.name}/index.html",
            caption="../report/index.rst",
            category="Report",
        ),
        browser=report(
            f"reports/{EXP.name}/browser.html",
            caption="../report/index.rst",
            category="Report",
        ),
    params:
        py=PY,
        config=params_json(*REPORT_SECTIONS),
        analyses=REPORT_ANALYSES,
    conda:
        "../envs/darkmatter.yaml"
    log:
        f"{RESULTS}/logs/render_report.log",
    shell:
        "{params.py:q} -m darkmatter.cli render-report --params {params.config:q} "
        "--db {input.db:q} --analyses {params.analyses:q} --out {output.index:q} > {log:q} 2>&1"

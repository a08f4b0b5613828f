# The report: reports/<exp>/index.html and browser.html beside it (darkmatter.report), assembled from the store
# and the analysis folders. `snakemake --report` includes it as a secondary artifact.

from darkmatter.report.render import budget_study_summary

REPORT_ANALYSES = list(EXP.analysis.names)  # in the order the report shows them


rule render_report:
    input:
        db=rules.build_database.output[0],
        analyses=[str(P.analysis(name)) for name in REPORT_ANALYSES],
        # the budget study's verdicts, once that experiment has run (it shares this one's data, so it runs after)
        budget=[str(s) for s in [budget_study_summary(P, EXP.analysis.budget_study)] if s.is_file()]
        if EXP.analysis.budget_study else [],
    output:
        index=report(str(P.report_index), caption="../report/index.rst", category="Report"),
        browser=report(str(P.report_browser), caption="../report/index.rst", category="Report"),
    params:
        py=PY,
        config=step_params(EXP, "render-report"),
        analyses=REPORT_ANALYSES,
    threads: 1
    resources:
        **resources_of("render-report"),
    conda:
        "../envs/darkmatter.yaml"
    log:
        str(P.log("render_report")),
    shell:
        "{params.py:q} -m darkmatter.cli render-report --params {params.config:q} --db {input.db:q} "
        "--analyses {params.analyses:q} --out {output.index:q} > {log:q} 2>&1"

# darkmatter workflow: `snakemake --cores all` runs the default experiment (config/config.yaml);
# `snakemake --cores all --configfile config/<exp>.yaml` runs another one. All logic lives in the package.

from darkmatter.config import load_config


if not config:  # no --configfile given: the default experiment (never merged into another one)

    configfile: "config/config.yaml"


EXP = load_config(data=config)  # a typo or an impossible value fails here, in a second


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/errors.smk"
include: "workflow/rules/downstream.smk"
include: "workflow/rules/pursuit.smk"
include: "workflow/rules/error_saes.smk"
include: "workflow/rules/store.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.render_report.output,

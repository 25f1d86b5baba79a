"""Scaling-law laboratory: tokenize -> train -> evaluate -> aggregate -> fit and extrapolate.

Wiring only: the config, its validation, the rule files and the final targets. The config
file given with --configfile replaces config.yaml (a preset is complete on its own) rather
than being merged into it.
"""

from snakemake.utils import min_version

min_version("9.0")


report: "report/workflow.rst"


if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"


rule all:
    input:
        final_targets(),
    default_target: True


if config["released_dir"]:

    include: "rules/released.smk"

elif config["results_table"]:

    include: "rules/ingest.smk"

else:

    include: "rules/prepare.smk"
    include: "rules/tokenize.smk"
    include: "rules/train.smk"
    include: "rules/evaluate.smk"
    include: "rules/downstream.smk"
    include: "rules/aggregate.smk"


include: "rules/fit.smk"
include: "rules/report.smk"

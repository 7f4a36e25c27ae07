# leukflow: blood-smear fields -> white-cell ROIs -> CNN embeddings -> fold-wise
# classifiers and metrics. This file is the table of contents; each stage lives
# in workflow/rules/<stage>.smk and calls the library in src/leukflow.

from snakemake.utils import min_version

from leukflow.core.config import validate_config

min_version("9.0")


# A user's --configfile replaces the demo config as a whole (no merging of
# dataset lists); the schema's defaults fill in every key it leaves out.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# Unknown keys, wrong types and missing dataset folders stop the run here,
# before any job starts; every key left out gets its documented default.
# The schema ships with the library: src/leukflow/core/config.schema.yaml.
validate_config(config, sources=workflow.overwrite_configfiles or workflow.configfiles)


# `snakemake --report report.html`: the outputs marked report() in the rules,
# by stage, with the captions in workflow/report/.
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/segment.smk"
include: "workflow/rules/folds.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/cross.smk"
include: "workflow/rules/provenance.smk"


rule all:
    default_target: True
    input:
        PLAN.final_outputs(),

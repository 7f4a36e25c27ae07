"""Rules gather_rois and summarise_metrics: concatenate per-dataset tables."""

import pandas as pd

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table

log = start_log(snakemake.rule, snakemake.log[0])
table = pd.concat([read_table(path) for path in snakemake.input], ignore_index=True)
write_table(table, snakemake.output[0])
log.info("%d rows from %d tables -> %s", len(table), len(snakemake.input), snakemake.output[0])

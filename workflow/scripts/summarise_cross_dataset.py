"""Rule summarise_cross_dataset: every pair's pooled metrics -> cross_dataset.csv and heatmap."""

import pandas as pd

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table
from leukflow.evaluate.cross import plot_cross_matrix, summarise_cross

log = start_log("summarise_cross_dataset", snakemake.log[0], {})
metrics = pd.concat([read_table(path) for path in snakemake.input.metrics], ignore_index=True)
table = summarise_cross(metrics)
write_table(table, snakemake.output.table)
plot_cross_matrix(table, snakemake.output.plot, within=read_table(snakemake.input.within))
log.info("cross-dataset figures:\n%s", table.to_string())

"""Rule summarise_metrics: every dataset's and encoder's metric tables in one of each."""

import pandas as pd

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table

log = start_log(snakemake.rule, snakemake.log[0])
for name in ("metrics", "metrics_per_class"):
    paths = snakemake.input[name]
    table = pd.concat([read_table(path) for path in paths], ignore_index=True)
    # which shortcut control a row is (none: the dataset's own crops)
    control = {name: kind for name, (_, kind) in snakemake.params.controls.items()}
    table.insert(1, "control", table["dataset"].map(control).fillna("none"))
    if name == "metrics" and snakemake.input.reliance:
        # the reliance test's rows: the dataset's own models on altered test crops
        reliance = pd.concat([read_table(path) for path in snakemake.input.reliance])
        reliance.insert(1, "control", "reliance_" + reliance.pop("reliance"))
        table = pd.concat([table, reliance[table.columns]], ignore_index=True)
    write_table(table, snakemake.output[name])
    log.info("%d rows from %d tables -> %s", len(table), len(paths), snakemake.output[name])

"""Rule assign_folds: manifest -> folds.csv, grouped by patient (or random, leaky)."""

import pandas as pd

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table
from leukflow.evaluate.folds import assign_folds, compare_labelled_sets

log = start_log("assign_folds", snakemake.log[0], dict(snakemake.params))
manifest = read_table(snakemake.input.manifest)
change = compare_labelled_sets(manifest, snakemake.params.state)
if change:
    log.warning("%s: folds and every per-fold encoder are recomputed", change)
folds = assign_folds(
    manifest,
    k=snakemake.params.k,
    seed=snakemake.params.seed,
    duplicates=read_table(snakemake.input.duplicates),
    protocol=snakemake.params.protocol,
    holdout_fraction=snakemake.params.holdout_fraction,
)
# shortcut controls (<name>_cell_only, ...) test the same images in the same folds
copies = []
for control, (base, _kind) in snakemake.params.controls.items():
    rows = folds[folds["dataset"] == base]
    copies.append(rows.assign(
        dataset=control,
        image_id=control + rows["image_id"].str.removeprefix(base),
        group=control + rows["group"].str.removeprefix(base),
    ))  # fmt: skip
folds = pd.concat([folds, *copies], ignore_index=True)
write_table(folds, snakemake.output.folds)
log.info(
    "%d images in %d test folds; protocol per dataset %s; leaky datasets: %s",
    len(folds),
    folds.loc[folds["fold"] >= 0, "fold"].nunique(),
    dict(snakemake.params.protocol),
    sorted(folds.loc[folds["leaky"], "dataset"].unique()),
)

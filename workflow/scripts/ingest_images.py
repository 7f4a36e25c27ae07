"""Rule ingest_images: dataset folders -> manifest.parquet, rejects.csv, duplicates.csv."""

from leukflow.core.runlog import start_log
from leukflow.data.duplicates import find_duplicates, plot_duplicates
from leukflow.data.ingest import ingest_datasets
from leukflow.data.io import write_table
from leukflow.segment.ledger import write_ledgers

log = start_log(
    "ingest_images", snakemake.log[0], {**snakemake.params, "threads": snakemake.threads}
)
# ingest_datasets logs "kept N, rejected M by reason (...)" at the end
manifest, rejects = ingest_datasets(
    snakemake.params.datasets,
    min_size_px=snakemake.params.min_size_px,
    n_workers=snakemake.threads,
    cache_dir=snakemake.params.cache_dir,
)
# folds.twin datasets repeat their dataset's files: each gets its dataset's pairs.
# The search index lives in the cache: a re-run searches only new images.
duplicates = find_duplicates(
    manifest,
    max_distance=snakemake.params.duplicate_max_distance,
    twins=snakemake.params.twins,
    cache_dir=snakemake.params.cache_dir,
    n_workers=snakemake.threads,
)
write_table(manifest, snakemake.output.manifest)
write_table(rejects, snakemake.output.rejects)
write_table(duplicates, snakemake.output.duplicates)
plot_duplicates(manifest, duplicates, snakemake.output.qa)
# the batch ledgers, as the run plan worked them out (a demo dataset's: its sorted ids)
write_ledgers(
    snakemake.params.datasets, manifest, snakemake.params.ledgers, snakemake.params.batch_size
)

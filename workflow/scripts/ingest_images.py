"""Rule ingest_images: dataset folders -> manifest.parquet and rejects.csv."""

from leukflow.ingest import find_duplicates, ingest_datasets
from leukflow.io import write_table
from leukflow.runlog import start_log

log = start_log("ingest_images", snakemake.log[0], dict(snakemake.params))
manifest, rejects = ingest_datasets(
    snakemake.params.datasets, min_size_px=snakemake.params.min_size_px
)
write_table(manifest, snakemake.output.manifest)
write_table(rejects, snakemake.output.rejects)
duplicates = find_duplicates(manifest, max_distance=snakemake.params.duplicate_max_distance)
write_table(duplicates, snakemake.output.duplicates)
log.info("%d images in the manifest, %d rejected", len(manifest), len(rejects))
if len(rejects):
    log.warning("rejects by reason:\n%s", rejects["reason"].value_counts().to_string())

"""Rule draw_demo_data: draw the built-in synthetic smear dataset."""

from leukflow.core.runlog import start_log
from leukflow.data.demo import draw_demo_dataset

log = start_log("draw_demo_data", snakemake.log[0], dict(snakemake.params))
labels = draw_demo_dataset(
    snakemake.output[0],
    n_fields=snakemake.params.n_fields,
    seed=snakemake.params.seed,
    fields_per_patient=snakemake.params.fields_per_patient,
)
log.info("drew %d fields of %d patients", len(labels), labels["patient"].nunique())

"""Rule write_provenance: what produced this result folder -> provenance.json."""

from leukflow.core.provenance import build_provenance, write_provenance
from leukflow.core.runlog import start_log
from leukflow.data.io import read_table

log = start_log("write_provenance", snakemake.log[0])
provenance = build_provenance(
    snakemake.params.config, read_table(snakemake.input.manifest), snakemake.params.source_dir
)
write_provenance(provenance, snakemake.output[0])
log.info(
    "git commit %s, manifest %s, images %s",
    provenance["git_commit"],
    provenance["manifest_sha256"][:12],
    provenance["images_per_dataset"],
)

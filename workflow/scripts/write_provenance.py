"""Rule write_provenance: what produced this result folder -> provenance.json."""

from leukflow.io import read_table
from leukflow.provenance import build_provenance, write_provenance
from leukflow.runlog import start_log

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

"""Rule score_segmentation: one dataset's segmentation against its masks and annotations."""

from dataclasses import replace

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table
from leukflow.segment import SegmentParams
from leukflow.segment.qa import plot_overlays, score_segmentation, summarise_qa

cfg, methods = snakemake.params.segmentation, snakemake.params.methods
dataset = snakemake.wildcards.dataset
log = start_log("score_segmentation", snakemake.log[0], {**cfg, "qa_methods": methods})
manifest = read_table(snakemake.input.manifest)
images = manifest[manifest["dataset"] == dataset]
params = SegmentParams.from_mapping(cfg)
per_image = score_segmentation(images, params, methods=methods, n_workers=snakemake.threads)
summary = summarise_qa(per_image, methods)
write_table(per_image, snakemake.output.per_image)
write_table(summary, snakemake.output.summary)
for method, png in zip(methods, snakemake.output.overlays, strict=True):
    plot_overlays(
        images, per_image, replace(params, method=method), png, title=f"{dataset} / {method}"
    )
log.info("QA summary:\n%s", summary.to_string())

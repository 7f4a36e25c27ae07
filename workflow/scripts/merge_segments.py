"""Rule merge_segments: a dataset's segmentation batches -> one ROI table and crop store."""

import pandas as pd

from leukflow.core.runlog import start_log
from leukflow.data.grow import files_digest, grow_crops, mirror_dir
from leukflow.data.io import read_table, write_table
from leukflow.evaluate.plots import plot_k_scores
from leukflow.segment import summarise_k_scores

log = start_log("merge_segments", snakemake.log[0])
cfg, out = snakemake.params.segmentation, snakemake.output


def concat(paths):
    """Concatenate the tables at ``paths``."""
    return pd.concat([read_table(p) for p in paths], ignore_index=True)


rois = concat(snakemake.input.rois)
# crops follow the ROI rows, batch after batch; batches that did not run again
# since the last merge are hard-linked from its store (leukflow.data.grow)
parts = [
    (files_digest([r, c]), c)
    for r, c in zip(snakemake.input.rois, snakemake.input.crops, strict=True)
]
stats = grow_crops(
    out.crops, parts, roi_size_px=cfg["roi_size_px"], attrs={"method": cfg["method"], **cfg},
    mirror=mirror_dir(snakemake.params.cache_dir, f"segment/{snakemake.wildcards.dataset}/crops"),
)  # fmt: skip
n_crops = stats["rows_kept"] + stats["rows_written"]
if n_crops != len(rois):
    raise RuntimeError(f"{out.crops}: {n_crops} crops for {len(rois)} ROIs")
write_table(rois, out.rois)
write_table(concat(snakemake.input.images), out.images)
manifest = read_table(snakemake.input.manifest)
labels = manifest.set_index("image_id")["label"]
k_table = summarise_k_scores(concat(snakemake.input.k_scores), labels)
write_table(k_table, out.kmeans_scores)
plot_k_scores(k_table, title=f"{snakemake.wildcards.dataset}: kmeans k selection",
              path=out.kmeans_curves)  # fmt: skip
log.info("%d ROIs from %d images in %d batches; crops of %d batches linked, %d new",
         len(rois), len(labels), len(parts), stats["parts_kept"],
         stats["rows_written"])  # fmt: skip

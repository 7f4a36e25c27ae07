"""Rule merge_segments: a dataset's segmentation batches -> one ROI table and crop store."""

import pandas as pd
import zarr

from leukflow.core.runlog import start_log
from leukflow.data.io import CropStoreWriter, read_table, write_table
from leukflow.evaluate.plots import plot_k_scores
from leukflow.segment import summarise_k_scores

log = start_log("merge_segments", snakemake.log[0])
cfg, out = snakemake.params.segmentation, snakemake.output


def concat(paths):
    """Concatenate the tables at ``paths``."""
    return pd.concat([read_table(p) for p in paths], ignore_index=True)


rois = concat(snakemake.input.rois)
# crops follow the ROI rows: batch after batch, streamed block by block
with CropStoreWriter(out.crops, cfg["roi_size_px"], {"method": cfg["method"], **cfg}) as store:
    for path in snakemake.input.crops:
        part = zarr.open_array(str(path), mode="r")
        for start in range(0, part.shape[0], 4096):
            store.append(part[start : start + 4096])
if store.n_rows != len(rois):
    raise RuntimeError(f"{out.crops}: {store.n_rows} crops for {len(rois)} ROIs")
write_table(rois, out.rois)
write_table(concat(snakemake.input.images), out.images)
manifest = read_table(snakemake.input.manifest)
labels = manifest.set_index("image_id")["label"]
k_table = summarise_k_scores(concat(snakemake.input.k_scores), labels)
write_table(k_table, out.kmeans_scores)
plot_k_scores(k_table, title=f"{snakemake.wildcards.dataset}: kmeans k selection",
              path=out.kmeans_curves)  # fmt: skip
log.info("%d ROIs from %d images in %d batches", len(rois), len(labels), len(snakemake.input.rois))

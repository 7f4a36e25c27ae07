"""Rule control_crops: a dataset's ROI crops with the background or the cell painted black."""

import zarr

from leukflow.core.runlog import start_log
from leukflow.data.io import CropStoreWriter, read_table, write_table
from leukflow.evaluate.controls import iter_control_crops

p, out = snakemake.params, snakemake.output
log = start_log("control_crops", snakemake.log[0], dict(p))
rois = read_table(snakemake.input.rois)
# the control is a dataset of its own: its ids carry its name, so that folds and
# predictions never mix it with the dataset it copies
prefix = snakemake.wildcards.dataset
rois = rois.assign(
    roi_id=prefix + rois["roi_id"].str.removeprefix(p.base),
    image_id=prefix + rois["image_id"].str.removeprefix(p.base),
)
source = zarr.open_array(str(snakemake.input.crops), mode="r")
black = []
with CropStoreWriter(out.crops, source.shape[1], {**source.attrs, "control": p.control}) as store:
    for block, share in iter_control_crops(source, p.control):
        store.append(block)
        black.append(share * len(block))
write_table(rois, out.rois)
log.info("%s: %d crops, %.0f%% of their pixels black on average", p.control, len(rois),
         100 * sum(black) / max(1, len(rois)))  # fmt: skip

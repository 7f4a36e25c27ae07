"""Rule segment_cells: one dataset's fields -> ROI table and ROI crops."""

from pathlib import Path

from leukflow.io import read_table, write_crops, write_table
from leukflow.runlog import start_log
from leukflow.segment import SegmentParams, segment_images

cfg = snakemake.params.segmentation
log = start_log("segment_cells", snakemake.log[0], {**cfg, "threads": snakemake.threads})
manifest = read_table(snakemake.input.manifest)
images = manifest[manifest["dataset"] == snakemake.wildcards.dataset]
params = SegmentParams(
    channel=cfg["channel"],
    classes=cfg["classes"],
    min_area_px=cfg["min_area_px"],
    closing_radius_px=cfg["closing_radius_px"],
    roi_margin=cfg["roi_margin"],
    roi_size_px=cfg["roi_size_px"],
)
rois, crops = segment_images(
    [Path(root) / path for root, path in zip(images["root"], images["path"], strict=True)],
    images["image_id"].tolist(),
    params=params,
    n_workers=snakemake.threads,
    chunk_size=cfg["chunk_size"],
)
write_crops(crops, snakemake.output.crops, attrs={"method": cfg["method"], **cfg})
write_table(rois, snakemake.output.rois)
log.info("%d ROIs from %d images", len(rois), len(images))

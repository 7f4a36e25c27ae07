"""Rule segment_cells: one dataset's fields -> ROI table, ROI crops, per-image table."""

from pathlib import Path

from leukflow.io import read_table, write_table
from leukflow.runlog import start_log
from leukflow.segment import SegmentParams, segment_to_store, summarise_k_scores

cfg = snakemake.params.segmentation
log = start_log("segment_cells", snakemake.log[0], {**cfg, "threads": snakemake.threads})
manifest = read_table(snakemake.input.manifest)
images = manifest[manifest["dataset"] == snakemake.wildcards.dataset]
params = SegmentParams.from_mapping(cfg)
roots = [Path(root) for root in images["root"]]
result = segment_to_store(
    [root / path for root, path in zip(roots, images["path"], strict=True)],
    images["image_id"].tolist(),
    params=params,
    crops_path=snakemake.output.crops,
    attrs={"method": cfg["method"], **cfg},
    mask_paths=[root / m if m else "" for root, m in zip(roots, images["mask_path"], strict=True)],
    n_workers=snakemake.threads,
    chunk_size=cfg["chunk_size"],
)
write_table(result.rois, snakemake.output.rois)
write_table(result.images, snakemake.output.images)
labels = images.set_index("image_id")["label"]
write_table(summarise_k_scores(result.k_scores, labels), snakemake.output.kmeans_scores)
log.info("%d ROIs from %d images", len(result.rois), len(images))

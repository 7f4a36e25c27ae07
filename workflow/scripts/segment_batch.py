"""Rule segment_batch: one batch of a dataset's fields -> ROI table, crops, image table.

Fields segmented before with the same parameters and code come from the
per-image cache (results_dir/cache/segment), so a re-run after new images
arrive segments only those.
"""

from pathlib import Path

from leukflow.core.runlog import start_log
from leukflow.data.io import read_table, write_table
from leukflow.segment import SegmentParams, batch_images, segment_to_store, workers_for_memory

cfg, p, wc = snakemake.params.segmentation, snakemake.params, snakemake.wildcards
log = start_log(
    "segment_batch",
    snakemake.log[0],
    {**cfg, "batch": wc.batch, "threads": snakemake.threads, "mem_mb": snakemake.resources.mem_mb},
)  # fmt: skip
# the batch's members: its input files (from the batch ledger), or for a demo
# dataset the batch_size-th slice of its sorted ids
members = snakemake.input.get("members")
images = batch_images(
    read_table(snakemake.input.manifest), wc.dataset, int(wc.batch), p.batch_size,
    files=None if members is None else Path(members).read_text().splitlines(),
)  # fmt: skip
params = SegmentParams.from_mapping(cfg)
largest = int((images["width"] * images["height"]).max()) if len(images) else 0
n_workers = workers_for_memory(
    snakemake.threads, snakemake.resources.mem_mb, min(largest, params.max_image_px)
)
if n_workers < snakemake.threads:
    log.info("%d workers, not %d: %d MB for fields of up to %d pixels",
             n_workers, snakemake.threads, snakemake.resources.mem_mb, largest)  # fmt: skip
roots = [Path(root) for root in images["root"]]
result = segment_to_store(
    [root / path for root, path in zip(roots, images["path"], strict=True)],
    images["image_id"].tolist(),
    params=params,
    crops_path=snakemake.output.crops,
    attrs={"method": cfg["method"], **cfg},
    mask_paths=[root / m if m else "" for root, m in zip(roots, images["mask_path"], strict=True)],
    n_workers=n_workers,
    chunk_size=cfg["chunk_size"],
    image_sha256=images["sha256"].tolist(),
    cache_dir=p.cache_dir,
)
write_table(result.rois, snakemake.output.rois)
write_table(result.images, snakemake.output.images)
write_table(result.k_scores, snakemake.output.k_scores)
log.info("%d ROIs from %d images", len(result.rois), len(images))

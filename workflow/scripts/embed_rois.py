"""Rule embed_rois: every ROI through each fold's encoder -> one zarr store."""

import torch

import leukflow
from leukflow.core.runlog import start_log
from leukflow.data.grow import mirror_dir
from leukflow.data.io import read_table, write_table
from leukflow.learn.embed import embed_rois
from leukflow.learn.models import pick_device
from leukflow.segment import SegmentParams, cache_space

wc = snakemake.wildcards
device = pick_device()
# CPU: the forward pass needs every thread and decoding small crops is cheap, so no
# loader workers (one cost a 2-thread job half its speed); CUDA: every other thread decodes.
workers = snakemake.threads - 1 if device.type == "cuda" else 0
torch.set_num_threads(max(1, snakemake.threads - workers))
log = start_log("embed_rois", snakemake.log[0], {"device": device, "workers": workers})
rois = read_table(snakemake.input.rois)
# a frozen encoder's embeddings are cached per source image: its content hash and
# the segmentation that cut its ROIs
sha = read_table(snakemake.input.manifest).set_index("image_id")["sha256"]
space = cache_space(SegmentParams.from_mapping(snakemake.params.segmentation))
shas = rois["image_id"].map(sha)
# a shortcut control's crops are not its images' (no manifest rows): not cached
roi_keys = None if shas.isna().any() else (shas + "_" + space.replace("/", "-")).tolist()
attrs = embed_rois(
    snakemake.input.checkpoints,
    snakemake.input.crops,
    snakemake.output.store,
    leukflow_version=leukflow.__version__,
    batch_size=snakemake.params.batch_size,
    num_workers=workers,
    device=device,
    roi_keys=roi_keys,
    cache_dir=snakemake.params.cache_dir,
    # a frozen encoder's store grows: ROIs it held are linked, new ones embedded
    roi_ids=rois["roi_id"].tolist(),
    mirror=mirror_dir(snakemake.params.cache_dir, f"embeddings/{wc.dataset}/{wc.encoder}"),
)
write_table(rois[["roi_id", "image_id"]], snakemake.output.ids)
log.info("embedded %d ROIs with %d encoders: %s", len(rois), len(snakemake.input.checkpoints),
         attrs)  # fmt: skip

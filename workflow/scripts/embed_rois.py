"""Rule embed_rois: every ROI through each fold's encoder -> one zarr store."""

import torch

import leukflow
from leukflow.embed import embed_crops
from leukflow.io import read_crops, read_table, sha256_file, write_embeddings, write_table
from leukflow.models import load_encoder, pick_device
from leukflow.runlog import start_log

torch.set_num_threads(snakemake.threads)
log = start_log("embed_rois", snakemake.log[0], {"device": pick_device()})
rois = read_table(snakemake.input.rois)
crops = read_crops(snakemake.input.crops)
arrays, array_attrs = {}, {}
for fold, path in enumerate(snakemake.input.checkpoints):
    model, ckpt = load_encoder(path)
    name = f"fold_{fold}"
    arrays[name] = embed_crops(model, crops, mean=ckpt["mean"], std=ckpt["std"])
    array_attrs[name] = {
        "weights_sha256": sha256_file(path),
        "normalisation": {"mean": ckpt["mean"], "std": ckpt["std"]},
        "classes": ckpt["classes"],
    }
attrs = {
    "architecture": ckpt["arch"],
    "input_size_px": ckpt["input_size_px"],
    "training": "per_fold",
    "leukflow_version": leukflow.__version__,
}
write_embeddings(arrays, snakemake.output.store, attrs, array_attrs)
write_table(rois[["roi_id", "image_id"]], snakemake.output.ids)
log.info("embedded %d ROIs with %d fold encoders", len(rois), len(arrays))

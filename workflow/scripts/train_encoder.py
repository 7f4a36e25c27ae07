"""Rule train_encoder: train one encoder on one fold's training ROIs (or all.pt: once)."""

import torch

from leukflow.core.runlog import start_log
from leukflow.data.io import read_crops, read_table, write_table
from leukflow.evaluate.folds import label_rois
from leukflow.evaluate.plots import plot_history
from leukflow.learn.models import pick_device, save_checkpoint
from leukflow.learn.train import train_fold

enc = snakemake.params.encoder
# fold_<k>; all: an encoder shared by every fold; whole: trained on every ROI for
# another dataset (cross-dataset evaluation)
part = snakemake.wildcards.part
torch.set_num_threads(snakemake.threads)
log = start_log("train_encoder", snakemake.log[0], {**enc, "part": part, "device": pick_device()})
folds = read_table(snakemake.input.folds)
rois = label_rois(read_table(snakemake.input.rois), folds)
rois = rois.merge(folds[["image_id", "group"]], on="image_id", how="left")
checkpoint, history = train_fold(
    rois,
    read_crops(snakemake.input.crops),
    fold=None if part in ("all", "whole") else int(part.removeprefix("fold_")),
    training=enc["training"],
    every_roi=part == "whole",
    arch=enc["arch"],
    weights=enc["weights"],
    input_size_px=enc["input_size_px"] or None,
    normalisation=enc["normalisation"],
    epochs=enc["epochs"],
    batch_size=enc["batch_size"],
    lr=enc["lr"],
    weight_decay=enc["weight_decay"],
    val_fraction=enc["val_fraction"],
    patience=enc["patience"],
    norm=enc["norm"],
    hed_jitter_scale=enc["hed_jitter_scale"],
    hed_jitter_shift=enc["hed_jitter_shift"],
    stain_normalisation=enc["stain_normalisation"],
    seed=enc["seed"],
    resume_dir=snakemake.params.resume_dir,
)
save_checkpoint(checkpoint, snakemake.output.checkpoint)
write_table(history.assign(part=part), snakemake.output.history)
plot_history(history, title=f"{snakemake.wildcards.dataset} / {snakemake.wildcards.encoder} / "
             f"{part}", path=snakemake.output.curves)  # fmt: skip
log.info("trained on %d ROIs (%d held out for early stopping); best epoch %d",
         len(checkpoint["train_roi_ids"]), len(checkpoint["val_roi_ids"]),
         checkpoint["best_epoch"])  # fmt: skip

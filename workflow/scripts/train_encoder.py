"""Rule train_encoder: train one encoder on one fold's training ROIs."""

import torch

from leukflow.folds import label_rois
from leukflow.io import read_crops, read_table, write_table
from leukflow.models import pick_device, save_checkpoint, train_encoder
from leukflow.runlog import start_log

enc = snakemake.params.encoder
fold = int(snakemake.wildcards.fold)
torch.set_num_threads(snakemake.threads)
log = start_log("train_encoder", snakemake.log[0], {**enc, "fold": fold, "device": pick_device()})
rois = label_rois(read_table(snakemake.input.rois), read_table(snakemake.input.folds))
train = (rois["fold"] != fold).to_numpy()
checkpoint, history = train_encoder(
    read_crops(snakemake.input.crops)[train],
    rois.loc[train, "label"].tolist(),
    arch=enc["arch"],
    weights=enc["weights"],
    epochs=enc["epochs"],
    batch_size=enc["batch_size"],
    lr=enc["lr"],
    seed=enc["seed"],
)
save_checkpoint(checkpoint, snakemake.output.checkpoint)
write_table(history.assign(fold=fold), snakemake.output.history)
log.info("trained on %d ROIs; final training loss %.4f", train.sum(), history["loss"].iloc[-1])

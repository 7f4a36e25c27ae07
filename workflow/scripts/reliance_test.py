"""Rule reliance_test: the unchanged models on test-fold crops with the background altered."""

from pathlib import Path

import pandas as pd
import torch

from leukflow.core.runlog import start_log
from leukflow.data.io import read_crops, write_table
from leukflow.evaluate.model_files import load_model
from leukflow.evaluate.reliance import RELIANCE_KINDS, reliance_crops, reliance_predictions
from leukflow.evaluate.scoring import ScoringSettings, read_scoring_inputs, score_predictions
from leukflow.learn.embed import embed_as_trained
from leukflow.learn.models import load_checkpoint, pick_device

p, inp, out = snakemake.params, snakemake.input, snakemake.output
dataset, encoder = snakemake.wildcards.dataset, snakemake.wildcards.encoder
torch.set_num_threads(snakemake.threads)
device = pick_device()
log = start_log("reliance_test", snakemake.log[0], {**dict(p), "device": device})
folds, rois, _ = read_scoring_inputs(inp.folds, inp.ids, inp.store, dataset)
crops = read_crops(inp.crops)
ckpts = {Path(path).stem: load_checkpoint(path) for path in inp.checkpoints}
models = {c: {} for c in p.classifiers}
for path in map(Path, inp.models):  # <classifier>_fold_<k>.skops
    name, fold = path.stem.rsplit("_fold_", 1)
    models[name][int(fold)] = load_model(path)
head = ckpts[next(iter(ckpts))]["classes"] if p.head else None
tables = []
for kind in RELIANCE_KINDS:
    altered = reliance_crops(crops, kind, labels=rois["label"].to_numpy(),
                             folds=rois["fold"].to_numpy(), seed=p.seed)  # fmt: skip
    preds = reliance_predictions(
        altered, rois, models=models, head_classes=head, positive_label=p.positive_label,
        embed=lambda k, x: embed_as_trained(ckpts.get("all") or ckpts[f"fold_{k}"], x,
                                            device=device),
    )  # fmt: skip
    metrics = score_predictions(preds, folds, ScoringSettings.from_params(p)).metrics
    tables.append(metrics.assign(reliance=kind))
    log.info("%s: %d test ROIs scored by %s", kind, preds["roi_id"].nunique(), sorted(models))
table = pd.concat(tables, ignore_index=True).assign(dataset=dataset, encoder=encoder)
write_table(table[["dataset", "encoder", "reliance", *tables[0].columns[:-1]]], out.metrics)

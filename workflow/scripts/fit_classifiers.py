"""Rule fit_classifiers: classifiers per fold on the embeddings -> predictions, metrics, plots."""

import pandas as pd

from leukflow.evaluate import aggregate_images, fit_predict_folds, score_folds
from leukflow.folds import label_rois
from leukflow.io import open_embeddings, read_table, write_table
from leukflow.report import plot_confusion
from leukflow.runlog import start_log

p = snakemake.params
dataset, encoder = snakemake.wildcards.dataset, snakemake.wildcards.encoder
log = start_log("fit_classifiers", snakemake.log[0], dict(p))
folds = read_table(snakemake.input.folds)
folds = folds[folds["dataset"] == dataset]
rois = label_rois(read_table(snakemake.input.ids), folds)
arrays = open_embeddings(snakemake.input.store)
embeddings = {int(name.removeprefix("fold_")): arr[:] for name, arr in arrays.items()}
roi_preds = fit_predict_folds(
    embeddings, rois, classifiers=p.classifiers, positive_label=p.positive_label
)
image_preds = aggregate_images(
    roi_preds, folds, positive_label=p.positive_label, method=p.image_aggregation
)
levels = {"roi": roi_preds, "image": image_preds}
metrics = pd.concat(
    [score_folds(preds, positive_label=p.positive_label).assign(level=level)
     for level, preds in levels.items()]
).assign(dataset=dataset, encoder=encoder)  # fmt: skip
first = ["dataset", "encoder", "classifier", "level", "fold"]
write_table(
    metrics[first + [c for c in metrics.columns if c not in first]], snakemake.output.metrics
)
write_table(roi_preds, snakemake.output.roi_predictions)
write_table(image_preds, snakemake.output.image_predictions)
for clf, png in zip(p.classifiers, snakemake.output.plots, strict=True):
    plot_confusion(
        {level: preds[preds["classifier"] == clf] for level, preds in levels.items()},
        title=f"{dataset} / {encoder} / {clf}",
        positive_label=p.positive_label,
        path=png,
    )
log.info("metrics (mean over folds):\n%s", metrics[metrics["fold"] == "mean"].to_string())

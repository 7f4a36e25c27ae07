"""Rule score_cnn_softmax: each fold's encoder head (its softmax) scored as a classifier."""

from leukflow.core.runlog import start_log
from leukflow.data.io import embeddings_attrs, open_probabilities, read_table
from leukflow.evaluate.classifiers import CNN_SOFTMAX, head_predictions
from leukflow.evaluate.folds import label_rois
from leukflow.evaluate.plots import plot_classifier
from leukflow.evaluate.scoring import ScoringSettings, score_predictions, write_evaluation

p, out = snakemake.params, snakemake.output
dataset, encoder = snakemake.wildcards.dataset, snakemake.wildcards.encoder
log = start_log("score_cnn_softmax", snakemake.log[0], dict(p))
folds = read_table(snakemake.input.folds)
folds = folds[folds["dataset"] == dataset]
# a head trained on every ROI (training: all_labels) has seen the test ROIs: leaky
folds = folds.assign(leaky=folds["leaky"] | embeddings_attrs(snakemake.input.store)["leaky"])
rois = label_rois(read_table(snakemake.input.ids), folds)
arrays = open_probabilities(snakemake.input.store)
test_folds = sorted(int(k) for k in folds["fold"].unique() if k >= 0)
probs = {k: arrays["all" if "all" in arrays else f"fold_{k}"] for k in test_folds}
classes = list(next(iter(probs.values())).attrs["classes"])
preds = head_predictions(
    {k: a[:] for k, a in probs.items()}, classes, rois, positive_label=p.positive_label
)
result = score_predictions(preds, folds, ScoringSettings.from_params(p))
write_evaluation(result, out, keys={"dataset": dataset, "encoder": encoder})
plot_classifier(
    result,
    dict(zip(p.plot_kinds, out.plots, strict=True)),
    classifier=CNN_SOFTMAX,
    title=f"{dataset} / {encoder} / {CNN_SOFTMAX}",
    positive_label=p.positive_label,
)
log.info("scored the head's softmax (classes %s) on %d test ROIs", classes, len(preds))

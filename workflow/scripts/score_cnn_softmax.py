"""Rule score_cnn_softmax: each fold's encoder head (its softmax) scored as a classifier."""

from leukflow.core.runlog import start_log
from leukflow.data.io import open_probabilities
from leukflow.evaluate.classifiers import head_predictions
from leukflow.evaluate.conformal import head_calibration_predictions
from leukflow.evaluate.plots import plot_classifier
from leukflow.evaluate.scoring import (
    ScoringSettings,
    read_scoring_inputs,
    score_predictions,
    write_evaluation,
)
from leukflow.plan import CNN_SOFTMAX

p, out, inp = snakemake.params, snakemake.output, snakemake.input
dataset, encoder = snakemake.wildcards.dataset, snakemake.wildcards.encoder
log = start_log("score_cnn_softmax", snakemake.log[0], dict(p))
# a head trained on every ROI (training: all_labels) has seen the test ROIs: leaky
folds, rois, test_folds = read_scoring_inputs(inp.folds, inp.ids, inp.store, dataset)
arrays = open_probabilities(inp.store)
probs = {k: arrays["all" if "all" in arrays else f"fold_{k}"] for k in test_folds}
classes = list(next(iter(probs.values())).attrs["classes"])
preds = head_predictions({k: a[:] for k, a in probs.items()}, classes, rois,
                         positive_label=p.positive_label)  # fmt: skip
# calibration: each fold's head on its own training ROIs (in-sample, see docs/conformal.md)
calibration = head_calibration_predictions({k: a[:] for k, a in probs.items()}, classes, rois,
                                           positive_label=p.positive_label)  # fmt: skip
result = score_predictions(preds, folds, ScoringSettings.from_params(p), calibration,
                           scheme="head_training_rois")  # fmt: skip
write_evaluation(result, out, keys={"dataset": dataset, "encoder": encoder})
plot_classifier(result, dict(zip(p.plot_kinds, out.plots, strict=True)), classifier=CNN_SOFTMAX,
                title=f"{dataset} / {encoder} / {CNN_SOFTMAX}",
                positive_label=p.positive_label)  # fmt: skip
log.info("scored the head's softmax (classes %s) on %d test ROIs", classes, len(preds))

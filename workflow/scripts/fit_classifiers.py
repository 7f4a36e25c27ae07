"""Rule fit_classifiers: classifiers per fold on embeddings -> models, predictions, plots."""

from pathlib import Path

from leukflow.core.runlog import start_log
from leukflow.data.io import embeddings_attrs, fold_embeddings, read_table
from leukflow.evaluate.folds import label_rois
from leukflow.evaluate.model_files import save_model
from leukflow.evaluate.plots import plot_classifier
from leukflow.evaluate.scoring import ScoringSettings, evaluate_embeddings, write_evaluation

p, out = snakemake.params, snakemake.output
dataset, encoder = snakemake.wildcards.dataset, snakemake.wildcards.encoder
log = start_log("fit_classifiers", snakemake.log[0], dict(p))
folds = read_table(snakemake.input.folds)
folds = folds[folds["dataset"] == dataset]
# an encoder trained on every ROI (training: all_labels) makes every result leaky
folds = folds.assign(leaky=folds["leaky"] | embeddings_attrs(snakemake.input.store)["leaky"])
rois = label_rois(read_table(snakemake.input.ids), folds)
test_folds = sorted(int(k) for k in folds["fold"].unique() if k >= 0)  # -1: holdout training
arrays = fold_embeddings(snakemake.input.store, test_folds)
result = evaluate_embeddings(
    {fold: arr[:] for fold, arr in arrays.items()},
    rois,
    folds,
    classifiers=p.classifiers,
    settings=ScoringSettings.from_params(p),
    inner_folds=p.inner_folds,
)
write_evaluation(result, out, keys={"dataset": dataset, "encoder": encoder})
model_paths = {Path(path).stem: path for path in out.models}
for (clf, fold), model in result.models.items():
    save_model(model, model_paths[f"{clf}_fold_{fold}"])
for i, clf in enumerate(p.classifiers):
    plot_classifier(
        result,
        {kind: out[kind][i] for kind in p.plot_kinds},
        classifier=clf,
        title=f"{dataset} / {encoder} / {clf}",
        positive_label=p.positive_label,
    )
pooled = result.metrics.query("fold == 'pooled' and metric in ['accuracy', 'roc_auc']")
log.info("pooled metrics with %g%% bootstrap CIs:\n%s", 100 * p.ci_level,
         pooled[["classifier", "level", "metric", "accuracy", "roc_auc", "ci_low", "ci_high"]]
         .to_string())  # fmt: skip

"""Rule fit_classifiers: classifiers per fold on embeddings -> models, predictions, plots."""

from pathlib import Path

from leukflow.core.runlog import start_log
from leukflow.data.io import fold_embeddings
from leukflow.evaluate.model_files import save_model
from leukflow.evaluate.plots import plot_classifier
from leukflow.evaluate.scoring import (
    ScoringSettings,
    evaluate_embeddings,
    read_scoring_inputs,
    write_evaluation,
)

p, out, inp = snakemake.params, snakemake.output, snakemake.input
dataset, encoder = snakemake.wildcards.dataset, snakemake.wildcards.encoder
log = start_log("fit_classifiers", snakemake.log[0], dict(p))
folds, rois, test_folds = read_scoring_inputs(inp.folds, inp.ids, inp.store, dataset)
arrays = fold_embeddings(inp.store, test_folds)
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
    pngs = {kind: out[kind][i] for kind in p.plot_kinds}
    plot_classifier(result, pngs, classifier=clf, title=f"{dataset} / {encoder} / {clf}",
                    positive_label=p.positive_label)  # fmt: skip
pooled = result.metrics.query("fold == 'pooled' and metric in ['accuracy', 'roc_auc']")
log.info("pooled metrics with %g%% bootstrap CIs:\n%s", 100 * p.ci_level,
         pooled[["classifier", "level", "metric", "accuracy", "roc_auc", "ci_low", "ci_high"]]
         .to_string())  # fmt: skip

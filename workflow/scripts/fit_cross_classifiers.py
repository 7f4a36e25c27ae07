"""Rule fit_cross_classifiers: classifiers fitted on one dataset, scored on another."""

from leukflow.core.runlog import start_log
from leukflow.data.io import open_embeddings, read_table
from leukflow.evaluate.cross import evaluate_cross, shared_images
from leukflow.evaluate.folds import label_rois
from leukflow.evaluate.scoring import ScoringSettings, write_evaluation

p, out, wc = snakemake.params, snakemake.output, snakemake.wildcards
log = start_log("fit_cross_classifiers", snakemake.log[0], dict(p))
folds = read_table(snakemake.input.folds)


def dataset_rois(name, ids, store):
    """Return the dataset's images, its ROIs with label and group, and its one embedding array."""
    images = folds[folds["dataset"] == name]
    rois = label_rois(read_table(ids), images)
    rois = rois.merge(images[["image_id", "group"]], on="image_id", how="left")
    (array,) = open_embeddings(store).values()  # all.pt or whole.pt: one array
    return images, rois, array[:]


_, train_rois, train_emb = dataset_rois(wc.train, snakemake.input.train_ids,
                                        snakemake.input.train_store)  # fmt: skip
test_images, test_rois, test_emb = dataset_rois(wc.test, snakemake.input.test_ids,
                                                snakemake.input.test_store)  # fmt: skip
# the same cell in both datasets (same pixels, or a near copy in duplicates.csv) leaks
shared = shared_images(
    folds.loc[folds["dataset"] == wc.train, "image_id"],
    test_images["image_id"],
    read_table(snakemake.input.manifest),
    read_table(snakemake.input.duplicates),
)
if shared:
    raise ValueError(
        f"evaluation.cross_dataset {wc.train} -> {wc.test}: {len(shared)} test images are "
        f"also in the train dataset, e.g. {shared[:3]} (train image, test image, kind; "
        f"see {snakemake.input.duplicates}); remove them from one dataset"
    )
result = evaluate_cross(
    train_emb,
    train_rois,
    test_emb,
    test_rois,
    test_images,
    classifiers=p.classifiers,
    settings=ScoringSettings.from_params(p),
    inner_folds=p.inner_folds,
)
write_evaluation(result, out, keys={"train": wc.train, "test": wc.test, "encoder": wc.encoder},
                 keyed_predictions=True)  # fmt: skip
pooled = result.metrics.query("fold == 'pooled' and metric == 'balanced_accuracy'")
log.info("%s -> %s, %s: balanced accuracy with %g%% bootstrap CIs:\n%s", wc.train, wc.test,
         wc.encoder, 100 * p.ci_level,
         pooled[["classifier", "level", "balanced_accuracy", "ci_low", "ci_high", "n"]]
         .to_string())  # fmt: skip

"""Rule fit_cross_classifiers: classifiers fitted on one dataset, scored on another."""

from leukflow.core.runlog import start_log
from leukflow.data.io import open_embeddings, read_table, write_table
from leukflow.evaluate.cross import evaluate_cross, shared_images
from leukflow.evaluate.folds import label_rois

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
    positive_label=p.positive_label,
    image_aggregation=p.image_aggregation,
    any_positive_threshold=p.any_positive_threshold,
    n_boot=p.n_boot,
    bootstrap_seed=p.bootstrap_seed,
    ci_level=p.ci_level,
    inner_folds=p.inner_folds,
)
keys = {"train": wc.train, "test": wc.test, "encoder": wc.encoder}
write_table(result.metrics.assign(**keys)[[*keys, *result.metrics.columns]], out.metrics)
write_table(result.roi_predictions.assign(**keys), out.roi_predictions)
write_table(result.image_predictions.assign(**keys), out.image_predictions)
pooled = result.metrics.query("fold == 'pooled' and metric == 'balanced_accuracy'")
log.info("%s -> %s, %s: balanced accuracy with %g%% bootstrap CIs:\n%s", wc.train, wc.test,
         wc.encoder, 100 * p.ci_level,
         pooled[["classifier", "level", "balanced_accuracy", "ci_low", "ci_high", "n"]]
         .to_string())  # fmt: skip

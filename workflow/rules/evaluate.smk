# Fit and score: classifiers per fold on the embeddings -> models, predictions,
# metrics (per fold, mean, std, pooled with bootstrap CIs; per class), plots.

# Plots per dataset x encoder x classifier, plots/<dataset>/<encoder>/<classifier>_<kind>.png;
# fit_classifiers names one output list per kind.
PLOT_KINDS = ["confusion", "roc", "calibration", "wbc_count"]


rule fit_classifiers:
    input:
        store=result("embeddings/{dataset}/{encoder}.zarr"),
        ids=result("embeddings/{dataset}/{encoder}_rois.parquet"),
        folds=result("folds.csv"),
    output:
        roi_predictions=result("evaluate/{dataset}/{encoder}/roi_predictions.parquet"),
        image_predictions=result(
            "evaluate/{dataset}/{encoder}/image_predictions.parquet"
        ),
        metrics=result("evaluate/{dataset}/{encoder}/metrics.csv"),
        metrics_per_class=result("evaluate/{dataset}/{encoder}/metrics_per_class.csv"),
        models=expand(
            result(
                "evaluate/{{dataset}}/{{encoder}}/models/{classifier}_fold_{fold}.skops"
            ),
            classifier=CLASSIFIERS,
            fold=FOLDS,
        ),
        confusion=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_confusion.png"),
                classifier=CLASSIFIERS,
            ),
            caption="../report/confusion.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        roc=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_roc.png"),
                classifier=CLASSIFIERS,
            ),
            caption="../report/roc.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        calibration=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_calibration.png"),
                classifier=CLASSIFIERS,
            ),
            caption="../report/calibration.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
        wbc_count=report(
            expand(
                result("plots/{{dataset}}/{{encoder}}/{classifier}_wbc_count.png"),
                classifier=CLASSIFIERS,
            ),
            caption="../report/wbc_count.rst",
            category="5. Plots",
            subcategory="{dataset} / {encoder}",
        ),
    log:
        logfile("evaluate/{dataset}/{encoder}.log"),
    benchmark:
        benchfile("evaluate/{dataset}/{encoder}.tsv")
    conda:
        "../../envs/leukflow.yaml"
    threads: 1
    params:
        classifiers=CLASSIFIERS,
        positive_label=config["positive_label"],
        image_aggregation=config["evaluation"]["image_aggregation"],
        any_positive_threshold=config["evaluation"]["any_positive_threshold"],
        n_boot=config["evaluation"]["n_boot"],
        bootstrap_seed=config["evaluation"]["bootstrap_seed"],
        ci_level=config["evaluation"]["ci_level"],
        plot_kinds=PLOT_KINDS,
    script:
        "../scripts/fit_classifiers.py"


rule summarise_metrics:
    input:
        metrics=expand(
            result("evaluate/{dataset}/{encoder}/metrics.csv"),
            dataset=DATASETS,
            encoder=ENCODERS,
        ),
        metrics_per_class=expand(
            result("evaluate/{dataset}/{encoder}/metrics_per_class.csv"),
            dataset=DATASETS,
            encoder=ENCODERS,
        ),
    output:
        metrics=report(
            result("metrics.csv"),
            caption="../report/metrics.rst",
            category="4. Metrics",
            subcategory="all datasets",
        ),
        metrics_per_class=report(
            result("metrics_per_class.csv"),
            caption="../report/metrics_per_class.rst",
            category="4. Metrics",
            subcategory="all datasets",
        ),
    log:
        logfile("evaluate/summarise_metrics.log"),
    benchmark:
        benchfile("evaluate/summarise_metrics.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    script:
        "../scripts/summarise_metrics.py"

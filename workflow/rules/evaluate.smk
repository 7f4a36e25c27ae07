# Fit and score: classifiers per fold on the embeddings -> predictions, metrics, plots.


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
        plots=expand(
            result("plots/{{dataset}}/{{encoder}}/{classifier}_confusion.png"),
            classifier=CLASSIFIERS,
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
    script:
        "../scripts/fit_classifiers.py"


rule summarise_metrics:
    input:
        expand(
            result("evaluate/{dataset}/{encoder}/metrics.csv"),
            dataset=DATASETS,
            encoder=ENCODERS,
        ),
    output:
        result("metrics.csv"),
    log:
        logfile("evaluate/summarise_metrics.log"),
    benchmark:
        benchfile("evaluate/summarise_metrics.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    script:
        "../scripts/gather_tables.py"

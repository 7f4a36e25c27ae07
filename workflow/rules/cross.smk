# Cross-dataset: for each evaluation.cross_dataset pair, an encoder trained on
# every labelled ROI of the train dataset (all.pt of a shared encoder, whole.pt
# of a per-fold one) embeds both datasets; each fitted classifier is trained on
# the train dataset and scored on the whole test dataset (CIs resample its
# patient groups) -> cross_dataset.csv and its train x test heatmap.

CROSS_PAIRS = [(p["train"], p["test"]) for p in config["evaluation"]["cross_dataset"]]
for _i, (_train, _test) in enumerate(CROSS_PAIRS):
    check_cross_pair(_i, _train, _test)
if CROSS_PAIRS and not FITTED:
    raise ValueError(
        "evaluation.cross_dataset: needs a fitted classifier under classifiers "
        "besides cnn_softmax, which is not scored across datasets"
    )


rule embed_cross_rois:
    input:
        checkpoints=cross_checkpoint,
        rois=result("segment/{dataset}/rois.parquet"),
        crops=result("segment/{dataset}/crops.zarr"),
        manifest=result("manifest.parquet"),
    output:
        store=directory(cross_store("{dataset}")),
        ids=result("cross/embeddings/{train}/{encoder}/{dataset}_rois.parquet"),
    log:
        logfile("cross/embed/{train}/{encoder}/{dataset}.log"),
    benchmark:
        benchfile("cross/embed/{train}/{encoder}/{dataset}.tsv")
    wildcard_constraints:
        train="|".join(DATASETS),
    conda:
        "../../envs/leukflow.yaml"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=attempt_mem_mb(4000),
    params:
        batch_size=lambda wc: ENCODERS[wc.encoder]["embed_batch_size"],
        segmentation=config["segmentation"],
        cache_dir=result("cache"),
    script:
        "../scripts/embed_rois.py"


rule fit_cross_classifiers:
    input:
        train_store=cross_store("{train}"),
        train_ids=result("cross/embeddings/{train}/{encoder}/{train}_rois.parquet"),
        test_store=cross_store("{test}"),
        test_ids=result("cross/embeddings/{train}/{encoder}/{test}_rois.parquet"),
        folds=result("folds.csv"),
        manifest=result("manifest.parquet"),
        duplicates=result("duplicates.csv"),
    output:
        roi_predictions=result("cross/{train}/{test}/{encoder}/roi_predictions.parquet"),
        image_predictions=result(
            "cross/{train}/{test}/{encoder}/image_predictions.parquet"
        ),
        metrics=result("cross/{train}/{test}/{encoder}/metrics.csv"),
    log:
        logfile("cross/{train}/{test}/{encoder}.log"),
    benchmark:
        benchfile("cross/{train}/{test}/{encoder}.tsv")
    wildcard_constraints:
        train="|".join(DATASETS),
        test="|".join(DATASETS),
    conda:
        "../../envs/leukflow.yaml"
    threads: 1
    params:
        **{k: v for k, v in EVALUATION_PARAMS.items() if k != "plot_kinds"},
        classifiers=FITTED,
        inner_folds=config["evaluation"]["inner_folds"],
    script:
        "../scripts/fit_cross_classifiers.py"


rule summarise_cross_dataset:
    input:
        metrics=[
            result(f"cross/{train}/{test}/{encoder}/metrics.csv")
            for train, test in CROSS_PAIRS
            for encoder in ENCODERS
        ],
        within=result("metrics.csv"),
    output:
        table=report(
            result("cross_dataset.csv"),
            caption="../report/cross_dataset.rst",
            category="4. Metrics",
            subcategory="all datasets",
        ),
        plot=report(
            result("cross_dataset.png"),
            caption="../report/cross_dataset.rst",
            category="4. Metrics",
            subcategory="all datasets",
        ),
    log:
        logfile("cross/summarise_cross_dataset.log"),
    benchmark:
        benchfile("cross/summarise_cross_dataset.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    script:
        "../scripts/summarise_cross_dataset.py"

# Cross-dataset: for each evaluation.cross_dataset pair, an encoder trained on
# every labelled ROI of the train dataset (all.pt of a shared encoder, whole.pt
# of a per-fold one) embeds both datasets; each fitted classifier is trained on
# the train dataset and scored on the whole test dataset (CIs resample its
# patient groups) -> cross_dataset.csv and its train x test heatmap.


rule embed_cross_rois:
    input:
        checkpoints=lambda wc: [PLAN.cross_checkpoint(wc.train, wc.encoder)],
        rois=PLAN.segment_file("rois.parquet"),
        crops=PLAN.segment_file("crops.zarr"),
        manifest=result("manifest.parquet"),
    output:
        store=directory(PLAN.cross_store()),
        ids=PLAN.cross_ids(),
    log:
        logfile("cross/embed/{train}/{encoder}/{dataset}.log"),
    benchmark:
        benchfile("cross/embed/{train}/{encoder}/{dataset}.tsv")
    wildcard_constraints:
        train="|".join(PLAN.datasets),
    conda:
        "../../envs/leukflow.yaml"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=attempt_mem_mb(4000),
    params:
        batch_size=lambda wc: PLAN.encoders[wc.encoder]["embed_batch_size"],
        segmentation=config["segmentation"],
        cache_dir=result("cache"),
    script:
        "../scripts/embed_rois.py"


rule fit_cross_classifiers:
    input:
        train_store=PLAN.cross_store("{train}"),
        train_ids=PLAN.cross_ids("{train}"),
        test_store=PLAN.cross_store("{test}"),
        test_ids=PLAN.cross_ids("{test}"),
        folds=result("folds.csv"),
        manifest=result("manifest.parquet"),
        duplicates=result("duplicates.csv"),
    output:
        roi_predictions=PLAN.cross_file("roi_predictions.parquet"),
        image_predictions=PLAN.cross_file("image_predictions.parquet"),
        metrics=PLAN.cross_file("metrics.csv"),
    log:
        logfile("cross/{train}/{test}/{encoder}.log"),
    benchmark:
        benchfile("cross/{train}/{test}/{encoder}.tsv")
    wildcard_constraints:
        train="|".join(PLAN.datasets),
        test="|".join(PLAN.datasets),
    conda:
        "../../envs/leukflow.yaml"
    threads: 1
    params:
        **{k: v for k, v in EVALUATION_PARAMS.items() if k != "plot_kinds"},
        classifiers=PLAN.fitted,
        inner_folds=config["evaluation"]["inner_folds"],
    script:
        "../scripts/fit_cross_classifiers.py"


rule summarise_cross_dataset:
    input:
        metrics=[
            PLAN.cross_file("metrics.csv", train, test, encoder)
            for train, test in PLAN.cross_pairs
            for encoder in PLAN.encoders
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

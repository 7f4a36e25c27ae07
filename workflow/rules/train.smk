# Train: one encoder per dataset x encoder x fold, on that fold's training ROIs only.


rule train_encoder:
    input:
        rois=result("segment/{dataset}/rois.parquet"),
        crops=result("segment/{dataset}/crops.zarr"),
        folds=result("folds.csv"),
    output:
        checkpoint=result("train/{dataset}/{encoder}/fold_{fold}.pt"),
        history=report(
            result("train/{dataset}/{encoder}/fold_{fold}_history.csv"),
            caption="../report/history.rst",
            category="3. Training",
            subcategory="{dataset} / {encoder}",
        ),
    log:
        logfile("train/{dataset}/{encoder}/fold_{fold}.log"),
    benchmark:
        benchfile("train/{dataset}/{encoder}/fold_{fold}.tsv")
    conda:
        "../../envs/leukflow.yaml"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=attempt_mem_mb(4000),
    params:
        encoder=lambda wc: ENCODERS[wc.encoder],
    script:
        "../scripts/train_encoder.py"

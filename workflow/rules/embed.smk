# Embed: every ROI through each fold's encoder -> one zarr store per dataset x encoder.


rule embed_rois:
    input:
        checkpoints=fold_checkpoints,
        rois=result("segment/{dataset}/rois.parquet"),
        crops=result("segment/{dataset}/crops.zarr"),
        manifest=result("manifest.parquet"),
    output:
        store=directory(result("embeddings/{dataset}/{encoder}.zarr")),
        ids=result("embeddings/{dataset}/{encoder}_rois.parquet"),
    log:
        logfile("embed/{dataset}/{encoder}.log"),
    benchmark:
        benchfile("embed/{dataset}/{encoder}.tsv")
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

# Embed: every ROI through each fold's encoder -> one zarr store per dataset x encoder.


rule embed_rois:
    input:
        checkpoints=lambda wc: PLAN.checkpoints(wc.dataset, wc.encoder),
        rois=PLAN.segment_file("rois.parquet"),
        crops=PLAN.segment_file("crops.zarr"),
        manifest=result("manifest.parquet"),
    output:
        store=directory(PLAN.embeddings()),
        ids=PLAN.embedding_ids(),
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
        batch_size=lambda wc: PLAN.encoders[wc.encoder]["embed_batch_size"],
        segmentation=config["segmentation"],
        cache_dir=result("cache"),
    script:
        "../scripts/embed_rois.py"

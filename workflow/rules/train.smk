# Train: one encoder per dataset x encoder x fold, on that fold's training ROIs
# only (fold_<k>.pt); encoders trained on every ROI (all_labels) or not at all
# (frozen) are made once per dataset (all.pt) and serve every fold; whole.pt: a
# per-fold encoder trained once on every ROI, for another dataset (cross.smk).


rule train_encoder:
    input:
        rois=PLAN.segment_file("rois.parquet"),
        crops=PLAN.segment_file("crops.zarr"),
        folds=result("folds.csv"),
    output:
        checkpoint=PLAN.checkpoint(),
        history=report(
            result("train/{dataset}/{encoder}/{part}_history.csv"),
            caption="../report/history.rst",
            category="3. Training",
            subcategory="{dataset} / {encoder}",
        ),
        curves=report(
            result("train/{dataset}/{encoder}/{part}_history.png"),
            caption="../report/history_curves.rst",
            category="3. Training",
            subcategory="{dataset} / {encoder}",
        ),
    log:
        logfile("train/{dataset}/{encoder}/{part}.log"),
    benchmark:
        benchfile("train/{dataset}/{encoder}/{part}.tsv")
    wildcard_constraints:
        part=r"fold_\d+|all|whole",
    conda:
        "../../envs/leukflow.yaml"
    threads: 2
    resources:
        **gpu_resources(),
        mem_mb=attempt_mem_mb(4000),
    params:
        encoder=lambda wc: PLAN.encoders[wc.encoder],
        # the state after each epoch: a killed job resumes from it
        resume_dir=lambda wc: result(
            f"train/{wc.dataset}/{wc.encoder}/{wc.part}.resume"
        ),
    script:
        "../scripts/train_encoder.py"

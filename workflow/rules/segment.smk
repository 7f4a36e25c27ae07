# Segment: manifest -> ROI tables and ROI crops (zarr) per batch of images, dask
# inside each batch job, merged per dataset; a per-image cache keyed by content
# makes re-runs segment only new or edited images. QA of the segmentation
# against the masks and annotations a dataset brings.

from leukflow.core.config import ConfigError

_KMEANS = config["segmentation"]["kmeans"]
if _KMEANS["k_min"] > _KMEANS["k_max"]:
    raise ConfigError(
        "invalid leukflow configuration:\n  segmentation.kmeans: expected k_min <= k_max; "
        f"got k_min={_KMEANS['k_min']}, k_max={_KMEANS['k_max']}"
    )


# One batch's members (from the batch ledger): its files are this rule's inputs,
# so a new, edited or removed member re-runs this batch alone.
rule batch_members:
    input:
        batch_files,
    output:
        PLAN.batch_file("members.txt"),
    log:
        logfile("segment/{dataset}/batch_{batch}_members.log"),
    wildcard_constraints:
        dataset="|".join(LISTED) or "^$",
    localrule: True
    run:
        write_members(input, output[0], log[0])


rule segment_batch:
    input:
        unpack(batch_inputs),
    output:
        rois=PLAN.batch_file("rois.parquet"),
        crops=directory(PLAN.batch_file("crops.zarr")),
        images=PLAN.batch_file("images.parquet"),
        k_scores=PLAN.batch_file("k_scores.parquet"),
    log:
        logfile("segment/{dataset}/batch_{batch}.log"),
    benchmark:
        benchfile("segment/{dataset}/batch_{batch}.tsv")
    wildcard_constraints:
        dataset="|".join(PLAN.datasets),
    group:
        "segment"
    conda:
        "../../envs/leukflow.yaml"
    threads: 8
    resources:
        mem_mb=attempt_mem_mb(4000),
    params:
        segmentation=config["segmentation"],
        batch_size=BATCH_SIZE,
        cache_dir=result("cache"),
    script:
        "../scripts/segment_batch.py"


rule merge_segments:
    input:
        rois=segment_batches("rois.parquet"),
        crops=segment_batches("crops.zarr"),
        images=segment_batches("images.parquet"),
        k_scores=segment_batches("k_scores.parquet"),
        manifest=result("manifest.parquet"),
    output:
        rois=PLAN.segment_file("rois.parquet"),
        crops=directory(PLAN.segment_file("crops.zarr")),
        images=PLAN.segment_file("images.parquet"),
        kmeans_scores=report(
            result("segment/{dataset}/kmeans_scores.csv"),
            caption="../report/kmeans_scores.rst",
            category="2. Segmentation",
            subcategory="{dataset}",
        ),
        kmeans_curves=report(
            result("segment/{dataset}/kmeans_scores.png"),
            caption="../report/kmeans_curves.rst",
            category="2. Segmentation",
            subcategory="{dataset}",
        ),
    log:
        logfile("segment/{dataset}.log"),
    benchmark:
        benchfile("segment/{dataset}.tsv")
    wildcard_constraints:
        dataset="|".join(PLAN.datasets),
    conda:
        "../../envs/leukflow.yaml"
    resources:
        mem_mb=attempt_mem_mb(2000),
    params:
        segmentation=config["segmentation"],
        cache_dir=result("cache"),
    script:
        "../scripts/merge_segments.py"


rule control_crops:
    input:
        rois=lambda wc: PLAN.segment_file("rois.parquet", PLAN.control_base(wc.dataset)),
        crops=lambda wc: PLAN.segment_file("crops.zarr", PLAN.control_base(wc.dataset)),
    output:
        rois=PLAN.segment_file("rois.parquet"),
        crops=directory(PLAN.segment_file("crops.zarr")),
    log:
        logfile("segment/{dataset}.log"),
    benchmark:
        benchfile("segment/{dataset}.tsv")
    wildcard_constraints:
        dataset="|".join(PLAN.controls) or "^$",
    conda:
        "../../envs/leukflow.yaml"
    resources:
        mem_mb=attempt_mem_mb(2000),
    params:
        base=lambda wc: PLAN.controls[wc.dataset][0],
        control=lambda wc: PLAN.controls[wc.dataset][1],
    script:
        "../scripts/control_crops.py"


rule gather_rois:
    input:
        [PLAN.segment_file("rois.parquet", d) for d in PLAN.datasets],
    output:
        result("rois.parquet"),
    log:
        logfile("segment/gather_rois.log"),
    benchmark:
        benchfile("segment/gather_rois.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    script:
        "../scripts/gather_tables.py"


rule score_segmentation:
    input:
        manifest=result("manifest.parquet"),
    output:
        per_image=report(
            result("qa/{dataset}/per_image.csv"),
            caption="../report/qa_per_image.rst",
            category="2. Segmentation",
            subcategory="{dataset}",
        ),
        summary=report(
            result("qa/{dataset}/summary.csv"),
            caption="../report/qa_summary.rst",
            category="2. Segmentation",
            subcategory="{dataset}",
        ),
        overlays=report(
            expand(
                result("qa/{{dataset}}/overlays_{method}.png"), method=PLAN.qa_methods
            ),
            caption="../report/qa_overlays.rst",
            category="2. Segmentation",
            subcategory="{dataset}",
        ),
    log:
        logfile("qa/{dataset}.log"),
    benchmark:
        benchfile("qa/{dataset}.tsv")
    wildcard_constraints:
        dataset="|".join(PLAN.datasets),
    conda:
        "../../envs/leukflow.yaml"
    threads: 4
    resources:
        mem_mb=4000,
    params:
        segmentation=config["segmentation"],
        methods=list(PLAN.qa_methods),
    script:
        "../scripts/score_segmentation.py"

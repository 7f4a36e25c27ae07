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

# The run's method first, then the further methods QA scores.
QA_METHODS = list(
    dict.fromkeys([config["segmentation"]["method"], *config["qa"]["methods"]])
)


rule segment_batch:
    input:
        manifest=result("manifest.parquet"),
    output:
        rois=result("segment/{dataset}/batch_{batch}/rois.parquet"),
        crops=directory(result("segment/{dataset}/batch_{batch}/crops.zarr")),
        images=result("segment/{dataset}/batch_{batch}/images.parquet"),
        k_scores=result("segment/{dataset}/batch_{batch}/k_scores.parquet"),
    log:
        logfile("segment/{dataset}/batch_{batch}.log"),
    benchmark:
        benchfile("segment/{dataset}/batch_{batch}.tsv")
    wildcard_constraints:
        dataset="|".join(DATASETS),
    group:
        "segment"
    conda:
        "../../envs/leukflow.yaml"
    threads: 8
    resources:
        mem_mb=attempt_mem_mb(4000),
    params:
        segmentation=config["segmentation"],
        n_batches=lambda wc: N_BATCHES[wc.dataset],
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
        rois=result("segment/{dataset}/rois.parquet"),
        crops=directory(result("segment/{dataset}/crops.zarr")),
        images=result("segment/{dataset}/images.parquet"),
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
        dataset="|".join(DATASETS),
    conda:
        "../../envs/leukflow.yaml"
    resources:
        mem_mb=attempt_mem_mb(2000),
    params:
        segmentation=config["segmentation"],
    script:
        "../scripts/merge_segments.py"


rule control_crops:
    input:
        rois=lambda wc: result(f"segment/{CONTROLS[wc.dataset][0]}/rois.parquet"),
        crops=lambda wc: result(f"segment/{CONTROLS[wc.dataset][0]}/crops.zarr"),
    output:
        rois=result("segment/{dataset}/rois.parquet"),
        crops=directory(result("segment/{dataset}/crops.zarr")),
    log:
        logfile("segment/{dataset}.log"),
    benchmark:
        benchfile("segment/{dataset}.tsv")
    wildcard_constraints:
        dataset="|".join(CONTROLS) or "^$",
    conda:
        "../../envs/leukflow.yaml"
    resources:
        mem_mb=attempt_mem_mb(2000),
    params:
        base=lambda wc: CONTROLS[wc.dataset][0],
        control=lambda wc: CONTROLS[wc.dataset][1],
    script:
        "../scripts/control_crops.py"


rule gather_rois:
    input:
        expand(result("segment/{dataset}/rois.parquet"), dataset=DATASETS),
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
            expand(result("qa/{{dataset}}/overlays_{method}.png"), method=QA_METHODS),
            caption="../report/qa_overlays.rst",
            category="2. Segmentation",
            subcategory="{dataset}",
        ),
    log:
        logfile("qa/{dataset}.log"),
    benchmark:
        benchfile("qa/{dataset}.tsv")
    wildcard_constraints:
        dataset="|".join(DATASETS),
    conda:
        "../../envs/leukflow.yaml"
    threads: 4
    resources:
        mem_mb=4000,
    params:
        segmentation=config["segmentation"],
        methods=QA_METHODS,
    script:
        "../scripts/score_segmentation.py"

# Segment: manifest -> per-dataset ROI table and ROI crops (zarr), dask inside.


rule segment_cells:
    input:
        manifest=result("manifest.parquet"),
    output:
        rois=result("segment/{dataset}/rois.parquet"),
        crops=directory(result("segment/{dataset}/crops.zarr")),
    log:
        logfile("segment/{dataset}.log"),
    benchmark:
        benchfile("segment/{dataset}.tsv")
    conda:
        "../../envs/leukflow.yaml"
    threads: 8
    resources:
        mem_mb=4000,
    params:
        segmentation=config["segmentation"],
    script:
        "../scripts/segment_cells.py"


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

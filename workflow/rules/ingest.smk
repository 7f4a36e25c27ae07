# Ingest: dataset folders as downloaded -> manifest.parquet, rejects.csv, duplicates.csv.

for _name, _ds in PLAN.demo_datasets.items():

    rule:
        name:
            f"draw_demo_data_{_name}"
        output:
            directory(_ds["root"]),
        log:
            logfile(f"ingest/draw_demo_data_{_name}.log"),
        benchmark:
            benchfile(f"ingest/draw_demo_data_{_name}.tsv")
        localrule: True
        conda:
            "../../envs/leukflow.yaml"
        params:
            n_fields=_ds["n_fields"],
            seed=_ds["seed"],
            fields_per_patient=_ds["fields_per_patient"],
        script:
            "../scripts/draw_demo_data.py"


rule ingest_images:
    input:
        dataset_inputs,
    output:
        manifest=result("manifest.parquet"),
        rejects=report(
            result("rejects.csv"),
            caption="../report/rejects.rst",
            category="1. Ingest",
            subcategory="rejects and duplicates",
        ),
        duplicates=report(
            result("duplicates.csv"),
            caption="../report/duplicates.rst",
            category="1. Ingest",
            subcategory="rejects and duplicates",
        ),
        qa=report(
            result("qa/duplicates.png"),
            caption="../report/duplicates_qa.rst",
            category="1. Ingest",
            subcategory="rejects and duplicates",
        ),
    log:
        logfile("ingest/ingest_images.log"),
    benchmark:
        benchfile("ingest/ingest_images.tsv")
    conda:
        "../../envs/leukflow.yaml"
    threads: 4
    resources:
        mem_mb=attempt_mem_mb(2000),
    params:
        datasets=PLAN.datasets,
        min_size_px=config["ingest"]["min_size_px"],
        duplicate_max_distance=config["ingest"]["duplicate_max_distance"],
        cache_dir=result("cache"),
        twins=PLAN.twins,
        ledgers={name: PLAN.ledger(name) for name in PLAN.datasets},
        batch_size=BATCH_SIZE,
    script:
        "../scripts/ingest_images.py"

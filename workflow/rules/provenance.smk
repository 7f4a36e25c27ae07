# Provenance: the resolved config, versions, git commit, manifest hash and seeds
# of this result folder -> provenance.json (read back by `leukflow predict`).


rule write_provenance:
    input:
        manifest=result("manifest.parquet"),
    output:
        report(
            result("provenance.json"),
            caption="../report/provenance.rst",
            category="1. Ingest",
            subcategory="dataset summary and provenance",
        ),
    log:
        logfile("provenance.log"),
    benchmark:
        benchfile("provenance.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    params:
        config=config,
        source_dir=workflow.basedir,
    script:
        "../scripts/write_provenance.py"

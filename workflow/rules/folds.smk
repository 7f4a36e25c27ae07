# Folds: manifest -> folds.csv (grouped by patient and leakage-checked, or random: leaky;
# k-fold or one holdout split; a dataset's twin under the other protocol).


rule assign_folds:
    input:
        manifest=result("manifest.parquet"),
        duplicates=result("duplicates.csv"),
    output:
        folds=result("folds.csv"),
    log:
        logfile("folds/assign_folds.log"),
    benchmark:
        benchfile("folds/assign_folds.tsv")
    localrule: True
    conda:
        "../../envs/leukflow.yaml"
    params:
        k=config["folds"]["k"],
        seed=config["folds"]["seed"],
        protocol=PLAN.protocols,
        holdout_fraction=config["folds"]["holdout_fraction"],
        state=result("cache/folds/labelled_set.json"),
        controls=PLAN.controls,
    script:
        "../scripts/assign_folds.py"

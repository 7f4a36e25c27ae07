# Names and input functions shared by the stage rules (config is validated).

RESULTS = config["results_dir"]
DATASETS = config["datasets"]
DEMO_DATASETS = {n: d for n, d in DATASETS.items() if d["format"] == "demo"}
ENCODERS = config["encoders"]
CLASSIFIERS = config["classifiers"]
FOLDS = list(range(config["folds"]["k"]))


wildcard_constraints:
    dataset="|".join(DATASETS),
    encoder="|".join(ENCODERS),
    fold=r"\d+",


def gpu_resources():
    """Resources that make train and embed jobs ask SLURM for a GPU (none when gpu=0)."""
    cluster = config["cluster"]
    if not cluster["gpu"]:
        return {}
    extra = {"gpu": cluster["gpu"]}
    if cluster["gpu_model"]:
        extra["gpu_model"] = cluster["gpu_model"]
    if cluster["cpus_per_gpu"]:
        extra["cpus_per_gpu"] = cluster["cpus_per_gpu"]
    return extra


def attempt_mem_mb(base_mb):
    """Memory that grows with the attempt, so a job killed for memory gets more."""
    return lambda wildcards, attempt: base_mb * attempt


def result(path):
    return f"{RESULTS}/{path}"


def logfile(path):
    return f"{RESULTS}/logs/{path}"


def benchfile(path):
    return f"{RESULTS}/benchmarks/{path}"


def dataset_roots(wildcards):
    return [d["root"] for d in DATASETS.values()]


def fold_checkpoints(wildcards):
    """fold_<k>.pt per fold, or the one all.pt of an encoder shared by every fold."""
    if ENCODERS[wildcards.encoder]["training"] in ("all_labels", "frozen"):
        return [result(f"train/{wildcards.dataset}/{wildcards.encoder}/all.pt")]
    return expand(
        result("train/{dataset}/{encoder}/fold_{fold}.pt"),
        dataset=wildcards.dataset,
        encoder=wildcards.encoder,
        fold=FOLDS,
    )


def final_outputs():
    return [
        result("manifest.parquet"),
        result("rejects.csv"),
        result("rois.parquet"),
        result("folds.csv"),
        result("metrics.csv"),
        result("metrics_per_class.csv"),
        *expand(result("qa/{dataset}/summary.csv"), dataset=DATASETS),
        *expand(
            result("embeddings/{dataset}/{encoder}.zarr"),
            dataset=DATASETS,
            encoder=ENCODERS,
        ),
        *expand(
            result("plots/{dataset}/{encoder}/{classifier}_{kind}.png"),
            dataset=DATASETS,
            encoder=ENCODERS,
            classifier=CLASSIFIERS,
            kind=PLOT_KINDS,  # defined in evaluate.smk
        ),
    ]

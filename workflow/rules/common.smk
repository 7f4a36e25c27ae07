# Names and input functions shared by the stage rules (config is validated).

import math

from leukflow.datasets import count_images, dataset_files

RESULTS = config["results_dir"]
DATASETS = config["datasets"]
DEMO_DATASETS = {n: d for n, d in DATASETS.items() if d["format"] == "demo"}
ENCODERS = config["encoders"]
CLASSIFIERS = config["classifiers"]
FOLDS = list(range(config["folds"]["k"]))

# The files ingest reads, listed when the DAG is built: a new, removed or edited
# file re-runs ingest (demo folders are drawn by a rule, so the folder stands in).
DATASET_FILES = {
    name: [d["root"]] if d["format"] == "demo" else dataset_files(d)
    for name, d in DATASETS.items()
}
# Segmentation runs in jobs of about segmentation.batch_size images each.
N_BATCHES = {
    name: max(
        1,
        math.ceil(
            (
                d["n_fields"]
                if d["format"] == "demo"
                else count_images(DATASET_FILES[name])
            )
            / config["segmentation"]["batch_size"]
        ),
    )
    for name, d in DATASETS.items()
}


wildcard_constraints:
    dataset="|".join(DATASETS),
    encoder="|".join(ENCODERS),
    fold=r"\d+",
    batch=r"\d+",


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


def dataset_inputs(wildcards):
    return [path for files in DATASET_FILES.values() for path in files]


def segment_batches(name):
    """Input function: file ``name`` of every segmentation batch of a dataset."""
    return lambda wc: [
        result(f"segment/{wc.dataset}/batch_{b}/{name}")
        for b in range(N_BATCHES[wc.dataset])
    ]


def fold_checkpoints(wildcards):
    return expand(
        result("train/{dataset}/{encoder}/fold_{fold}.pt"),
        dataset=wildcards.dataset,
        encoder=wildcards.encoder,
        fold=FOLDS,
    )


def final_outputs():
    return [
        result("manifest.parquet"),
        result("provenance.json"),
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

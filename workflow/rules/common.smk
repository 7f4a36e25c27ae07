# The run plan and the helpers shared by the stage rules (config is validated).
# Which datasets, folds, encoders and heads a run has, and every output path,
# come from leukflow.plan.RunPlan; rule files use PLAN and nothing of each other.

import math

from leukflow.data.datasets import count_images, dataset_files
from leukflow.plan import CNN_SOFTMAX, ENSEMBLE, PLOT_KINDS, RunPlan

PLAN = RunPlan.from_config(config)

# The files ingest reads, listed when the DAG is built: a new, removed or edited
# file re-runs ingest (demo folders are drawn by a rule, so the folder stands in).
DATASET_FILES = {
    name: [d["root"]] if d["format"] == "demo" else dataset_files(d)
    for name, d in PLAN.datasets.items()
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
    for name, d in PLAN.datasets.items()
}


wildcard_constraints:
    dataset="|".join(PLAN.eval_datasets),
    encoder="|".join(PLAN.encoders),
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


result = PLAN.result
logfile = PLAN.logfile
benchfile = PLAN.benchfile


def dataset_inputs(wildcards):
    return [path for files in DATASET_FILES.values() for path in files]


def segment_batches(name):
    """Input function: file ``name`` of every segmentation batch of a dataset."""
    return lambda wc: [
        PLAN.batch_file(name, wc.dataset, b) for b in range(N_BATCHES[wc.dataset])
    ]


# Evaluation parameters shared by every scoring rule.
EVALUATION_PARAMS = dict(
    positive_label=config["positive_label"],
    image_aggregation=config["evaluation"]["image_aggregation"],
    any_positive_threshold=config["evaluation"]["any_positive_threshold"],
    n_boot=config["evaluation"]["n_boot"],
    bootstrap_seed=config["evaluation"]["bootstrap_seed"],
    ci_level=config["evaluation"]["ci_level"],
    conformal=config["evaluation"]["conformal"],
    plot_kinds=list(PLOT_KINDS),
)

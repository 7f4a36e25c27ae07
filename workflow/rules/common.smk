# The run plan and the helpers shared by the stage rules (config is validated).
# Which datasets, folds, encoders and heads a run has, and every output path,
# come from leukflow.plan.RunPlan; rule files use PLAN and nothing of each other.

import math
from pathlib import Path

from leukflow.data.datasets import dataset_files
from leukflow.segment.ledger import members as ledger_members, plan_ledger
from leukflow.plan import CNN_SOFTMAX, ENSEMBLE, PLOT_KINDS, RunPlan

PLAN = RunPlan.from_config(config)

# The files ingest reads, listed when the DAG is built: a new, removed or edited
# file re-runs ingest (demo folders are drawn by a rule, so the folder stands in).
DATASET_FILES = {
    name: [d["root"]] if d["format"] == "demo" else dataset_files(d)
    for name, d in PLAN.datasets.items()
}
# Segmentation runs in jobs of about segmentation.batch_size images each, whose
# members the batch ledger (results_dir/segment/<dataset>/batches.csv) keeps
# from run to run: new images fill the open batch, sealed batches never change
# (leukflow.segment.ledger). A demo folder is drawn by a rule, so its batches
# are its sorted ids cut in order, chosen inside the job from the manifest.
BATCH_SIZE = config["segmentation"]["batch_size"]
LEDGERS = {}
LISTED = {}
for _name, _d in PLAN.datasets.items():
    if _d["format"] != "demo":
        LEDGERS[_name], _listed = plan_ledger(
            _name, _d, BATCH_SIZE, PLAN.ledger(_name), DATASET_FILES[_name]
        )
        LISTED[_name] = _listed.set_index("image_id")
MEMBERS = {name: ledger_members(ledger) for name, ledger in LEDGERS.items()}
N_BATCHES = {
    name: (
        max(1, len(MEMBERS[name]))
        if name in MEMBERS
        else max(1, math.ceil(d["n_fields"] / BATCH_SIZE))
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


def batch_members(wildcards):
    """Image ids of one batch (ledger order); None for a demo dataset (chosen in the job)."""
    members = MEMBERS.get(wildcards.dataset)
    if members is None:
        return None
    batch = int(wildcards.batch)
    return members[batch] if batch < len(members) else []


def batch_files(wildcards):
    """The image and mask files of one batch's members, in ledger order."""
    ids = batch_members(wildcards)
    listed = LISTED[wildcards.dataset]
    listed = listed.loc[ids] if ids else listed[:0]
    return [*listed["path"], *[m for m in listed["mask"] if m]]


def batch_inputs(wildcards):
    """What one segmentation batch reads: its members list (a new or edited member
    re-runs it) and the manifest (ancient: a new image elsewhere re-runs ingest, not
    this batch); a demo dataset's batches follow the manifest."""
    if batch_members(wildcards) is None:
        return {"manifest": result("manifest.parquet")}
    members = PLAN.batch_file("members.txt", wildcards.dataset, wildcards.batch)
    return {"manifest": ancient(result("manifest.parquet")), "members": members}


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


def write_members(paths, members, logfile):
    """List a batch's member files in ``members``, one path per line, and say so in the log."""
    Path(members).write_text("".join(f"{path}\n" for path in paths))
    Path(logfile).write_text(f"{len(paths)} member files listed in {members}\n")

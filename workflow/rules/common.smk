# Names and input functions shared by the stage rules (config is validated).

import math

from leukflow.data.datasets import count_images, dataset_files

RESULTS = config["results_dir"]
DEMO_DATASETS = {n: d for n, d in config["datasets"].items() if d["format"] == "demo"}
# folds.twin: every dataset also runs under the other protocol, as <name>_<protocol>
# (same images; ingest and segmentation read them from the cache).
PROTOCOL = config["folds"]["protocol"]
OTHER_PROTOCOL = {"grouped": "random", "random": "grouped"}[PROTOCOL]
PROTOCOLS = dict.fromkeys(config["datasets"], PROTOCOL)
TWINS = {}
if config["folds"]["twin"]:
    TWINS = {f"{n}_{OTHER_PROTOCOL}": n for n in config["datasets"]}
    taken = set(TWINS) & set(config["datasets"])
    if taken:
        raise ValueError(
            f"folds.twin: dataset names {sorted(taken)} are taken by the twins of "
            f"{sorted(TWINS[t] for t in taken)}; rename them or set folds.twin: false"
        )
    PROTOCOLS.update(dict.fromkeys(TWINS, OTHER_PROTOCOL))
DATASETS = {
    **config["datasets"],
    **{t: config["datasets"][n] for t, n in TWINS.items()},
}
# evaluation.shortcut_controls: each dataset's ROI crops with the background black
# (<name>_cell_only) and with the cell black (<name>_background_only) go through the
# same encoders and classifiers; control_crops makes their crops from the dataset's.
SINGLE_CELL_FORMATS = ("allidb2", "cnmc", "zheng")
_CONTROLS_ON = config["evaluation"]["shortcut_controls"]
CONTROLS = {
    f"{name}_{kind}": (name, kind)
    for name, d in config["datasets"].items()
    if _CONTROLS_ON is True
    or (_CONTROLS_ON == "auto" and d["format"] in SINGLE_CELL_FORMATS)
    for kind in ("cell_only", "background_only")
}
if set(CONTROLS) & set(DATASETS):
    raise ValueError(
        f"evaluation.shortcut_controls: dataset names {sorted(set(CONTROLS) & set(DATASETS))} "
        "are taken by shortcut controls; rename them or set shortcut_controls: false"
    )
# every dataset that encoders and classifiers run on
EVAL_DATASETS = [*DATASETS, *CONTROLS]
ENCODERS = config["encoders"]
CLASSIFIERS = config["classifiers"]
# a holdout split (folds.holdout_fraction > 0) has one test fold
FOLDS = (
    [0] if config["folds"]["holdout_fraction"] else list(range(config["folds"]["k"]))
)

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
    dataset="|".join(EVAL_DATASETS),
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
    """fold_<k>.pt per fold, or the one all.pt of an encoder shared by every fold."""
    if ENCODERS[wildcards.encoder]["training"] in ("all_labels", "frozen"):
        return [result(f"train/{wildcards.dataset}/{wildcards.encoder}/all.pt")]
    return expand(
        result("train/{dataset}/{encoder}/fold_{fold}.pt"),
        dataset=wildcards.dataset,
        encoder=wildcards.encoder,
        fold=FOLDS,
    )


# Evaluations (names in evaluate.smk): fitted classifiers, encoder heads, ensembles.


def check_ensemble_member(ensemble, member):
    encoder, classifier = member.split("/")
    if encoder not in ENCODERS:
        raise ValueError(
            f"evaluation.ensembles.{ensemble}: member {member!r} names encoder "
            f"{encoder!r}; expected one of {sorted(ENCODERS)}"
        )
    if classifier == CNN_SOFTMAX and encoder not in SOFTMAX_ENCODERS:
        raise ValueError(
            f"evaluation.ensembles.{ensemble}: member {member!r} needs classifiers.cnn_softmax "
            f"and an encoder with a trained head (not frozen, not hog)"
        )
    if classifier != CNN_SOFTMAX and classifier not in FITTED:
        raise ValueError(
            f"evaluation.ensembles.{ensemble}: member {member!r} names classifier "
            f"{classifier!r}; expected one of {sorted([*FITTED, CNN_SOFTMAX])} (listed "
            f"under classifiers)"
        )


def check_cross_pair(index, train, test):
    """evaluation.cross_dataset[index]: two different datasets of this config."""
    for side, name in (("train", train), ("test", test)):
        if name not in DATASETS:
            raise ValueError(
                f"evaluation.cross_dataset[{index}].{side}: unknown dataset {name!r}; "
                f"expected one of {sorted(DATASETS)}"
            )
    if train == test:
        raise ValueError(
            f"evaluation.cross_dataset[{index}]: train and test are both {train!r}; "
            f"within-dataset figures are in metrics.csv"
        )


# Cross-dataset runs (cross.smk, CROSS_PAIRS).


def cross_checkpoint(wildcards):
    """The train dataset's encoder trained on every labelled ROI."""
    shared = ENCODERS[wildcards.encoder]["training"] in ("all_labels", "frozen")
    part = "all" if shared else "whole"
    return [result(f"train/{wildcards.train}/{wildcards.encoder}/{part}.pt")]


def cross_store(dataset):
    """Embeddings of ``dataset`` by the encoder trained on the pair's train dataset."""
    return result(f"cross/embeddings/{{train}}/{{encoder}}/{dataset}.zarr")


def cross_outputs():
    if not CROSS_PAIRS:
        return []
    return [result("cross_dataset.csv"), result("cross_dataset.png")]


def member_predictions(member):
    """ROI predictions file of an ensemble member ``<encoder>/<classifier>``."""
    encoder, classifier = member.split("/")
    sub = f"{encoder}/{CNN_SOFTMAX}" if classifier == CNN_SOFTMAX else encoder
    return result(f"evaluate/{{dataset}}/{sub}/roi_predictions.parquet")


def evaluations(name):
    """File ``name`` of every evaluation: fitted classifiers, heads, ensembles."""
    paths = expand(result(f"evaluate/{{dataset}}/{{encoder}}/{name}"), dataset=EVAL_DATASETS,
                   encoder=ENCODERS if FITTED else [])  # fmt: skip
    paths += expand(result(f"evaluate/{{dataset}}/{{encoder}}/{CNN_SOFTMAX}/{name}"),
                    dataset=EVAL_DATASETS, encoder=SOFTMAX_ENCODERS)  # fmt: skip
    paths += expand(result(f"evaluate/{{dataset}}/ensemble/{{ensemble}}/{name}"),
                    dataset=EVAL_DATASETS, ensemble=ENSEMBLES)  # fmt: skip
    return paths


def evaluation_plots():
    plots = expand(
        result("plots/{dataset}/{encoder}/{classifier}_{kind}.png"),
        dataset=EVAL_DATASETS,
        encoder=ENCODERS,
        classifier=FITTED,
        kind=PLOT_KINDS,
    )
    plots += expand(
        result(f"plots/{{dataset}}/{{encoder}}/{CNN_SOFTMAX}_{{kind}}.png"),
        dataset=EVAL_DATASETS,
        encoder=SOFTMAX_ENCODERS,
        kind=PLOT_KINDS,
    )
    plots += expand(result("plots/{dataset}/ensemble/{ensemble}_{kind}.png"),
                    dataset=EVAL_DATASETS, ensemble=ENSEMBLES, kind=PLOT_KINDS)  # fmt: skip
    return plots


def final_outputs():
    return [
        result("manifest.parquet"),
        result("provenance.json"),
        result("rejects.csv"),
        result("rois.parquet"),
        result("folds.csv"),
        result("metrics.csv"),
        result("metrics_per_class.csv"),
        result("comparison.csv"),
        result("comparison.png"),
        *expand(result("qa/{dataset}/summary.csv"), dataset=DATASETS),
        *expand(
            result("embeddings/{dataset}/{encoder}.zarr"),
            dataset=EVAL_DATASETS,
            encoder=ENCODERS,
        ),
        *evaluation_plots(),  # defined in evaluate.smk
        *cross_outputs(),  # cross.smk: only with evaluation.cross_dataset pairs
    ]

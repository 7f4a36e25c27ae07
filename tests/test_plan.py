"""The run plan (leukflow.plan): datasets, folds, heads and paths from a config, no Snakemake."""

import copy
from pathlib import Path

import pytest
import yaml

from leukflow.core.config import validate_config
from leukflow.plan import CNN_SOFTMAX, ENSEMBLE, PLOT_KINDS, RunPlan

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "results_dir": "out",
    "datasets": {
        "demo": {"format": "demo", "root": "demo"},
        "cells": {"format": "cnmc", "root": "cnmc"},
    },
    "folds": {"k": 3},
    "encoders": {
        "net": {"arch": "small_cnn", "training": "per_fold"},
        "pub": {"arch": "resnet18", "training": "all_labels"},
        "frozen": {"arch": "resnet18", "training": "frozen"},
        "hog": {"arch": "hog", "training": "frozen"},
    },
    "classifiers": {"knn": {}, "cnn_softmax": {}},
}


VALID = validate_config(copy.deepcopy(BASE), check_paths=False)  # once: it takes ~1 s


def plan_of(**changes) -> RunPlan:
    """The plan of BASE with sections changed: folds, evaluation merged; the others replaced."""
    config = copy.deepcopy(VALID)
    for section, value in changes.items():
        merge = section in ("folds", "evaluation")
        config[section] = {**config[section], **value} if merge else value
    return RunPlan.from_config(config)


def test_demo_config_plans_one_dataset_five_folds_and_every_default_model():
    config = validate_config(yaml.safe_load((REPO / "config/config.yaml").read_text()),
                             check_paths=False)  # fmt: skip
    plan = RunPlan.from_config(config)
    assert plan.eval_datasets == ["demo"]
    assert plan.folds == (0, 1, 2, 3, 4)
    assert (plan.twins, plan.controls, plan.cross_pairs) == ({}, {}, ())
    assert list(plan.fitted) == ["random_forest", "knn", "svm_rbf"]
    assert plan.softmax_encoders == []  # no cnn_softmax configured
    assert plan.evaluations("metrics.csv") == ["results/evaluate/demo/resnet18/metrics.csv"]
    assert len(plan.evaluation_plots()) == 3 * len(PLOT_KINDS)
    assert plan.demo_datasets == {"demo": config["datasets"]["demo"]}
    assert plan.qa_methods == ("multiotsu",)


def test_twins_take_the_other_protocol_and_controls_the_single_cell_formats():
    plan = plan_of(folds={"twin": True})
    assert plan.twins == {"demo_random": "demo", "cells_random": "cells"}
    assert plan.protocols == {"demo": "grouped", "cells": "grouped",
                              "demo_random": "random", "cells_random": "random"}  # fmt: skip
    assert plan.datasets["cells_random"] == plan.datasets["cells"]
    assert plan.configured == ["demo", "cells"]
    # auto: only the single-cell cnmc dataset, and never a twin
    assert plan.controls == {"cells_cell_only": ("cells", "cell_only"),
                             "cells_background_only": ("cells", "background_only")}  # fmt: skip
    assert plan.eval_datasets[-2:] == ["cells_cell_only", "cells_background_only"]
    assert plan.control_base("cells_cell_only") == "cells"
    every = plan_of(evaluation={"shortcut_controls": True}).controls
    assert sorted(every) == ["cells_background_only", "cells_cell_only",
                             "demo_background_only", "demo_cell_only"]  # fmt: skip
    assert plan_of(evaluation={"shortcut_controls": False}).controls == {}
    random = plan_of(folds={"k": 3, "protocol": "random", "twin": True})
    assert random.protocols["demo_grouped"] == "grouped"


def test_names_taken_by_twins_or_controls_are_refused():
    taken = {
        "demo": {"format": "demo", "root": "a"},
        "demo_random": {"format": "demo", "root": "b"},
    }
    with pytest.raises(ValueError, match=r"folds.twin: dataset names \['demo_random'\]"):
        plan_of(datasets=taken, folds={"twin": True})
    taken = {"c": {"format": "cnmc", "root": "a"}, "c_cell_only": {"format": "demo", "root": "b"}}
    with pytest.raises(ValueError, match=r"shortcut_controls: dataset names \['c_cell_only'\]"):
        plan_of(datasets=taken)


def test_holdout_has_fold_zero_only():
    plan = plan_of(folds={"k": 5, "holdout_fraction": 0.2})
    assert plan.folds == (0,)
    assert plan.checkpoints("demo", "net") == ["out/train/demo/net/fold_0.pt"]
    assert plan_of().checkpoints("demo", "net") == [
        f"out/train/demo/net/fold_{k}.pt" for k in range(3)
    ]
    # trained once or not at all: one all.pt serves every fold
    assert plan.checkpoints("demo", "pub") == ["out/train/demo/pub/all.pt"]
    assert plan.cross_checkpoint("demo", "net") == "out/train/demo/net/whole.pt"
    assert plan.cross_checkpoint("demo", "hog") == "out/train/demo/hog/all.pt"


def test_heads_exclude_frozen_and_hog_and_need_cnn_softmax():
    plan = plan_of()
    assert plan.heads == ["net", "pub"]
    assert plan.softmax_encoders == ["net", "pub"]
    assert plan.classifiers_for("net") == ["knn", CNN_SOFTMAX]
    assert plan.classifiers_for("hog") == ["knn"]
    assert plan_of(classifiers={"knn": {}}).softmax_encoders == []
    names = plan.evaluations("metrics.csv")
    assert "out/evaluate/demo/net/cnn_softmax/metrics.csv" in names
    assert "out/evaluate/demo/hog/cnn_softmax/metrics.csv" not in names
    assert "out/evaluate/cells_cell_only/hog/metrics.csv" in names
    # 4 datasets (2 controls) x (4 encoders fitted + 2 heads)
    assert len(names) == 4 * 6


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (["nope/knn", "net/knn"], r"member 'nope/knn' names encoder 'nope'"),
        (
            ["hog/cnn_softmax", "net/knn"],
            r"member 'hog/cnn_softmax' needs classifiers.cnn_softmax",
        ),
        (["net/svm_rbf", "net/knn"], r"member 'net/svm_rbf' names classifier 'svm_rbf'"),
    ],
)
def test_ensemble_members_must_be_models_of_the_run(members, message):
    with pytest.raises(ValueError, match=message):
        plan_of(evaluation={"ensembles": {"e": {"members": members, "vote": "soft"}}})


def test_cross_pairs_name_two_datasets_and_need_a_fitted_classifier():
    pair = [{"train": "demo", "test": "cells_random"}]
    plan = plan_of(folds={"twin": True}, evaluation={"cross_dataset": pair})
    assert plan.cross_pairs == (("demo", "cells_random"),)
    assert plan.final_outputs()[-2:] == ["out/cross_dataset.csv", "out/cross_dataset.png"]
    assert "out/cross_dataset.csv" not in plan_of().final_outputs()
    for bad, message in (
        ([{"train": "demo", "test": "x"}], r"cross_dataset\[0\].test: unknown dataset 'x'"),
        ([{"train": "demo", "test": "demo"}], r"train and test are both 'demo'"),
    ):
        with pytest.raises(ValueError, match=message):
            plan_of(evaluation={"cross_dataset": bad})
    with pytest.raises(ValueError, match="needs a fitted classifier"):
        plan_of(classifiers={"cnn_softmax": {}},
                evaluation={"cross_dataset": [{"train": "demo", "test": "cells"}]})  # fmt: skip


def test_path_methods_give_patterns_and_files():
    plan = plan_of()
    assert plan.embeddings() == "out/embeddings/{dataset}/{encoder}.zarr"
    assert plan.model(classifier="knn", fold=2) == (
        "out/evaluate/{dataset}/{encoder}/models/knn_fold_2.skops"
    )
    assert plan.plot("roc", "demo", ENSEMBLE, "vote") == "out/plots/demo/ensemble/vote_roc.png"
    assert plan.plot() == "out/plots/{dataset}/{encoder}/{classifier}_{kind}.png"
    assert plan.member_predictions("net/cnn_softmax", "demo") == (
        "out/evaluate/demo/net/cnn_softmax/roi_predictions.parquet"
    )
    assert (
        plan.member_predictions("net/knn") == "out/evaluate/{dataset}/net/roi_predictions.parquet"
    )
    assert plan.cross_ids("b", "a", "net") == "out/cross/embeddings/a/net/b_rois.parquet"
    assert plan.ledger("demo") == "out/segment/demo/batches.csv"
    assert plan.batch_file("members.txt", "demo", 3) == "out/segment/demo/batch_3/members.txt"
    moved = RunPlan.from_config(VALID, results_dir="/elsewhere")
    assert moved.embeddings("demo", "net") == "/elsewhere/embeddings/demo/net.zarr"


def test_model_files_per_fold_shared_head_and_ensemble():
    ensembles = {"vote": {"members": ["hog/knn", "net/cnn_softmax"], "vote": "majority"}}
    plan = plan_of(evaluation={"ensembles": ensembles})
    files = plan.model_files("demo", "net", "knn")
    assert [(f.fold, f.part) for f in files] == [(0, "fold_0"), (1, "fold_1"), (2, "fold_2")]
    assert files[1].checkpoint == "out/train/demo/net/fold_1.pt"
    assert files[1].classifier == "out/evaluate/demo/net/models/knn_fold_1.skops"
    assert files[1].store == "out/embeddings/demo/net.zarr"
    shared = plan.model_files("demo", "frozen", "knn")
    assert {f.checkpoint for f in shared} == {"out/train/demo/frozen/all.pt"}
    assert [f.classifier for f in plan.model_files("demo", "pub", CNN_SOFTMAX)] == [None] * 3
    votes = plan.model_files("demo", ENSEMBLE, "vote")
    assert [(f.member, f.fold) for f in votes] == [
        ("hog/knn", 0), ("hog/knn", 1), ("hog/knn", 2),
        ("net/cnn_softmax", 0), ("net/cnn_softmax", 1), ("net/cnn_softmax", 2),
    ]  # fmt: skip
    holdout = plan_of(folds={"holdout_fraction": 0.2})
    assert [f.fold for f in holdout.model_files("cells", "net", "knn")] == [0]
    for args, message in (
        (("nope", "net", "knn"), "no dataset 'nope'"),
        (("demo", "nope", "knn"), "no encoder 'nope'"),
        (("demo", "hog", CNN_SOFTMAX), "classifier 'cnn_softmax' does not score encoder 'hog'"),
        (("demo", ENSEMBLE, "nope"), "no ensemble 'nope'"),
    ):
        with pytest.raises(ValueError, match=message):
            plan.model_files(*args)


def test_plot_kinds_agree_with_the_plotters():
    from leukflow.evaluate.plots import PLOTTERS

    assert set(PLOT_KINDS) == set(PLOTTERS)

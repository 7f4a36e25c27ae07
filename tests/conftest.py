"""Shared fixtures: repository paths, the real data beside the checkout, one e2e run."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leukflow.data.demo import draw_demo_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real datasets in ../shared/data; skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


def run_workflow(work: Path) -> tuple[Path, Path]:
    """Run the workflow on ``work/my.yaml`` to the end; the folder and its ``out``."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--cores", "2", "--configfile", "my.yaml"]
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work, work / "out"


@pytest.fixture
def one_thread():
    """Tiny tensors: OpenMP threads cost more than they give on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory):
    """A real run on 12 demo fields plus one corrupt file, small and fast settings.

    Session-scoped: the workflow, predict, serve and report tests share this one run.
    """
    work = tmp_path_factory.mktemp("e2e")
    demo = work / "demo"
    draw_demo_dataset(demo, n_fields=12, seed=3, fields_per_patient=2)
    whole = (demo / "images" / "field_000.png").read_bytes()
    (demo / "images" / "field_999.png").write_bytes(whole[: len(whole) // 2])  # truncated
    with open(demo / "labels.csv", "a") as f:
        f.write("images/field_999.png,ALL,P05\n")
    config = {
        "results_dir": "out",
        "datasets": {"demo": {"format": "demo", "root": "demo"}},
        "segmentation": {"roi_size_px": 32},
        "folds": {"k": 3},
        "encoders": {"resnet18": {"epochs": 2, "batch_size": 16}},
        "classifiers": {"random_forest": {"n_estimators": 50}, "knn": {"n_neighbors": 3}},
        "evaluation": {"reliance_test": True},  # the reliance_* rows of metrics.csv
    }
    (work / "my.yaml").write_text(yaml.safe_dump(config))
    return run_workflow(work)


#: The models of ``kinds_run``: every kind that predict and serve must load.
KINDS_CONFIG = {
    "results_dir": "out",
    "datasets": {
        "demo": {
            "format": "demo",
            "root": "demo",
            "n_fields": 12,
            "seed": 5,
            "fields_per_patient": 2,
        }
    },
    "segmentation": {"roi_size_px": 32},
    "folds": {"holdout_fraction": 0.34},
    "encoders": {
        # colour robustness options: predict must apply the stain target it recorded
        "small": {
            "arch": "small_cnn",
            "epochs": 1,
            "batch_size": 16,
            "norm": "group",
            "stain_normalisation": "reinhard",
            "hed_jitter_scale": 0.05,
        },
        "shared": {"arch": "small_cnn", "training": "all_labels", "epochs": 1, "batch_size": 16},
        "frozen": {"arch": "small_cnn", "training": "frozen"},
        "hog": {"arch": "hog", "training": "frozen"},
        # S4's YOLOv8 classifier, its smallest size, with S4's recipe
        "yolo": {"arch": "yolov8n_cls", "training": "s4", "epochs": 1, "batch_size": 16},
    },
    "classifiers": {"knn": {"n_neighbors": 3}, "cnn_softmax": {}},
    "evaluation": {
        "n_boot": 50,
        "ensembles": {
            "soft2": {"members": ["small/knn", "shared/cnn_softmax"], "vote": "soft"},
            "maj3": {
                "members": ["hog/knn", "small/cnn_softmax", "frozen/knn"],
                "vote": "majority",
            },
        },
    },
}


@pytest.fixture(scope="session")
def kinds_run(tmp_path_factory):
    """A holdout run on 12 demo fields with every kind of model predict must deploy.

    Per-fold, all_labels, frozen, HOG and YOLOv8 (S4's recipe) encoders, fitted
    knn and the cnn_softmax heads, a soft and a majority ensemble: one tiny
    Snakemake run, shared by the predict and serve tests of each kind.
    """
    work = tmp_path_factory.mktemp("kinds")
    (work / "my.yaml").write_text(yaml.safe_dump(KINDS_CONFIG))
    return run_workflow(work)

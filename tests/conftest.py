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
    }
    (work / "my.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--cores", "2", "--configfile", "my.yaml"]
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return work, work / "out"

"""The workflow through a real SLURM (started by `.ci/slurm.sh start`, as `.ci/run` does).

Skipped with a reason when no SLURM node answers on this machine.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from leukflow.data.io import open_embeddings

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
# The CI cluster has no accounting and no accounts, and one node of 2 CPUs. Its
# jobs take seconds: the first status check after a submission comes after 1 s,
# not the plugin's default 40 s, which would idle the run between stages.
CI_FLAGS = ["--slurm-no-account", "--slurm-status-command", "squeue", "--max-threads", "2",
            "--slurm-init-seconds-before-status-checks", "1"]  # fmt: skip


def slurm_is_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    run = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return run.returncode == 0 and bool(re.search(r"idle|mixed|allocated", run.stdout))


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not slurm_is_up(), reason="no SLURM node answers (.ci/slurm.sh start)"),
]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def runs(e2e_run, tmp_path_factory):
    """The session's local e2e run, and the same config and images run through SLURM."""
    e2e_work, local = e2e_run
    work = tmp_path_factory.mktemp("slurm")
    shutil.copytree(e2e_work / "demo", work / "demo")
    config = yaml.safe_load((e2e_work / "my.yaml").read_text())
    (work / "slurm.yaml").write_text(yaml.safe_dump({**config, "results_dir": "slurm"}))
    cluster = snakemake(
        work, "--profile", str(PROFILE), *CI_FLAGS, "--configfile", "slurm.yaml",
        "--slurm-keep-successful-logs",
    )  # fmt: skip
    assert cluster.returncode == 0, cluster.stderr[-5000:]
    return work, local, cluster.stdout + cluster.stderr


def test_jobs_went_through_sbatch(runs):
    work, _, log = runs
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
    # every rule but the local ones (demo drawing, gathering, folds, summary, all)
    assert len(job_ids) >= 1 + 1 + 3 + 1 + 1  # ingest, segment, 3 x train, embed, fit
    slurm_logs = {p.stem: p for p in (work / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(slurm_logs) >= set(job_ids)
    # each sbatch job ran the rule's Snakemake job step on the cluster node
    assert all("Finished jobid" in slurm_logs[i].read_text() for i in job_ids)


def test_slurm_results_equal_a_local_run(runs):
    work, local, _ = runs
    cluster = work / "slurm"
    for table in ("manifest.parquet", "rois.parquet"):
        a = pd.read_parquet(local / table).drop(columns=["root"], errors="ignore")
        b = pd.read_parquet(cluster / table).drop(columns=["root"], errors="ignore")
        pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(
        pd.read_csv(local / "folds.csv"), pd.read_csv(cluster / "folds.csv")
    )
    a = open_embeddings(local / "embeddings" / "demo" / "resnet18.zarr")
    b = open_embeddings(cluster / "embeddings" / "demo" / "resnet18.zarr")
    assert sorted(a) == sorted(b)
    for fold in a:  # same code, same threads, same seeds: bitwise equal on CPU
        np.testing.assert_array_equal(a[fold][:], b[fold][:])
    pd.testing.assert_frame_equal(
        pd.read_csv(local / "metrics.csv"), pd.read_csv(cluster / "metrics.csv")
    )


def test_gpu_request_reaches_the_sbatch_command_line(e2e_run, tmp_path):
    # This cluster has no GPU, so the submission is refused; what matters is
    # that the sbatch call that training jobs generate asks for the GPU, and
    # only theirs. The local run's results (same config) stand in for the
    # upstream jobs: the segmentation's merge is redone as a CPU job on the
    # cluster, then the training jobs are submitted.
    e2e_work, local = e2e_run
    shutil.copytree(e2e_work / "demo", tmp_path / "demo")
    shutil.copytree(local, tmp_path / "gpu")
    config = yaml.safe_load((e2e_work / "my.yaml").read_text())
    config = {**config, "results_dir": "gpu", "cluster": {"gpu": 1, "gpu_model": "a100"}}
    (tmp_path / "gpu.yaml").write_text(yaml.safe_dump(config))
    run = snakemake(
        tmp_path, "--profile", str(PROFILE), *CI_FLAGS, "--configfile", "gpu.yaml",
        "--until", "train_encoder", "--forcerun", "merge_segments", "--verbose", "--retries", "0",
    )  # fmt: skip
    calls = re.findall(r"sbatch call: (.*)", run.stdout + run.stderr)
    train = [c for c in calls if "rule_train_encoder" in c or "train_encoder" in c]
    assert train, calls
    assert all("--gpus=a100:1" in c for c in train)
    others = [c for c in calls if c not in train]
    assert others  # the segmentation's merge ran as a CPU job
    assert any("merge_segments" in c for c in others), others
    assert not any("--gpus" in c for c in others)

"""Kill a workflow run at random moments, resume it, compare with a clean run.

Used by tests/test_crash_safety.py (a few kills) and benchmarks/killtest.py
(N >= 10). A run is the real Snakefile on a small demo dataset; a kill is
SIGKILL to the run's whole process group (Snakemake, its script processes and
their dask workers), as a node failure or ``scancel --signal=KILL`` would do.
Each resume is ``snakemake --unlock`` then ``snakemake --rerun-incomplete``,
what a user types after a crash.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]

#: A small, fast configuration: every stage runs, all on CPU.
CONFIG = {
    "results_dir": "out",
    "datasets": {"demo": {"format": "demo", "root": "demo", "n_fields": 8,
                          "fields_per_patient": 2, "seed": 3}},
    "segmentation": {"roi_size_px": 32, "batch_size": 4},
    "folds": {"k": 2},
    "encoders": {"resnet18": {"epochs": 2, "batch_size": 16}},
    "classifiers": {"random_forest": {"n_estimators": 50}, "knn": {"n_neighbors": 3}},
}  # fmt: skip


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--cores", "2", *args, "--configfile", "my.yaml"]  # fmt: skip


def prepare(work: Path) -> None:
    """Write the run's config into ``work`` (the demo data is drawn by the workflow)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "my.yaml").write_text(yaml.safe_dump(CONFIG))


def run_to_end(work: Path) -> float:
    """Run (or resume) the workflow to completion; return the wall time in seconds."""
    subprocess.run(_command("--unlock"), cwd=work, capture_output=True, check=True)
    start = time.perf_counter()
    run = subprocess.run(
        _command("--rerun-incomplete"), cwd=work, capture_output=True, text=True, timeout=1800
    )
    if run.returncode != 0:
        raise RuntimeError(f"run in {work} failed:\n{run.stderr[-4000:]}")
    return time.perf_counter() - start


def run_and_kill(work: Path, after_s: float) -> bool:
    """Start (or resume) the run and SIGKILL its process group after ``after_s``.

    Returns whether the kill hit a running workflow (False: it had finished).
    """
    subprocess.run(_command("--unlock"), cwd=work, capture_output=True, check=True)
    proc = subprocess.Popen(
        _command("--rerun-incomplete"), cwd=work, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proc.wait(timeout=after_s)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def kill_and_resume(
    work: Path, kills: int, span_s: float, clean: Path, seed: int = 0
) -> tuple[list[float], list[list[str]]]:
    """Kill runs ``kills`` times at random moments, resuming after each; compare the ends.

    Each (re)start is killed after a uniform random delay in ``[1, span_s]``
    seconds. When a resumed run finishes before its kill, its results are
    compared with ``clean`` (a clean run's result folder) and the next run
    starts over from an empty folder, so that every one of the ``kills`` hits a
    running workflow, early and late stages alike. The last run is resumed to
    the end and compared too.

    Returns
    -------
    hits : list of float
        The delay of each kill.
    diffs : list of list of str
        For each completed run, :func:`compare_runs` against ``clean``.
    """
    prepare(work)
    rng = random.Random(seed)
    hits, diffs = [], []
    while len(hits) < kills:
        delay = rng.uniform(1.0, span_s)
        if run_and_kill(work, delay):
            hits.append(round(delay, 1))
            continue
        diffs.append(compare_runs(clean, work / "out"))
        for name in ("out", "demo", ".snakemake"):
            shutil.rmtree(work / name, ignore_errors=True)
    run_to_end(work)
    diffs.append(compare_runs(clean, work / "out"))
    return hits, diffs


def compare_runs(clean: Path, other: Path) -> list[str]:
    """Differences between two result folders' manifest, ROIs, crops, embeddings, metrics."""
    diffs = []
    tables = ["manifest.parquet", "rois.parquet", "folds.csv", "metrics.csv",
              "metrics_per_class.csv", "provenance.json",
              "evaluate/demo/resnet18/roi_predictions.parquet"]  # fmt: skip
    for name in tables:
        a, b = clean / name, other / name
        if name.endswith(".parquet"):
            equal = pd.read_parquet(a).equals(pd.read_parquet(b))
        else:
            equal = a.read_bytes() == b.read_bytes()
        if not equal:
            diffs.append(name)
    stores = ["segment/demo/crops.zarr", "embeddings/demo/resnet18.zarr"]
    for name in stores:
        with warnings.catch_warnings():  # Snakemake's .snakemake_timestamp in the store
            warnings.simplefilter("ignore")
            a = zarr.open(str(clean / name), mode="r")
            b = zarr.open(str(other / name), mode="r")
        arrays_a = dict(a.arrays()) if isinstance(a, zarr.Group) else {"": a}
        arrays_b = dict(b.arrays()) if isinstance(b, zarr.Group) else {"": b}
        if sorted(arrays_a) != sorted(arrays_b):
            diffs.append(f"{name}: arrays {sorted(arrays_a)} vs {sorted(arrays_b)}")
            continue
        for key in arrays_a:
            if not np.array_equal(arrays_a[key][:], arrays_b[key][:]):
                diffs.append(f"{name}/{key}")
    return diffs

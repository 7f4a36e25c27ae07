"""Kill a workflow run at random moments, resume it, compare with a clean run.

Used by tests/test_crash_safety.py (a few kills) and benchmarks/killtest.py
(N >= 10). A run is the real Snakefile on a small dataset of demo fields, or
an incremental run after fields were added to a finished one (its stores
grow: :func:`kill_incremental`); a kill is
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

from leukflow.data.demo import draw_demo_dataset

REPO = Path(__file__).resolve().parents[1]

#: A small, fast configuration: every stage runs, all on CPU. The images are
#: drawn demo fields filed by class (format folders), so that fields can be added
#: for an incremental run; HOG is a frozen encoder, whose store grows.
CONFIG = {
    "results_dir": "out",
    "datasets": {"demo": {"format": "folders", "root": "demo"}},
    "segmentation": {"roi_size_px": 32, "batch_size": 4},
    "folds": {"k": 2},
    "encoders": {"resnet18": {"epochs": 2, "batch_size": 16},
                 "hog": {"arch": "hog", "training": "frozen"}},
    "classifiers": {"random_forest": {"n_estimators": 50}, "knn": {"n_neighbors": 3}},
}  # fmt: skip
#: Fields drawn for a run, and those of them added by :func:`add_fields`.
N_FIELDS, N_ADDED = 8, 2


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
            "--cores", "2", *args, "--configfile", "my.yaml"]  # fmt: skip


def prepare(work: Path) -> None:
    """Write the run's config and its first :data:`N_FIELDS` fields into ``work``.

    The :data:`N_ADDED` further fields wait in ``work/more`` for :func:`add_fields`.
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "my.yaml").write_text(yaml.safe_dump(CONFIG))
    drawn = work / "drawn"
    draw_demo_dataset(drawn, n_fields=N_FIELDS + N_ADDED, seed=3, fields_per_patient=2)
    labels = pd.read_csv(drawn / "labels.csv")
    for i, row in enumerate(labels.itertuples(index=False)):
        folder = "demo" if i < N_FIELDS else "more"
        target = work / folder / row.label / Path(row.image).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(drawn / row.image, target)
    shutil.rmtree(drawn)


def add_fields(work: Path) -> None:
    """Move the fields waiting in ``work/more`` into the dataset: an incremental run."""
    for path in sorted((work / "more").rglob("*.png")):
        target = work / "demo" / path.relative_to(work / "more")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    shutil.rmtree(work / "more")


def kill_incremental(
    finished: Path, work: Path, kills: int, span_s: float, clean: Path, seed: int = 0
) -> tuple[list[float], list[list[str]]]:
    """Kill incremental runs at random moments, resume each, compare with ``clean``.

    Each try copies ``finished`` (a finished run's folder, fields waiting in
    ``more``; mtimes kept, so its outputs stay up to date) to ``work``, adds
    the fields, starts the run and SIGKILLs it after a uniform random delay in
    ``[1, span_s]`` s, then resumes it to the end and compares its results with
    ``clean`` (an uninterrupted incremental run's result folder).

    Returns
    -------
    hits : list of float
        The delay of each kill that hit a running workflow.
    diffs : list of list of str
        For each resumed run, :func:`compare_runs` against ``clean``.
    """
    rng = random.Random(seed)
    hits, diffs = [], []
    while len(hits) < kills:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(finished, work, symlinks=True)
        add_fields(work)
        delay = rng.uniform(1.0, span_s)
        if not run_and_kill(work, delay):
            continue
        hits.append(round(delay, 1))
        run_to_end(work)
        diffs.append(compare_runs(clean, work / "out"))
    return hits, diffs


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
        for name in ("out", ".snakemake"):
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
    stores = ["segment/demo/crops.zarr", "embeddings/demo/resnet18.zarr",
              "embeddings/demo/hog.zarr"]  # fmt: skip
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

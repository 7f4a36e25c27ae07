"""Incremental re-runs: the cost of adding 5% new images to a finished run.

Generates a `folders` dataset of demo fields resized to ALL-IDB1's 2592x1944
(JPEG; one sub-folder per class), runs
the workflow up to the ROI crops and their embeddings by a frozen encoder (HOG;
ingest, segmentation batches, merge, embedding), then adds 5% new fields and
runs again. Prints, in one run: the full run's time,
the time after adding the images, and how many images each run segmented (from
the segmentation logs' "segmented N images; M read from the cache"); then
checks that a third `snakemake -n` plans no job.

    .venv/bin/python benchmarks/incremental.py [--n 400] [--size 2592x1944] [--cores 2]

Targets: the re-run takes <= 10% of the full run, and re-segments 0 old images.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from leukflow.data.demo import draw_demo_dataset

REPO = Path(__file__).resolve().parents[1]


def add_fields(smears: Path, n: int, seed: int, scratch: Path, size: tuple[int, int]) -> None:
    """Draw ``n`` demo fields, resize them to ``size`` and file them under ``smears/<label>/``."""
    drawn = scratch / f"drawn_{seed}"
    draw_demo_dataset(drawn, n_fields=n, seed=seed, fields_per_patient=1)
    labels = pd.read_csv(drawn / "labels.csv")
    for row in labels.itertuples(index=False):
        target = smears / row.label / f"s{seed}_{Path(row.image).stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(drawn / row.image) as im:
            im.resize(size, Image.Resampling.BICUBIC).save(target, quality=92)
    shutil.rmtree(drawn)


def snakemake(work: Path, cores: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--cores", str(cores), *args, "--configfile", "my.yaml"]  # fmt: skip
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=True)


def segmented(out: Path) -> tuple[int, int, str]:
    """Images segmented and read from the cache (batch logs); the embed log's count."""
    new = cached = 0
    pattern = r"segmented (\d+) images; (\d+) read from the cache"
    for log in (out / "logs" / "segment").rglob("batch_*.log"):
        for m in re.finditer(pattern, log.read_text()):
            new, cached = new + int(m[1]), cached + int(m[2])
    embed_log = out / "logs" / "embed" / "smears" / "hog.log"
    embed = re.findall(r"frozen encoder: (.*)", embed_log.read_text())
    return new, cached, embed[-1] if embed else "?"


def timed(work: Path, cores: int, targets: list[str]) -> tuple[float, float]:
    """Run to ``targets``: the wall time, and the segment and embed jobs' time in all.

    The second figure sums the Snakemake benchmark files of the segmentation
    rules (``segment_batch`` jobs, ``merge_segments``) and of ``embed_rois``:
    the time of the work itself, without Snakemake's start-up of each job.
    """
    start = time.perf_counter()
    snakemake(work, cores, *targets)
    wall = time.perf_counter() - start
    bench = work / "out" / "benchmarks"
    tsvs = [*(bench / "segment").rglob("*.tsv"), *(bench / "embed").rglob("*.tsv")]
    times = {str(t.relative_to(bench)): float(pd.read_csv(t, sep="\t")["s"].iloc[0]) for t in tsvs}
    print("  jobs (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items())))
    return wall, sum(times.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images in the first run (400)")
    parser.add_argument("--size", default="2592x1944",
                        help="field size, WxH (default 2592x1944, ALL-IDB1's)")  # fmt: skip
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukflow-incr-") as tmp:
        work = Path(tmp)
        smears = work / "smears"
        size = tuple(int(v) for v in args.size.split("x"))
        add_fields(smears, args.n, seed=0, scratch=work, size=size)
        config = {
            "results_dir": "out",
            "datasets": {"smears": {"format": "folders", "root": "smears"}},
            # a frozen encoder: its embeddings depend on the image alone, so are cached
            "encoders": {"hog": {"arch": "hog", "training": "frozen"}},
        }
        (work / "my.yaml").write_text(yaml.safe_dump(config))
        targets = ["out/rois.parquet", "out/embeddings/smears/hog.zarr"]
        full, full_jobs = timed(work, args.cores, targets)
        full_new, _, full_embed = segmented(work / "out")
        n_add = max(1, round(0.05 * args.n))
        add_fields(smears, n_add, seed=1, scratch=work, size=size)
        again, again_jobs = timed(work, args.cores, targets)
        new, cached, embed = segmented(work / "out")
        dry = snakemake(work, args.cores, "-n", *targets)
        idle = "Nothing to be done" in dry.stdout + dry.stderr
    print(f"full run, {args.n} images of {args.size}: segment+embed jobs {full_jobs:.1f} s "
          f"(whole run with ingest and job start-up {full:.1f} s); {full_new} images segmented; "
          f"hog: {full_embed}")  # fmt: skip
    print(f"after adding {n_add} images (5%): segment+embed jobs {again_jobs:.1f} s = "
          f"{100 * again_jobs / full_jobs:.1f}% of the full run's (target <= 10%); "
          f"whole run {again:.1f} s = {100 * again / full:.1f}%")  # fmt: skip
    print(f"  images segmented: {new} (new: {n_add}); old images re-segmented: {new - n_add} "
          f"(target 0); read from the cache: {cached}; hog: {embed}")  # fmt: skip
    print(f"third run, nothing new: snakemake -n plans {'no job' if idle else 'jobs (!)'}")


if __name__ == "__main__":
    main()

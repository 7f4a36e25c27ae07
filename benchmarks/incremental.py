"""Incremental re-runs: the cost of adding 5% new images to a finished run.

Generates a `folders` dataset of fields (JPEG, one sub-folder per class):
a few hundred drawn demo fields resized to ``--size``, and the rest copies of
them made distinct (turned, flipped and shifted by a few pixels), so that
20,000 fields take minutes to make. Runs the workflow up to the ROI crops and
their embeddings by a frozen encoder (HOG; ingest, segmentation batches,
merge, embedding), then adds 5% new fields and runs again. Prints:

- segment+embed: the time of the segmentation and embedding jobs that ran
  (their Snakemake benchmark files), of the re-run as a share of the full run's;
- the whole run's wall time share, Snakemake start-up and ingest included;
- how many ``segment_batch`` jobs each run ran, and how many images they
  segmented or read from the cache;
- bytes written under results_dir by the re-run (files new or written again,
  the per-image cache apart), and those rewritten (files that existed and were
  written again);

then checks that a third ``snakemake -n`` plans no job.

    .venv/bin/python benchmarks/incremental.py [--n 1000] [--size 640x480] [--cores 2]
    .venv/bin/python benchmarks/incremental.py --n 20000   # the scale check, not in CI

Targets (5% added, ``segmentation.batch_size`` 1000): 1,000 -> 1,050 fields:
segment+embed <= 10% of the full run, whole run <= 20%; 20,000 -> 21,000:
<= 7% and <= 10%; 1 or 2 segment_batch jobs; nothing new: no job.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from leukflow.data.demo import draw_demo_dataset

REPO = Path(__file__).resolve().parents[1]
#: Drawn fields that the others are made from.
N_DRAWN = 200
_TURNS = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
          Image.Transpose.ROTATE_180]  # fmt: skip


def drawn_fields(scratch: Path, size: tuple[int, int]) -> list[tuple[Image.Image, str]]:
    """Draw :data:`N_DRAWN` demo fields, resized to ``size``, with their labels."""
    draw_demo_dataset(scratch / "drawn", n_fields=N_DRAWN, seed=0, fields_per_patient=1)
    labels = pd.read_csv(scratch / "drawn" / "labels.csv")
    return [
        (Image.open(scratch / "drawn" / row.image).convert("RGB").resize(size), row.label)
        for row in labels.itertuples(index=False)
    ]


def add_fields(smears: Path, drawn: list, first: int, n: int) -> None:
    """Write fields ``first .. first + n - 1``: drawn field ``i % N``, turned and shifted."""
    for i in range(first, first + n):
        image, label = drawn[i % len(drawn)]
        variant = i // len(drawn)
        turn = _TURNS[variant % len(_TURNS)]
        pixels = np.asarray(image if turn is None else image.transpose(turn))
        shifted = np.roll(pixels, shift=(variant // len(_TURNS), 0), axis=(0, 1))
        target = smears / label / f"f{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shifted).save(target, quality=92)


def snakemake(work: Path, cores: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--cores", str(cores), *args, "--configfile", "my.yaml"]  # fmt: skip
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, check=True)


def stamps(out: Path) -> dict[Path, tuple[int, int, int]]:
    """Every file under ``out`` (the cache apart): (inode, mtime, size)."""
    return {
        p: (st.st_ino, st.st_mtime_ns, st.st_size)
        for p in out.rglob("*")
        if p.is_file() and "cache" not in p.relative_to(out).parts[:1]
        for st in [p.stat()]
    }


def timed(work: Path, cores: int, targets: list[str]) -> dict:
    """Run to ``targets``; what it cost (see the module docstring)."""
    out = work / "out"
    before = stamps(out) if out.exists() else {}
    start = time.time()
    snakemake(work, cores, *targets)
    wall = time.time() - start
    after = stamps(out)
    written = {p: s for p, s in after.items() if before.get(p, (0, 0))[:2] != s[:2]}
    bench = out / "benchmarks"
    tsvs = [t for t in [*(bench / "segment").rglob("*.tsv"), *(bench / "embed").rglob("*.tsv")]
            if t in written]  # fmt: skip
    times = {str(t.relative_to(bench)): float(pd.read_csv(t, sep="\t")["s"].iloc[0]) for t in tsvs}
    logs = [p for p in written if p.name.startswith("batch_") and p.suffix == ".log"]
    new = cached = 0
    pattern = r"segmented (\d+) images; (\d+) read from the cache"
    for log in logs:
        for m in re.finditer(pattern, log.read_text()):
            new, cached = new + int(m[1]), cached + int(m[2])
    return {
        "wall": wall,
        "jobs": sum(times.values()),
        "batches": len(logs),
        "segmented": new,
        "cached": cached,
        "written": sum(s[2] for s in written.values()),
        "rewritten": sum(s[2] for p, s in written.items() if p in before),
        "largest": sorted(
            ((s[2], str(p.relative_to(out))) for p, s in written.items() if p in before),
            reverse=True,
        )[:6],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="fields in the first run (1000)")
    parser.add_argument("--size", default="640x480", help="field size, WxH (640x480)")
    parser.add_argument("--batch-size", type=int, default=1000, help="segmentation.batch_size")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="leukflow-incr-") as tmp:
        work = Path(tmp)
        smears = work / "smears"
        drawn = drawn_fields(work, size)
        add_fields(smears, drawn, 0, args.n)
        config = {
            "results_dir": "out",
            "datasets": {"smears": {"format": "folders", "root": "smears"}},
            "segmentation": {"batch_size": args.batch_size},
            # a frozen encoder: its store grows by the new ROIs
            "encoders": {"hog": {"arch": "hog", "training": "frozen"}},
        }
        (work / "my.yaml").write_text(yaml.safe_dump(config))
        targets = ["out/rois.parquet", "out/embeddings/smears/hog.zarr"]
        full = timed(work, args.cores, targets)
        n_add = max(1, round(0.05 * args.n))
        add_fields(smears, drawn, args.n, n_add)
        again = timed(work, args.cores, targets)
        dry = snakemake(work, args.cores, "-n", *targets)
        idle = "Nothing to be done" in dry.stdout + dry.stderr
    print(
        f"full run, {args.n} fields of {args.size}, batch_size {args.batch_size}: "
        f"segment+embed jobs {full['jobs']:.1f} s, whole run {full['wall']:.1f} s; "
        f"{full['batches']} segment_batch jobs, {full['segmented']} images segmented"
    )
    print(
        f"after adding {n_add} fields (5%): segment+embed jobs {again['jobs']:.1f} s = "
        f"{100 * again['jobs'] / full['jobs']:.1f}% of the full run's; whole run "
        f"{again['wall']:.1f} s = {100 * again['wall'] / full['wall']:.1f}%"
    )
    print(
        f"  segment_batch jobs run: {again['batches']}; images segmented {again['segmented']}, "
        f"read from the cache {again['cached']}"
    )
    print(
        f"  bytes written under results_dir (cache apart): {again['written']:,} "
        f"(full run: {full['written']:,}); of files that existed: {again['rewritten']:,}"
    )
    print("  largest files rewritten: " + ", ".join(f"{p} {n:,}" for n, p in again["largest"]))
    print(f"third run, nothing new: snakemake -n plans {'no job' if idle else 'jobs (!)'}")


if __name__ == "__main__":
    main()

"""How long `snakemake -n` takes to build the DAG of a large run.

Generates a `folders` dataset of N tiny images (two classes), then times a dry
run of the whole workflow on it, and prints the job count: jobs are per
dataset, encoder and fold, never per image.

    .venv/bin/python benchmarks/dag.py --n 20000
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
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="images (default 20000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukflow-dag-") as tmp:
        root = Path(tmp) / "smears"
        pixel = np.zeros((40, 40, 3), np.uint8)
        for i in range(args.n):
            folder = root / ("ALL" if i % 2 else "healthy") / f"{i // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixel[0, 0] = (i % 256, i // 256 % 256, 0)
            Image.fromarray(pixel).save(folder / f"field_{i:06d}.png")
        config = Path(tmp) / "big.yaml"
        config.write_text(
            f"results_dir: {tmp}/results\n"
            f"datasets:\n  big:\n    format: folders\n    root: {root}\n"
        )
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
               "-n", "--cores", "8", "--configfile", str(config)]  # fmt: skip
        start = time.perf_counter()
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=True)
        elapsed = time.perf_counter() - start
        total = re.search(r"^total\s+(\d+)$", run.stdout + run.stderr, re.MULTILINE)
        print(f"snakemake -n over {args.n} images: {elapsed:.1f} s, "
              f"{total.group(1) if total else '?'} jobs planned")  # fmt: skip


if __name__ == "__main__":
    main()

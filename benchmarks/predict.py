"""Throughput and memory of ``leukflow predict`` on generated demo fields.

Draws N demo fields (640x480), runs ``leukflow predict`` on a finished run's
models in a child process, and prints images per second and the child's peak
resident memory, for N and 4 x N fields: bounded memory means the second peak
is about the first.

    .venv/bin/python benchmarks/predict.py RESULTS_DIR [--fields 50] [--classifier knn]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from leukflow.data.demo import draw_demo_dataset

#: The child runs the CLI, then prints its own peak RSS (KiB on Linux).
CHILD = (
    "import resource, sys; from leukflow.cli import main; rc = main(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
)


def run(results_dir: str, images: Path, out: Path, classifier: str | None) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one ``leukflow predict`` in a fresh process."""
    cmd = [sys.executable, "-c", CHILD, "predict", "--model", results_dir,
           "--out", str(out), str(images)]  # fmt: skip
    if classifier:
        cmd += ["--classifier", classifier]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return seconds, int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir")
    parser.add_argument("--fields", type=int, default=50)
    parser.add_argument("--classifier")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.fields, 4 * args.fields):
            root = Path(tmp) / f"fields_{n}"
            draw_demo_dataset(root, n_fields=n, seed=7, fields_per_patient=1)
            seconds, peak = run(args.results_dir, root / "images", root / "preds.csv",
                                args.classifier)  # fmt: skip
            print(f"{n} fields: {seconds:.1f} s, {n / seconds:.2f} images/s "
                  f"(model loading included), peak RSS {peak:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()

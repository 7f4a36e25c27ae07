"""Crash safety: SIGKILL a workflow run at N random moments, resume, compare.

Runs the demo workflow (8 fields, every stage) once cleanly, then again in a
second folder killing its whole process group N times at random moments
(uniform in [1 s, 0.6 x the clean run's time] after each restart), resuming
with `snakemake --unlock` and `--rerun-incomplete` each time, and finally to
the end. Prints the kill moments that hit a running workflow and whether the
manifest, ROI table, crops, folds, embeddings, predictions and metrics equal
the clean run's, bitwise.

    .venv/bin/python benchmarks/killtest.py [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from killrun import compare_runs, kill_and_resume, prepare, run_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="leukflow-kill-") as tmp:
        clean = Path(tmp) / "clean"
        prepare(clean)
        elapsed = run_to_end(clean)
        print(f"clean run: {elapsed:.1f} s")
        start = time.perf_counter()
        hits = kill_and_resume(Path(tmp) / "killed", args.kills, 0.6 * elapsed, args.seed)
        total = time.perf_counter() - start
        diffs = compare_runs(clean / "out", Path(tmp) / "killed" / "out")
    print(f"{args.kills} kills requested, {len(hits)} hit a running workflow, at (s after "
          f"each restart): {hits}")  # fmt: skip
    print(f"killed and resumed run: {total:.1f} s in all")
    print(
        "final results equal the clean run's, bitwise: " + ("yes" if not diffs else f"NO {diffs}")
    )
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()

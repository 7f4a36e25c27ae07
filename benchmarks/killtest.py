"""Crash safety: SIGKILL a workflow run at N random moments, resume, compare.

Runs the demo workflow (8 fields, every stage) once cleanly, then again in a
second folder killing its whole process group N times at random moments
(uniform in [1 s, 0.6 x the clean run's time] after each (re)start), resuming
with `snakemake --unlock` and `--rerun-incomplete` each time; a resumed run
that finishes before its kill is compared and the next starts over, so that
all N kills hit a running workflow. Prints the kill moments and whether the
manifest, ROI table, crops, folds, embeddings, predictions and metrics of
every resumed run equal the clean run's, bitwise.

    .venv/bin/python benchmarks/killtest.py [--kills 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from killrun import kill_and_resume, prepare, run_to_end


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
        hits, diffs = kill_and_resume(
            Path(tmp) / "killed", args.kills, 0.6 * elapsed, clean / "out", args.seed
        )
        total = time.perf_counter() - start
    bad = [d for d in diffs if d]
    print(f"{len(hits)} kills, each hitting a running workflow, at (s after each (re)start): "
          f"{hits}")  # fmt: skip
    print(f"{len(diffs)} runs resumed to the end ({total:.0f} s in all); their results equal "
          "the clean run's, bitwise: " + ("all" if not bad else f"NOT {bad}"))  # fmt: skip
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

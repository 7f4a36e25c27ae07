"""A run killed at random moments resumes to exactly the result of a clean run.

The same holds for an incremental run (fields added to a finished run): a
killed append leaves the old stores readable, and the resumed run ends equal
to an uninterrupted incremental run, bitwise.
"""

import shutil

import pytest
from killrun import add_fields, kill_and_resume, kill_incremental, prepare, run_to_end


@pytest.mark.e2e
def test_killed_run_resumes_to_the_clean_result(tmp_path):
    clean = tmp_path / "clean"
    prepare(clean)
    elapsed = run_to_end(clean)
    finished = tmp_path / "finished"  # the clean run before its fields are added
    shutil.copytree(clean, finished, symlinks=True)
    hits, diffs = kill_and_resume(
        tmp_path / "killed", kills=2, span_s=0.6 * elapsed, clean=clean / "out", seed=1
    )
    assert len(hits) == 2
    assert diffs
    assert all(d == [] for d in diffs)

    # incremental: 2 fields added to the 8 of a finished run
    add_fields(clean)
    elapsed = run_to_end(clean)
    hits, diffs = kill_incremental(
        finished, tmp_path / "grown", kills=1, span_s=0.6 * elapsed, clean=clean / "out", seed=2
    )
    assert len(hits) == 1
    assert diffs == [[]]

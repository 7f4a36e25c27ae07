"""A run killed at random moments resumes to exactly the result of a clean run."""

import pytest
from killrun import kill_and_resume, prepare, run_to_end


@pytest.mark.e2e
def test_killed_run_resumes_to_the_clean_result(tmp_path):
    clean = tmp_path / "clean"
    prepare(clean)
    elapsed = run_to_end(clean)
    hits, diffs = kill_and_resume(
        tmp_path / "killed", kills=2, span_s=0.6 * elapsed, clean=clean / "out", seed=1
    )
    assert len(hits) == 2
    assert diffs
    assert all(d == [] for d in diffs)

"""A run killed at random moments resumes to exactly the result of a clean run."""

import pytest
from killrun import compare_runs, kill_and_resume, prepare, run_to_end


@pytest.mark.e2e
def test_killed_run_resumes_to_the_clean_result(tmp_path):
    clean = tmp_path / "clean"
    prepare(clean)
    elapsed = run_to_end(clean)
    hits = kill_and_resume(tmp_path / "killed", kills=2, span_s=0.6 * elapsed, seed=1)
    assert hits, "no kill hit a running workflow"
    assert compare_runs(clean / "out", tmp_path / "killed" / "out") == []

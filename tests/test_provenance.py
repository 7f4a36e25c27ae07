"""Provenance: the resolved config, versions, commit and manifest hash of a run."""

import json
import subprocess

import pandas as pd
import pytest

import leukflow
from leukflow.core.provenance import (
    build_provenance,
    find_seeds,
    git_commit,
    manifest_digest,
    read_provenance,
    write_provenance,
)


def _manifest(paths, shas):
    return pd.DataFrame(
        {
            "dataset": ["a"] * len(paths),
            "path": paths,
            "sha256": shas,
            "label": ["ALL"] * len(paths),
        }
    )


def test_manifest_digest_follows_content_not_row_order():
    one = manifest_digest(_manifest(["x.png", "y.png"], ["1", "2"]))
    swapped = manifest_digest(_manifest(["y.png", "x.png"], ["2", "1"]))
    edited = manifest_digest(_manifest(["x.png", "y.png"], ["1", "3"]))
    assert one == swapped
    assert one["manifest_sha256"] != edited["manifest_sha256"]
    assert one["images_per_dataset"] == {"a": 2}


def test_find_seeds_walks_nested_keys():
    config = {"folds": {"seed": 3}, "encoders": {"r18": {"seed": 7, "epochs": 2}}, "x": 1}
    assert find_seeds(config) == {"folds.seed": 3, "encoders.r18.seed": 7}


def test_git_commit_marks_a_dirty_tree(tmp_path):
    assert git_commit(tmp_path) == "unknown"

    def run(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    run("init", "-q")
    (tmp_path / "f.txt").write_text("one")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    (tmp_path / "f.txt").write_text("two")
    assert git_commit(tmp_path) == f"{clean}-dirty"


def test_provenance_round_trips_and_is_byte_stable(tmp_path):
    config = {"results_dir": str(tmp_path), "folds": {"seed": 0, "k": 5}}
    prov = build_provenance(config, _manifest(["x.png"], ["1"]), tmp_path)
    assert prov["leukflow_version"] == leukflow.__version__
    assert prov["config"] == config
    assert prov["packages"]["torch"] != "absent"
    write_provenance(prov, tmp_path / "provenance.json")
    first = (tmp_path / "provenance.json").read_bytes()
    write_provenance(
        build_provenance(config, _manifest(["x.png"], ["1"]), tmp_path),
        tmp_path / "provenance.json",
    )
    assert (tmp_path / "provenance.json").read_bytes() == first
    assert read_provenance(tmp_path) == json.loads(first)


def test_read_provenance_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"provenance\.json"):
        read_provenance(tmp_path)

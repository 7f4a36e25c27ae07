"""Incremental re-runs: per-image cache keyed by content, batches, watched inputs."""

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from leukflow.data import cache
from leukflow.data.datasets import count_images, dataset_files
from leukflow.data.demo import draw_demo_dataset
from leukflow.data.io import sha256_file
from leukflow.segment import SegmentParams, batch_of, segment_images, workers_for_memory

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fields(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fields")
    draw_demo_dataset(root, n_fields=6, seed=5, fields_per_patient=1)
    return sorted((root / "images").glob("*.png"))


def _segment(paths, cache_dir, params=None):
    params = params or SegmentParams(roi_size_px=32)
    return segment_images(
        paths, [p.stem for p in paths], params=params,
        image_sha256=[sha256_file(p) for p in paths], cache_dir=cache_dir,
    )  # fmt: skip


def _cache_log(caplog) -> str:
    return [r.message for r in caplog.records if r.message.startswith("segmented")][-1]


def test_cached_segmentation_equals_a_fresh_one(fields, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="leukflow.segment.batch")
    fresh = segment_images(fields, [p.stem for p in fields], params=SegmentParams(roi_size_px=32))
    first = _segment(fields, tmp_path)
    assert _cache_log(caplog) == "segmented 6 images; 0 read from the cache"
    again = _segment(fields, tmp_path)
    assert _cache_log(caplog) == "segmented 0 images; 6 read from the cache"
    for run in (first, again):
        pd.testing.assert_frame_equal(run.rois, fresh.rois)
        pd.testing.assert_frame_equal(run.images, fresh.images)
        np.testing.assert_array_equal(run.crops, fresh.crops)
    assert len(fresh.rois) > 6


def test_cache_misses_on_new_content_new_params_and_corrupt_entries(fields, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="leukflow.segment.batch")
    params = SegmentParams(roi_size_px=32)
    _segment(fields[:4], tmp_path, params)
    _segment(fields, tmp_path, params)  # two new images
    assert _cache_log(caplog) == "segmented 2 images; 4 read from the cache"
    _segment(fields, tmp_path, SegmentParams(roi_size_px=32, min_area_px=300))
    assert _cache_log(caplog) == "segmented 6 images; 0 read from the cache"
    # same name, edited content: a new hash, so a miss
    edited = tmp_path / "edited" / fields[0].name
    edited.parent.mkdir()
    Image.open(fields[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(edited)
    _segment([edited, *fields[1:]], tmp_path, params)
    assert _cache_log(caplog) == "segmented 1 images; 5 read from the cache"
    # a truncated entry (a killed writer on a file system without atomic rename)
    entries = sorted((tmp_path / cache_dir_of(params)).rglob("*.npz"))
    assert len(entries) == 7
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    caplog.clear()
    run = _segment(fields, tmp_path, params)
    assert _cache_log(caplog) == "segmented 1 images; 5 read from the cache"
    assert any("unreadable cache entry" in r.message for r in caplog.records)
    assert len(run.images) == 6


def cache_dir_of(params):
    from leukflow.segment import cache_space

    return cache_space(params)


def test_cache_namespace_depends_on_params_and_code():
    a = cache.namespace("segment", {"x": 1}, cache.SEGMENT_SOURCES)
    assert a == cache.namespace("segment", {"x": 1}, cache.SEGMENT_SOURCES)
    assert a != cache.namespace("segment", {"x": 2}, cache.SEGMENT_SOURCES)
    assert a != cache.namespace("segment", {"x": 1}, ("data/io.py",))
    assert a.startswith("segment/")


def test_batches_are_stable_and_cover_every_batch():
    ids = [f"d/field_{i:05d}" for i in range(2000)]
    batches = batch_of(ids, 8)
    assert set(batches) == set(range(8))
    assert np.bincount(batches).min() > 180  # about 250 each
    # an image keeps its batch whatever else is listed, in any order
    assert batch_of(ids[::-1], 8)[::-1].tolist() == batches.tolist()
    assert batch_of(ids[:10], 8).tolist() == batches[:10].tolist()


def test_workers_fit_the_memory_of_the_job():
    assert workers_for_memory(8, None, 10**6) == 8
    assert workers_for_memory(8, 64000, 10**6) == 8
    assert workers_for_memory(8, 4000, 5_038_848) == 5  # 2592x1944 fields: ~708 MB each
    assert workers_for_memory(8, 500, 5_038_848) == 1  # never fewer than one


def test_dataset_files_watch_nested_files_and_skip_hidden(tmp_path):
    (tmp_path / "ALL" / "p1").mkdir(parents=True)
    (tmp_path / "ALL" / "p1" / "a.png").write_bytes(b"x")
    (tmp_path / "ALL" / ".hidden.png").write_bytes(b"x")
    (tmp_path / ".snakemake").mkdir()
    (tmp_path / ".snakemake" / "b.png").write_bytes(b"x")
    (tmp_path / "labels.csv").write_text("path,label\n")
    files = dataset_files({"format": "folders", "root": str(tmp_path)})
    assert files == [str(tmp_path / "labels.csv"), str(tmp_path / "ALL" / "p1" / "a.png")]
    assert count_images(files) == 1


# ------------------------------------------------------------------ workflow


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--cores", "2", *args, "--configfile", "my.yaml"]  # fmt: skip
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)


def _jobs(run: subprocess.CompletedProcess) -> set[str]:
    text = run.stdout + run.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:")[1].split("total")[0]
    rows = [line.split() for line in table.splitlines()]
    return {row[0] for row in rows if len(row) == 2 and row[1].isdigit()}


def _segment_log(out: Path) -> str:
    logs = sorted((out / "logs" / "segment" / "smears").glob("batch_*.log"))
    lines = [
        line.split(": ", 1)[1] for p in logs for line in p.read_text().splitlines()
        if ": segmented " in line
    ]  # fmt: skip
    new = sum(int(line.split()[1]) for line in lines)
    cached = sum(int(line.split()[3]) for line in lines)
    return f"{new} segmented, {cached} cached"


@pytest.mark.e2e
def test_new_and_edited_images_cost_only_themselves(fields, tmp_path):
    smears = tmp_path / "smears"
    for i, path in enumerate(fields[:4]):
        (smears / ("ALL" if i % 2 else "healthy") / "site_a").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, smears / ("ALL" if i % 2 else "healthy") / "site_a" / path.name)
    config = {"results_dir": "out",
              "datasets": {"smears": {"format": "folders", "root": "smears"}},
              "segmentation": {"roi_size_px": 32, "batch_size": 2}}  # fmt: skip
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    target = "out/rois.parquet"
    assert _snakemake(tmp_path, target).returncode == 0
    out = tmp_path / "out"
    assert _segment_log(out) == "4 segmented, 0 cached"
    assert _jobs(_snakemake(tmp_path, target, "-n")) == set()

    # two new images in a new sub-folder (the dataset root's own mtime is unchanged)
    (smears / "ALL" / "site_b").mkdir()
    for path in fields[4:]:
        shutil.copy(path, smears / "ALL" / "site_b" / path.name)
    assert _jobs(_snakemake(tmp_path, target, "-n")) == {
        "ingest_images", "segment_batch", "merge_segments", "gather_rois"
    }  # fmt: skip
    assert _snakemake(tmp_path, target).returncode == 0
    assert _segment_log(out) == "2 segmented, 4 cached"
    assert len(pd.read_parquet(out / "manifest.parquet")) == 6

    # an edited file under the same name is detected and only it is segmented
    edited = smears / "healthy" / "site_a" / fields[0].name
    Image.open(edited).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(edited)
    assert _snakemake(tmp_path, target).returncode == 0
    assert _segment_log(out) == "1 segmented, 5 cached"
    assert _jobs(_snakemake(tmp_path, target, "-n")) == set()

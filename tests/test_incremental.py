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
import zarr
from PIL import Image

from leukflow.data import cache
from leukflow.data.datasets import count_images, dataset_files
from leukflow.data.demo import draw_demo_dataset
from leukflow.data.ingest import ingest_datasets
from leukflow.data.io import open_embeddings, sha256_file
from leukflow.segment import SegmentParams, batch_images, segment_images, workers_for_memory
from leukflow.segment.ledger import (
    listed_images,
    members,
    plan_ledger,
    read_ledger,
    update_ledger,
    write_ledger,
)

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


def test_ledger_fills_the_open_batch_and_never_touches_sealed_ones():
    ids = [f"d/field_{i:03d}" for i in range(12)]
    first = update_ledger({}, ids[::-1], batch_size=5)  # any listing order: sorted ids cut
    assert members(first) == [ids[0:5], ids[5:10], ids[10:12]]
    # new images fill the open batch (the last) to batch_size, then open a new one
    grown = update_ledger(first, [*ids, "d/a_new", "d/z_new", "d/m_new", "d/n_new"], 5)
    assert members(grown)[:2] == members(first)[:2]  # sealed batches unchanged
    assert members(grown)[2:] == [[*ids[10:12], "d/a_new", "d/m_new", "d/n_new"], ["d/z_new"]]
    assert list(grown)[:12] == list(first)  # old entries keep their order
    # a removed image leaves its batch; the others keep theirs, nothing moves in
    shrunk = update_ledger(grown, [i for i in grown if i != ids[3]], 5)
    assert members(shrunk)[0] == [i for i in ids[0:5] if i != ids[3]]
    assert members(shrunk)[1:] == members(grown)[1:]
    assert update_ledger(shrunk, list(shrunk), 5) == shrunk  # nothing new: the same ledger
    # a larger batch_size later never reopens a sealed batch
    assert members(update_ledger(first, [*ids, "d/b"], 50))[:2] == members(first)[:2]


def test_ledger_file_round_trips_and_names_a_bad_file(tmp_path):
    path = tmp_path / "batches.csv"
    assert read_ledger(path) == {}
    ledger = update_ledger({}, ["d/b", "d/a", "d/c"], 2)
    listed = pd.DataFrame({"image_id": ["d/a", "d/b", "d/c"], "mask": ["", "m/b.png", ""],
                           "path": ["i/a.png", "i/b.png", "i/c.png"]})  # fmt: skip
    write_ledger(ledger, listed, path)
    assert list(read_ledger(path).items()) == list(ledger.items())
    assert path.read_text().splitlines()[:3] == [
        "image_id,batch,path,mask", "d/a,0,i/a.png,", "d/b,0,i/b.png,m/b.png"
    ]  # fmt: skip
    # the plan takes the ledger as it is while the dataset holds the same files
    spec = {"format": "folders", "root": str(tmp_path / "nowhere")}  # never listed
    same = ["i/a.png", "i/b.png", "m/b.png", "i/c.png", "i/labels.csv"]
    assert plan_ledger("d", spec, 2, path, same)[0] == ledger
    with pytest.raises(FileNotFoundError):  # a new image: listed again
        plan_ledger("d", spec, 2, path, [*same, "i/new.png"])
    path.write_text("id,batch\nd/a,0\n")
    with pytest.raises(ValueError, match=r"batches\.csv: expected columns"):
        read_ledger(path)


def test_batch_images_follow_the_members_files(tmp_path):
    manifest = pd.DataFrame({
        "image_id": ["d/c", "d/a", "d/b", "e/a"], "dataset": ["d", "d", "d", "e"],
        "root": [str(tmp_path)] * 4, "path": ["c.png", "a.png", "b.png", "a.png"],
    })  # fmt: skip
    files = [str(tmp_path / "b.png"), str(tmp_path / "gone.png"), str(tmp_path / "c.png")]
    assert batch_images(manifest, "d", 0, 2, files=files)["image_id"].tolist() == ["d/b", "d/c"]
    # without a members list (a demo dataset): the batch_size-th slice of sorted ids
    assert batch_images(manifest, "d", 1, 2)["image_id"].tolist() == ["d/c"]


def test_listed_images_are_the_ids_ingest_gives(tmp_path):
    for rel in ("ALL/p1/a.png", "healthy/b.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40)).save(tmp_path / rel)
    spec = {"format": "folders", "root": str(tmp_path)}
    listed = listed_images("smears", spec)
    manifest, _ = ingest_datasets({"smears": spec}, min_size_px=8)
    assert sorted(listed["image_id"]) == sorted(manifest["image_id"])
    assert set(listed["path"]) == {str(tmp_path / r) for r in manifest["path"]}


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


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (inode, mtime): a file written again changes both."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


def _by_roi(out: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """ROI table, crops and hog embeddings of a run, in roi_id order."""
    rois = pd.read_parquet(out / "segment" / "smears" / "rois.parquet")
    order = np.argsort(rois["roi_id"].to_numpy(), kind="stable")
    crops = zarr.open_array(str(out / "segment" / "smears" / "crops.zarr"), mode="r")[:]
    ids = pd.read_parquet(out / "embeddings" / "smears" / "hog_rois.parquet")
    assert ids["roi_id"].tolist() == rois["roi_id"].tolist()
    emb = open_embeddings(out / "embeddings" / "smears" / "hog.zarr")["all"][:]
    return rois.iloc[order].reset_index(drop=True), crops[order], emb[order]


@pytest.mark.e2e
def test_new_and_edited_images_cost_only_themselves(fields, tmp_path):
    # 24 distinct fields: the drawn ones, turned
    turns = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
             Image.Transpose.ROTATE_180]  # fmt: skip
    pool = [(i, path, turn) for i, (turn, path) in
            enumerate((t, p) for t in turns for p in fields)]  # fmt: skip

    def put(i, path, turn):
        target = tmp_path / "smears" / ("ALL" if i % 2 else "healthy") / f"f{i:02d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(path)
        (image if turn is None else image.transpose(turn)).save(target)
        return target

    files = [put(*p) for p in pool[:20]]
    config = {"results_dir": "out",
              "datasets": {"smears": {"format": "folders", "root": "smears"}},
              "segmentation": {"roi_size_px": 32, "batch_size": 5},
              "encoders": {"hog": {"arch": "hog", "training": "frozen"}}}  # fmt: skip
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    targets = ["out/rois.parquet", "out/embeddings/smears/hog.zarr"]
    assert _snakemake(tmp_path, *targets).returncode == 0
    out = tmp_path / "out"
    assert _segment_log(out) == "20 segmented, 0 cached"
    assert _jobs(_snakemake(tmp_path, *targets, "-n")) == set()
    batches = out / "segment" / "smears"
    sealed = {b: _stamps(batches / f"batch_{b}") for b in range(4)}

    # one new image: it opens batch 4, the only batch job planned; sealed batches
    # are not run, and an edited image re-runs its own batch alone
    put(*pool[20]).rename(tmp_path / "smears" / "ALL" / "a20.png")  # first in sorted order
    shutil.rmtree(out / "logs" / "segment")  # count the next run's batches only
    dry = _snakemake(tmp_path, *targets, "-n")
    assert _jobs(dry) >= {"ingest_images", "batch_members", "segment_batch", "merge_segments"}
    assert (dry.stdout + dry.stderr).count("rule segment_batch:") == 1
    edited = files[1]  # in batch 0 (sorted ids: ALL/f01 first); turned: no other field
    Image.open(edited).transpose(Image.Transpose.TRANSPOSE).save(edited)
    assert _snakemake(tmp_path, *targets).returncode == 0
    assert _segment_log(out) == "2 segmented, 4 cached"  # batch 0's 5 and batch 4's 1
    assert [b for b in range(4) if _stamps(batches / f"batch_{b}") != sealed[b]] == [0]
    ledger = pd.read_csv(batches / "batches.csv")
    assert ledger.groupby("batch").size().tolist() == [5, 5, 5, 5, 1]
    assert _jobs(_snakemake(tmp_path, *targets, "-n")) == set()

    # history does not change results: a from-scratch run (its own batches, the
    # segmentations from the cache) gives the same ROIs, crops and embeddings
    shutil.copytree(out / "cache", tmp_path / "scratch" / "cache")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump({**config, "results_dir": "scratch"}))
    assert _snakemake(tmp_path, *[t.replace("out/", "scratch/") for t in targets]).returncode == 0
    grown, scratch = _by_roi(out), _by_roi(tmp_path / "scratch")
    pd.testing.assert_frame_equal(grown[0], scratch[0])
    for a, b in zip(grown[1:], scratch[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(grown[0]) > 21

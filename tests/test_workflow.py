"""The Snakemake workflow: dry runs, config errors, and one real end-to-end run."""

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from leukflow.data.duplicates import DUPLICATE_COLUMNS
from leukflow.data.io import open_embeddings
from leukflow.segment import match_rois_to_boxes

REPO = Path(__file__).resolve().parents[1]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_dry_run_of_the_demo_config_plans_every_stage(tmp_path):
    run = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config" / "config.yaml"))
    assert run.returncode == 0, run.stderr
    counts = job_counts(run.stdout + run.stderr)
    assert counts == {
        "draw_demo_data_demo": 1, "ingest_images": 1, "segment_batch": 1, "merge_segments": 1,
        "gather_rois": 1, "score_segmentation": 1, "write_provenance": 1,
        "assign_folds": 1, "train_encoder": 5, "embed_rois": 1, "fit_classifiers": 1,
        "summarise_metrics": 1, "compare_to_papers": 1, "all": 1,
    }  # fmt: skip


def test_bad_config_fails_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"segmentation": {"min_area": 10}, "folds": {"k": "x"}}))
    run = snakemake(tmp_path, "--configfile", str(bad))
    assert run.returncode != 0
    err = run.stdout + run.stderr
    assert "segmentation.min_area: unknown key" in err
    assert "folds.k: expected a value of type integer; got 'x'" in err
    assert str(bad) in err
    assert not (tmp_path / "results").exists()


@pytest.mark.e2e
def test_e2e_ingest_keeps_every_file(e2e_run):
    _work, out = e2e_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    rejects = pd.read_csv(out / "rejects.csv")
    assert len(manifest) == 12
    assert rejects[["path", "reason"]].values.tolist() == [["images/field_999.png", "unreadable"]]
    assert manifest["sha256"].str.fullmatch(r"[0-9a-f]{64}").all()
    assert (manifest[["width", "height"]] == [640, 480]).all().all()
    duplicates = pd.read_csv(out / "duplicates.csv")
    assert list(duplicates.columns) == DUPLICATE_COLUMNS
    assert len(duplicates) == 0  # every demo field is drawn anew


@pytest.mark.e2e
def test_e2e_segmentation_finds_the_planted_cells(e2e_run):
    work, out = e2e_run
    rois = pd.read_parquet(out / "rois.parquet")
    cells = pd.read_csv(work / "demo" / "cells.csv")
    hits = falses = 0
    for image, boxes in cells.groupby("image"):
        image_id = "demo/" + image.removesuffix(".png")
        h, f = match_rois_to_boxes(rois[rois["image_id"] == image_id], boxes)
        hits, falses = hits + h, falses + f
    assert hits / len(cells) >= 0.85  # touching cells may merge into one ROI
    assert falses <= 0.1 * len(rois)
    crops = zarr.open_array(str(out / "segment" / "demo" / "crops.zarr"), mode="r")
    assert crops.shape == (len(rois), 32, 32, 3)
    assert crops.dtype == np.uint8


@pytest.mark.e2e
def test_e2e_folds_and_embeddings(e2e_run):
    _, out = e2e_run
    folds = pd.read_csv(out / "folds.csv")
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert not folds["leaky"].any()  # folds.protocol grouped, the default
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    assert (folds["group"] == "demo/" + folds["patient"]).all()
    n_rois = len(pd.read_parquet(out / "rois.parquet"))
    path = out / "embeddings" / "demo" / "resnet18.zarr"
    store = open_embeddings(path)
    assert sorted(store) == ["fold_0", "fold_1", "fold_2"]
    assert store["fold_0"].shape == (n_rois, 512)
    assert store["fold_0"].dtype == np.float32
    assert zarr.open_group(str(path), mode="r").attrs["architecture"] == "resnet18"
    assert re.fullmatch(r"[0-9a-f]{64}", store["fold_1"].attrs["weights_sha256"])
    # each fold's encoder is its own model: the embeddings differ
    assert not np.allclose(store["fold_0"][:], store["fold_1"][:])
    ids = pd.read_parquet(out / "embeddings" / "demo" / "resnet18_rois.parquet")
    assert len(ids) == n_rois


@pytest.mark.e2e
def test_e2e_metrics_are_consistent_with_predictions(e2e_run):
    _, out = e2e_run
    metrics = pd.read_csv(out / "metrics.csv", dtype={"fold": str})
    metrics = metrics[metrics["control"] == "none"]  # the reliance test's rows: their own test
    assert set(metrics["classifier"]) == {"random_forest", "knn"}
    assert set(metrics["level"]) == {"roi", "image"}
    for (_clf, level), part in metrics.groupby(["classifier", "level"]):
        per_fold = part[part["fold"].isin(["0", "1", "2"])]
        assert len(per_fold) == 3
        mean = part[part["fold"] == "mean"].iloc[0]
        assert mean["accuracy"] == pytest.approx(per_fold["accuracy"].mean())
        assert per_fold[["accuracy", "sensitivity", "specificity"]].stack().between(0, 1).all()
        if level == "image":  # every ingested image is scored exactly once
            assert per_fold["n"].sum() == 12
    preds = pd.read_parquet(out / "evaluate" / "demo" / "resnet18" / "image_predictions.parquet")
    knn = preds[preds["classifier"] == "knn"]
    fold0 = metrics[(metrics["classifier"] == "knn") & (metrics["level"] == "image")
                    & (metrics["fold"] == "0")].iloc[0]  # fmt: skip
    part = knn[knn["fold"] == 0]
    assert fold0["accuracy"] == pytest.approx((part["label"] == part["pred"]).mean())
    for clf in ["random_forest", "knn"]:
        for kind in ["confusion", "roc", "calibration", "wbc_count"]:
            path = out / "plots" / "demo" / "resnet18" / f"{clf}_{kind}.png"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_e2e_pooled_metrics_with_bootstrap_cis_and_per_class_table(e2e_run):
    _, out = e2e_run
    metrics = pd.read_csv(out / "metrics.csv", dtype={"fold": str})
    assert not metrics["leaky"].any()
    pooled = metrics[metrics["fold"] == "pooled"]
    own = pooled["control"] == "none"
    assert own.sum() == 2 * 2 * 9  # classifiers x levels x metrics
    # the reliance test's two kinds, the same table each
    assert pooled.loc[~own, "control"].value_counts().to_dict() == {
        "reliance_cell_only": 36, "reliance_swapped_background": 36
    }  # fmt: skip
    not_pooled = metrics.loc[metrics["fold"] != "pooled", ["metric", "ci_low", "ci_high"]]
    assert not_pooled.isna().all().all()
    preds = pd.read_parquet(out / "evaluate" / "demo" / "resnet18" / "image_predictions.parquet")
    for (clf, level), part in pooled[own].groupby(["classifier", "level"]):
        rows = part.set_index("metric")
        acc = rows.loc["accuracy"]
        assert acc["ci_low"] <= acc["accuracy"] <= acc["ci_high"]
        assert acc["ci_high"] - acc["ci_low"] > 0.05  # 6 patients: a wide interval
        if level == "image":
            mine = preds[preds["classifier"] == clf]
            assert acc["accuracy"] == pytest.approx((mine["label"] == mine["pred"]).mean())
            assert acc["n"] == 12
    per_class = pd.read_csv(out / "metrics_per_class.csv", dtype={"fold": str})
    image = per_class[(per_class["level"] == "image") & (per_class["fold"] == "pooled")]
    for _, part in image.groupby("classifier"):
        assert list(part["class"]) == ["ALL", "healthy", "macro", "weighted"]
        assert part["support"].iloc[-1] == 12


@pytest.mark.e2e
def test_e2e_models_are_saved_per_fold_and_load_back(e2e_run):
    _, out = e2e_run
    from leukflow.evaluate.folds import label_rois
    from leukflow.evaluate.model_files import load_model

    models = out / "evaluate" / "demo" / "resnet18" / "models"
    names = sorted(p.name for p in models.iterdir())
    assert names == sorted(
        f"{c}_fold_{k}.skops" for c in ("knn", "random_forest") for k in range(3)
    )
    store = open_embeddings(out / "embeddings" / "demo" / "resnet18.zarr")
    ids = pd.read_parquet(out / "embeddings" / "demo" / "resnet18_rois.parquet")
    rois = label_rois(ids, pd.read_csv(out / "folds.csv"))
    preds = pd.read_parquet(out / "evaluate" / "demo" / "resnet18" / "roi_predictions.parquet")
    fold = 1
    test = (rois["fold"] == fold).to_numpy()
    knn = load_model(models / f"knn_fold_{fold}.skops")
    saved = preds[(preds["classifier"] == "knn") & (preds["fold"] == fold)].set_index("roi_id")
    again = knn.predict_proba(store[f"fold_{fold}"][:][test])[:, list(knn.classes_).index("ALL")]
    np.testing.assert_allclose(again, saved.loc[rois.loc[test, "roi_id"], "score"])


@pytest.mark.e2e
def test_e2e_every_rule_logged_and_benchmarked_and_rerun_does_nothing(e2e_run):
    work, out = e2e_run
    logs = list((out / "logs").rglob("*.log"))
    benches = list((out / "benchmarks").rglob("*.tsv"))
    # ingest, segment batch, merge, gather, QA, folds, 3 x train, embed, fit, reliance test,
    # summarise, compare, provenance
    assert len(logs) == len(benches) == 15
    assert all("leukflow 0.1.0" in p.read_text() for p in logs)
    rerun = snakemake(work, "--configfile", "my.yaml", "-n")
    assert rerun.returncode == 0
    assert "Nothing to be done" in rerun.stdout + rerun.stderr


def test_second_run_in_the_same_directory_is_refused_by_the_lock(tmp_path):
    # a valid run that trains for a while, so it holds its lock throughout
    demo = {"format": "demo", "root": "demo", "n_fields": 10, "fields_per_patient": 2}
    config = {"results_dir": "out", "datasets": {"demo": demo}, "folds": {"k": 2},
              "encoders": {"resnet18": {"epochs": 20}}}  # fmt: skip
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--cores", "1", "--configfile", "my.yaml"]  # fmt: skip
    first = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        locks = tmp_path / ".snakemake" / "locks"
        deadline = time.monotonic() + 120
        while not (locks.is_dir() and any(locks.iterdir())):
            assert first.poll() is None, "the first run ended before taking its lock"
            assert time.monotonic() < deadline, "the first run took no lock in 120 s"
            time.sleep(0.2)
        second = snakemake(tmp_path, "--configfile", "my.yaml", "--rerun-incomplete")
        assert first.poll() is None, "the first run ended while the second ran"
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout + second.stderr
    finally:
        first.kill()
        first.wait()


def _planned_after_edit(work: Path, name: str, edit) -> set[str]:
    """Jobs a dry run plans after ``edit`` changes a copy of the run's config."""
    config = yaml.safe_load((work / "my.yaml").read_text())
    edit(config)
    (work / name).write_text(yaml.safe_dump(config))
    run = snakemake(work, "-n", "--configfile", name)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(job_counts(run.stdout + run.stderr))


@pytest.mark.e2e
def test_e2e_a_changed_parameter_redoes_its_stage_and_what_follows_only(e2e_run):
    work, _ = e2e_run
    refit = _planned_after_edit(
        work, "knn.yaml", lambda c: c["classifiers"]["knn"].update(n_neighbors=5)
    )
    assert refit == {
        "fit_classifiers", "reliance_test", "summarise_metrics", "compare_to_papers",
        "write_provenance", "all",
    }  # fmt: skip
    resegment = _planned_after_edit(
        work, "seg.yaml", lambda c: c["segmentation"].update(min_area_px=300)
    )
    assert {"segment_batch", "merge_segments", "train_encoder", "embed_rois"} <= resegment
    assert not resegment & {"ingest_images", "assign_folds", "draw_demo_data_demo"}

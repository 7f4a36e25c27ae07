"""Cross-dataset evaluation: fit on one dataset, score on another."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from leukflow.evaluate.cross import (
    COLUMNS,
    CROSS_METRICS,
    evaluate_cross,
    plot_cross_matrix,
    shared_images,
    summarise_cross,
)
from leukflow.evaluate.scoring import ScoringSettings
from leukflow.learn.train import training_rows

KNN = {"knn": {"n_neighbors": 1}}


def _train():
    emb = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    rois = pd.DataFrame({
        "roi_id": [f"a/{i}#0" for i in range(4)],
        "image_id": [f"a/{i}" for i in range(4)],
        "label": ["HEM", "HEM", "ALL", "ALL"],
        "group": ["p0", "p0", "p1", "p1"],
    })  # fmt: skip
    return emb, rois


def _test():
    # 1-NN calls: -1.5 -> HEM (right), 1.5 -> ALL (right), 0.5 -> ALL (wrong), -0.5 -> HEM (wrong)
    emb = np.array([[-1.5], [1.5], [0.5], [-0.5]])
    rois = pd.DataFrame({
        "roi_id": [f"b/{i}#0" for i in range(4)],
        "image_id": [f"b/{i}" for i in range(4)],
        "label": ["HEM", "ALL", "HEM", "ALL"],
    })  # fmt: skip
    images = pd.DataFrame({
        "image_id": [f"b/{i}" for i in range(5)],  # b/4: no white cell found
        "label": ["HEM", "ALL", "HEM", "ALL", "ALL"],
        "group": ["q0", "q1", "q2", "q3", "q4"],
    })  # fmt: skip
    return emb, rois, images


def _cross(**kw):
    return evaluate_cross(*_train(), *_test(), classifiers=KNN,
                          settings=ScoringSettings("ALL", n_boot=200), **kw)  # fmt: skip


def _pooled(result, level, metric):
    m = result.metrics
    row = m[(m["level"] == level) & (m["fold"] == "pooled") & (m["metric"] == metric)]
    return row.iloc[0]


def test_cross_scores_the_test_dataset_with_the_train_datasets_classifier():
    result = _cross()
    preds = result.roi_predictions
    assert preds["pred"].tolist() == ["HEM", "ALL", "ALL", "HEM"]
    assert set(preds["roi_id"]) == {f"b/{i}#0" for i in range(4)}  # training ROIs never scored
    roi = _pooled(result, "roi", "accuracy")
    assert roi["accuracy"] == pytest.approx(0.5)
    assert (roi["n"], roi["tp"], roi["tn"]) == (4, 1, 1)
    assert roi["ci_low"] <= 0.5 <= roi["ci_high"]
    # image level: the image without ROIs is called negative (a missed ALL): 2 of 5 right
    image = _pooled(result, "image", "balanced_accuracy")
    assert image["n"] == 5
    assert image["balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert not result.metrics["leaky"].any()
    assert set(result.models) == {("knn", 0)}


def test_cross_labels_absent_from_the_train_dataset_do_not_crash():
    emb, rois, images = _test()
    rois.loc[3, "label"] = images.loc[3, "label"] = "L3"
    result = evaluate_cross(*_train(), emb, rois, images, classifiers=KNN,
                            settings=ScoringSettings("ALL", n_boot=50))  # fmt: skip
    preds = result.roi_predictions
    assert "L3" not in set(preds["pred"])
    assert (preds["proba_L3"] == 0).all()
    # without the positive label in training, every score is 0
    emb_t, rois_t = _train()
    rois_t["label"] = ["HEM", "HEM", "L1", "L1"]
    result = evaluate_cross(emb_t, rois_t, *_test(), classifiers=KNN,
                            settings=ScoringSettings("ALL", n_boot=50))  # fmt: skip
    assert (result.roi_predictions["score"] == 0).all()
    assert _pooled(result, "roi", "sensitivity")["sensitivity"] == 0


def test_cross_refuses_mismatched_rows_and_shared_images():
    emb, rois = _train()
    with pytest.raises(ValueError, match="3 train embeddings for 4 train ROIs"):
        evaluate_cross(emb[:3], rois, *_test(), classifiers=KNN, settings=ScoringSettings("ALL"))
    t_emb, t_rois, t_images = _test()
    t_images.loc[0, "image_id"] = "a/0"
    with pytest.raises(ValueError, match="1 images are in both"):
        evaluate_cross(emb, rois, t_emb, t_rois, t_images, classifiers=KNN,
                       settings=ScoringSettings("ALL"))  # fmt: skip


def test_shared_images_finds_copies_across_datasets_by_content_not_name():
    manifest = pd.DataFrame({
        "image_id": ["a/0", "a/1", "a/2", "b/0", "b/1", "b/2", "c/0"],
        "pixel_sha256": ["x", "y", "z", "y", "w", "v", "x"],
    })  # fmt: skip
    duplicates = pd.DataFrame({
        "image_id_a": ["a/1", "b/2", "a/0"],
        "image_id_b": ["b/0", "a/2", "c/0"],
        "kind": ["exact", "near", "exact"],
    })  # fmt: skip
    a, b = ["a/0", "a/1", "a/2"], ["b/0", "b/1", "b/2"]
    # b/0 has a/1's pixels; b/2 is a near copy of a/2 (listed either way round);
    # the same names (a/0, b/0) mean nothing, and c is in neither dataset
    assert shared_images(a, b, manifest, duplicates) == [
        ("a/1", "b/0", "exact"),
        ("a/2", "b/2", "near"),
    ]
    assert shared_images(b, a, manifest, duplicates) == [
        ("b/0", "a/1", "exact"),
        ("b/2", "a/2", "near"),
    ]
    assert shared_images(["a/0"], ["b/1"], manifest, duplicates) == []


def test_summarise_cross_one_row_per_pair_and_level_and_the_plot(tmp_path):
    metrics = _cross().metrics.assign(train="a", test="b", encoder="resnet18")
    table = summarise_cross(metrics)
    assert list(table.columns) == COLUMNS
    assert table[["train", "test", "level", "n"]].values.tolist() == [
        ["a", "b", "roi", 4],
        ["a", "b", "image", 5],
    ]
    roi = table.iloc[0]
    assert roi["accuracy"] == pytest.approx(0.5)
    assert roi["balanced_accuracy"] == pytest.approx(0.5)
    # the train dataset's prediction sets, measured on the test dataset
    assert roi["conformal_alpha"] == 0.1
    assert 0 <= roi["coverage"] <= 1
    assert roi["calibration_n"] > 0
    for m in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert (table[f"{m}_ci_low"] <= table[m] + 1e-12).all()
        assert (table[m] <= table[f"{m}_ci_high"] + 1e-12).all()
    within = pd.DataFrame({
        "dataset": ["a"], "encoder": ["resnet18"], "classifier": ["knn"], "level": ["roi"],
        "fold": ["pooled"], "leaky": [False], "metric": ["balanced_accuracy"],
        "balanced_accuracy": [0.9],
    })  # fmt: skip
    png = tmp_path / "cross.png"
    plot_cross_matrix(table, png, within=within)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_per_fold_encoder_for_another_dataset_trains_on_every_roi():
    folds = np.array([0, 0, 1, 1])
    assert training_rows(folds, fold=1, training="per_fold").tolist() == [1, 1, 0, 0]
    assert training_rows(folds, fold=None, training="s1", every_roi=True).all()
    with pytest.raises(ValueError, match="trains per fold"):
        training_rows(folds, fold=None, training="per_fold")


# ------------------------------------------------------------------ workflow

REPO = Path(__file__).resolve().parents[1]


def _snakemake(work: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--cores", "2", "--configfile", "my.yaml", *args]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)


def _config(work: Path, *, small: bool = False, **evaluation) -> None:
    demo = {"format": "demo", "n_fields": 8, "fields_per_patient": 2}
    config = {
        "results_dir": "out",
        "datasets": {"a": {**demo, "root": "a", "seed": 1}, "b": {**demo, "root": "b", "seed": 2}},
        "segmentation": {"roi_size_px": 32},
        "folds": {"k": 2},
        "encoders": {
            "cnn": {"arch": "small_cnn", "epochs": 1, "batch_size": 16},
            "hog": {"arch": "hog", "training": "frozen"},
        },
        "classifiers": {"knn": {"n_neighbors": 3}, "logistic_regression": {}},
        "evaluation": {"n_boot": 200, **evaluation},
    }
    if small:  # the end-to-end run: one per-fold encoder (whole.pt), one classifier
        del config["encoders"]["hog"], config["classifiers"]["logistic_regression"]
    (work / "my.yaml").write_text(yaml.safe_dump(config))


def _job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_dry_run_plans_one_cross_evaluation_per_pair_and_encoder(tmp_path):
    _config(tmp_path, cross_dataset=[{"train": "a", "test": "b"}, {"train": "b", "test": "a"}])
    run = _snakemake(tmp_path, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = _job_counts(run.stdout + run.stderr)
    # per dataset: 2 fold encoders + whole.pt (cnn), all.pt (hog)
    assert counts["train_encoder"] == 2 * 4
    # every dataset by each of the 2 train datasets' 2 encoders
    assert counts["embed_cross_rois"] == 2 * 2 * 2
    assert counts["fit_cross_classifiers"] == 2 * 2
    assert counts["summarise_cross_dataset"] == 1
    _config(tmp_path)
    run = _snakemake(tmp_path, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "cross" not in "".join(_job_counts(run.stdout + run.stderr))


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ({"train": "a", "test": "c"}, r"evaluation.cross_dataset\[0\].test: unknown dataset 'c'"),
        ({"train": "a", "test": "a"}, r"evaluation.cross_dataset\[0\]: train and test are both"),
    ],
)
def test_a_bad_cross_pair_fails_naming_the_key(tmp_path, pair, message):
    _config(tmp_path, cross_dataset=[pair])
    run = _snakemake(tmp_path, "-n")
    assert run.returncode != 0
    assert re.search(message, run.stdout + run.stderr)


@pytest.mark.e2e
def test_e2e_cross_dataset_table_matches_the_test_datasets(tmp_path):
    _config(tmp_path, small=True, cross_dataset=[{"train": "a", "test": "b"}])
    run = _snakemake(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    table = pd.read_csv(out / "cross_dataset.csv")
    assert list(table.columns) == COLUMNS
    assert table[["train", "test", "encoder", "classifier", "level"]].values.tolist() == [
        ["a", "b", "cnn", "knn", "roi"],
        ["a", "b", "cnn", "knn", "image"],
    ]
    folds = pd.read_csv(out / "folds.csv")
    rois = pd.read_parquet(out / "rois.parquet")
    for r in table.itertuples():
        images = folds[folds["dataset"] == r.test]
        expected = (
            len(images) if r.level == "image" else rois["image_id"].isin(images["image_id"]).sum()
        )
        assert r.n == expected
        preds = pd.read_parquet(
            out / f"cross/{r.train}/{r.test}/{r.encoder}/roi_predictions.parquet"
        )
        assert set(preds["image_id"]) <= set(images["image_id"])
    for m in CROSS_METRICS:
        ok = table[m].notna()
        assert ok.any()
        assert (table.loc[ok, f"{m}_ci_low"] <= table.loc[ok, m] + 1e-9).all()
        assert (table.loc[ok, m] <= table.loc[ok, f"{m}_ci_high"] + 1e-9).all()
        assert table.loc[ok, m].between(0, 1).all()
    # the ROI accuracy is the share of right calls among the test dataset's ROIs
    preds = pd.read_parquet(out / "cross/a/b/cnn/roi_predictions.parquet")
    knn = preds[preds["classifier"] == "knn"]
    row = table.query(
        "train == 'a' and encoder == 'cnn' and classifier == 'knn' and level == 'roi'"
    )
    assert row["accuracy"].iloc[0] == pytest.approx(
        ((knn["label"] == "ALL") == (knn["pred"] == "ALL")).mean()
    )
    assert (out / "cross_dataset.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "train/a/cnn/whole.pt").exists()
    # one of b's fields replaced by one of a's: the pair now shares a cell, and
    # the run stops before scoring it
    first = sorted((tmp_path / "a" / "images").glob("*.png"))[0]
    victim = sorted((tmp_path / "b" / "images").glob("*.png"))[0]
    victim.write_bytes(first.read_bytes())
    run = _snakemake(tmp_path, "--forcerun", "ingest_images")
    assert run.returncode != 0
    log = (out / "logs/cross/a/b/cnn.log").read_text()
    message = "evaluation.cross_dataset a -> b: 1 test images are also in the train dataset"
    assert message in run.stdout + run.stderr + log
    assert f"('a/images/{first.stem}', 'b/images/{victim.stem}', 'exact')" in run.stderr + log

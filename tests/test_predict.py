"""leukflow predict: a finished run's models applied to new images."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from crafted import png_bomb
from PIL import Image

from leukflow.data.demo import draw_demo_dataset
from leukflow.deploy.predict import (
    ModelMismatchError,
    draw_overlay,
    image_table_path,
    iter_image_paths,
    load_predictor,
    predict_images,
    predict_paths,
)
from leukflow.segment import match_rois_to_boxes

# ------------------------------------------------------------------ unit tests


def test_iter_image_paths_searches_folders_and_keeps_named_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/2.png", "a/b/1.JPG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "odd.dat").write_bytes(b"x")
    found = list(iter_image_paths([tmp_path / "a", tmp_path / "odd.dat"]))
    assert found == [tmp_path / "a/2.png", tmp_path / "a/b/1.JPG", tmp_path / "odd.dat"]
    with pytest.raises(FileNotFoundError, match=r"predict: .*missing.png does not exist"):
        list(iter_image_paths([tmp_path / "missing.png"]))


def test_draw_overlay_outlines_each_roi_in_the_colour_of_its_call():
    rgb = np.full((100, 120, 3), 255, np.uint8)
    rois = pd.DataFrame(
        {"roi": [0, 1], "x0": [10, 60], "y0": [40, 40], "x1": [40, 90], "y1": [70, 70],
         "label": ["ALL", "healthy"], "proba_ALL": [0.9, 0.2], "proba_healthy": [0.1, 0.8]}
    )  # fmt: skip
    out = draw_overlay(rgb, rois, positive_label="ALL")
    assert out.shape == rgb.shape
    assert tuple(out[55, 10]) == (220, 20, 60)  # left edge of the ALL box: red
    assert tuple(out[55, 60]) == (30, 90, 230)  # left edge of the healthy box: blue
    assert (out[55, 20:30] == 255).all()  # inside stays untouched
    assert (rgb == 255).all()  # the input is not drawn on


def test_load_predictor_without_provenance_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no provenance file"):
        load_predictor(tmp_path)


def test_image_table_sits_beside_the_roi_table(tmp_path):
    assert image_table_path(tmp_path / "preds.csv") == tmp_path / "preds_images.csv"


# ------------------------------------------------------- on a small trained run


#: Box colours of the overlays: positive call, other call, review.
COLOURS = [(220, 20, 60), (30, 90, 230), (240, 130, 0)]


@pytest.fixture(scope="module")
def new_fields(tmp_path_factory):
    """Eight demo fields the run never saw (another seed), with their planted cells."""
    root = tmp_path_factory.mktemp("new")
    draw_demo_dataset(root, n_fields=8, seed=11, fields_per_patient=2)
    return root


@pytest.mark.e2e
def test_predict_with_one_fold_reproduces_the_runs_out_of_fold_predictions(e2e_run):
    work, out = e2e_run
    saved = pd.read_parquet(out / "evaluate" / "demo" / "resnet18" / "roi_predictions.parquet")
    saved = saved[(saved["classifier"] == "knn") & (saved["fold"] == 1)]
    predictor = load_predictor(out, classifier="knn", folds=[1])
    assert predictor.classes == ["ALL", "healthy"]
    assert not predictor.notes  # every choice was named
    images = sorted(saved["image_id"].unique())
    preds = list(
        predict_images(predictor, [(i, work / "demo" / f"{i.removeprefix('demo/')}.png")
                                   for i in images])
    )  # fmt: skip
    rois = pd.concat([p.rois for p in preds], ignore_index=True)
    rois["roi_id"] = rois["image"] + "#" + rois["roi"].astype(str)
    # the same segmentation, so the same ROIs and boxes as the run's...
    run_rois = pd.read_parquet(out / "rois.parquet").set_index("roi_id")
    assert sorted(rois["roi_id"]) == sorted(saved["roi_id"])
    np.testing.assert_array_equal(
        rois[["x0", "y0", "x1", "y1"]].to_numpy(),
        run_rois.loc[rois["roi_id"], ["x0", "y0", "x1", "y1"]].to_numpy(),
    )
    # ...and the same encoder and classifier, so the same probabilities
    mine = rois.set_index("roi_id").loc[saved["roi_id"]]
    np.testing.assert_allclose(mine["proba_ALL"], saved["proba_ALL"], atol=1e-6)
    np.testing.assert_array_equal(mine["label"], saved["pred"])


@pytest.mark.e2e
def test_predict_cli_calls_new_fields_and_reports_a_corrupt_one(e2e_run, new_fields, tmp_path):
    _, out = e2e_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb())
    cmd = [sys.executable, "-m", "leukflow.cli", "predict", "--model", str(out),
           "--classifier", "random_forest", "--out", str(tmp_path / "preds.csv"),
           str(new_fields / "images"), str(bad), str(bomb)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "10 images (demo / resnet18 / random_forest, 3 folds averaged" in run.stdout
    images = pd.read_csv(tmp_path / "preds_images.csv").fillna({"reason": "", "message": ""})
    assert len(images) == 10
    broken = images[images["image"] == str(bad)].iloc[0]
    assert (broken["status"], broken["reason"]) == ("error", "unreadable")
    assert "broken.png" in broken["message"]
    bombed = images[images["image"] == str(bomb)].iloc[0]
    assert (bombed["status"], bombed["reason"]) == ("error", "too_large")
    assert "1600000000 pixels" in bombed["message"]
    ok = images[images["status"] == "ok"].copy()
    ok["name"] = ok["image"].map(lambda p: "images/" + p.rsplit("/", 1)[1])
    truth = pd.read_csv(new_fields / "labels.csv").set_index("image")["label"]
    assert (ok["label"] == ok["name"].map(truth)).mean() >= 0.75  # planted ALL vs healthy
    assert ok["score"].between(0, 1).all()
    # every planted white cell is found (touching cells may merge)
    rois = pd.read_csv(tmp_path / "preds.csv")
    assert list(rois.columns) == [
        "image", "roi", "x0", "y0", "x1", "y1", "area_px", "centroid_x", "centroid_y",
        "proba_ALL", "proba_healthy", "label", "score", "prediction_set", "review",
    ]  # fmt: skip
    np.testing.assert_allclose(rois[["proba_ALL", "proba_healthy"]].sum(axis=1), 1.0)
    cells = pd.read_csv(new_fields / "cells.csv")
    rois["name"] = rois["image"].map(lambda p: "images/" + p.rsplit("/", 1)[1])
    hits = sum(
        match_rois_to_boxes(rois[rois["name"] == name], boxes)[0]
        for name, boxes in cells.groupby("image")
    )
    assert hits / len(cells) >= 0.85
    assert (ok["n_rois"] == ok["image"].map(rois.groupby("image").size())).all()
    # one overlay per readable image, the size of the field, with red, blue or orange
    # (review) boxes drawn
    for path in ok["overlay"]:
        overlay = np.asarray(Image.open(path))
        assert overlay.shape == (480, 640, 3)
        drawn = [(overlay == colour).all(-1) for colour in COLOURS]
        assert np.logical_or.reduce(drawn).sum() > 100
    assert sorted(p.name for p in (tmp_path / "preds_overlays").iterdir()) == [
        f"field_{i:03d}.png" for i in range(8)
    ]


@pytest.mark.e2e
def test_predict_refuses_a_model_whose_config_does_not_match(e2e_run, tmp_path):
    _, out = e2e_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("train", "evaluate", "embeddings"):
        (copy / name).symlink_to(out / name)
    provenance = json.loads((out / "provenance.json").read_text())
    provenance["config"]["segmentation"]["roi_size_px"] = 48
    (copy / "provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(ModelMismatchError, match=r"fold 0 does not match .*trained on 32 px "
                       r"crops; the config's segmentation.roi_size_px is 48"):  # fmt: skip
        load_predictor(copy)
    provenance["config"]["segmentation"]["roi_size_px"] = 32
    provenance["config"]["encoders"]["resnet18"]["arch"] = "resnet50"
    (copy / "provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(
        ModelMismatchError, match="a 'resnet18' encoder; the config says 'resnet50'"
    ):
        load_predictor(copy)
    with pytest.raises(ValueError, match=r"classifier 'svm_rbf' is not in the run; expected one"):
        load_predictor(out, classifier="svm_rbf")
    # a checkpoint swapped for another fold's is caught by the embeddings' weights hash
    shutil.copytree(out / "train", copy / "train2")
    (copy / "train").unlink()
    (copy / "train2").rename(copy / "train")
    fold_dir = copy / "train" / "demo" / "resnet18"
    shutil.copy(fold_dir / "fold_1.pt", fold_dir / "fold_0.pt")
    provenance["config"]["encoders"]["resnet18"]["arch"] = "resnet18"
    (copy / "provenance.json").write_text(json.dumps(provenance))
    with pytest.raises(ModelMismatchError, match=r"fold_0\.pt is not the checkpoint that made"):
        load_predictor(copy)


@pytest.mark.e2e
def test_predict_paths_on_arrays_gives_reasons_for_fields_without_cells(e2e_run, tmp_path):
    _, out = e2e_run
    predictor = load_predictor(out, classifier="knn")
    blank = np.full((200, 300, 3), 230, np.uint8)
    dark = np.zeros((200, 300, 3), np.uint8)
    rows = [p.image for p in predict_images(predictor, [("blank", blank), ("dark", dark)])]
    assert [(r["image"], r["status"], r["reason"], r["n_rois"], r["label"]) for r in rows] == [
        ("blank", "ok", "blank", 0, "healthy"),
        ("dark", "ok", "too_dark", 0, "healthy"),
    ]
    Image.fromarray(blank).save(tmp_path / "blank.png")
    images = predict_paths(predictor, [tmp_path / "blank.png"], out=tmp_path / "p.csv")
    assert images["pred_class"].tolist() == ["no_roi"]
    assert pd.read_csv(tmp_path / "p.csv").empty

"""predict and serve on every kind of model a run makes: holdout, all_labels, frozen, HOG,
YOLOv8, cnn_softmax heads and ensembles (the k-fold run is e2e_run, in test_predict.py)."""

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from leukflow.deploy.predict import load_predictor, predict_images
from leukflow.deploy.serve import create_app

#: (encoder, classifier) -> members: every model of kinds_run (tests/conftest.py)
KINDS = {
    ("small", "knn"): 1,  # per fold: fold_0.pt of the holdout split
    ("shared", "knn"): 1,  # all_labels: all.pt
    ("frozen", "knn"): 1,  # frozen network: all.pt, no head
    ("hog", "knn"): 1,  # HOG
    ("small", "cnn_softmax"): 1,
    ("shared", "cnn_softmax"): 1,
    ("yolo", "knn"): 1,  # yolov8n_cls, trained with S4's recipe
    ("yolo", "cnn_softmax"): 1,
    ("ensemble", "soft2"): 2,
    ("ensemble", "maj3"): 3,
}


def saved_predictions(out, encoder, classifier) -> pd.DataFrame:
    """The run's own ROI predictions of one model on its test fold."""
    base = out / "evaluate" / "demo"
    if encoder == "ensemble":
        path = base / "ensemble" / classifier / "roi_predictions.parquet"
    elif classifier == "cnn_softmax":
        path = base / encoder / "cnn_softmax" / "roi_predictions.parquet"
    else:
        path = base / encoder / "roi_predictions.parquet"
    saved = pd.read_parquet(path)
    return saved[saved["classifier"] == classifier]


def field_path(work, image_id):
    return work / "demo" / f"{image_id.removeprefix('demo/')}.png"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("encoder", "classifier"), list(KINDS), ids=[f"{e}/{c}" for e, c in KINDS]
)
def test_predict_reproduces_the_holdout_runs_test_predictions(kinds_run, encoder, classifier):
    work, out = kinds_run
    saved = saved_predictions(out, encoder, classifier)
    assert len(saved) > 0
    assert set(saved["fold"]) == {0}  # a holdout split: one test fold
    predictor = load_predictor(out, dataset="demo", encoder=encoder, classifier=classifier)
    assert [f.fold for f in predictor.folds] == [0] * KINDS[encoder, classifier]
    assert predictor.classes == ["ALL", "healthy"]
    images = sorted(saved["image_id"].unique())
    preds = list(predict_images(predictor, [(i, field_path(work, i)) for i in images]))
    rois = pd.concat([p.rois for p in preds], ignore_index=True)
    rois["roi_id"] = rois["image"] + "#" + rois["roi"].astype(str)
    assert sorted(rois["roi_id"]) == sorted(saved["roi_id"])
    # fold 0's models on fold 0's test ROIs: the run's own out-of-fold calls
    mine = rois.set_index("roi_id").loc[saved["roi_id"]]
    columns = ["proba_ALL", "proba_healthy"]
    np.testing.assert_allclose(mine[columns], saved[columns], atol=1e-4)
    np.testing.assert_allclose(mine[columns].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(mine["label"], saved["pred"])
    np.testing.assert_allclose(mine["score"], saved["score"], atol=1e-4)
    # ...and fold 0's own calibration (conformal.json) gives the run's prediction sets
    np.testing.assert_array_equal(mine["prediction_set"], saved["prediction_set"])
    np.testing.assert_array_equal(mine["review"].astype(bool), saved["review"])


@pytest.mark.e2e
def test_holdout_run_has_fold_zero_only_and_names_its_models(kinds_run):
    _, out = kinds_run
    with pytest.raises(ValueError, match=r"non-empty subset of the run's folds \[0\]; got \[1\]"):
        load_predictor(out, encoder="small", classifier="knn", folds=[1])
    with pytest.raises(ValueError, match=r"classifier 'cnn_softmax' is not in the run; expected "
                       r"one of \['knn'\]"):  # fmt: skip
        load_predictor(out, encoder="hog", classifier="cnn_softmax")
    with pytest.raises(ValueError, match=r"classifier 'nope' is not in the run; expected one of "):
        load_predictor(out, encoder="ensemble", classifier="nope")
    # defaults: the first encoder of the config and the first classifier that scores it
    config = json.loads((out / "provenance.json").read_text())["config"]
    first = next(iter(config["encoders"]))
    predictor = load_predictor(out)
    assert (predictor.encoder, predictor.classifier) == (first, "knn")
    choices = [*config["encoders"], "ensemble"]
    assert f"encoder {first!r} chosen, the first of {choices}" in " ".join(predictor.notes)


@pytest.mark.e2e
def test_predict_cli_runs_a_majority_ensemble(kinds_run, tmp_path):
    work, out = kinds_run
    fields = [str(work / "demo" / "images" / f"field_{i:03d}.png") for i in (0, 5)]
    cmd = [sys.executable, "-m", "leukflow.cli", "predict", "--model", str(out),
           "--encoder", "ensemble", "--classifier", "maj3", "--out", str(tmp_path / "p.csv"),
           *fields]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 images (demo / ensemble / maj3, majority vote of 3 models" in run.stdout
    rois = pd.read_csv(tmp_path / "p.csv")
    assert len(rois) > 0
    # a majority score is the share of the three members calling ALL
    assert set(np.round(rois["score"] * 3, 6)) <= {0.0, 1.0, 2.0, 3.0}
    images = pd.read_csv(tmp_path / "p_images.csv")
    assert list(images["status"]) == ["ok", "ok"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("encoder", "classifier"), [("shared", "cnn_softmax"), ("ensemble", "soft2")]
)
def test_serve_answers_with_a_head_and_an_ensemble(kinds_run, encoder, classifier):
    work, out = kinds_run
    predictor = load_predictor(out, encoder=encoder, classifier=classifier)
    client = create_app(predictor).test_client()
    assert f"classifier {classifier}" in client.get("/").text
    field = field_path(work, "demo/images/field_003").read_bytes()
    page = client.post("/upload", data={"image": (io.BytesIO(field), "field_003.png")})
    assert page.status_code == 303
    result = client.get(page.headers["Location"])
    assert result.status_code == 200
    assert "Image call: <b>" in result.text
    csv = client.get(page.headers["Location"] + ".csv")
    cells = pd.read_csv(io.StringIO(csv.text))
    expected = next(
        predict_images(predictor, [("field_003.png", field_path(work, "demo/images/field_003"))])
    )
    np.testing.assert_allclose(cells["proba_ALL"], expected.rois["proba_ALL"], atol=1e-6)
    assert list(cells["label"]) == list(expected.rois["label"])

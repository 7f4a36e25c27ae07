"""Conformal prediction sets, review and AUGRC: known guarantees on synthetic scores."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
from crepes import ConformalClassifier
from PIL import Image

from leukflow.deploy.predict import load_predictor, predict_images, review_queue
from leukflow.evaluate import conformal
from leukflow.evaluate.conformal import (
    CONFORMAL_COLUMNS,
    ConformalSettings,
    augrc,
    calibrate,
    cross_conformal_predictions,
    min_calibration,
    prediction_sets,
)
from leukflow.evaluate.metrics import METRICS
from leukflow.evaluate.scoring import ScoringSettings, evaluate_embeddings, write_evaluation

CLASSES = ["a", "b", "c"]


def _draw(rng, n, k=3):
    """Probabilities and labels drawn from them: the classifier is calibrated, exchangeable."""
    proba = rng.dirichlet(np.full(k, 0.7), size=n)
    labels = np.array([rng.choice(k, p=p) for p in proba])
    return proba, labels


@pytest.mark.parametrize("mondrian", [False, True])
def test_coverage_within_the_binomial_tolerance(mondrian):
    rng = np.random.default_rng(0)
    alpha, n_cal, n_test = 0.1, 1000, 4000
    proba, labels = _draw(rng, n_cal + n_test)
    true = 1 - proba[np.arange(len(labels)), labels]
    names = np.asarray(CLASSES)[labels]
    cal = calibrate(true[:n_cal], names[:n_cal], alpha=alpha, mondrian=mondrian, where="t")
    sets = prediction_sets(proba[n_cal:], CLASSES, cal)
    covered = sets[np.arange(n_test), labels[n_cal:]]
    # split conformal: 1 - alpha <= E[coverage] <= 1 - alpha + 1/(n+1) (per class with Mondrian)
    sd = np.sqrt(alpha * (1 - alpha) / n_test)
    assert 1 - alpha - 3 * sd <= covered.mean() <= 1 - alpha + 1 / (n_cal / 3 + 1) + 3 * sd
    if mondrian:  # class-conditional coverage holds per class
        for j in range(3):
            mine = labels[n_cal:] == j
            sd_j = np.sqrt(alpha * (1 - alpha) / mine.sum())
            assert covered[mine].mean() >= 1 - alpha - 3 * sd_j
    assert json.loads(json.dumps(cal)) == cal  # plain numbers only


def test_threshold_gives_crepes_sets():
    rng = np.random.default_rng(1)
    proba, labels = _draw(rng, 300)
    true = 1 - proba[np.arange(200), labels[:200]]
    for alpha in (0.05, 0.1, 0.2, 0.33):
        cal = calibrate(true, labels[:200], alpha=alpha, mondrian=False, where="t")
        cc = ConformalClassifier()
        cc.fit(true)
        expected = cc.predict_set(1 - proba[200:], confidence=1 - alpha, smoothing=False)
        np.testing.assert_array_equal(prediction_sets(proba[200:], CLASSES, cal), expected == 1)


def test_too_small_calibration_keeps_every_label_and_says_so(caplog):
    assert min_calibration(0.1) == 9
    rng = np.random.default_rng(2)
    proba, labels = _draw(rng, 20)
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.conformal"):
        cal = calibrate(rng.uniform(size=8), labels[:8], alpha=0.1, mondrian=False, where="m")
    assert cal["too_small"]
    assert cal["threshold"] is None
    assert cal["n"] == 8
    assert "fewer than 1/alpha - 1 = 9" in caplog.text
    assert prediction_sets(proba, CLASSES, cal).all()
    ok = calibrate(rng.uniform(size=9), labels[:9], alpha=0.1, mondrian=False, where="m")
    assert not ok["too_small"]
    assert ok["threshold"] is not None


def test_mondrian_falls_back_for_a_rare_class(caplog):
    rng = np.random.default_rng(3)
    scores = rng.uniform(size=60)
    labels = np.array(["a"] * 30 + ["b"] * 27 + ["c"] * 3)
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.conformal"):
        cal = calibrate(scores, labels, alpha=0.1, mondrian=True, where="m")
    assert cal["fallback"] == ["c"]
    assert set(cal["class_thresholds"]) == {"a", "b"}
    assert "['c'] have fewer than 9 calibration members" in caplog.text
    proba = np.full((1, 3), 1 - cal["threshold"])  # nonconformity at the global threshold
    assert prediction_sets(proba, CLASSES, cal)[0, 2]


def test_augrc_known_values():
    n, e = 100, 0.2
    correct = np.arange(n) >= e * n  # the first 20 are wrong
    confidence = np.linspace(1, 0, n)
    worst, *_ = augrc(confidence, correct)  # errors most confident
    best, coverage, risk = augrc(confidence[::-1], correct)  # errors least confident
    assert best == pytest.approx(e**2 / 2, abs=1e-3)
    assert worst == pytest.approx(e - e**2 / 2, abs=1e-3)
    assert (coverage[-1], risk[-1]) == (1.0, e)
    tied, *_ = augrc(np.ones(n), correct)  # no ranking: the straight line, e / 2
    assert tied == pytest.approx(e / 2)


def _dataset(n_images=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n_images) % 2 == 0, "ALL", "HEM")
    image = np.repeat(np.arange(n_images), 2)
    rois = pd.DataFrame({"roi_id": [f"i{i}#{j % 2}" for j, i in enumerate(image)],
                         "image_id": [f"i{i}" for i in image], "label": labels[image],
                         "fold": image // 2 % 3,
                         "group": [f"p{i // 2}" for i in image]})  # fmt: skip
    x = rng.normal(0, 1.2, (len(rois), 4)) + np.where(rois["label"] == "ALL", 1.0, -1.0)[:, None]
    folds = rois.drop_duplicates("image_id")[["image_id", "label", "fold", "group"]]
    folds = folds.assign(dataset="d", patient=folds["group"], leaky=False)
    return rois, {k: x for k in range(3)}, folds


def test_no_test_or_calibration_roi_reaches_the_fit_that_scores_it(monkeypatch):
    rois, embeddings, _ = _dataset()
    ids = {k: np.column_stack([np.arange(len(rois)), e]) for k, e in embeddings.items()}
    real_fit, calls = conformal._fit, []

    def spy(pipe, x, y, where, **kw):
        model = real_fit(pipe, x, y, where, **kw)
        fitted_rows = set(x[:, 0].astype(int))
        proba = model.predict_proba

        def recording(xs):
            calls.append((where, fitted_rows, set(xs[:, 0].astype(int))))
            return proba(xs)

        model.predict_proba = recording
        return model

    monkeypatch.setattr(conformal, "_fit", spy)
    models = {("knn", k): conformal._fit(conformal.clone(_knn()), e[rois["fold"] != k],
                                         rois.loc[rois["fold"] != k, "label"], "main")
              for k, e in ids.items()}  # fmt: skip
    calls.clear()
    cal = cross_conformal_predictions(ids, rois, models, positive_label="ALL", calibration_folds=4)
    group = rois["group"].to_numpy()
    for fold in range(3):
        test = set(np.flatnonzero(rois["fold"] == fold))
        mine = [c for c in calls if c[0].startswith(f"knn fold {fold} ")]
        assert len(mine) == 4
        for _, fitted, scored in mine:
            assert not fitted & test
            assert not scored & test
            assert not fitted & scored
            assert not set(group[list(fitted)]) & set(group[list(scored)])  # patients apart
        rows = cal[cal["fold"] == fold]
        train = rois.loc[rois["fold"] != fold, "roi_id"]
        assert sorted(rows["roi_id"]) == sorted(train)  # every training ROI once


def test_a_small_dataset_calibrates_knn_with_fewer_neighbours(caplog):
    # 6 images, 3 patients, 3 folds: a fold trains on 8 ROIs of 2 patients, so each
    # inner calibration part fits on 4 ROIs, fewer than k=5
    rois, embeddings, _ = _dataset(n_images=6)
    models = {("knn", k): conformal._fit(conformal.clone(_knn()), e[rois["fold"] != k],
                                         rois.loc[rois["fold"] != k, "label"], "main")
              for k, e in embeddings.items()}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.classifiers"):
        cal = cross_conformal_predictions(
            embeddings, rois, models, positive_label="ALL", calibration_folds=4
        )
    assert "n_neighbors lowered to 4" in caplog.text
    # 8 patients of 1 ROI each: fewer ROIs per class (4) than the 5 calibration folds asked for
    few = rois.drop_duplicates("image_id").assign(group=lambda r: r["image_id"])
    small = {k: e[few.index] for k, e in embeddings.items()}
    few = few.reset_index(drop=True)
    fitted = {("knn", k): conformal._fit(conformal.clone(_knn()), e[few["fold"] != k],
                                         few.loc[few["fold"] != k, "label"], "main")
              for k, e in small.items()}  # fmt: skip
    few_cal = cross_conformal_predictions(
        small, few, fitted, positive_label="ALL", calibration_folds=5
    )
    assert len(few_cal[few_cal["fold"] == 0]) == (few["fold"] != 0).sum()
    assert models[("knn", 0)].named_steps["model"].n_neighbors == 5  # the scored model as fitted
    for fold in range(3):
        assert len(cal[cal["fold"] == fold]) == (rois["fold"] != fold).sum()


def _knn():
    from leukflow.evaluate.classifiers import make_classifier

    return make_classifier("knn", {"n_neighbors": 5})


@pytest.mark.parametrize("rule", ["any", "share"])
def test_evaluation_tables_json_and_unchanged_main_figures(tmp_path, rule):
    rois, embeddings, folds = _dataset()
    clfs = {"logistic_regression": {"C": 1.0, "max_iter": 200}}
    on = ConformalSettings(alpha=0.2, image_rule=rule, calibration_folds=3)
    runs = {
        enabled: evaluate_embeddings(
            embeddings, rois, folds, classifiers=clfs,
            settings=ScoringSettings("ALL", n_boot=20, conformal=ConformalSettings(
                **{**on.__dict__, "enabled": enabled})))
        for enabled in (False, True)
    }  # fmt: skip
    off, out = runs[False], runs[True]
    pd.testing.assert_frame_equal(off.metrics[METRICS], out.metrics[METRICS])
    assert off.metrics["coverage"].isna().all()
    assert off.metrics["augrc"].notna().all()
    roi = out.roi_predictions
    assert (roi["review"] == (roi["set_size"] != 1)).all()
    assert set(roi["prediction_set"]) <= {"", "ALL", "HEM", "ALL|HEM"}
    pooled = out.metrics.query("fold == 'pooled' and level == 'roi'").iloc[0]
    assert pooled["coverage"] == pytest.approx(roi["covered"].mean())
    assert pooled["review_share"] == pytest.approx(roi["review"].mean())
    assert pooled["calibration_n"] == 80
    assert not pooled["calibration_too_small"]
    assert list(out.metrics.columns[-len(CONFORMAL_COLUMNS) :]) == CONFORMAL_COLUMNS
    images = out.image_predictions
    any_review = roi.groupby("image_id")["review"].agg("mean")
    expected = any_review > (0 if rule == "any" else 0.5)
    assert (images.set_index("image_id")["review"] == expected[images["image_id"]].values).all()
    names = ["roi_predictions.parquet", "image_predictions.parquet", "conformal.json"]
    write_evaluation(out, {n.split(".")[0]: tmp_path / n for n in names}, keys={})
    saved = json.loads((tmp_path / "conformal.json").read_text())
    assert saved["models"]["logistic_regression"]["0"]["roi"]["n"] == 80
    assert saved["calibration"] == "cross_conformal"
    assert saved["alpha"] == 0.2


@pytest.mark.e2e
def test_e2e_sets_review_tables_and_predict(e2e_run):
    work, out = e2e_run
    evaluated = out / "evaluate" / "demo" / "resnet18"
    roi = pd.read_parquet(evaluated / "roi_predictions.parquet")
    saved = json.loads((evaluated / "conformal.json").read_text())
    assert saved["enabled"]
    assert saved["calibration"] == "cross_conformal"
    # the saved plain-number thresholds give back every test ROI's set
    classes = ["ALL", "healthy"]
    for (clf, fold), part in roi.groupby(["classifier", "fold"]):
        cal = saved["models"][clf][str(fold)]["roi"]
        assert cal["n"] == (roi["fold"] != fold).sum() / roi["classifier"].nunique()
        members = prediction_sets(part[["proba_ALL", "proba_healthy"]].to_numpy(), classes, cal)
        assert conformal.set_text(members, classes) == part["prediction_set"].tolist()
    assert (roi["review"] == (roi["set_size"] != 1)).all()
    metrics = pd.read_csv(out / "metrics.csv")
    pooled = metrics[metrics["fold"] == "pooled"].drop_duplicates(["classifier", "level"])
    for row in pooled[pooled["level"] == "roi"].itertuples():
        mine = roi[roi["classifier"] == row.classifier]
        assert row.coverage == pytest.approx(mine["covered"].mean())
        assert row.review_share == pytest.approx(mine["review"].mean())
        assert row.conformal_alpha == 0.1
    # 12 fields in 3 folds: 8 training images per fold, under 1/alpha - 1 = 9
    image_rows = pooled[pooled["level"] == "image"]
    assert image_rows["calibration_too_small"].all()
    assert "fewer than 1/alpha - 1 = 9" in (out / "logs" / "evaluate" / "demo" /
                                            "resnet18.log").read_text()  # fmt: skip
    with Image.open(out / "plots" / "demo" / "resnet18" / "knn_risk_coverage.png") as plot:
        pixels = np.asarray(plot.convert("L"))
    assert min(pixels.shape) > 200
    assert (pixels < 128).mean() > 0.005
    # predict with one fold's model gives the set the run gave that fold's test ROIs
    saved_knn = roi[(roi["classifier"] == "knn") & (roi["fold"] == 1)].set_index("roi_id")
    predictor = load_predictor(out, classifier="knn", folds=[1])
    images = sorted(saved_knn["image_id"].unique())
    fields = [(i, work / "demo" / f"{i.removeprefix('demo/')}.png") for i in images]
    rois = pd.concat([p.rois for p in predict_images(predictor, fields)], ignore_index=True)
    rois.index = rois["image"] + "#" + rois["roi"].astype(str)
    assert rois["prediction_set"].tolist() == saved_knn.loc[rois.index, "prediction_set"].tolist()
    assert rois["review"].tolist() == saved_knn.loc[rois.index, "review"].tolist()
    queue = review_queue(rois)
    assert len(queue) == rois["review"].sum()
    assert queue["confidence"].is_monotonic_increasing


class _OnePlan:
    """A run plan stand-in whose every conformal.json is one file."""

    def __init__(self, path):
        self.path = path

    def fitted_file(self, *_):
        return self.path


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "Expecting property name"),
        ('{"enabled": true, "models": ["knn"]}', "has no attribute"),
        (
            '{"enabled": true, "image_rule": "any", "image_review_share": 0.5,'
            ' "models": {"knn": {"0": {"roi": {"threshold": "rm -rf"}}}}}',
            "not a number",
        ),
        (
            '{"enabled": true, "image_rule": "any", "image_review_share": 0.5,'
            ' "models": {"knn": {"1": {"roi": {"threshold": 0.3}}}}}',
            "'0'",
        ),
        (
            '{"enabled": true, "image_rule": "__import__", "models": {"knn": {"0": {}}}}',
            "image_rule",
        ),
    ],
)
def test_a_crafted_conformal_json_is_refused_naming_the_file(tmp_path, text, problem):
    from leukflow.deploy.predict import ModelMismatchError, _conformal_file

    path = tmp_path / "conformal.json"
    path.write_text(text)
    with pytest.raises(ModelMismatchError, match=f"{path}.*{problem}"):
        _conformal_file(_OnePlan(path), "d", "enc", "knn", [], folds={0})


def test_a_conformal_json_leukflow_wrote_is_read_back(tmp_path):
    from leukflow.deploy.predict import _conformal_file

    path = tmp_path / "conformal.json"
    roi = {"threshold": 0.4, "class_thresholds": {"ALL": None}}
    path.write_text(json.dumps({"enabled": True, "image_rule": "share", "image_review_share": 0.5,
                                "models": {"knn": {"0": {"roi": roi}}}}))  # fmt: skip
    read = _conformal_file(_OnePlan(path), "d", "enc", "knn", [], folds={0})
    assert read["models"] == {"0": {"roi": roi}}

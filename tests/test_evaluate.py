"""Tests of classifiers, model files and metrics (leukflow.evaluate: classifiers, model_files,
images, metrics, bootstrap, per_class, scoring)."""

import logging
import math
import subprocess
import zipfile

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.svm import LinearSVC

from leukflow.data.io import InvalidInputError
from leukflow.evaluate import bootstrap
from leukflow.evaluate import classifiers as fitting
from leukflow.evaluate.bootstrap import CI_COLUMNS, bootstrap_metrics, score_pooled
from leukflow.evaluate.classifiers import (
    fit_predict_folds,
    head_predictions,
    make_classifier,
    vote_predictions,
)
from leukflow.evaluate.conformal import CONFORMAL_COLUMNS
from leukflow.evaluate.folds import LeakageError
from leukflow.evaluate.images import aggregate_images
from leukflow.evaluate.metrics import COUNTS, METRICS, binary_metrics, score_folds
from leukflow.evaluate.model_files import load_model, save_model
from leukflow.evaluate.per_class import per_class_metrics, score_folds_per_class
from leukflow.evaluate.scoring import (
    ScoringSettings,
    evaluate_embeddings,
    score_predictions,
    write_evaluation,
)

POS, NEG = "ALL", "HEM"
CLASSIFIERS = {
    "random_forest": {"n_estimators": 25, "seed": 0},
    "knn": {"n_neighbors": 3},
    "svm_rbf": {"C": 1.0},
    "svm_linear": {"C": 1.0, "max_iter": 5000},
    "logistic_regression": {"C": 1.0, "max_iter": 1000},
}

# ---------------------------------------------------------------- binary_metrics


def test_binary_metrics_hand_computed():
    labels = [POS, POS, POS, POS, NEG, NEG, NEG, NEG, NEG, "other"]
    preds = [POS, POS, POS, NEG, POS, POS, NEG, NEG, NEG, "other"]
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.75, 0.2, 0.1, 0.3, 0.05]
    # "other" is a negative label and a negative prediction.
    # tp: rows 0-2 = 3; fn: row 3 = 1; fp: rows 4-5 = 2; tn: rows 6-9 = 4.
    # AUC: pairs (positive score > negative score) over 4 x 6 = 24 pairs, ties count 1/2:
    #   0.9 beats 6, 0.8 beats 6, 0.7 beats 5 (not 0.75), 0.3 beats 3 and ties 1 -> 20.5.
    m = binary_metrics(pd.Series(labels), pd.Series(preds), pd.Series(scores), positive_label=POS)
    assert (m["tn"], m["fp"], m["fn"], m["tp"], m["n"]) == (4, 2, 1, 3, 10)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert m["roc_auc"] == pytest.approx(20.5 / 24)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # PR-AUC (average precision): scores descending 0.9 P, 0.8 P, 0.75 N, 0.7 P, 0.6 N,
    # 0.3 {P, N} (one tied level), 0.2 N, 0.1 N, 0.05 N. Each positive adds 1/4 recall at
    # the precision down to its score level: 1/1, 2/2, 3/4 and, at 0.3, 4/7.
    assert m["pr_auc"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 7) / 4)
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert m["brier"] == pytest.approx(np.mean((np.array(scores) - truth) ** 2))
    assert m["brier"] == pytest.approx(
        (0.01 + 0.04 + 0.09 + 0.49 + 0.36 + 0.5625 + 0.04 + 0.01 + 0.09 + 0.0025) / 10
    )
    assert list(m) == METRICS + COUNTS
    assert all(isinstance(m[c], int) for c in COUNTS)


def test_binary_metrics_perfect_and_inverted():
    labels = pd.Series([POS, NEG, POS, NEG])
    perfect = binary_metrics(labels, labels, pd.Series([1.0, 0.0, 0.9, 0.2]), positive_label=POS)
    for name in METRICS:
        if name != "brier":
            assert perfect[name] == 1.0, name
    assert perfect["brier"] == pytest.approx((0 + 0 + 0.1**2 + 0.2**2) / 4)
    flipped = pd.Series([NEG, POS, NEG, POS])
    worst = binary_metrics(labels, flipped, pd.Series([0.0, 1.0, 0.1, 0.8]), positive_label=POS)
    for name in METRICS:
        if name not in ("brier", "pr_auc"):
            assert worst[name] == 0.0, name
    assert worst["brier"] == pytest.approx((1 + 1 + 0.9**2 + 0.8**2) / 4)
    # PR-AUC cannot reach 0: ranked last, the positives still give precision 2/4 at recall 1.
    assert worst["pr_auc"] == pytest.approx(0.5 * 1 / 3 + 0.5 * 2 / 4)


def test_binary_metrics_zero_denominators_are_nan():
    labels = pd.Series([NEG, NEG, NEG])
    m = binary_metrics(labels, labels, pd.Series([0.1, 0.2, 0.3]), positive_label=POS)
    assert (m["tn"], m["fp"], m["fn"], m["tp"], m["n"]) == (3, 0, 0, 0, 3)
    assert m["accuracy"] == 1.0
    assert m["specificity"] == 1.0
    assert math.isnan(m["precision"])  # nothing predicted positive
    assert math.isnan(m["sensitivity"])  # no positive label
    assert math.isnan(m["f1"])
    assert math.isnan(m["roc_auc"])  # one class only
    assert math.isnan(m["pr_auc"])
    assert m["balanced_accuracy"] == 1.0  # the one defined recall, as scikit-learn
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.09) / 3)


def test_binary_metrics_single_positive_class():
    labels = pd.Series([POS, POS, POS])
    preds = pd.Series([POS, NEG, NEG])
    m = binary_metrics(labels, preds, pd.Series([0.9, 0.1, 0.2]), positive_label=POS)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (0, 0, 2, 1)
    assert m["precision"] == 1.0
    assert m["sensitivity"] == pytest.approx(1 / 3)
    assert math.isnan(m["specificity"])
    assert math.isnan(m["roc_auc"])
    assert m["f1"] == pytest.approx(2 / 4)


def test_binary_metrics_positive_label_is_a_parameter():
    labels = pd.Series([POS, NEG, NEG])
    preds = pd.Series([POS, NEG, POS])
    m = binary_metrics(labels, preds, pd.Series([0.5, 0.5, 0.5]), positive_label=NEG)
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 0, 1, 1)
    assert m["roc_auc"] == 0.5  # constant scores


# -------------------------------------------------------------------- score_folds


def _predictions(seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for clf in ("knn", "random_forest"):
        for fold in range(3):
            n = 12
            labels = np.array([POS] * 6 + [NEG] * 6)
            flip = rng.random(n) < 0.25
            preds = np.where(flip, np.where(labels == POS, NEG, POS), labels)
            scores = np.clip((labels == POS) * 0.6 + rng.normal(0.2, 0.2, n), 0, 1)
            parts.append(
                pd.DataFrame(
                    {
                        "classifier": clf,
                        "fold": fold,
                        "roi_id": [f"r{fold}_{i}" for i in range(n)],
                        "image_id": [f"i{fold}_{i // 2}" for i in range(n)],
                        "label": labels,
                        "pred": preds,
                        "score": scores,
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def test_score_folds_rows_and_summary():
    preds = _predictions()
    table = score_folds(preds, positive_label=POS)
    assert list(table.columns) == ["classifier", "fold", *METRICS, *COUNTS]
    assert list(table["fold"]) == ["0", "1", "2"] * 2 + ["mean", "std"] * 2
    assert list(table["classifier"]) == ["knn"] * 3 + ["random_forest"] * 3 + [
        "knn",
        "knn",
        "random_forest",
        "random_forest",
    ]
    for clf in ("knn", "random_forest"):
        rows = table[(table["classifier"] == clf) & table["fold"].isin(["0", "1", "2"])]
        for fold in range(3):
            part = preds[(preds["classifier"] == clf) & (preds["fold"] == fold)]
            expected = binary_metrics(
                part["label"], part["pred"], part["score"], positive_label=POS
            )
            got = rows[rows["fold"] == str(fold)].iloc[0]
            for name in METRICS + COUNTS:
                assert got[name] == pytest.approx(expected[name]), (clf, fold, name)
        values = rows[METRICS].to_numpy(dtype=float)
        assert not np.isnan(values).any()
        mean = table[(table["classifier"] == clf) & (table["fold"] == "mean")].iloc[0]
        std = table[(table["classifier"] == clf) & (table["fold"] == "std")].iloc[0]
        np.testing.assert_allclose(mean[METRICS].to_numpy(float), values.mean(0))
        np.testing.assert_allclose(std[METRICS].to_numpy(float), values.std(0, ddof=1))
        assert mean[COUNTS].isna().all()
        assert std[COUNTS].isna().all()


# --------------------------------------------------------------- aggregate_images


def _roi_predictions():
    rows = [
        # image A: 2 of 3 ROIs positive; mean score 0.5667
        ("A", POS, 0.9),
        ("A", POS, 0.6),
        ("A", NEG, 0.2),
        # image B: 1 of 2 positive (a tie counts positive); mean score 0.4
        ("B", POS, 0.7),
        ("B", NEG, 0.1),
        # image C: no positive ROI; mean score 0.45
        ("C", NEG, 0.45),
    ]
    df = pd.DataFrame(rows, columns=["image_id", "pred", "score"])
    df["roi_id"] = [f"{img}#{k}" for k, img in enumerate(df["image_id"])]
    df["label"] = df["image_id"].map({"A": POS, "B": NEG, "C": NEG})
    df["fold"] = df["image_id"].map({"A": 0, "B": 1, "C": 1})
    knn = df.assign(classifier="knn")
    # A second classifier that calls every ROI negative with score 0.8.
    rf = df.assign(classifier="random_forest", pred=NEG, score=0.8)
    return pd.concat([knn, rf], ignore_index=True)


IMAGES = pd.DataFrame(
    {
        "image_id": ["A", "B", "C", "D"],  # D has no ROI at all
        "label": [POS, NEG, NEG, POS],
        "fold": [0, 1, 1, 0],
        "patient": ["pa", "pb", "pc", "pd"],
    }
)


def _by_image(out, clf):
    return out[out["classifier"] == clf].set_index("image_id")


IMAGE_COLUMNS = [
    "classifier",
    "fold",
    "image_id",
    "label",
    "pred",
    "score",
    "n_rois",
    "pred_class",
]


def test_aggregate_images_vote():
    out = aggregate_images(_roi_predictions(), IMAGES, positive_label=POS, method="vote")
    assert list(out.columns) == IMAGE_COLUMNS
    assert len(out) == 2 * len(IMAGES)
    knn = _by_image(out, "knn")
    assert list(knn.index) == ["A", "B", "C", "D"]
    assert knn.loc["A", "score"] == pytest.approx(2 / 3)
    assert knn.loc["B", "score"] == pytest.approx(1 / 2)
    assert knn.loc["C", "score"] == 0.0
    assert knn.loc["D", "score"] == 0.0
    assert knn.loc["A", "pred"] == POS
    assert knn.loc["B", "pred"] == POS
    assert knn.loc["C", "pred"] != POS
    assert knn.loc["D", "pred"] != POS
    assert list(knn["n_rois"]) == [3, 2, 1, 0]
    assert list(knn["label"]) == list(IMAGES["label"])
    assert list(knn["fold"]) == list(IMAGES["fold"])
    rf = _by_image(out, "random_forest")
    assert (rf["score"] == 0.0).all()
    assert (rf["pred"] != POS).all()
    assert list(rf["n_rois"]) == [3, 2, 1, 0]


def test_aggregate_images_mean_probability():
    out = aggregate_images(
        _roi_predictions(), IMAGES, positive_label=POS, method="mean_probability"
    )
    knn = _by_image(out, "knn")
    assert knn.loc["A", "score"] == pytest.approx((0.9 + 0.6 + 0.2) / 3)
    assert knn.loc["B", "score"] == pytest.approx(0.4)
    assert knn.loc["C", "score"] == pytest.approx(0.45)
    assert knn.loc["D", "score"] == 0.0
    assert [p == POS for p in knn["pred"]] == [True, False, False, False]
    rf = _by_image(out, "random_forest")
    np.testing.assert_allclose(rf["score"], [0.8, 0.8, 0.8, 0.0])
    assert [p == POS for p in rf["pred"]] == [True, True, True, False]
    assert list(rf["n_rois"]) == [3, 2, 1, 0]


def test_aggregate_images_feeds_binary_metrics():
    out = aggregate_images(_roi_predictions(), IMAGES, positive_label=POS, method="vote")
    knn = out[out["classifier"] == "knn"]
    m = binary_metrics(knn["label"], knn["pred"], knn["score"], positive_label=POS)
    # A: tp, B: fp, C: tn, D (no ROI, positive label): fn.
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 1, 1)


def test_aggregate_images_negative_call_name():
    # Two labels: the negative call is the other label, so it compares with image labels.
    out = aggregate_images(_roi_predictions(), IMAGES, positive_label=POS)
    knn = _by_image(out, "knn")
    assert list(knn["pred"]) == [POS, POS, NEG, NEG]
    # More than two labels: no single other label, so "not_<positive>".
    three = IMAGES.assign(label=[POS, NEG, "other", POS])
    out = aggregate_images(_roi_predictions(), three, positive_label=POS)
    assert list(_by_image(out, "knn")["pred"]) == [POS, POS, "not_ALL", "not_ALL"]


def test_aggregate_images_unknown_method():
    with pytest.raises(
        ValueError, match="method must be one of vote, mean_probability, any_positive; got 'max'"
    ):
        aggregate_images(_roi_predictions(), IMAGES, positive_label=POS, method="max")


def test_aggregate_images_no_predictions():
    empty = _roi_predictions().iloc[:0]
    out = aggregate_images(empty, IMAGES, positive_label=POS)
    assert len(out) == 0
    assert list(out.columns) == IMAGE_COLUMNS


# -------------------------------------------------------------- fit_predict_folds


def _blobs(n_per_class=30, dim=8, k=3, seed=0, label_per_image=False):
    rng = np.random.default_rng(seed)
    labels = np.array([POS, NEG] * n_per_class)
    if label_per_image:  # both ROIs of an image share its label
        labels = np.where(np.arange(2 * n_per_class) // 2 % 2 == 0, POS, NEG)
    centres = {POS: np.full(dim, 2.0), NEG: np.full(dim, -2.0)}
    x = np.stack([centres[lab] + rng.normal(0, 1.0, dim) for lab in labels])
    image = np.arange(len(labels)) // 2
    rois = pd.DataFrame(
        {
            "roi_id": [f"img{i}#{j % 2}" for j, i in enumerate(image)],
            "image_id": [f"img{i}" for i in image],
            "label": labels,
            "fold": (image % k).astype(int),
        }
    )
    # Each fold's encoder maps ROIs differently (a sign flip, a column permutation):
    # a classifier that mixed folds' embeddings would fail.
    perm = rng.permutation(dim)
    embeddings = {0: x, 1: -x, 2: x[:, perm]}
    return rois, embeddings


def test_fit_predict_folds_predicts_each_roi_once_on_its_own_fold():
    rois, embeddings = _blobs()
    preds = fit_predict_folds(embeddings, rois, classifiers=CLASSIFIERS, positive_label=POS)
    assert list(preds.columns) == [
        "classifier",
        "fold",
        "roi_id",
        "image_id",
        "label",
        "pred",
        "score",
        "proba_ALL",
        "proba_HEM",
    ]
    np.testing.assert_allclose(preds["proba_ALL"] + preds["proba_HEM"], 1.0)
    np.testing.assert_allclose(preds["score"], preds["proba_ALL"])
    assert len(preds) == len(CLASSIFIERS) * len(rois)
    fold_of = rois.set_index("roi_id")["fold"]
    for name in CLASSIFIERS:
        part = preds[preds["classifier"] == name]
        assert sorted(part["roi_id"]) == sorted(rois["roi_id"])  # each ROI exactly once
        assert (part["fold"].to_numpy() == fold_of[part["roi_id"]].to_numpy()).all()
        accuracy = (part["pred"] == part["label"]).mean()
        assert accuracy > 0.95, (name, accuracy)
        assert part["score"].between(0, 1).all()
        pos = part["label"] == POS
        assert part.loc[pos, "score"].mean() > 0.8
        assert part.loc[~pos, "score"].mean() < 0.2
        labels = rois.set_index("roi_id")["label"]
        assert (part["label"].to_numpy() == labels[part["roi_id"]].to_numpy()).all()


def test_fit_predict_folds_never_trains_on_test_rois(monkeypatch):
    rois, embeddings = _blobs()
    fits = []
    real = fitting.make_classifier

    def spy(name, params):
        pipe = real(name, params)
        fit = pipe.fit

        def recording_fit(x, y):
            fits.append((name, np.array(x, copy=True), list(y)))
            return fit(x, y)

        pipe.fit = recording_fit
        return pipe

    monkeypatch.setattr(fitting, "make_classifier", spy)
    preds = fit_predict_folds(
        embeddings, rois, classifiers={"knn": {"n_neighbors": 3}}, positive_label=POS
    )
    assert len(fits) == 3
    for fold, (_, x_train, y_train) in enumerate(fits):
        emb = embeddings[fold]
        # Find each training row in that fold's embeddings: all come from other folds.
        rows = [int(np.flatnonzero((emb == r).all(axis=1))[0]) for r in x_train]
        assert len(set(rows)) == len(rows)
        assert (rois["fold"].iloc[rows] != fold).all()
        assert sorted(rows) == list(np.flatnonzero(rois["fold"].to_numpy() != fold))
        assert y_train == list(rois["label"].iloc[rows])
        tested = set(preds.loc[preds["fold"] == fold, "roi_id"])
        assert not tested & set(rois["roi_id"].iloc[rows])


def test_fit_predict_folds_ignores_the_roi_index():
    rois, embeddings = _blobs()
    knn = {"knn": {"n_neighbors": 3}}
    plain = fit_predict_folds(embeddings, rois, classifiers=knn, positive_label=POS)
    odd = rois.set_axis(np.arange(len(rois))[::-1] * 10 + 5)
    shifted = fit_predict_folds(embeddings, odd, classifiers=knn, positive_label=POS)
    pd.testing.assert_frame_equal(shifted, plain)


def test_fit_predict_folds_positive_label_missing_from_training():
    rois, embeddings = _blobs()
    preds = fit_predict_folds(
        embeddings, rois, classifiers={"knn": {"n_neighbors": 3}}, positive_label="T-ALL"
    )
    assert (preds["score"] == 0.0).all()
    assert set(preds["pred"]) <= {POS, NEG}


def test_fit_predict_folds_skips_empty_folds_and_checks_rows():
    rois, embeddings = _blobs()
    extra = {**embeddings, 7: embeddings[0]}  # fold 7 has no ROI: nothing to predict
    preds = fit_predict_folds(
        extra, rois, classifiers={"knn": {"n_neighbors": 3}}, positive_label=POS
    )
    assert sorted(preds["fold"].unique()) == [0, 1, 2]
    with pytest.raises(ValueError, match="fold 1 has 59 rows, 60 ROIs"):
        fit_predict_folds(
            {0: embeddings[0], 1: embeddings[1][:-1]},
            rois,
            classifiers={"knn": {"n_neighbors": 3}},
            positive_label=POS,
        )


def test_fit_predict_folds_no_embeddings():
    rois, _ = _blobs()
    preds = fit_predict_folds({}, rois, classifiers=CLASSIFIERS, positive_label=POS)
    assert len(preds) == 0
    assert "score" in preds.columns


# ---------------------------------------------------------------- make_classifier


@pytest.mark.parametrize(
    ("name", "model_type", "checks"),
    [
        ("random_forest", RandomForestClassifier, {"n_estimators": 25, "random_state": 0}),
        ("knn", KNeighborsClassifier, {"n_neighbors": 3}),
        (
            "svm_rbf",
            CalibratedClassifierCV,
            {"estimator__C": 1.0, "estimator__kernel": "rbf", "ensemble": False, "cv": 5},
        ),
        (
            "svm_linear",
            CalibratedClassifierCV,
            {"estimator__C": 1.0, "estimator__max_iter": 5000, "ensemble": False, "cv": 5},
        ),
        ("logistic_regression", LogisticRegression, {"C": 1.0, "max_iter": 1000}),
    ],
)
def test_make_classifier(name, model_type, checks):
    pipe = make_classifier(name, CLASSIFIERS[name])
    assert isinstance(pipe, Pipeline)
    (_, scaler), (_, model) = pipe.steps
    assert isinstance(scaler, StandardScaler)
    assert isinstance(model, model_type)
    params = model.get_params()
    for key, value in checks.items():
        assert params[key] == value, key
    if name == "svm_linear":
        assert isinstance(model.estimator, LinearSVC)


def test_make_classifier_unknown_name():
    with pytest.raises(ValueError, match="unknown classifier 'xgboost'"):
        make_classifier("xgboost", {})


def test_make_classifier_optional_pca():
    pipe = make_classifier("logistic_regression", {"C": 0.5, "max_iter": 200, "pca_components": 4})
    assert [name for name, _ in pipe.steps] == ["scale", "pca", "model"]
    assert isinstance(pipe.named_steps["pca"], PCA)
    assert pipe.named_steps["pca"].n_components == 4
    none = make_classifier("knn", {"n_neighbors": 3, "pca_components": None})
    assert [name for name, _ in none.steps] == ["scale", "model"]


def test_fit_predict_folds_with_pca_larger_than_the_data(caplog):
    rois, embeddings = _blobs(dim=8)
    classifiers = {"knn": {"n_neighbors": 3, "pca_components": 50}}
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.classifiers"):
        preds, models = fit_predict_folds(
            embeddings, rois, classifiers=classifiers, positive_label=POS, return_models=True
        )
    assert "pca_components lowered to 8" in caplog.text
    assert models[("knn", 0)].named_steps["pca"].n_components_ == 8
    assert (preds["pred"] == preds["label"]).mean() > 0.95


# ------------------------------------------------------------------ model files


def test_saved_models_load_back_and_predict_the_same(tmp_path):
    rois, embeddings = _blobs()
    classifiers = {
        **CLASSIFIERS,
        "logistic_regression": {"C": 1.0, "max_iter": 1000, "pca_components": 3},
    }
    _, models = fit_predict_folds(
        embeddings, rois, classifiers=classifiers, positive_label=POS, return_models=True
    )
    assert sorted(models) == sorted((c, f) for c in classifiers for f in range(3))
    x = embeddings[1]
    for (name, fold), model in models.items():
        path = tmp_path / f"{name}_fold_{fold}.skops"
        save_model(model, path)
        assert path.read_bytes()[:2] == b"PK"  # a skops zip archive, not a pickle
        back = load_model(path)
        assert type(back) is Pipeline
        np.testing.assert_array_equal(back.predict(x), model.predict(x))
        np.testing.assert_allclose(back.predict_proba(x), model.predict_proba(x))


def _double(x):
    return 2 * x


def test_load_model_refuses_types_outside_sklearn(tmp_path):
    rois, embeddings = _blobs()
    pipe = Pipeline([("f", FunctionTransformer(_double)), ("knn", KNeighborsClassifier(3))])
    pipe.fit(embeddings[0], rois["label"])
    save_model(pipe, tmp_path / "odd.skops")
    with pytest.raises(InvalidInputError, match=r"odd.skops: holds types .*refused: .*_double"):
        load_model(tmp_path / "odd.skops")


def test_a_callable_named_under_sklearn_in_a_crafted_model_file_never_runs(tmp_path):
    """A shared results folder may hold a .skops file that calls a program on predict."""
    marker = tmp_path / "ran"
    pipe = Pipeline([("run", FunctionTransformer(subprocess.check_output, validate=False))])
    path = tmp_path / "knn_fold_0.skops"
    save_model(pipe, path)
    # Name the callable where scikit-learn re-exports it, as a crafted file would.
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    schema = members["schema.json"].decode()
    assert '"__module__": "subprocess"' in schema
    members["schema.json"] = schema.replace(
        '"__module__": "subprocess"', '"__module__": "sklearn.utils._testing"'
    ).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert skops.io.get_untrusted_types(file=path) == ["sklearn.utils._testing.check_output"]
    # What trusting the sklearn. prefix loads runs a program on transform:
    loaded = skops.io.load(path, trusted=["sklearn.utils._testing.check_output"])
    loaded.transform(["touch", str(marker)])
    assert marker.exists()
    marker.unlink()
    with pytest.raises(InvalidInputError, match=r"knn_fold_0\.skops: holds types") as info:
        load_model(path)
    assert info.value.reason == "untrusted_model"
    assert "sklearn.utils._testing.check_output (FunctionNode)" in str(info.value)
    assert "FunctionTransformer" in str(info.value)
    assert not marker.exists()


def test_load_model_refuses_a_file_that_is_not_a_skops_archive(tmp_path):
    (tmp_path / "model.skops").write_bytes(b"\x80\x04pickled")
    with pytest.raises(InvalidInputError, match=r"model\.skops: not a skops model file") as info:
        load_model(tmp_path / "model.skops")
    assert info.value.reason == "unreadable"


# ------------------------------------------------------------------ any_positive


def test_aggregate_images_any_positive_threshold():
    rois = _roi_predictions()
    out = aggregate_images(rois, IMAGES, positive_label=POS, method="any_positive", threshold=0.65)
    knn = _by_image(out, "knn")
    # highest ROI score per image: A 0.9, B 0.7, C 0.45, D no ROI
    np.testing.assert_allclose(knn["score"], [0.9, 0.7, 0.45, 0.0])
    assert [p == POS for p in knn["pred"]] == [True, True, False, False]
    strict = aggregate_images(
        rois, IMAGES, positive_label=POS, method="any_positive", threshold=0.8
    )
    assert [p == POS for p in _by_image(strict, "knn")["pred"]] == [True, False, False, False]
    # every ROI of random_forest scores 0.8: at threshold 0.8 one ROI suffices
    assert [p == POS for p in _by_image(strict, "random_forest")["pred"]] == [
        True,
        True,
        True,
        False,
    ]


def test_aggregate_images_multiclass_call():
    rows = [  # image, pred, proba of a, b, c
        ("X", "a", 0.6, 0.3, 0.1),
        ("X", "a", 0.5, 0.4, 0.1),
        ("X", "b", 0.1, 0.8, 0.1),
        # Y: a tie of votes, b against c; mean probability b 0.375 < c 0.475
        ("Y", "b", 0.2, 0.45, 0.35),
        ("Y", "c", 0.1, 0.3, 0.6),
        ("Z", "c", 0.3, 0.3, 0.4),
    ]
    rois = pd.DataFrame(rows, columns=["image_id", "pred", "proba_a", "proba_b", "proba_c"])
    rois = rois.assign(
        classifier="lr", roi_id=[f"r{i}" for i in range(len(rois))], score=rois["proba_a"]
    )
    images = pd.DataFrame(
        {"image_id": ["X", "Y", "Z", "W"], "label": ["a", "b", "c", "a"], "fold": [0, 0, 1, 1]}
    )
    vote = _by_image(aggregate_images(rois, images, positive_label="a", method="vote"), "lr")
    assert list(vote["pred_class"]) == ["a", "c", "c", "no_roi"]
    assert list(vote["pred"]) == ["a", "not_a", "not_a", "not_a"]  # binary: a vs rest
    mean = _by_image(
        aggregate_images(rois, images, positive_label="a", method="mean_probability"), "lr"
    )
    # mean probabilities: X (0.4, 0.5, 0.1) -> b; Y -> c; Z -> c
    assert list(mean["pred_class"]) == ["b", "c", "c", "no_roi"]


# -------------------------------------------------------------------- bootstrap


def _grouped_predictions(rng, n_groups, accuracy=0.8, concentration=4.0):
    """Simulated out-of-fold calls: each group has its own chance of being right."""
    sizes = rng.integers(1, 7, n_groups)
    p_right = rng.beta(accuracy * concentration, (1 - accuracy) * concentration, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    right = rng.random(len(group)) < p_right[group]
    truth = rng.random(len(group)) < 0.5
    labels = np.where(truth, POS, NEG)
    preds = np.where(right == truth, POS, NEG)
    scores = np.clip(np.where(preds == POS, 0.7, 0.3) + rng.normal(0, 0.15, len(group)), 0, 1)
    return labels, preds, scores, group


def test_bootstrap_samples_match_sklearn_with_group_weights():
    rng = np.random.default_rng(3)
    labels, preds, scores, group = _grouped_predictions(rng, 30)
    scores = np.round(scores, 1)  # many ties
    y, p = labels == POS, preds == POS
    weights = rng.multinomial(30, np.full(30, 1 / 30), size=4).astype(float)
    parts = (~y & ~p, ~y & p, y & ~p, y & p, np.ones_like(y), (scores - y) ** 2)
    counts = np.stack([np.bincount(group, weights=v.astype(float), minlength=30) for v in parts])
    levels, u = np.unique(scores, return_inverse=True)
    pos = np.zeros((30, len(levels)))
    neg = np.zeros((30, len(levels)))
    np.add.at(pos, (group[y], u[y]), 1)
    np.add.at(neg, (group[~y], u[~y]), 1)
    got = bootstrap._weighted_metrics(weights @ counts.T, weights @ pos, weights @ neg)
    for b, w in enumerate(weights):
        rows = w[group]  # a group drawn twice counts twice
        expected = {
            "accuracy": np.average(y == p, weights=rows),
            "sensitivity": np.average(p[y], weights=rows[y]),
            "specificity": np.average(~p[~y], weights=rows[~y]),
            "roc_auc": roc_auc_score(y, scores, sample_weight=rows),
            "pr_auc": average_precision_score(y, scores, sample_weight=rows),
            "brier": np.average((scores - y) ** 2, weights=rows),
        }
        for name, value in expected.items():
            assert got[b, METRICS.index(name)] == pytest.approx(value), (b, name)


def test_bootstrap_ci_covers_the_truth():
    # 200 simulated studies of 150 patients whose ROIs are correct together more often than
    # not (beta-distributed accuracy per patient, mean 0.8): the 95% interval should hold
    # the true accuracy 0.8 in about 95% of them.
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(200):
        labels, preds, scores, group = _grouped_predictions(rng, 150)
        ci = bootstrap_metrics(
            labels, preds, scores, group, positive_label=POS, n_boot=500, seed=rep
        ).set_index("metric")
        hits += ci.loc["accuracy", "ci_low"] <= 0.8 <= ci.loc["accuracy", "ci_high"]
    assert 0.9 <= hits / 200 <= 0.99


def test_bootstrap_resamples_groups_not_rois():
    # 40 patients with 10 ROIs each; all ROIs of a patient are right or all wrong.
    rng = np.random.default_rng(1)
    group = np.repeat(np.arange(40), 10)
    right = np.repeat(rng.random(40) < 0.75, 10)
    labels = np.where(np.arange(400) % 2 == 0, POS, NEG)
    preds = np.where(right, labels, np.where(labels == POS, NEG, POS))
    scores = np.where(preds == POS, 0.8, 0.2)
    by_group = bootstrap_metrics(labels, preds, scores, group, positive_label=POS).set_index(
        "metric"
    )
    by_roi = bootstrap_metrics(
        labels, preds, scores, np.arange(400), positive_label=POS
    ).set_index("metric")
    width_group = by_group.loc["accuracy", "ci_high"] - by_group.loc["accuracy", "ci_low"]
    width_roi = by_roi.loc["accuracy", "ci_high"] - by_roi.loc["accuracy", "ci_low"]
    # 40 independent units instead of 400: about sqrt(10) times wider
    assert width_group > 2.5 * width_roi
    acc = (labels == preds).mean()
    assert by_group.loc["accuracy", "estimate"] == acc == by_roi.loc["accuracy", "estimate"]
    se = np.sqrt(acc * (1 - acc) / 40)
    assert width_group == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_bootstrap_is_seeded_and_checks_arguments():
    labels, preds, scores, group = _grouped_predictions(np.random.default_rng(2), 30)
    a = bootstrap_metrics(labels, preds, scores, group, positive_label=POS, n_boot=300, seed=5)
    b = bootstrap_metrics(labels, preds, scores, group, positive_label=POS, n_boot=300, seed=5)
    c = bootstrap_metrics(labels, preds, scores, group, positive_label=POS, n_boot=300, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert not a["ci_low"].equals(c["ci_low"])
    assert list(a["metric"]) == METRICS
    assert (a["ci_low"] <= a["estimate"]).all()
    assert (a["estimate"] <= a["ci_high"]).all()
    with pytest.raises(ValueError, match="n_boot must be >= 1; got 0"):
        bootstrap_metrics(labels, preds, scores, group, positive_label=POS, n_boot=0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\); got 95"):
        bootstrap_metrics(labels, preds, scores, group, positive_label=POS, level=95)


def test_score_pooled_rows():
    preds = _predictions()
    groups = pd.Series({img: img.split("_")[0] for img in preds["image_id"]})  # one per fold
    groups = pd.Series({img: img for img in preds["image_id"]})
    table = score_pooled(preds, groups, positive_label=POS, n_boot=200)
    assert list(table.columns) == ["classifier", "fold", *METRICS, *COUNTS, *CI_COLUMNS]
    assert (table["fold"] == "pooled").all()
    assert list(table["metric"]) == METRICS * 2
    knn = table[table["classifier"] == "knn"].set_index("metric")
    part = preds[preds["classifier"] == "knn"]
    pooled = binary_metrics(part["label"], part["pred"], part["score"], positive_label=POS)
    for name in METRICS:
        assert knn.loc[name, name] == pytest.approx(pooled[name])
        others = [m for m in METRICS if m != name]
        assert knn.loc[name, others].isna().all()
        assert knn.loc[name, "ci_low"] <= pooled[name] <= knn.loc[name, "ci_high"]
    assert (knn["n"] == len(part)).all()
    with pytest.raises(ValueError, match="has no group"):
        score_pooled(preds, groups.iloc[1:], positive_label=POS, n_boot=10)


# ----------------------------------------------------------- per-class metrics


def test_per_class_metrics_hand_made():
    labels = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "d"]
    preds = ["a", "a", "b", "b", "c", "c", "c", "a", "no_roi", "d"]
    table = per_class_metrics(labels, preds).set_index("class")
    assert list(table.index) == ["a", "b", "c", "d", "macro", "weighted"]
    # a: tp 2, fp 1 (a c), fn 1 -> P 2/3, R 2/3; b: tp 1, fp 1, fn 1 -> 1/2, 1/2;
    # c: tp 2, fp 1 (a b), fn 2 (an a, a no_roi) -> 2/3, 1/2; d: 1, 1.
    expected = {
        "a": (2 / 3, 2 / 3, 3),
        "b": (1 / 2, 1 / 2, 2),
        "c": (2 / 3, 1 / 2, 4),
        "d": (1.0, 1.0, 1),
    }
    for c, (prec, rec, support) in expected.items():
        assert table.loc[c, "precision"] == pytest.approx(prec)
        assert table.loc[c, "recall"] == pytest.approx(rec)
        assert table.loc[c, "f1"] == pytest.approx(2 * prec * rec / (prec + rec))
        assert table.loc[c, "support"] == support
    f1 = {c: 2 * p * r / (p + r) for c, (p, r, _) in expected.items()}
    assert table.loc["macro", "precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3 + 1) / 4)
    assert table.loc["macro", "recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 1) / 4)
    assert table.loc["macro", "f1"] == pytest.approx(sum(f1.values()) / 4)
    assert table.loc["weighted", "recall"] == pytest.approx(6 / 10)  # = accuracy
    assert table.loc["weighted", "f1"] == pytest.approx(
        sum(f1[c] * expected[c][2] for c in f1) / 10
    )
    assert table.loc["weighted", "support"] == 10


def test_per_class_metrics_absent_class_is_nan_and_left_out_of_macro():
    table = per_class_metrics(["a", "a", "b"], ["a", "b", "b"], ["a", "b", "rare"])
    table = table.set_index("class")
    assert table.loc["rare", "support"] == 0
    assert math.isnan(table.loc["rare", "recall"])
    assert table.loc["macro", "recall"] == pytest.approx((1 / 2 + 1) / 2)


def test_score_folds_per_class_rows():
    preds = _predictions()
    table = score_folds_per_class(preds)
    assert list(table.columns) == [
        "classifier",
        "fold",
        "class",
        "precision",
        "recall",
        "f1",
        "support",
    ]
    assert set(table["fold"]) == {"0", "1", "2", "pooled"}
    pooled = table[(table["classifier"] == "knn") & (table["fold"] == "pooled")]
    assert list(pooled["class"]) == [POS, NEG, "macro", "weighted"]  # sorted labels
    part = preds[preds["classifier"] == "knn"]
    recall_pos = ((part["label"] == POS) & (part["pred"] == POS)).sum() / (
        part["label"] == POS
    ).sum()
    assert pooled.set_index("class").loc[POS, "recall"] == pytest.approx(recall_pos)
    m = binary_metrics(part["label"], part["pred"], part["score"], positive_label=POS)
    assert pooled.set_index("class").loc["macro", "recall"] == pytest.approx(
        m["balanced_accuracy"]
    )


# ------------------------------------------------------------ evaluate_embeddings


def _folds_of(rois, leaky=False):
    images = rois.drop_duplicates("image_id")
    return pd.DataFrame(
        {
            "dataset": "d",
            "image_id": images["image_id"],
            "patient": images["image_id"],
            "group": images["image_id"],
            "label": images["label"],
            "fold": images["fold"],
            "leaky": leaky,
        }
    )


@pytest.mark.parametrize("leaky", [False, True])
def test_evaluate_embeddings_tables_and_leaky_flag(leaky):
    rois, embeddings = _blobs(label_per_image=True)
    folds = _folds_of(rois, leaky)
    classifiers = {"knn": {"n_neighbors": 3}, "logistic_regression": {"C": 1.0, "max_iter": 500}}
    out = evaluate_embeddings(
        embeddings, rois, folds, classifiers=classifiers, settings=ScoringSettings(POS, n_boot=200)
    )
    for table in (out.roi_predictions, out.image_predictions, out.metrics, out.metrics_per_class):
        assert (table["leaky"] == leaky).all()
    assert list(out.metrics.columns) == [
        "classifier",
        "level",
        "fold",
        "leaky",
        *METRICS,
        *COUNTS,
        *CI_COLUMNS,
        *CONFORMAL_COLUMNS,
    ]
    for (_clf, _level), part in out.metrics.groupby(["classifier", "level"]):
        assert list(part["fold"]) == ["0", "1", "2", "mean", "std"] + ["pooled"] * len(METRICS)
        pooled = part[part["fold"] == "pooled"].set_index("metric")
        assert (pooled["ci_low"] <= pooled["ci_high"]).all()
        assert part.loc[part["fold"] != "pooled", CI_COLUMNS].isna().all().all()
    assert set(out.metrics_per_class["level"]) == {"roi", "image"}
    assert sorted(out.models) == [(c, f) for c in sorted(classifiers) for f in range(3)]
    images = out.image_predictions
    assert len(images) == 2 * folds["image_id"].nunique()


def test_evaluate_embeddings_checks_leakage_before_any_fit(monkeypatch):
    rois, embeddings = _blobs()
    folds = _folds_of(rois)
    folds.loc[folds.index[:2], "group"] = "shared"  # one group, two images
    folds.loc[folds.index[:2], "fold"] = [0, 1]  # ...on both sides of fold 0
    fits = []
    monkeypatch.setattr(fitting, "make_classifier", lambda *a: fits.append(a))
    with pytest.raises(LeakageError, match="group"):
        evaluate_embeddings(
            embeddings,
            rois,
            folds,
            classifiers={"knn": {"n_neighbors": 3}},
            settings=ScoringSettings(POS),
        )
    assert fits == []
    # the same folds, marked leaky (random protocol), are accepted
    monkeypatch.undo()
    knn = {"knn": {"n_neighbors": 3}}
    out = evaluate_embeddings(
        embeddings,
        rois,
        folds.assign(leaky=True),
        classifiers=knn,
        settings=ScoringSettings(POS, n_boot=50),
    )
    assert out.metrics["leaky"].all()


def test_rare_label_does_not_break_the_svms(caplog):
    # a third label with a single ROI: Platt scaling's inner 5 folds cannot split it
    rois, embeddings = _blobs()
    rois.loc[0, "label"] = "basophil"
    svms = {"svm_rbf": {"C": 1.0}, "svm_linear": {"C": 1.0, "max_iter": 5000}}
    with caplog.at_level(logging.WARNING, logger="leukflow.evaluate.classifiers"):
        preds = fit_predict_folds(embeddings, rois, classifiers=svms, positive_label=POS)
    assert "['basophil'] have fewer than 5 training ROIs" in caplog.text
    assert len(preds) == 2 * len(rois)
    assert (preds["proba_basophil"] == 0).all()
    kept = preds[preds["label"] != "basophil"]
    assert (kept["pred"] == kept["label"]).mean() > 0.95


# ------------------------------------------------- CNN softmax, votes, tuning


def test_head_predictions_reads_each_folds_softmax_on_its_test_rois():
    rois, _ = _blobs(k=3)
    n = len(rois)
    rng = np.random.default_rng(1)
    probs = {}
    for fold in range(3):
        p_all = rng.uniform(size=n)
        # the head's classes in another order than the sorted labels, and one extra
        probs[fold] = np.column_stack([1 - p_all, p_all * 0.5, p_all * 0.5])
    preds = head_predictions(probs, [NEG, POS, "blast2"], rois, positive_label=POS)
    assert list(preds.columns[:7]) == [
        "classifier", "fold", "roi_id", "image_id", "label", "pred", "score"
    ]  # fmt: skip
    assert (preds["classifier"] == "cnn_softmax").all()
    assert sorted(preds["roi_id"]) == sorted(rois["roi_id"])
    row_of = {r: i for i, r in enumerate(rois["roi_id"])}
    for row in preds.itertuples():
        p = probs[row.fold][row_of[row.roi_id]]
        assert row.score == pytest.approx(p[1])
        assert row.proba_HEM == pytest.approx(p[0])
        assert row.pred == [NEG, POS, "blast2"][int(np.argmax(p))]
    with pytest.raises(ValueError, match=r"fold 0 has probabilities of shape \(3, 2\)"):
        head_predictions({0: np.zeros((3, 2))}, [NEG, POS], rois, positive_label=POS)


def _member(preds, proba_all):
    proba_all = np.asarray(proba_all, float)
    return pd.DataFrame(
        {
            "classifier": "m",
            "fold": [0, 0, 1],
            "roi_id": ["a#0", "b#0", "c#0"],
            "image_id": ["a", "b", "c"],
            "label": [POS, NEG, POS],
            "pred": preds,
            "score": proba_all,
            "proba_ALL": proba_all,
            "proba_HEM": 1 - proba_all,
        }
    )


def test_soft_and_majority_votes_hand_computed():
    members = {
        "e1/cnn_softmax": _member([POS, POS, NEG], [0.9, 0.6, 0.4]),
        "e2/cnn_softmax": _member([POS, NEG, NEG], [0.7, 0.2, 0.45]),
        # the third member lists its rows in another order
        "e3/knn": _member([NEG, NEG, POS], [0.2, 0.1, 0.8]).iloc[::-1],
    }
    soft = vote_predictions(members, vote="soft", positive_label=POS, name="s3")
    assert list(soft["roi_id"]) == ["a#0", "b#0", "c#0"]
    np.testing.assert_allclose(soft["score"], [0.6, 0.3, 0.55])
    assert list(soft["pred"]) == [POS, NEG, POS]
    np.testing.assert_allclose(soft["proba_ALL"] + soft["proba_HEM"], 1.0)
    major = vote_predictions(members, vote="majority", positive_label=POS, name="s3")
    assert list(major["pred"]) == [POS, NEG, NEG]  # c: one of three calls ALL
    np.testing.assert_allclose(major["score"], [2 / 3, 1 / 3, 1 / 3])
    assert (major["classifier"] == "s3").all()


def test_majority_vote_tie_goes_to_the_higher_mean_probability():
    members = {
        "a": _member([POS, NEG, NEG], [0.55, 0.1, 0.1]),
        "b": _member([NEG, NEG, NEG], [0.1, 0.1, 0.1]),
    }
    major = vote_predictions(members, vote="majority", positive_label=POS, name="v")
    assert major["pred"].iloc[0] == NEG  # 1:1, mean P(ALL) 0.325 < 0.5
    members["b"] = _member([NEG, NEG, NEG], [0.49, 0.1, 0.1])
    members["a"] = _member([POS, NEG, NEG], [0.99, 0.1, 0.1])
    major = vote_predictions(members, vote="majority", positive_label=POS, name="v")
    assert major["pred"].iloc[0] == POS  # 1:1, mean P(ALL) 0.74


def test_vote_checks_members_and_vote():
    one = _member([POS, NEG, POS], [0.9, 0.1, 0.8])
    with pytest.raises(ValueError, match="needs >= 2 members"):
        vote_predictions({"a": one}, vote="soft", positive_label=POS, name="v")
    with pytest.raises(ValueError, match="vote must be one of"):
        vote_predictions({"a": one, "b": one}, vote="mean", positive_label=POS, name="v")
    with pytest.raises(ValueError, match="predicts other ROIs or folds"):
        vote_predictions({"a": one, "b": one.iloc[:2]}, vote="soft", positive_label=POS, name="v")


def test_soft_vote_of_classifiers_scores_like_any_classifier():
    rois, embeddings = _blobs(label_per_image=True)
    preds = fit_predict_folds(
        embeddings,
        rois,
        classifiers={"knn": {"n_neighbors": 3}, "random_forest": {"n_estimators": 25, "seed": 0}},
        positive_label=POS,
    )
    members = {c: preds[preds["classifier"] == c] for c in ("knn", "random_forest")}
    vote = vote_predictions(members, vote="soft", positive_label=POS, name="rf_knn")
    out = score_predictions(vote, _folds_of(rois), ScoringSettings(POS, n_boot=50))
    acc = out.metrics.query("fold == 'pooled' and metric == 'accuracy' and level == 'roi'")
    assert acc["accuracy"].iloc[0] > 0.95
    assert set(out.metrics["classifier"]) == {"rf_knn"}


def test_grid_is_tuned_by_an_inner_grouped_cv_on_training_rois_only(monkeypatch, caplog):
    rois, embeddings = _blobs(label_per_image=True)
    rois = rois.assign(group="p" + (rois["image_id"].str[3:].astype(int) // 2).astype(str))
    seen = []
    real_fit = fitting.GridSearchCV.fit

    def spy(self, x, y, groups=None):
        seen.append((np.array(x, copy=True), np.asarray(groups)))
        return real_fit(self, x, y, groups=groups)

    monkeypatch.setattr(fitting.GridSearchCV, "fit", spy)
    knn = {"knn": {"n_neighbors": 5, "grid": {"n_neighbors": [1, 3, 7]}}}
    with caplog.at_level(logging.INFO, logger="leukflow.evaluate.classifiers"):
        preds, models = fit_predict_folds(
            embeddings, rois, classifiers=knn, positive_label=POS, return_models=True
        )
    assert len(seen) == 3
    for fold, (x, groups) in enumerate(seen):
        assert len(x) == (rois["fold"] != fold).sum()
        assert set(groups) == set(rois.loc[rois["fold"] != fold, "group"])
    assert "inner 3-fold grouped CV chose {'model__n_neighbors'" in caplog.text
    chosen = {m.named_steps["model"].n_neighbors for m in models.values()}
    assert chosen <= {1, 3, 7}
    assert (preds["pred"] == preds["label"]).mean() > 0.95


def test_grid_parameters_of_svms_and_pca():
    assert fitting.grid_parameter("svm_rbf", "C") == "model__estimator__C"
    assert fitting.grid_parameter("knn", "pca_components") == "pca__n_components"
    params = {"C": 1, "max_iter": 100, "grid": {"pca_components": [2, 4]}}
    pipe = make_classifier("logistic_regression", params)
    assert pipe.named_steps["pca"].n_components == 2


def test_grid_needs_groups():
    rois, embeddings = _blobs()
    with pytest.raises(ValueError, match="needs the patient group"):
        fit_predict_folds(
            embeddings,
            rois,
            classifiers={"knn": {"n_neighbors": 3, "grid": {"n_neighbors": [1, 3]}}},
            positive_label=POS,
        )


def test_holdout_training_only_images_are_never_scored():
    rois, embeddings = _blobs(label_per_image=True, k=3)
    # a holdout: fold 0 is the test part, folds 1 and 2 only train (fold -1)
    rois["fold"] = np.where(rois["fold"] == 0, 0, -1)
    folds = _folds_of(rois)
    out = evaluate_embeddings(
        {0: embeddings[0]}, rois, folds, classifiers={"knn": {"n_neighbors": 3}},
        settings=ScoringSettings(POS, n_boot=50),
    )  # fmt: skip
    assert set(out.roi_predictions["fold"]) == {0}
    assert len(out.roi_predictions) == (rois["fold"] == 0).sum()
    assert len(out.image_predictions) == folds["fold"].eq(0).sum()
    roi_folds = out.metrics.query("level == 'roi'")["fold"].unique()
    assert list(roi_folds) == ["0", "mean", "std", "pooled"]


# -------------------------------------------------------------------- real data

ZHENG_CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]


def _colour_histograms(manifest):
    """16-bin histogram of each RGB channel of every whole crop: a cheap stand-in encoder."""
    from leukflow.data.io import read_image

    feats = []
    for root, path in zip(manifest["root"], manifest["path"], strict=True):
        rgb = read_image(f"{root}/{path}")
        hist = [np.histogram(rgb[..., c], bins=16, range=(0, 256))[0] for c in range(3)]
        feats.append(np.concatenate(hist) / rgb[..., 0].size)
    return np.stack(feats)


@pytest.fixture(scope="module")
def zheng(shared_data):
    from leukflow.data.duplicates import DEFAULT_MAX_DISTANCE, find_duplicates
    from leukflow.data.ingest import ingest_datasets

    spec = {"format": "zheng", "root": str(shared_data / "segmentation_WBC")}
    manifest, rejects = ingest_datasets({"zheng": spec}, min_size_px=32)
    assert len(manifest) == 400
    assert len(rejects) == 0
    duplicates = find_duplicates(manifest, max_distance=DEFAULT_MAX_DISTANCE, n_workers=2)
    return manifest, duplicates, _colour_histograms(manifest)


def _evaluate_zheng(zheng, label_map, classifiers, positive_label="lymphocyte"):
    from leukflow.evaluate.folds import assign_folds, label_rois

    manifest, duplicates, x = zheng
    manifest = manifest.assign(label=manifest["label"].map(label_map))
    folds = assign_folds(manifest, k=5, seed=0, duplicates=duplicates)
    rois = label_rois(
        pd.DataFrame({"roi_id": manifest["image_id"] + "#0", "image_id": manifest["image_id"]}),
        folds,
    )
    return folds, evaluate_embeddings(
        dict.fromkeys(range(5), x),
        rois,
        folds,
        classifiers=classifiers,
        # one ROI per image: image level = ROI level
        settings=ScoringSettings(positive_label, image_aggregation="mean_probability"),
    )


@pytest.mark.realdata
def test_real_zheng_lymphocyte_vs_other_grouped_cv(zheng):
    # Zheng's 400 crops (both datasets), lymphocyte vs other, grouped 5-fold CV on colour
    # histograms of the whole crop. Measured: random forest pooled accuracy 0.910 (95% CI
    # 0.880-0.935), ROC-AUC 0.955; logistic regression 0.887; always "other" scores 0.775.
    label_map = {c: "lymphocyte" if c == "lymphocyte" else "other" for c in ZHENG_CLASSES}
    classifiers = {
        "random_forest": {"n_estimators": 300, "seed": 0},
        "logistic_regression": {"C": 1.0, "max_iter": 2000},
    }
    folds, out = _evaluate_zheng(zheng, label_map, classifiers)
    assert not folds["leaky"].any()
    # Dataset 1's 112/139 (same pixels) and 12 re-cut copies (166/171, 70/72, 54/91, ...;
    # see tests/test_duplicates.py) are one group each
    assert folds["group"].nunique() == 387
    majority = (folds["label"] == "other").mean()
    assert majority == pytest.approx(310 / 400)
    pooled = out.metrics[(out.metrics["fold"] == "pooled") & (out.metrics["level"] == "image")]
    rf = pooled[pooled["classifier"] == "random_forest"].set_index("metric")
    assert rf.loc["accuracy", "accuracy"] == pytest.approx(0.91, abs=0.04)
    assert rf.loc["accuracy", "ci_low"] > majority  # better than always "other", honestly
    assert rf.loc["roc_auc", "roc_auc"] > 0.92
    lr = pooled[pooled["classifier"] == "logistic_regression"].set_index("metric")
    assert lr.loc["accuracy", "accuracy"] > majority + 0.05
    mean = out.metrics[(out.metrics["fold"] == "mean") & (out.metrics["level"] == "image")]
    assert (mean["accuracy"] > majority).all()


@pytest.mark.realdata
def test_real_zheng_five_classes_with_four_basophils(zheng, caplog):
    # 4 basophils (1 + 3) for 5 folds: a warning and a rare stratum, not a crash; the SVM's
    # Platt scaling leaves them out where a training part holds fewer than 5.
    classifiers = {"random_forest": {"n_estimators": 300, "seed": 0}, "svm_rbf": {"C": 1.0}}
    with caplog.at_level(logging.WARNING):
        folds, out = _evaluate_zheng(zheng, {c: c for c in ZHENG_CLASSES}, classifiers)
    assert "'basophil' (4)" in caplog.text
    assert folds.loc[folds["label"] == "basophil", "fold"].nunique() < 5
    per_class = out.metrics_per_class
    pooled = per_class[(per_class["fold"] == "pooled") & (per_class["level"] == "image")]
    rf = pooled[pooled["classifier"] == "random_forest"].set_index("class")
    assert list(rf.index) == [*sorted(ZHENG_CLASSES), "macro", "weighted"]
    assert rf.loc["weighted", "support"] == 400
    assert rf.loc["weighted", "recall"] > 0.75  # 5-class accuracy; measured 0.83
    assert rf.loc["neutrophil", "f1"] > 0.85
    assert rf.loc["macro", "f1"] < rf.loc["weighted", "f1"]  # the rare classes are harder


# ------------------------------------------------------- settings, writing, plots


def test_scoring_settings_from_rule_params_takes_its_six_keys():
    params = {"positive_label": POS, "image_aggregation": "any_positive",
              "any_positive_threshold": 0.7, "n_boot": 20, "bootstrap_seed": 3, "ci_level": 0.9,
              "plot_kinds": ["roc"], "inner_folds": 3}  # fmt: skip
    settings = ScoringSettings.from_params(params)
    assert settings == ScoringSettings(POS, "any_positive", 0.7, 20, 3, 0.9)
    with pytest.raises(KeyError, match=r"missing \['n_boot'\]"):
        ScoringSettings.from_params({k: v for k, v in params.items() if k != "n_boot"})


def test_write_evaluation_puts_keys_first_and_only_on_predictions_when_asked(tmp_path):
    rois, embeddings = _blobs(label_per_image=True)
    out = evaluate_embeddings(
        embeddings, rois, _folds_of(rois), classifiers={"knn": {"n_neighbors": 3}},
        settings=ScoringSettings(POS, n_boot=20),
    )  # fmt: skip
    names = ("metrics", "metrics_per_class", "roi_predictions", "image_predictions")
    paths = {n: tmp_path / f"{n}.csv" for n in names} | {"models": ["ignored.skops"]}
    write_evaluation(out, paths, keys={"dataset": "d", "encoder": "e"})
    metrics = pd.read_csv(paths["metrics"])
    assert list(metrics.columns[:4]) == ["dataset", "encoder", "classifier", "level"]
    assert (metrics["dataset"] == "d").all()
    assert len(metrics) == len(out.metrics)
    per_class = pd.read_csv(paths["metrics_per_class"])
    assert list(per_class.columns[:2]) == ["dataset", "encoder"]
    assert list(pd.read_csv(paths["roi_predictions"]).columns) == list(out.roi_predictions.columns)
    cross = {n: tmp_path / f"cross_{n}.csv" for n in names if n != "metrics_per_class"}
    write_evaluation(out, cross, keys={"train": "a", "test": "b"}, keyed_predictions=True)
    images = pd.read_csv(cross["image_predictions"])
    assert list(images.columns[-2:]) == ["train", "test"]
    assert (images["test"] == "b").all()
    assert not (tmp_path / "cross_metrics_per_class.csv").exists()


def test_plot_classifier_draws_each_kind_from_its_own_rows(tmp_path, monkeypatch):
    from leukflow.evaluate import plots

    rois, embeddings = _blobs(label_per_image=True)
    out = evaluate_embeddings(
        embeddings, rois, _folds_of(rois), settings=ScoringSettings(POS, n_boot=20),
        classifiers={"knn": {"n_neighbors": 3}, "random_forest": {"n_estimators": 5, "seed": 0}},
    )  # fmt: skip
    drawn = []
    monkeypatch.setitem(plots.PLOTTERS, "roc", lambda levels, **kw: drawn.append((levels, kw)))
    paths = {"roc": tmp_path / "knn_roc.png", "confusion": tmp_path / "knn_confusion.png"}
    plots.plot_classifier(out, paths, classifier="knn", title="t", positive_label=POS)
    assert (tmp_path / "knn_confusion.png").stat().st_size > 0
    (levels, kw), = drawn  # fmt: skip
    assert kw == {"title": "t", "positive_label": POS, "path": paths["roc"]}
    assert set(levels["roi"]["classifier"]) == set(levels["image"]["classifier"]) == {"knn"}
    assert len(levels["roi"]) == len(rois)
    assert len(levels["image"]) == rois["image_id"].nunique()

"""Tests of classifiers and metrics (leukflow.evaluate)."""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from leukflow import evaluate
from leukflow.evaluate import (
    COUNTS,
    METRICS,
    aggregate_images,
    binary_metrics,
    fit_predict_folds,
    make_classifier,
    score_folds,
)

POS, NEG = "ALL", "HEM"
CLASSIFIERS = {
    "random_forest": {"n_estimators": 25, "seed": 0},
    "knn": {"n_neighbors": 3},
    "svm_rbf": {"C": 1.0},
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
    assert list(m) == METRICS + COUNTS
    assert all(isinstance(m[c], int) for c in COUNTS)


def test_binary_metrics_perfect_and_inverted():
    labels = pd.Series([POS, NEG, POS, NEG])
    perfect = binary_metrics(labels, labels, pd.Series([1.0, 0.0, 0.9, 0.2]), positive_label=POS)
    for name in METRICS:
        assert perfect[name] == 1.0, name
    flipped = pd.Series([NEG, POS, NEG, POS])
    worst = binary_metrics(labels, flipped, pd.Series([0.0, 1.0, 0.1, 0.8]), positive_label=POS)
    for name in METRICS:
        assert worst[name] == 0.0, name


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


def test_aggregate_images_vote():
    out = aggregate_images(_roi_predictions(), IMAGES, positive_label=POS, method="vote")
    assert list(out.columns) == [
        "classifier",
        "fold",
        "image_id",
        "label",
        "pred",
        "score",
        "n_rois",
    ]
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
    with pytest.raises(ValueError, match="method must be vote or mean_probability; got 'max'"):
        aggregate_images(_roi_predictions(), IMAGES, positive_label=POS, method="max")


def test_aggregate_images_no_predictions():
    empty = _roi_predictions().iloc[:0]
    out = aggregate_images(empty, IMAGES, positive_label=POS)
    assert len(out) == 0
    assert list(out.columns) == [
        "classifier",
        "fold",
        "image_id",
        "label",
        "pred",
        "score",
        "n_rois",
    ]


# -------------------------------------------------------------- fit_predict_folds


def _blobs(n_per_class=30, dim=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([POS, NEG] * n_per_class)
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
    ]
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
    real = evaluate.make_classifier

    def spy(name, params):
        pipe = real(name, params)
        fit = pipe.fit

        def recording_fit(x, y):
            fits.append((name, np.array(x, copy=True), list(y)))
            return fit(x, y)

        pipe.fit = recording_fit
        return pipe

    monkeypatch.setattr(evaluate, "make_classifier", spy)
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
            {"estimator__C": 1.0, "estimator__kernel": "rbf", "ensemble": False},
        ),
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


def test_make_classifier_unknown_name():
    with pytest.raises(ValueError, match="unknown classifier 'xgboost'"):
        make_classifier("xgboost", {})

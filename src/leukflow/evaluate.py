"""Evaluate: classical classifiers on fold embeddings, and their metrics.

Fold ``f``'s classifier is fitted on the training ROIs of fold ``f`` embedded
by fold ``f``'s encoder (trained on those same ROIs), and scored on that
fold's test ROIs; nothing it sees comes from the test patients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

log = logging.getLogger(__name__)

METRICS = ["accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc"]
COUNTS = ["tn", "fp", "fn", "tp", "n"]


def make_classifier(name: str, params: Mapping) -> Pipeline:
    """Build a scikit-learn pipeline (standardisation + model) for a configured classifier.

    Parameters
    ----------
    name : str
        ``random_forest``, ``knn`` or ``svm_rbf``.
    params : mapping
        The classifier's config entry (see the schema).
    """
    if name == "random_forest":
        model = RandomForestClassifier(
            n_estimators=params["n_estimators"], random_state=params["seed"], n_jobs=1
        )
    elif name == "knn":
        model = KNeighborsClassifier(n_neighbors=params["n_neighbors"])
    elif name == "svm_rbf":
        # Platt-scaled probabilities from an internal 5-fold split of the training part
        model = CalibratedClassifierCV(SVC(kernel="rbf", C=params["C"]), ensemble=False)
    else:
        raise ValueError(f"make_classifier: unknown classifier {name!r}")
    return make_pipeline(StandardScaler(), model)


def fit_predict_folds(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    *,
    classifiers: Mapping[str, Mapping],
    positive_label: str,
) -> pd.DataFrame:
    """Fit every classifier on each fold's training ROIs and predict its test ROIs.

    Parameters
    ----------
    embeddings : mapping of int to numpy.ndarray
        Fold -> ``(n_rois, dim)`` embeddings of *all* ROIs by that fold's encoder,
        row-aligned with ``rois``.
    rois : pandas.DataFrame
        ``roi_id, image_id, label, fold``.
    classifiers : mapping
        Classifier name -> parameters (see :func:`make_classifier`).
    positive_label : str
        The class whose probability is reported as ``score``.

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold, roi_id, image_id, label, pred, score`` for every test ROI.
    """
    out = []
    for fold, emb in sorted(embeddings.items()):
        if len(emb) != len(rois):
            raise ValueError(
                f"fit_predict_folds: fold {fold} has {len(emb)} rows, {len(rois)} ROIs"
            )
        train = (rois["fold"] != fold).to_numpy()
        test = ~train
        if not test.any():
            continue
        for name, params in classifiers.items():
            clf = make_classifier(name, params).fit(emb[train], rois.loc[train, "label"])
            classes = list(clf.classes_)
            proba = clf.predict_proba(emb[test])
            score = proba[:, classes.index(positive_label)] if positive_label in classes else 0.0
            out.append(
                rois.loc[test, ["roi_id", "image_id", "label"]].assign(
                    classifier=name, fold=fold, pred=clf.predict(emb[test]), score=score
                )
            )
    cols = ["classifier", "fold", "roi_id", "image_id", "label", "pred", "score"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def aggregate_images(
    roi_predictions: pd.DataFrame,
    images: pd.DataFrame,
    *,
    positive_label: str,
    method: str = "vote",
) -> pd.DataFrame:
    """Turn ROI predictions into one call per image.

    Parameters
    ----------
    roi_predictions : pandas.DataFrame
        Output of :func:`fit_predict_folds`.
    images : pandas.DataFrame
        ``image_id, label, fold`` of every image, those without ROIs included:
        they are called negative with score 0 (no white cell, no blast seen).
        The negative call is the one other label when there are two, else
        ``not_<positive_label>``.
    positive_label : str
        The positive class.
    method : str
        ``vote``: positive when at least half of the ROIs are predicted
        positive, score = that share; ``mean_probability``: score = mean ROI
        score, positive when >= 0.5.

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold, image_id, label, pred, score, n_rois``.
    """
    if method not in ("vote", "mean_probability"):
        raise ValueError(
            f"aggregate_images: method must be vote or mean_probability; got {method!r}"
        )
    others = sorted(set(images["label"]) - {positive_label})
    negative = others[0] if len(others) == 1 else "not_" + positive_label
    rows = []
    for clf, preds in roi_predictions.groupby("classifier", sort=False):
        per_image = preds.groupby("image_id").agg(
            vote=("pred", lambda p: float(np.mean(p == positive_label))),
            mean_probability=("score", "mean"),
            n_rois=("roi_id", "size"),
        )
        merged = images[["image_id", "label", "fold"]].merge(
            per_image, left_on="image_id", right_index=True, how="left"
        )
        score = merged[method].fillna(0.0)
        rows.append(
            merged[["image_id", "label", "fold"]].assign(
                classifier=clf,
                pred=np.where(score >= 0.5, positive_label, negative),
                score=score,
                n_rois=merged["n_rois"].fillna(0).astype(int),
            )
        )
    cols = ["classifier", "fold", "image_id", "label", "pred", "score", "n_rois"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def binary_metrics(
    labels: pd.Series, preds: pd.Series, scores: pd.Series, *, positive_label: str
) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity, F1, ROC-AUC and the confusion counts.

    Every label other than ``positive_label`` counts as negative. A ratio with
    a zero denominator, and ROC-AUC on a single class, are NaN.
    """
    y = np.asarray(labels) == positive_label
    p = np.asarray(preds) == positive_label
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[False, True]).ravel().tolist()

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    precision, sensitivity = ratio(tp, tp + fp), ratio(tp, tp + fn)
    auc = roc_auc_score(y, np.asarray(scores)) if 0 < y.sum() < len(y) else float("nan")
    return {
        "accuracy": ratio(tp + tn, len(y)),
        "precision": precision,
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(auc),
        "tn": tn, "fp": fp, "fn": fn, "tp": tp, "n": len(y),
    }  # fmt: skip


def score_folds(predictions: pd.DataFrame, *, positive_label: str) -> pd.DataFrame:
    """Metrics per classifier and fold, plus ``mean`` and ``std`` rows over the folds.

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold`` (an int as text, ``mean`` or ``std``), :data:`METRICS`,
        :data:`COUNTS`. Mean and std rows leave the counts empty; std is the
        sample standard deviation (ddof=1) over folds.
    """
    rows = []
    for (clf, fold), part in predictions.groupby(["classifier", "fold"], sort=True):
        m = binary_metrics(
            part["label"], part["pred"], part["score"], positive_label=positive_label
        )
        rows.append({"classifier": clf, "fold": str(fold), **m})
    per_fold = pd.DataFrame(rows, columns=["classifier", "fold", *METRICS, *COUNTS])
    summary = []
    for clf, part in per_fold.groupby("classifier", sort=True):
        summary.append({"classifier": clf, "fold": "mean", **part[METRICS].mean().to_dict()})
        summary.append({"classifier": clf, "fold": "std", **part[METRICS].std(ddof=1).to_dict()})
    return pd.concat([per_fold, pd.DataFrame(summary)], ignore_index=True)

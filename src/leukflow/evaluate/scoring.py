"""Evaluate one dataset: fit, predict and score every classifier on its fold embeddings.

Metrics come three ways: per test fold (with mean and std over the folds,
:mod:`leukflow.evaluate.metrics`); on the pooled out-of-fold predictions
with a bootstrap confidence interval that resamples whole patient groups
(:mod:`leukflow.evaluate.bootstrap`); and per class (precision, recall, F1,
macro and weighted averages, :mod:`leukflow.evaluate.per_class`) for
datasets with several labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from leukflow.evaluate.bootstrap import CI_COLUMNS, score_pooled
from leukflow.evaluate.classifiers import fit_predict_folds
from leukflow.evaluate.folds import check_no_leakage
from leukflow.evaluate.images import aggregate_images
from leukflow.evaluate.metrics import COUNTS, METRICS, score_folds
from leukflow.evaluate.per_class import score_folds_per_class


@dataclass
class Evaluation:
    """Everything :func:`evaluate_embeddings` produces for one dataset and encoder."""

    roi_predictions: pd.DataFrame
    image_predictions: pd.DataFrame
    metrics: pd.DataFrame
    metrics_per_class: pd.DataFrame
    models: dict[tuple[str, int], Pipeline] = field(default_factory=dict)


def evaluate_embeddings(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    folds: pd.DataFrame,
    *,
    classifiers: Mapping[str, Mapping],
    positive_label: str,
    image_aggregation: str = "vote",
    any_positive_threshold: float = 0.5,
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
    ci_level: float = 0.95,
    inner_folds: int = 3,
) -> Evaluation:
    """Fit, predict and score every classifier on one dataset's fold embeddings.

    Checks the folds for leakage before any fit (a grouped split with a
    patient or group on both sides raises :class:`leukflow.evaluate.folds.LeakageError`).

    Parameters
    ----------
    embeddings : mapping of int to numpy.ndarray
        See :func:`.fit_predict_folds`.
    rois : pandas.DataFrame
        ``roi_id, image_id, label, fold`` (see :func:`leukflow.evaluate.folds.label_rois`).
    folds : pandas.DataFrame
        The dataset's rows of folds.csv: ``image_id, patient, group, label,
        fold, leaky``.
    classifiers, positive_label
        See :func:`.fit_predict_folds`.
    image_aggregation, any_positive_threshold
        ``method`` and ``threshold`` of :func:`.aggregate_images`.
    n_boot, bootstrap_seed, ci_level
        See :func:`.bootstrap_metrics`.
    inner_folds : int
        Inner grouped folds that tune a classifier's ``grid`` (training part only).

    Returns
    -------
    Evaluation
        Predictions and metric tables, each with a ``leaky`` column (True when
        the folds came from the random protocol), and the fitted models.
        ``metrics`` has ``classifier, level, fold`` (per fold, ``mean``,
        ``std``, ``pooled``), :data:`.METRICS`, :data:`.COUNTS`,
        :data:`.CI_COLUMNS`; ``metrics_per_class`` has ``classifier, level,
        fold, class, precision, recall, f1, support``.
    """
    check_no_leakage(folds, "patient")
    check_no_leakage(folds, "group")
    if "group" not in rois:
        rois = rois.merge(folds[["image_id", "group"]], on="image_id", how="left")
    roi_preds, models = fit_predict_folds(
        embeddings,
        rois,
        classifiers=classifiers,
        positive_label=positive_label,
        return_models=True,
        inner_folds=inner_folds,
    )
    out = score_predictions(
        roi_preds,
        folds,
        positive_label=positive_label,
        image_aggregation=image_aggregation,
        any_positive_threshold=any_positive_threshold,
        n_boot=n_boot,
        bootstrap_seed=bootstrap_seed,
        ci_level=ci_level,
    )
    out.models = models
    return out


def score_predictions(
    roi_preds: pd.DataFrame,
    folds: pd.DataFrame,
    *,
    positive_label: str,
    image_aggregation: str = "vote",
    any_positive_threshold: float = 0.5,
    n_boot: int = 1000,
    bootstrap_seed: int = 0,
    ci_level: float = 0.95,
) -> Evaluation:
    """Image calls and every metric table from ROI predictions of any source.

    ``roi_preds`` may come from fitted classifiers (:func:`.fit_predict_folds`),
    the encoder's head (:func:`.head_predictions`) or a vote
    (:func:`.vote_predictions`). Only test images (fold >= 0) are scored; a
    holdout split's training-only images (fold -1) are not. Parameters and
    the returned tables: see :func:`evaluate_embeddings` (no models).
    """
    leaky = bool(folds["leaky"].any())
    folds = folds[folds["fold"] >= 0]
    image_preds = aggregate_images(
        roi_preds,
        folds,
        positive_label=positive_label,
        method=image_aggregation,
        threshold=any_positive_threshold,
    )
    groups = folds.set_index("image_id")["group"]
    classes = sorted(folds["label"].astype(str).unique())
    metrics, per_class = [], []
    for level, preds, call in (("roi", roi_preds, "pred"), ("image", image_preds, "pred_class")):
        metrics.append(score_folds(preds, positive_label=positive_label).assign(level=level))
        metrics.append(
            score_pooled(
                preds,
                groups,
                positive_label=positive_label,
                n_boot=n_boot,
                seed=bootstrap_seed,
                level=ci_level,
            ).assign(level=level)
        )
        per_class.append(
            score_folds_per_class(preds, pred=call, classes=classes).assign(level=level)
        )
    first = ["classifier", "level", "fold", "leaky"]
    table = pd.concat(metrics, ignore_index=True).assign(leaky=leaky)
    table = table[[*first, *METRICS, *COUNTS, *CI_COLUMNS]]
    per_class_table = pd.concat(per_class, ignore_index=True).assign(leaky=leaky)
    per_class_table = per_class_table[[*first, "class", "precision", "recall", "f1", "support"]]
    return Evaluation(
        roi_predictions=roi_preds.assign(leaky=leaky),
        image_predictions=image_preds.assign(leaky=leaky),
        metrics=table,
        metrics_per_class=per_class_table,
    )

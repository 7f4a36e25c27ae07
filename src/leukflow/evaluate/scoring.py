"""Evaluate one dataset: fit, predict and score every classifier on its fold embeddings.

Metrics come three ways: per test fold (with mean and std over the folds,
:mod:`leukflow.evaluate.metrics`); on the pooled out-of-fold predictions
with a bootstrap confidence interval that resamples whole patient groups
(:mod:`leukflow.evaluate.bootstrap`); and per class (precision, recall, F1,
macro and weighted averages, :mod:`leukflow.evaluate.per_class`) for
datasets with several labels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from leukflow.data.io import atomic_path, embeddings_attrs, read_table, write_table
from leukflow.evaluate.bootstrap import CI_COLUMNS, score_pooled
from leukflow.evaluate.classifiers import fit_predict_folds
from leukflow.evaluate.conformal import (
    CONFORMAL_COLUMNS,
    ConformalSettings,
    apply_conformal,
    calibrate_folds,
    cross_conformal_predictions,
    image_probabilities,
    score_selective,
)
from leukflow.evaluate.folds import check_no_leakage, label_rois
from leukflow.evaluate.images import aggregate_images
from leukflow.evaluate.metrics import COUNTS, METRICS, score_folds
from leukflow.evaluate.per_class import score_folds_per_class


@dataclass(frozen=True)
class ScoringSettings:
    """How ROI predictions become image calls and metrics with intervals.

    The config's ``positive_label`` and the ``evaluation`` keys of the same
    names; every scoring rule (fitted classifiers, the encoder's head, a vote,
    cross-dataset) scores with the same settings.

    Attributes
    ----------
    positive_label : str
        The positive class (binary metrics: this label vs the rest).
    image_aggregation : str
        ``method`` of :func:`.aggregate_images`: ``vote``, ``mean_probability``
        or ``any_positive``.
    any_positive_threshold : float
        ``threshold`` of :func:`.aggregate_images` (``any_positive``).
    n_boot : int
        Bootstrap samples of the pooled intervals (see :func:`.bootstrap_metrics`).
    bootstrap_seed : int
        Seed of the bootstrap draws.
    ci_level : float
        Coverage of the bootstrap intervals, in (0, 1).
    conformal : ConformalSettings
        Prediction sets and review (``evaluation.conformal``); optional in
        :meth:`from_params` (absent: the defaults).
    """

    positive_label: str
    image_aggregation: str = "vote"
    any_positive_threshold: float = 0.5
    n_boot: int = 1000
    bootstrap_seed: int = 0
    ci_level: float = 0.95
    conformal: ConformalSettings = field(default_factory=ConformalSettings)

    @classmethod
    def from_params(cls, params: Mapping) -> ScoringSettings:
        """Take the settings from a mapping that holds each of them (e.g. a rule's params).

        Raises
        ------
        KeyError
            Naming the settings ``params`` lacks.
        """
        params = dict(params)
        missing = [f.name for f in fields(cls) if f.name not in params and f.name != "conformal"]
        if missing:
            raise KeyError(f"ScoringSettings.from_params: missing {missing}; got {sorted(params)}")
        values = {f.name: params[f.name] for f in fields(cls) if f.name in params}
        values["conformal"] = ConformalSettings.from_config(params.get("conformal"))
        return cls(**values)


@dataclass
class Evaluation:
    """Everything :func:`evaluate_embeddings` produces for one dataset and encoder."""

    roi_predictions: pd.DataFrame
    image_predictions: pd.DataFrame
    metrics: pd.DataFrame
    metrics_per_class: pd.DataFrame
    models: dict[tuple[str, int], Pipeline] = field(default_factory=dict)
    #: The calibration members' predictions (empty when conformal prediction is off).
    calibration_predictions: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame(columns=["classifier", "fold"])
    )
    #: conformal.json: the settings and every model's thresholds, plain numbers.
    conformal: dict = field(default_factory=dict)


def evaluate_embeddings(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    folds: pd.DataFrame,
    *,
    classifiers: Mapping[str, Mapping],
    settings: ScoringSettings,
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
    classifiers
        See :func:`.fit_predict_folds`.
    settings : ScoringSettings
        The positive label, image aggregation and bootstrap.
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
        positive_label=settings.positive_label,
        return_models=True,
        inner_folds=inner_folds,
    )
    calibration = calibrate_models(embeddings, rois, models, settings)
    out = score_predictions(roi_preds, folds, settings, calibration, scheme="cross_conformal")
    out.models = models
    return out


def calibrate_models(
    embeddings: Mapping[int, np.ndarray],
    rois: pd.DataFrame,
    models: Mapping[tuple[str, int], Pipeline],
    settings: ScoringSettings,
) -> pd.DataFrame | None:
    """Cross-conformal calibration rows of fitted models; None when conformal prediction is off.

    See :func:`leukflow.evaluate.conformal.cross_conformal_predictions`.
    """
    if not settings.conformal.enabled:
        return None
    return cross_conformal_predictions(
        embeddings,
        rois,
        models,
        positive_label=settings.positive_label,
        calibration_folds=settings.conformal.calibration_folds,
    )


def score_predictions(
    roi_preds: pd.DataFrame,
    folds: pd.DataFrame,
    settings: ScoringSettings,
    calibration: pd.DataFrame | None = None,
    *,
    scheme: str = "",
) -> Evaluation:
    """Image calls and every metric table from ROI predictions of any source.

    ``roi_preds`` may come from fitted classifiers (:func:`.fit_predict_folds`),
    the encoder's head (:func:`.head_predictions`) or a vote
    (:func:`.vote_predictions`). Only test images (fold >= 0) are scored; a
    holdout split's training-only images (fold -1) are not. Parameters and
    the returned tables: see :func:`evaluate_embeddings` (no models).

    With ``settings.conformal.enabled`` and ``calibration`` (the calibration
    members' predictions, ``fold`` naming the model they calibrate), every
    test ROI and image gets a prediction set and ``review``
    (:func:`leukflow.evaluate.conformal.apply_conformal`); ``scheme`` names
    how the calibration rows were made, in conformal.json.
    """
    positive_label = settings.positive_label
    leaky = bool(folds["leaky"].any())
    folds = folds[folds["fold"] >= 0]
    image_preds = aggregate_images(
        roi_preds,
        folds,
        positive_label=positive_label,
        method=settings.image_aggregation,
        threshold=settings.any_positive_threshold,
    )
    image_preds = _with_confidence(roi_preds, image_preds)
    conformal = _conformal_json(settings.conformal, scheme, calibration)
    if conformal["models"] is not None:
        roi_preds, image_preds = apply_conformal(
            roi_preds, image_preds, conformal["models"], settings.conformal
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
                n_boot=settings.n_boot,
                seed=settings.bootstrap_seed,
                level=settings.ci_level,
            ).assign(level=level)
        )
        per_class.append(
            score_folds_per_class(preds, pred=call, classes=classes).assign(level=level)
        )
    first = ["classifier", "level", "fold", "leaky"]
    table = pd.concat(metrics, ignore_index=True).assign(leaky=leaky)
    selective = score_selective(
        {"roi": roi_preds, "image": image_preds}, conformal["models"], settings.conformal.alpha
    )
    table = table.merge(selective, on=["classifier", "level", "fold"], how="left")
    table = table[[*first, *METRICS, *COUNTS, *CI_COLUMNS, *CONFORMAL_COLUMNS]]
    per_class_table = pd.concat(per_class, ignore_index=True).assign(leaky=leaky)
    per_class_table = per_class_table[[*first, "class", "precision", "recall", "f1", "support"]]
    return Evaluation(
        roi_predictions=roi_preds.assign(leaky=leaky),
        image_predictions=image_preds.assign(leaky=leaky),
        metrics=table,
        metrics_per_class=per_class_table,
        calibration_predictions=(
            calibration if conformal["enabled"] else pd.DataFrame(columns=["classifier", "fold"])
        ),
        conformal=conformal,
    )


def _with_confidence(roi_preds: pd.DataFrame, image_preds: pd.DataFrame) -> pd.DataFrame:
    """Add each image's ``confidence``: its highest mean ROI probability (0 without ROIs)."""
    per_image = image_probabilities(roi_preds).max(axis=1).rename("confidence")
    out = image_preds.join(per_image, on=["classifier", "fold", "image_id"])
    return out.assign(confidence=out["confidence"].fillna(0.0))


def _conformal_json(
    settings: ConformalSettings, scheme: str, calibration: pd.DataFrame | None
) -> dict:
    """conformal.json's content; ``models`` None when conformal prediction is off."""
    on = settings.enabled and calibration is not None
    return {
        "enabled": bool(on),
        "alpha": settings.alpha,
        "mondrian": settings.mondrian,
        "image_rule": settings.image_rule,
        "image_review_share": settings.image_review_share,
        "nonconformity": "1 - probability of the label (LAC)",
        "calibration": scheme if on else None,
        "models": calibrate_folds(calibration, settings) if on else None,
    }


def write_evaluation(
    result: Evaluation,
    paths: Mapping[str, str | Path],
    *,
    keys: Mapping[str, str],
    keyed_predictions: bool = False,
) -> None:
    """Write an evaluation's tables to the paths named after them.

    Parameters
    ----------
    result : Evaluation
        The tables to write.
    paths : mapping of str to path
        ``metrics``, ``roi_predictions``, ``image_predictions`` and, where it
        is written, ``metrics_per_class`` (e.g. a rule's output); other
        entries are ignored.
    keys : mapping of str to str
        Columns that name the result (``dataset, encoder``, or ``train, test,
        encoder``), put first in the metric tables.
    keyed_predictions : bool
        Also append ``keys`` to the prediction tables (cross-dataset results,
        whose predictions are gathered across pairs).
    """
    paths = dict(paths)
    if "conformal" in paths:
        with atomic_path(paths["conformal"]) as tmp:
            tmp.write_text(json.dumps(result.conformal, indent=1, sort_keys=True))
    if "calibration_predictions" in paths:
        write_table(result.calibration_predictions, paths["calibration_predictions"])
    for name in ("metrics", "metrics_per_class"):
        if name in paths:
            table = getattr(result, name)
            write_table(table.assign(**keys)[[*keys, *table.columns]], paths[name])
    for name in ("roi_predictions", "image_predictions"):
        table = getattr(result, name)
        write_table(table.assign(**keys) if keyed_predictions else table, paths[name])


def read_scoring_inputs(
    folds: str | Path, ids: str | Path, store: str | Path, dataset: str
) -> tuple[pd.DataFrame, pd.DataFrame, list[int]]:
    """Read what scoring one dataset's encoder needs.

    Parameters
    ----------
    folds, ids, store : str or Path
        folds.csv, the encoder's ROI table (``<encoder>_rois.parquet``) and
        its embedding store.
    dataset : str
        The dataset scored.

    Returns
    -------
    folds : pandas.DataFrame
        The dataset's rows of folds.csv, ``leaky`` also where the encoder was
        trained on every ROI (``training: all_labels``: it has seen the test ROIs).
    rois : pandas.DataFrame
        The ROIs with label and fold (:func:`leukflow.evaluate.folds.label_rois`).
    test_folds : list of int
        The test folds (a holdout's training-only fold -1 left out).
    """
    table = read_table(folds)
    table = table[table["dataset"] == dataset]
    table = table.assign(leaky=table["leaky"] | embeddings_attrs(store)["leaky"])
    test_folds = sorted(int(k) for k in table["fold"].unique() if k >= 0)
    return table, label_rois(read_table(ids), table), test_folds

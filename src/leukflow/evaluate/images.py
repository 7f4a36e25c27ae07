"""Image level: one call per image from the predictions of its ROIs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from leukflow.evaluate.classifiers import PROBA_PREFIX

AGGREGATIONS = ("vote", "mean_probability", "any_positive")
#: ``pred_class`` of an image in which no white cell was found.
NO_ROI = "no_roi"


def aggregate_images(
    roi_predictions: pd.DataFrame,
    images: pd.DataFrame,
    *,
    positive_label: str,
    method: str = "vote",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """Turn ROI predictions into one call per image.

    Parameters
    ----------
    roi_predictions : pandas.DataFrame
        Output of :func:`.fit_predict_folds`.
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
        score, positive when >= 0.5; ``any_positive``: score = highest ROI
        score, positive when >= ``threshold`` (one blast makes the smear).
    threshold : float
        The ``any_positive`` threshold.

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold, image_id, label, pred, score, n_rois, pred_class``.
        ``pred`` is the binary call; ``pred_class`` the multi-class call: the
        most frequent ROI prediction (``vote``; ties go to the higher mean
        probability) or the label of highest mean ROI probability (the other
        methods), :data:`NO_ROI` for an image without ROIs.
    """
    if method not in AGGREGATIONS:
        raise ValueError(
            f"aggregate_images: method must be one of {', '.join(AGGREGATIONS)}; got {method!r}"
        )
    others = sorted(set(images["label"]) - {positive_label})
    negative = others[0] if len(others) == 1 else "not_" + positive_label
    proba_cols = [c for c in roi_predictions.columns if c.startswith(PROBA_PREFIX)]
    rows = []
    for clf, preds in roi_predictions.groupby("classifier", sort=False):
        per_image = preds.groupby("image_id").agg(
            vote=("pred", lambda p: float(np.mean(p == positive_label))),
            mean_probability=("score", "mean"),
            any_positive=("score", "max"),
            n_rois=("roi_id", "size"),
        )
        per_image["pred_class"] = _class_calls(preds, proba_cols, method)
        merged = images[["image_id", "label", "fold"]].merge(
            per_image, left_on="image_id", right_index=True, how="left"
        )
        score = merged[method].fillna(0.0)
        cut = threshold if method == "any_positive" else 0.5
        rows.append(
            merged[["image_id", "label", "fold"]].assign(
                classifier=clf,
                pred=np.where(score >= cut, positive_label, negative),
                score=score,
                n_rois=merged["n_rois"].fillna(0).astype(int),
                pred_class=merged["pred_class"].fillna(NO_ROI).astype(str),
            )
        )
    cols = ["classifier", "fold", "image_id", "label", "pred", "score", "n_rois", "pred_class"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)


def _class_calls(preds: pd.DataFrame, proba_cols: list[str], method: str) -> pd.Series:
    """Multi-class call per image from its ROIs (see :func:`aggregate_images`)."""
    votes = pd.crosstab(preds["image_id"], preds["pred"]).astype(float)
    if not proba_cols:
        return votes.idxmax(axis=1)
    mean = preds.groupby("image_id")[proba_cols].mean()
    mean.columns = [c.removeprefix(PROBA_PREFIX) for c in proba_cols]
    if method != "vote":
        return mean.idxmax(axis=1)
    # a tie in votes goes to the label of higher mean probability (< 1 vote)
    return votes.add(mean.reindex(columns=votes.columns, fill_value=0.0) * 1e-3).idxmax(axis=1)

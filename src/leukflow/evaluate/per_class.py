"""Per-class metrics (precision, recall, F1, support) for datasets with several labels."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_fscore_support


def per_class_metrics(
    labels: pd.Series | np.ndarray,
    preds: pd.Series | np.ndarray,
    classes: list[str] | None = None,
) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, with macro and weighted averages.

    Parameters
    ----------
    labels, preds : array-like of str
        Truth and multi-class call per row. A call that is no class (e.g.
        :data:`.NO_ROI`) is wrong for every class.
    classes : list of str, optional
        The classes to report (default: the labels present), in this order.

    Returns
    -------
    pandas.DataFrame
        ``class, precision, recall, f1, support``: one row per class, then
        ``macro`` (unweighted mean over classes) and ``weighted`` (mean
        weighted by support). A ratio with a zero denominator is NaN and is
        left out of the averages (a class with no test member in a fold).
    """
    labels, preds = np.asarray(labels).astype(str), np.asarray(preds).astype(str)
    classes = sorted(set(labels)) if classes is None else list(classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined ratios are NaN by design
        prec, rec, f1, support = precision_recall_fscore_support(
            labels, preds, labels=classes, zero_division=np.nan
        )
        rows = [
            {
                "class": c,
                "precision": prec[i],
                "recall": rec[i],
                "f1": f1[i],
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        ]
        for average in ("macro", "weighted"):
            a_prec, a_rec, a_f1, _ = precision_recall_fscore_support(
                labels, preds, labels=classes, average=average, zero_division=np.nan
            )
            rows.append(
                {
                    "class": average,
                    "precision": a_prec,
                    "recall": a_rec,
                    "f1": a_f1,
                    "support": int(support.sum()),
                }
            )
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])


def score_folds_per_class(
    predictions: pd.DataFrame, *, pred: str = "pred", classes: list[str] | None = None
) -> pd.DataFrame:
    """:func:`per_class_metrics` per classifier and fold, and on the pooled predictions.

    Parameters
    ----------
    predictions : pandas.DataFrame
        ``classifier, fold, label`` and the call column ``pred``.
    pred : str
        ``pred`` for ROI predictions, ``pred_class`` for image predictions.
    classes : list of str, optional
        Classes to report in every fold (default: all labels in ``predictions``).

    Returns
    -------
    pandas.DataFrame
        ``classifier, fold`` (an int as text, or ``pooled``), ``class,
        precision, recall, f1, support``.
    """
    classes = sorted(predictions["label"].astype(str).unique()) if classes is None else classes
    parts = []
    for clf, by_clf in predictions.groupby("classifier", sort=True):
        for fold, part in by_clf.groupby("fold", sort=True):
            table = per_class_metrics(part["label"], part[pred], classes)
            parts.append(table.assign(classifier=clf, fold=str(fold)))
        table = per_class_metrics(by_clf["label"], by_clf[pred], classes)
        parts.append(table.assign(classifier=clf, fold="pooled"))
    cols = ["classifier", "fold", "class", "precision", "recall", "f1", "support"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)

"""Binary metrics (positive label vs the rest) per set of predictions, per fold and over folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

#: Binary metrics (positive label vs the rest), in the column order of metrics.csv.
#: Brier score: lower is better; every other metric: higher is better.
METRICS = [
    "accuracy",
    "precision",
    "sensitivity",
    "specificity",
    "f1",
    "roc_auc",
    "balanced_accuracy",
    "pr_auc",
    "brier",
]
COUNTS = ["tn", "fp", "fn", "tp", "n"]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def binary_metrics(
    labels: pd.Series, preds: pd.Series, scores: pd.Series, *, positive_label: str
) -> dict[str, float]:
    """Compute the :data:`METRICS` and :data:`COUNTS` of one set of predictions.

    Every label other than ``positive_label`` counts as negative. Balanced
    accuracy is the mean of sensitivity and specificity (the one defined when
    only one class is present, as scikit-learn does); PR-AUC is the average
    precision (the step-wise area under the precision-recall curve); Brier is
    the mean squared difference between ``scores`` and the 0/1 truth. A ratio
    with a zero denominator, and ROC-AUC and PR-AUC on a single class, are NaN.
    """
    y = np.asarray(labels) == positive_label
    p = np.asarray(preds) == positive_label
    s = np.asarray(scores, dtype=float)
    tn, fp, fn, tp = confusion_matrix(y, p, labels=[False, True]).ravel().tolist()
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    both = 0 < y.sum() < len(y)
    defined = [v for v in (sensitivity, specificity) if not np.isnan(v)]
    return {
        "accuracy": _ratio(tp + tn, len(y)),
        "precision": _ratio(tp, tp + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": float(roc_auc_score(y, s)) if both else float("nan"),
        "balanced_accuracy": float(np.mean(defined)) if defined else float("nan"),
        "pr_auc": float(average_precision_score(y, s)) if both else float("nan"),
        "brier": float(np.mean((s - y) ** 2)) if len(y) else float("nan"),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "n": len(y),
    }


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

"""Bootstrap confidence intervals of the binary metrics, resampling whole patient groups.

ROIs and fields of one patient are not independent, so the pooled
out-of-fold predictions are resampled by group (a cluster bootstrap).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix

from leukflow.evaluate.metrics import COUNTS, METRICS, binary_metrics

#: Columns of the ``pooled`` rows: the metric named, and its bootstrap interval.
CI_COLUMNS = ["metric", "ci_low", "ci_high"]


def bootstrap_metrics(
    labels: pd.Series | np.ndarray,
    preds: pd.Series | np.ndarray,
    scores: pd.Series | np.ndarray,
    groups: pd.Series | np.ndarray,
    *,
    positive_label: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    block: int = 200,
) -> pd.DataFrame:
    """Point estimates of :data:`.METRICS` with percentile bootstrap intervals over groups.

    Each bootstrap sample draws ``n_groups`` groups with replacement and keeps
    all rows of every drawn group (a cluster bootstrap): rows of one patient
    move together, so the interval reflects how many independent patients
    there are, not how many ROIs. The resampling is vectorised: per-group
    confusion counts, squared errors and per-score positive/negative counts
    are multiplied by a ``(block, n_groups)`` matrix of draw counts.

    Parameters
    ----------
    labels, preds : array-like of str
        Truth and call per row (ROI or image).
    scores : array-like of float
        Probability of ``positive_label`` per row.
    groups : array-like
        The resampling unit per row (patient group).
    positive_label : str
        The positive class.
    n_boot : int
        Bootstrap samples (>= 1).
    seed : int
        Seed of the draws; the same seed gives the same interval.
    level : float
        Coverage of the interval, in (0, 1).
    block : int
        Samples computed at once (memory: ``block * n_unique_scores`` floats).

    Returns
    -------
    pandas.DataFrame
        ``metric, estimate, ci_low, ci_high``, one row per :data:`.METRICS`.
        Samples in which a metric is undefined (no positive drawn...) are
        left out of its interval; NaN when none defines it.
    """
    if n_boot < 1:
        raise ValueError(f"bootstrap_metrics: n_boot must be >= 1; got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_metrics: level must be in (0, 1); got {level}")
    labels, preds, scores = np.asarray(labels), np.asarray(preds), np.asarray(scores, float)
    point = binary_metrics(labels, preds, scores, positive_label=positive_label)
    g, _ = pd.factorize(np.asarray(groups))
    n_groups = int(g.max()) + 1 if len(g) else 0
    if n_groups == 0:
        return _interval_table(point, np.nan, np.nan)
    counts, pos, neg = _group_tables(labels == positive_label, preds == positive_label, scores, g)
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        draws = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=size)
        w = draws.astype(float)
        samples.append(_weighted_metrics(w @ counts.T, (pos.T @ w.T).T, (neg.T @ w.T).T))
    values = np.concatenate(samples)  # (n_boot, len(METRICS))
    tail = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN metric: NaN interval
        low, high = np.nanpercentile(values, [tail, 100 - tail], axis=0)
    return _interval_table(point, low, high)


def _interval_table(
    point: dict, low: np.ndarray | float, high: np.ndarray | float
) -> pd.DataFrame:
    """``metric, estimate, ci_low, ci_high``, one row per metric."""
    return pd.DataFrame(
        {
            "metric": METRICS,
            "estimate": [point[m] for m in METRICS],
            "ci_low": low,
            "ci_high": high,
        }
    )


def _group_tables(
    y: np.ndarray, p: np.ndarray, scores: np.ndarray, g: np.ndarray
) -> tuple[np.ndarray, csr_matrix, csr_matrix]:
    """Sum per group what a bootstrap sample weights by the group's draw count.

    Returns ``(6, n_groups)`` tn, fp, fn, tp, n and squared-error sums per
    group, and ``(n_groups, n_scores)`` positives and negatives per group at
    each distinct score, scores ascending.
    """
    n_groups = int(g.max()) + 1

    def per_group(x: np.ndarray) -> np.ndarray:
        return np.bincount(g, weights=x.astype(float), minlength=n_groups)

    counts = np.stack(
        [
            per_group(~y & ~p),
            per_group(~y & p),
            per_group(y & ~p),
            per_group(y & p),
            per_group(np.ones_like(y)),
            per_group((scores - y) ** 2),
        ]
    )
    _, u = np.unique(scores, return_inverse=True)
    n_u = int(u.max()) + 1
    pos = csr_matrix((np.ones(y.sum()), (g[y], u[y])), shape=(n_groups, n_u))
    neg = csr_matrix((np.ones((~y).sum()), (g[~y], u[~y])), shape=(n_groups, n_u))
    return counts, pos, neg


def _weighted_metrics(counts: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """:data:`.METRICS` per bootstrap sample from weighted counts.

    ``counts``: ``(b, 6)`` tn, fp, fn, tp, n, squared-error sums; ``pos``,
    ``neg``: ``(b, n_scores)`` positives and negatives at each distinct score,
    scores ascending. Returns ``(b, len(METRICS))``.
    """
    tn, fp, fn, tp, n, sq = counts.T
    with np.errstate(divide="ignore", invalid="ignore"):
        sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
        balanced = np.where(
            np.isnan(sensitivity),
            specificity,
            np.where(np.isnan(specificity), sensitivity, (sensitivity + specificity) / 2),
        )
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        below = np.cumsum(neg, axis=1) - neg  # negatives scored lower; ties count half
        auc = (pos * (below + neg / 2)).sum(1) / (n_pos * n_neg)
        # average precision: precision at each distinct score, from the top down
        hits, false = np.cumsum(pos[:, ::-1], axis=1), np.cumsum(neg[:, ::-1], axis=1)
        precision_at = np.divide(
            hits, hits + false, out=np.zeros_like(hits), where=hits + false > 0
        )
        ap = (pos[:, ::-1] * precision_at).sum(1) / n_pos
        both = (n_pos > 0) & (n_neg > 0)
        columns = {
            "accuracy": (tp + tn) / n,
            "precision": tp / (tp + fp),
            "sensitivity": sensitivity,
            "specificity": specificity,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "roc_auc": np.where(both, auc, np.nan),
            "balanced_accuracy": balanced,
            "pr_auc": np.where(both, ap, np.nan),
            "brier": sq / n,
        }
    return np.column_stack([columns[m] for m in METRICS])


def score_pooled(
    predictions: pd.DataFrame,
    groups: pd.Series,
    *,
    positive_label: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """Rows ``fold == "pooled"``: metrics of all out-of-fold predictions, with bootstrap CIs.

    Parameters
    ----------
    predictions : pandas.DataFrame
        ROI or image predictions (``classifier, image_id, label, pred, score``).
    groups : pandas.Series
        Image id -> resampling group (patient group from folds.csv).
    positive_label, n_boot, seed, level
        See :func:`bootstrap_metrics`.

    Returns
    -------
    pandas.DataFrame
        Per classifier, one row per metric: ``classifier, fold`` (``pooled``),
        the metric's point estimate in its own column (other metrics empty),
        :data:`.COUNTS` of the pooled predictions, ``metric, ci_low, ci_high``.
    """
    rows = []
    for clf, part in predictions.groupby("classifier", sort=True):
        group = part["image_id"].map(groups)
        if group.isna().any():
            raise ValueError(
                f"score_pooled: image {part.loc[group.isna(), 'image_id'].iloc[0]!r} has no group"
            )
        counts = binary_metrics(
            part["label"], part["pred"], part["score"], positive_label=positive_label
        )
        ci = bootstrap_metrics(
            part["label"],
            part["pred"],
            part["score"],
            group,
            positive_label=positive_label,
            n_boot=n_boot,
            seed=seed,
            level=level,
        )
        for row in ci.itertuples():
            rows.append(
                {
                    "classifier": clf,
                    "fold": "pooled",
                    row.metric: row.estimate,
                    **{c: counts[c] for c in COUNTS},
                    "metric": row.metric,
                    "ci_low": row.ci_low,
                    "ci_high": row.ci_high,
                }
            )
    return pd.DataFrame(rows, columns=["classifier", "fold", *METRICS, *COUNTS, *CI_COLUMNS])

"""Report: plots people look at rather than read.

Every plot function takes the same arguments: ``levels`` (level name ->
predictions of one classifier, pooled over the test folds: ``roi`` from
:func:`leukflow.evaluate.classifiers.fit_predict_folds`, ``image`` from
:func:`leukflow.evaluate.images.aggregate_images`), a ``title``, the
``positive_label`` and the PNG ``path``; :data:`PLOTTERS` maps each kind of
plot to its function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import ConfusionMatrixDisplay, roc_auc_score, roc_curve

from leukflow.core.figures import subplots
from leukflow.data.io import atomic_path
from leukflow.evaluate.conformal import augrc, confidence_and_correct

if TYPE_CHECKING:
    from leukflow.evaluate.scoring import Evaluation

log = logging.getLogger(__name__)


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _class_call(preds: pd.DataFrame) -> pd.Series:
    """Return the multi-class call: ``pred_class`` of image predictions, ``pred`` of ROIs."""
    return preds["pred_class"] if "pred_class" in preds else preds["pred"]


def plot_confusion(
    levels: dict[str, pd.DataFrame], *, title: str, positive_label: str, path: str | Path
) -> None:
    """Confusion matrices per level (ROI, image), pooled over all test folds.

    The first row is binary: ``positive_label`` against every other label,
    shown as ``not_<positive>``. When the predictions hold more than two
    labels, a second row shows the multi-class matrices (rows: truth, columns:
    the multi-class call; an image without ROIs is called ``no_roi``).

    Parameters
    ----------
    levels : dict of str to pandas.DataFrame
        Level name -> predictions with ``label`` and ``pred`` columns (and
        ``pred_class`` for image predictions).
    title : str
        Figure title (dataset, encoder, classifier).
    positive_label : str
        Shown last on both axes of the binary matrices.
    path : str or Path
        PNG to write.
    """
    negative = "not_" + positive_label
    classes = sorted(set().union(*(set(p["label"].astype(str)) for p in levels.values())))
    multi = len(classes) > 2
    rows = 2 if multi else 1
    side = max(5.0, 0.75 * len(classes) + 2.5) if multi else 5.0
    fig, axes = subplots(rows, len(levels), figsize=(side * len(levels), 4 * rows), squeeze=False)
    for ax, (level, preds) in zip(axes[0], levels.items(), strict=True):
        truth = preds["label"].where(preds["label"] == positive_label, negative)
        called = preds["pred"].where(preds["pred"] == positive_label, negative)
        ConfusionMatrixDisplay.from_predictions(
            truth, called, labels=[negative, positive_label], ax=ax, colorbar=False, cmap="Blues"
        )
        ax.set_title(f"{level} level, {positive_label} vs rest (n={len(preds)})", fontsize=10)
    if multi:
        for ax, (level, preds) in zip(axes[1], levels.items(), strict=True):
            calls = _class_call(preds).astype(str)
            shown = classes + sorted(set(calls) - set(classes))
            ConfusionMatrixDisplay.from_predictions(
                preds["label"].astype(str),
                calls,
                labels=shown,
                ax=ax,
                colorbar=False,
                cmap="Blues",
                xticks_rotation=45,
            )
            ax.set_title(f"{level} level, {len(classes)} classes")
    fig.suptitle(title)
    _save(fig, path)


def plot_roc(
    levels: dict[str, pd.DataFrame], *, title: str, positive_label: str, path: str | Path
) -> None:
    """ROC curves per level: one thin line per test fold, the pooled curve bold.

    Parameters
    ----------
    levels : dict of str to pandas.DataFrame
        Level name -> predictions with ``fold``, ``label`` and ``score``.
    title, positive_label, path
        See :func:`plot_confusion`.
    """
    fig, axes = subplots(1, len(levels), figsize=(4.6 * len(levels), 4.4), squeeze=False)
    for ax, (level, preds) in zip(axes[0], levels.items(), strict=True):
        y = (preds["label"] == positive_label).to_numpy()
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        if not 0 < y.sum() < len(y):
            ax.text(0.5, 0.5, "one class only: no ROC", ha="center", va="center")
        else:
            aucs = []
            for _fold, part in preds.groupby("fold", sort=True):
                yf = (part["label"] == positive_label).to_numpy()
                if 0 < yf.sum() < len(yf):
                    fpr, tpr, _ = roc_curve(yf, part["score"])
                    ax.plot(fpr, tpr, color="tab:blue", alpha=0.35, lw=1)
                    aucs.append(roc_auc_score(yf, part["score"]))
            fpr, tpr, _ = roc_curve(y, preds["score"])
            pooled = roc_auc_score(y, preds["score"])
            spread = (
                f"; folds {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"
                if len(aucs) > 1
                else ""
            )
            ax.plot(fpr, tpr, color="tab:blue", lw=2.2, label=f"pooled AUC {pooled:.3f}{spread}")
            ax.plot([], [], color="tab:blue", alpha=0.35, lw=1, label="one test fold")
            ax.legend(loc="lower right", fontsize=8)
        ax.set(
            xlim=(-0.01, 1.01),
            ylim=(-0.01, 1.01),
            aspect="equal",
            xlabel="1 - specificity (false positive rate)",
            ylabel="sensitivity (true positive rate)",
            title=f"{level} level (n={len(preds)}, {int(y.sum())} {positive_label})",
        )
    fig.suptitle(title)
    _save(fig, path)


def plot_calibration(
    levels: dict[str, pd.DataFrame],
    *,
    title: str,
    positive_label: str,
    path: str | Path,
    n_bins: int = 10,
) -> None:
    """Calibration (reliability) curves per level, pooled, over a histogram of the scores.

    Parameters
    ----------
    levels : dict of str to pandas.DataFrame
        Level name -> predictions with ``label`` and ``score``.
    title, positive_label, path
        See :func:`plot_confusion`.
    n_bins : int
        Equal-width score bins; empty bins are not drawn.
    """
    fig, axes = subplots(
        2,
        len(levels),
        figsize=(4.6 * len(levels), 5.6),
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]},
        sharex="col",
    )
    edges = np.linspace(0, 1, n_bins + 1)
    for i, (level, preds) in enumerate(levels.items()):
        top, bottom = axes[0, i], axes[1, i]
        y = (preds["label"] == positive_label).to_numpy()
        score = preds["score"].to_numpy(dtype=float)
        top.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
        if len(y):
            observed, predicted = calibration_curve(y, score, n_bins=n_bins, strategy="uniform")
            brier = float(np.mean((score - y) ** 2))
            top.plot(
                predicted,
                observed,
                marker="o",
                color="tab:red",
                label=f"pooled folds (Brier {brier:.3f})",
            )
        top.legend(loc="upper left", fontsize=8)
        top.set(
            ylim=(-0.02, 1.02),
            ylabel=f"observed share {positive_label}",
            title=f"{level} level (n={len(preds)})",
        )
        bottom.hist(
            [score[y], score[~y]],
            bins=edges,
            stacked=True,
            color=["tab:red", "tab:grey"],
            label=[positive_label, f"not {positive_label}"],
        )
        bottom.set(
            xlim=(-0.02, 1.02), xlabel=f"predicted probability of {positive_label}", ylabel="count"
        )
        bottom.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)


def plot_wbc_counts(
    levels: dict[str, pd.DataFrame], *, title: str, positive_label: str, path: str | Path
) -> None:
    """White cells (ROIs) found per image, by true class and by correct/missed image call.

    S0's failure analysis: the ALL images it missed held few white cells.
    Uses the ``image`` level only.

    Parameters
    ----------
    levels : dict of str to pandas.DataFrame
        Must hold ``image``: image predictions with ``label``, ``pred`` and ``n_rois``.
    title, positive_label, path
        See :func:`plot_confusion`.
    """
    images = levels["image"]
    counts = images["n_rois"].to_numpy(dtype=int)
    bins = np.arange(0, (counts.max() if len(counts) else 0) + 2) - 0.5
    truth = (images["label"] == positive_label).to_numpy()
    called = (images["pred"] == positive_label).to_numpy()
    fig, axes = subplots(1, 2, figsize=(11, 4.2))
    by_class = {
        str(c): counts[(images["label"] == c).to_numpy()]
        for c in sorted(images["label"].astype(str).unique())
    }
    by_call = {
        "correct": counts[truth == called],
        f"missed {positive_label}": counts[truth & ~called],
        f"false {positive_label}": counts[~truth & called],
    }
    panels = (
        (axes[0], by_class, "by true class"),
        (axes[1], by_call, f"by image call ({positive_label} or not)"),
    )
    for ax, groups, what in panels:
        shown = {name: values for name, values in groups.items() if len(values)}
        if shown:
            ax.hist(
                list(shown.values()),
                bins=bins,
                label=[f"{k} ({len(v)})" for k, v in shown.items()],
            )
            ax.legend(fontsize=8)
        ax.set(
            xlabel="white cells (ROIs) found in the image",
            ylabel="images",
            title=f"WBCs per image, {what}",
        )
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    _save(fig, path)


def plot_risk_coverage(
    levels: dict[str, pd.DataFrame], *, title: str, positive_label: str, path: str | Path
) -> None:
    """Generalised risk-coverage curve per level, with its area (AUGRC, Traub et al. 2024).

    Predictions are accepted from the most confident (highest class
    probability) down; the curve shows the share accepted against the share
    accepted *and* wrong (multi-class call), pooled over the test folds. Where
    conformal prediction is on, the point of the review rule (cells or images
    not sent to review) is marked.

    Parameters
    ----------
    levels : dict of str to pandas.DataFrame
        ``roi``: ROI predictions with ``proba_<label>``; ``image``: image
        predictions with ``confidence`` (images without ROIs left out).
    title, positive_label, path
        See :func:`plot_confusion` (``positive_label`` unused: the curve is multi-class).
    """
    fig, axes = subplots(1, len(levels), figsize=(4.6 * len(levels), 4.2), squeeze=False)
    for ax, (level, preds) in zip(axes[0], levels.items(), strict=True):
        confidence, correct = confidence_and_correct(preds, level)
        area, coverage, risk = augrc(confidence, correct)
        ax.plot(coverage, risk, color="tab:red", label=f"AUGRC {area:.4f}")
        error = 1 - correct.mean() if len(correct) else 0.0
        ax.plot([0, 1], [0, error], ls=":", color="grey", lw=1, label="random ranking")
        if "review" in preds and len(preds):
            kept = ~preds["review"].to_numpy(bool)
            if level == "image":
                kept = kept[(preds["n_rois"] > 0).to_numpy()]
            ax.scatter([kept.mean()], [np.mean(kept & ~correct)], color="black", zorder=3,
                       label="kept by the review rule")  # fmt: skip
        ax.legend(loc="upper left", fontsize=8)
        ax.set(xlim=(0, 1), xlabel="coverage (share accepted)",
               ylabel="generalised risk (accepted and wrong)",
               title=f"{level} level (n={len(correct)})")  # fmt: skip
    fig.suptitle(title)
    _save(fig, path)


#: Plot kind (the PNG name's suffix: ``<classifier>_<kind>.png``) -> function.
PLOTTERS: dict[str, Callable[..., None]] = {
    "confusion": plot_confusion,
    "roc": plot_roc,
    "calibration": plot_calibration,
    "wbc_count": plot_wbc_counts,
    "risk_coverage": plot_risk_coverage,
}


def plot_classifier(
    result: Evaluation,
    paths: Mapping[str, str | Path],
    *,
    classifier: str,
    title: str,
    positive_label: str,
) -> None:
    """Draw each kind of plot in ``paths`` of one classifier's ROI and image predictions.

    Parameters
    ----------
    result : leukflow.evaluate.scoring.Evaluation
        Its ``roi_predictions`` and ``image_predictions`` are drawn (rows of
        ``classifier`` only).
    paths : mapping of str to path
        Kind of plot (a key of :data:`PLOTTERS`) -> PNG path.
    classifier, title, positive_label
        The rows to draw, the figure title, the positive class.
    """
    levels = {
        level: preds[preds["classifier"] == classifier]
        for level, preds in (("roi", result.roi_predictions), ("image", result.image_predictions))
    }
    for kind, path in paths.items():
        PLOTTERS[kind](levels, title=title, positive_label=positive_label, path=path)


def plot_history(history: pd.DataFrame, *, title: str, path: str | Path) -> None:
    """Training curves of one encoder: loss and accuracy per epoch, train and validation.

    ``history`` has :data:`leukflow.learn.train.HISTORY_COLUMNS`; an encoder that was
    not trained (``frozen``, ``hog``) has no rows and gets a figure saying so.
    """
    fig, axes = subplots(1, 2, figsize=(8, 3.2))
    if history.empty:
        for ax in axes:
            ax.text(0.5, 0.5, "not trained (frozen)", ha="center", va="center")
            ax.set_axis_off()
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        if history.empty:
            continue
        ax.plot(history["epoch"], history[metric], marker="o", label="training")
        val = history.get(f"val_{metric}")
        if val is not None and val.notna().any():
            ax.plot(history["epoch"], val, marker="s", label="inner validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def plot_k_scores(table: pd.DataFrame, *, title: str, path: str | Path) -> None:
    """S2's k-selection curves: mean score (mean of SSIM, Dice, IoU) against k, per class.

    ``table`` is :func:`leukflow.segment.summarise_k_scores`'s; an empty one
    (kmeans did not meet expert masks) gets a figure saying so.
    """
    fig, ax = subplots(figsize=(5, 3.2))
    if table.empty:
        ax.text(0.5, 0.5, "no k selection: kmeans did not meet expert masks",
                ha="center", va="center", fontsize=9)  # fmt: skip
        ax.set_axis_off()
    for label, part in table.groupby("label"):
        ax.plot(part["k"], part["score"], marker="o", label=str(label),
                linewidth=2.5 if label == "all" else 1.2)  # fmt: skip
    if not table.empty:
        ax.set(xlabel="k (colour clusters)", ylabel="mean(SSIM, Dice, IoU)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, title="class")
    ax.set_title(title)
    _save(fig, path)

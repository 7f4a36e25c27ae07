"""Report: plots people look at rather than read."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay

from leukflow.io import atomic_path

log = logging.getLogger(__name__)


def plot_confusion(
    levels: dict[str, pd.DataFrame], *, title: str, positive_label: str, path: str | Path
) -> None:
    """One confusion matrix per level (ROI, image), pooled over all test folds.

    Parameters
    ----------
    levels : dict of str to pandas.DataFrame
        Level name -> predictions with ``label`` and ``pred`` columns.
    title : str
        Figure title (dataset, encoder, classifier).
    positive_label : str
        Shown last on both axes; every other label is shown as ``not_<positive>``.
    path : str or Path
        PNG to write.
    """
    negative = "not_" + positive_label
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 4), squeeze=False)
    for ax, (level, preds) in zip(axes[0], levels.items(), strict=True):
        truth = preds["label"].where(preds["label"] == positive_label, negative)
        called = preds["pred"].where(preds["pred"] == positive_label, negative)
        ConfusionMatrixDisplay.from_predictions(
            truth, called, labels=[negative, positive_label], ax=ax, colorbar=False, cmap="Blues"
        )
        ax.set_title(f"{level} level (n={len(preds)})")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

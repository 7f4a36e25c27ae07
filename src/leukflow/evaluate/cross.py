"""Cross-dataset evaluation: fit on one dataset, score on another.

The honest protocol of a train -> test pair: one encoder trained on every
labelled ROI of the train dataset embeds both datasets; each classifier is
fitted on the train dataset's embeddings and applied to every ROI of the test
dataset, which nothing upstream has seen. Metrics are the binary ones of
:mod:`leukflow.evaluate.metrics` (positive label vs the rest), with bootstrap
intervals that resample the test dataset's patient groups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from leukflow.core.figures import subplots
from leukflow.data.io import atomic_path
from leukflow.evaluate.classifiers import fit_predict_folds
from leukflow.evaluate.folds import TRAIN_ONLY
from leukflow.evaluate.reliance import without_reliance
from leukflow.evaluate.scoring import (
    Evaluation,
    ScoringSettings,
    calibrate_models,
    score_predictions,
)

log = logging.getLogger(__name__)

#: The metrics of cross_dataset.csv, each with ``<metric>_ci_low`` and ``<metric>_ci_high``.
CROSS_METRICS = ["accuracy", "balanced_accuracy", "roc_auc"]
KEYS = ["train", "test", "encoder", "classifier", "level"]
#: Conformal columns of cross_dataset.csv: the sets calibrated on the train
#: dataset, measured on the test dataset (does the guarantee carry over?).
CROSS_CONFORMAL = ["conformal_alpha", "coverage", "set_size", "review_share", "calibration_n"]
COLUMNS = [
    *KEYS,
    *[f"{m}{s}" for m in CROSS_METRICS for s in ("", "_ci_low", "_ci_high")],
    "n",
    *CROSS_CONFORMAL,
]
#: The one "fold" of a cross-dataset evaluation: the whole test dataset.
TEST_FOLD = 0


def shared_images(
    train_ids: Iterable[str],
    test_ids: Iterable[str],
    manifest: pd.DataFrame,
    duplicates: pd.DataFrame,
) -> list[tuple[str, str, str]]:
    """Find the images of a test dataset that its train dataset also holds.

    Two datasets can hold the same cell under different names: a file copied
    into both, or the same field re-saved or re-compressed. Either is leakage
    across a cross-dataset pair.

    Parameters
    ----------
    train_ids, test_ids : iterable of str
        The two datasets' image ids.
    manifest : pandas.DataFrame
        ``image_id`` and ``pixel_sha256`` of every image (``manifest.parquet``).
    duplicates : pandas.DataFrame
        ``image_id_a``, ``image_id_b``, ``kind`` pairs (``duplicates.csv``).

    Returns
    -------
    list of tuple
        Sorted ``(train image, test image, kind)``: ``exact`` for the same
        decoded pixels, else the pair's kind in ``duplicates``.
    """
    train, test = set(train_ids), set(test_ids)
    pixels = manifest.set_index("image_id")["pixel_sha256"]
    by_pixels: dict[str, list[str]] = {}
    for image in sorted(train & set(pixels.index)):
        by_pixels.setdefault(pixels[image], []).append(image)
    found = {
        (a, b): "exact"
        for b in sorted(test & set(pixels.index))
        for a in by_pixels.get(pixels[b], [])
    }
    for a, b, kind in duplicates[["image_id_a", "image_id_b", "kind"]].itertuples(index=False):
        for x, y in ((a, b), (b, a)):
            if x in train and y in test:
                found.setdefault((x, y), kind)
    return sorted((a, b, kind) for (a, b), kind in found.items())


def evaluate_cross(
    train_embeddings: np.ndarray,
    train_rois: pd.DataFrame,
    test_embeddings: np.ndarray,
    test_rois: pd.DataFrame,
    test_images: pd.DataFrame,
    *,
    classifiers: Mapping[str, Mapping],
    settings: ScoringSettings,
    inner_folds: int = 3,
) -> Evaluation:
    """Fit every classifier on one dataset's ROIs and score it on another's.

    Parameters
    ----------
    train_embeddings : numpy.ndarray
        ``(n_train_rois, dim)`` embeddings of the train dataset's ROIs,
        row-aligned with ``train_rois``.
    train_rois : pandas.DataFrame
        ``roi_id, image_id, label`` and, for classifiers with a ``grid``,
        ``group`` (patient group).
    test_embeddings : numpy.ndarray
        ``(n_test_rois, dim)`` embeddings of the test dataset's ROIs by the
        same encoder, row-aligned with ``test_rois``.
    test_rois : pandas.DataFrame
        ``roi_id, image_id, label``.
    test_images : pandas.DataFrame
        ``image_id, label, group`` of every test image (those without ROIs
        included: called negative); the bootstrap resamples ``group``.
    classifiers, inner_folds
        See :func:`leukflow.evaluate.classifiers.fit_predict_folds`. A test label absent
        from the training labels gets probability 0 and is never predicted;
        without the positive label in training every score is 0.
    settings : leukflow.evaluate.scoring.ScoringSettings
        The positive label, image aggregation and bootstrap.

    Returns
    -------
    Evaluation
        As :func:`leukflow.evaluate.scoring.evaluate_embeddings`, with one test fold
        (:data:`TEST_FOLD`); the ``pooled`` metric rows carry the intervals.
        ``models`` maps ``(classifier, TEST_FOLD)`` to the fitted pipeline.

    Raises
    ------
    ValueError
        When the embeddings and ROI tables disagree in length, or an image is
        in both datasets.
    """
    _check_cross(train_embeddings, train_rois, test_embeddings, test_rois, test_images)
    cols = ["roi_id", "image_id", "label"]
    rois = pd.concat(
        [
            train_rois.assign(fold=TRAIN_ONLY),
            test_rois[cols].assign(fold=TEST_FOLD),
        ],
        ignore_index=True,
    )
    rois["label"] = rois["label"].astype(str)
    embeddings = np.concatenate([np.asarray(train_embeddings), np.asarray(test_embeddings)])
    roi_preds, models = fit_predict_folds(
        {TEST_FOLD: embeddings},
        rois,
        classifiers=classifiers,
        positive_label=settings.positive_label,
        return_models=True,
        inner_folds=inner_folds,
    )
    images = test_images[["image_id", "label", "group"]].assign(
        label=lambda d: d["label"].astype(str), fold=TEST_FOLD, leaky=False
    )
    # cross-conformal on the train dataset only (its ROIs are the training part)
    calibration = calibrate_models({TEST_FOLD: embeddings}, rois, models, settings)
    out = score_predictions(roi_preds, images, settings, calibration, scheme="cross_conformal")
    out.models = models
    return out


def _check_cross(
    train_embeddings: np.ndarray,
    train_rois: pd.DataFrame,
    test_embeddings: np.ndarray,
    test_rois: pd.DataFrame,
    test_images: pd.DataFrame,
) -> None:
    """Refuse misaligned tables and shared images; say which labels one side lacks."""
    for name, emb, rois in (("train", train_embeddings, train_rois),
                            ("test", test_embeddings, test_rois)):  # fmt: skip
        if len(emb) != len(rois):
            raise ValueError(
                f"evaluate_cross: {len(emb)} {name} embeddings for {len(rois)} {name} ROIs"
            )
    shared = set(train_rois["image_id"]) & set(test_images["image_id"])
    if shared:
        raise ValueError(
            f"evaluate_cross: {len(shared)} images are in both the train and the test "
            f"dataset, e.g. {sorted(shared)[0]!r}; expected two distinct datasets"
        )
    missing = set(train_rois["label"]) - set(test_images["label"])
    if missing:
        log.info("evaluate_cross: training labels %s are absent from the test dataset",
                 sorted(map(str, missing)))  # fmt: skip
    unseen = set(test_images["label"]) - set(train_rois["label"])
    if unseen:
        log.warning("evaluate_cross: test labels %s are absent from the training dataset "
                    "and are never predicted", sorted(map(str, unseen)))  # fmt: skip


def summarise_cross(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per train, test, encoder, classifier and level, from the pooled metric rows.

    Parameters
    ----------
    metrics : pandas.DataFrame
        :func:`evaluate_cross` metrics with ``train, test, encoder`` columns
        added (several pairs and encoders concatenated).

    Returns
    -------
    pandas.DataFrame
        :data:`COLUMNS`: each of :data:`CROSS_METRICS` with its interval,
        ``n`` (test ROIs at level ``roi``, test images at level ``image``) and
        :data:`CROSS_CONFORMAL` (coverage on the test dataset of sets
        calibrated on the train dataset; NaN when conformal prediction is off).
    """
    pooled = metrics[metrics["fold"].astype(str) == "pooled"]
    rows = []
    for keys, part in pooled.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, keys, strict=True))
        by_metric = part.set_index("metric")
        for m in CROSS_METRICS:
            row[m] = by_metric.at[m, m]
            row[f"{m}_ci_low"] = by_metric.at[m, "ci_low"]
            row[f"{m}_ci_high"] = by_metric.at[m, "ci_high"]
        row["n"] = int(part["n"].iloc[0])
        for col in CROSS_CONFORMAL:
            row[col] = part[col].iloc[0] if col in part else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def plot_cross_matrix(
    table: pd.DataFrame,
    path: str | Path,
    *,
    within: pd.DataFrame | None = None,
    metric: str = "balanced_accuracy",
    level: str = "roi",
) -> None:
    """Train x test heatmaps of ``metric``, one panel per encoder and classifier.

    Each cell also gives the prediction sets' coverage (``cov``) where the
    table has it: off the diagonal, the train dataset's sets on the test
    dataset, against ``1 - alpha`` within it.

    Parameters
    ----------
    table : pandas.DataFrame
        :func:`summarise_cross` output.
    path : str or Path
        The PNG.
    within : pandas.DataFrame, optional
        metrics.csv: the diagonal shows each dataset's pooled grouped-CV
        figure (non-leaky rows) for the same encoder and classifier.
    metric, level
        The figure shown and the level it is read at.
    """
    rows = table[table["level"] == level]
    panels = list(rows.groupby(["encoder", "classifier"], sort=True).groups) or [("", "")]
    datasets = sorted(set(rows["train"]) | set(rows["test"]))
    n = len(datasets)
    fig, axes = subplots(
        1, len(panels), figsize=(1.2 + (0.9 * n + 1.2) * len(panels), 1.6 + 0.8 * n),
        squeeze=False,
    )  # fmt: skip
    for ax, (encoder, classifier) in zip(axes[0], panels, strict=True):
        grid, coverage = np.full((n, n), np.nan), np.full((n, n), np.nan)
        mine = rows[(rows["encoder"] == encoder) & (rows["classifier"] == classifier)]
        for r in mine.itertuples():
            grid[datasets.index(r.train), datasets.index(r.test)] = getattr(r, metric)
            coverage[datasets.index(r.train), datasets.index(r.test)] = getattr(
                r, "coverage", np.nan
            )
        if within is not None and len(within):
            within = without_reliance(within)
            diag = within[
                (within["fold"].astype(str) == "pooled")
                & (within["metric"] == metric)
                & (within["level"] == level)
                & ~within["leaky"].astype(bool)
                & (within["encoder"] == encoder)
                & (within["classifier"] == classifier)
            ]
            for r in diag.itertuples():
                if r.dataset in datasets:
                    i = datasets.index(r.dataset)
                    grid[i, i] = getattr(r, metric)
                    coverage[i, i] = getattr(r, "coverage", np.nan)
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(n):
            for j in range(n):
                if not np.isnan(grid[i, j]):
                    colour = "black" if grid[i, j] > 0.6 else "white"
                    text = f"{grid[i, j]:.2f}"
                    if not np.isnan(coverage[i, j]):
                        text += f"\ncov {coverage[i, j]:.2f}"
                    ax.text(j, i, text, ha="center", va="center", color=colour,
                            fontsize=9, fontweight="bold" if i != j else "normal")  # fmt: skip
        ax.set_xticks(range(n), datasets, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n), datasets, fontsize=8)
        ax.set_xlabel("test dataset")
        ax.set_ylabel("train dataset")
        ax.set_title(f"{encoder} / {classifier}", fontsize=9)
    fig.suptitle(
        f"{level} {metric.replace('_', ' ')} (cov: prediction-set coverage); diagonal: "
        "grouped CV within the dataset",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

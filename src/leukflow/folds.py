"""Folds: patient-grouped, label-stratified cross-validation splits.

All fields (and so all ROIs) of one patient share one fold, so no fold's test
part holds a patient that its training part has seen.
"""

from __future__ import annotations

import logging
import warnings

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)


class LeakageError(ValueError):
    """A group appears on both sides of a split."""


def assign_folds(manifest: pd.DataFrame, *, k: int, seed: int) -> pd.DataFrame:
    """Assign every image a test fold, per dataset, grouped by patient.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``image_id``, ``dataset``, ``label``, ``patient``.
    k : int
        Number of folds (>= 2); each dataset needs at least ``k`` patients.
    seed : int
        Seed of the shuffle inside :class:`~sklearn.model_selection.StratifiedGroupKFold`.

    Returns
    -------
    pandas.DataFrame
        ``dataset, image_id, patient, label, fold`` (fold in ``0..k-1``).
    """
    if k < 2:
        raise ValueError(f"assign_folds: k must be >= 2; got {k}")
    parts = []
    for dataset, images in manifest.groupby("dataset", sort=True):
        n_patients = images["patient"].nunique()
        if n_patients < k:
            raise ValueError(
                f"assign_folds: dataset {dataset!r} has {n_patients} patients, fewer than "
                f"k={k} folds; lower folds.k or add patients"
            )
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        fold = pd.Series(-1, index=images.index)
        with warnings.catch_warnings():
            # sklearn warns when a class has fewer groups than folds; we log it instead.
            warnings.simplefilter("ignore", UserWarning)
            splits = splitter.split(images, images["label"], groups=images["patient"])
            for i, (_, test) in enumerate(splits):
                fold.iloc[test] = i
        parts.append(images.assign(fold=fold.astype(int)))
        counts = parts[-1].groupby(["fold", "label"]).size().unstack(fill_value=0)
        log.info("%s folds (images per label):\n%s", dataset, counts.to_string())
    folds = pd.concat(parts)[["dataset", "image_id", "patient", "label", "fold"]]
    check_no_leakage(folds)
    return folds.reset_index(drop=True)


def check_no_leakage(folds: pd.DataFrame, group: str = "patient") -> None:
    """Fail if any group of any dataset has images in more than one fold.

    Raises
    ------
    LeakageError
        Naming the dataset, the groups and their folds.
    """
    spread = folds.groupby(["dataset", group])["fold"].nunique()
    leaked = spread[spread > 1]
    if len(leaked):
        examples = ", ".join(f"{d}/{g}" for d, g in leaked.index[:5])
        raise LeakageError(
            f"{len(leaked)} {group}(s) have images in several folds, so they would be on "
            f"both the training and the test side: {examples}"
        )


def label_rois(rois: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Give every ROI its image's label and fold (ROIs inherit the image's label).

    Parameters
    ----------
    rois : pandas.DataFrame
        With an ``image_id`` column.
    folds : pandas.DataFrame
        Output of :func:`assign_folds`.

    Returns
    -------
    pandas.DataFrame
        ``rois`` with ``label`` and ``fold`` columns, in the same row order.
    """
    merged = rois.merge(folds[["image_id", "label", "fold"]], on="image_id", how="left")
    orphans = merged["fold"].isna()
    if orphans.any():
        raise ValueError(
            f"label_rois: {int(orphans.sum())} ROIs belong to images missing from the folds "
            f"table, e.g. {merged.loc[orphans, 'image_id'].iloc[0]!r}"
        )
    return merged.astype({"fold": int})

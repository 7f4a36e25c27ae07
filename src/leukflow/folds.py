"""Folds: patient-grouped, label-stratified cross-validation splits.

All fields (and so all ROIs) of one patient share one fold, so no fold's test
part holds a patient that its training part has seen.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)


class LeakageError(ValueError):
    """A group appears on both sides of a split."""


def group_patients(manifest: pd.DataFrame, duplicates: pd.DataFrame | None = None) -> pd.Series:
    """Join patients that share a duplicate image into one group.

    Parameters
    ----------
    manifest : pandas.DataFrame
        ``image_id, dataset, patient``.
    duplicates : pandas.DataFrame, optional
        ``image_id_a, image_id_b`` pairs (see :func:`leukflow.ingest.find_duplicates`).

    Returns
    -------
    pandas.Series
        Per manifest row, the group: the first patient (in sorted order) of
        the connected set of patients, prefixed by the dataset.
    """
    key = manifest["dataset"] + "/" + manifest["patient"].astype(str)
    nodes = sorted(set(key))
    index = {name: i for i, name in enumerate(nodes)}
    of_image = dict(zip(manifest["image_id"], key.map(index), strict=True))
    pairs = [] if duplicates is None else [
        (of_image[a], of_image[b])
        for a, b in zip(duplicates["image_id_a"], duplicates["image_id_b"], strict=True)
        if a in of_image and b in of_image
    ]  # fmt: skip
    rows = [i for i, _ in pairs]
    cols = [j for _, j in pairs]
    graph = coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(nodes), len(nodes)))
    _, component = connected_components(graph, directed=False)
    first = {}
    for i, c in enumerate(component):
        first.setdefault(c, nodes[i])
    return key.map(lambda name: first[component[index[name]]]).rename("group")


def assign_folds(
    manifest: pd.DataFrame, *, k: int, seed: int, duplicates: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Assign every image a test fold, per dataset, grouped by patient and duplicates.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``image_id``, ``dataset``, ``label``, ``patient``.
    k : int
        Number of folds (>= 2); each dataset needs at least ``k`` patients.
    seed : int
        Seed of the shuffle inside :class:`~sklearn.model_selection.StratifiedGroupKFold`.
    duplicates : pandas.DataFrame, optional
        Duplicate image pairs; their patients are joined into one group so that
        no copy of a test image is trained on.

    Returns
    -------
    pandas.DataFrame
        ``dataset, image_id, patient, group, label, fold`` (fold in ``0..k-1``).
    """
    if k < 2:
        raise ValueError(f"assign_folds: k must be >= 2; got {k}")
    manifest = manifest.assign(group=group_patients(manifest, duplicates))
    parts = []
    for dataset, images in manifest.groupby("dataset", sort=True):
        n_groups = images["group"].nunique()
        if n_groups < k:
            raise ValueError(
                f"assign_folds: dataset {dataset!r} has {n_groups} patient groups, fewer than "
                f"k={k} folds; lower folds.k or add patients"
            )
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        fold = pd.Series(-1, index=images.index)
        with warnings.catch_warnings():
            # sklearn warns when a class has fewer groups than folds; we log it instead.
            warnings.simplefilter("ignore", UserWarning)
            splits = splitter.split(images, images["label"], groups=images["group"])
            for i, (_, test) in enumerate(splits):
                fold.iloc[test] = i
        parts.append(images.assign(fold=fold.astype(int)))
        counts = parts[-1].groupby(["fold", "label"]).size().unstack(fill_value=0)
        log.info("%s folds (images per label):\n%s", dataset, counts.to_string())
    folds = pd.concat(parts)[["dataset", "image_id", "patient", "group", "label", "fold"]]
    check_no_leakage(folds, "patient")
    check_no_leakage(folds, "group")
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

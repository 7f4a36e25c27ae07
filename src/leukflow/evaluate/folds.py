"""Folds: patient-grouped, label-stratified cross-validation splits.

Under the ``grouped`` protocol all fields (and so all ROIs) of one patient,
and of every patient sharing a duplicate image with it, share one fold, so no
fold's test part holds a patient that its training part has seen. The
``random`` protocol reproduces the published seeds' image-level split and
marks every row ``leaky``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

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
        ``image_id_a, image_id_b`` pairs (see :func:`leukflow.data.duplicates.find_duplicates`).

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


PROTOCOLS = ("grouped", "random")
#: ``fold`` of a holdout split's images that are only trained on, never tested.
TRAIN_ONLY = -1
#: The stratum that labels with fewer members than folds share (see :func:`fold_strata`).
RARE_STRATUM = "__rare__"


def fold_strata(labels: pd.Series, members: pd.Series, *, k: int, dataset: str = "") -> pd.Series:
    """Stratification labels: each label, with labels that have fewer members than folds pooled.

    A label held by fewer than ``k`` members (patient groups, or images under
    the random protocol) cannot be put in every fold. Such labels are
    stratified together as one :data:`RARE_STRATUM`, so their members are
    spread over the folds as evenly as the pooled stratum allows; when even
    the pooled stratum has fewer than ``k`` members, the splitter places them
    without a stratification guarantee. Either way some folds test no member
    of the label, and the fold that tests a label's only member trains without
    that label. The label itself is never changed; a warning is logged.

    Parameters
    ----------
    labels : pandas.Series
        Label of each image.
    members : pandas.Series
        What the splitter keeps together, per image (group, or image id).
    k : int
        Number of folds.
    dataset : str
        Named in the warning.

    Returns
    -------
    pandas.Series
        The stratum of each image, aligned with ``labels``.
    """
    counts = members.groupby(labels).nunique()
    rare = counts[counts < k]
    if rare.empty:
        return labels.copy()
    listing = ", ".join(f"{label!r} ({n})" for label, n in rare.items())
    log.warning(
        "assign_folds: dataset %r has labels with fewer members than k=%d folds: %s; they "
        "are stratified together as one rare stratum (%d members): some folds test none of "
        "them, and a fold that tests all of a label's members trains without that label",
        dataset, k, listing, int(rare.sum()),
    )  # fmt: skip
    return labels.where(~labels.isin(rare.index), RARE_STRATUM)


def assign_folds(
    manifest: pd.DataFrame,
    *,
    k: int,
    seed: int,
    duplicates: pd.DataFrame | None = None,
    protocol: str | Mapping[str, str] = "grouped",
    holdout_fraction: float = 0.0,
) -> pd.DataFrame:
    """Assign every image a test fold, per dataset.

    Parameters
    ----------
    manifest : pandas.DataFrame
        Columns ``image_id``, ``dataset``, ``label``, ``patient``.
    k : int
        Number of folds (>= 2); each dataset needs at least ``k`` patient
        groups (``grouped``) or images (``random``).
    seed : int
        Seed of the shuffle inside the splitter.
    duplicates : pandas.DataFrame, optional
        Duplicate image pairs; their patients are joined into one group so that
        no copy of a test image is trained on.
    protocol : str
        ``grouped``: :class:`~sklearn.model_selection.StratifiedGroupKFold` by
        patient group, checked for leakage. ``random``: the published seeds'
        leaky protocol, :class:`~sklearn.model_selection.StratifiedKFold` over
        images, ignoring patients and duplicates; every row is marked ``leaky``.
        Labels with fewer members than folds: see :func:`fold_strata`. A
        mapping gives each dataset its own protocol (a dataset it does not
        name is ``grouped``).
    holdout_fraction : float
        0: ``k``-fold cross-validation. In (0, 0.5]: one holdout split instead
        (``k`` is ignored), the seeds' 80/20 (0.2) or, with the encoders'
        ``val_fraction`` as the validation part, 80/10/10 (0.1): the test part
        is the first of ``round(1 / holdout_fraction)`` stratified folds of
        the protocol (fold 0), every other image has fold :data:`TRAIN_ONLY`.

    Returns
    -------
    pandas.DataFrame
        ``dataset, image_id, patient, group, label, fold, leaky`` (fold in
        ``0..k-1``, or 0 and :data:`TRAIN_ONLY` for a holdout; leaky True for
        the random protocol).

    Raises
    ------
    LeakageError
        When a grouped split puts a patient or a group on both sides.
    """
    _check_fold_args(k, holdout_fraction, protocol)
    protocols = protocol if isinstance(protocol, Mapping) else None
    n_splits = round(1 / holdout_fraction) if holdout_fraction else k
    manifest = manifest.assign(group=group_patients(manifest, duplicates))
    parts = []
    for dataset, images in manifest.groupby("dataset", sort=True):
        proto = protocol if protocols is None else protocols.get(str(dataset), "grouped")
        leaky = proto == "random"
        fold = _split(images, str(dataset), leaky=leaky, n_splits=n_splits, seed=seed)
        if holdout_fraction:
            fold = fold.where(fold == 0, TRAIN_ONLY)
        parts.append(images.assign(fold=fold.astype(int), leaky=leaky))
        counts = parts[-1].groupby(["fold", "label"]).size().unstack(fill_value=0)
        log.info(
            "%s folds, %s protocol%s (images per label; fold %d: training only):\n%s",
            dataset, proto, f", holdout {holdout_fraction:g}" if holdout_fraction else "",
            TRAIN_ONLY, counts.to_string(),
        )  # fmt: skip
        if leaky:
            log.warning(
                "assign_folds: dataset %r: protocol random splits images ignoring patients "
                "and duplicates; results are marked leaky=True (the published seeds' "
                "protocol, not an honest estimate)",
                dataset,
            )
    columns = ["dataset", "image_id", "patient", "group", "label", "fold", "leaky"]
    folds = pd.concat(parts)[columns].reset_index(drop=True)
    check_no_leakage(folds, "patient")
    check_no_leakage(folds, "group")
    return folds


def _check_fold_args(k: int, holdout_fraction: float, protocol: str | Mapping[str, str]) -> None:
    """Refuse k < 2, a holdout fraction outside (0, 0.5] (0: k-fold), an unknown protocol."""
    if k < 2:
        raise ValueError(f"assign_folds: k must be >= 2; got {k}")
    if not 0 <= holdout_fraction <= 0.5:
        raise ValueError(
            f"assign_folds: holdout_fraction must be 0 (k-fold) or in (0, 0.5]; "
            f"got {holdout_fraction}"
        )
    for name in protocol.values() if isinstance(protocol, Mapping) else [protocol]:
        if name not in PROTOCOLS:
            raise ValueError(f"assign_folds: protocol must be one of {PROTOCOLS}; got {name!r}")


def _split(
    images: pd.DataFrame, dataset: str, *, leaky: bool, n_splits: int, seed: int
) -> pd.Series:
    """Test fold per image of one dataset: stratified, grouped by patient unless ``leaky``."""
    unit, kind = ("image_id", "images") if leaky else ("group", "patient groups")
    n_units = images[unit].nunique()
    if n_units < n_splits:
        raise ValueError(
            f"assign_folds: dataset {dataset!r} has {n_units} {kind}, fewer than "
            f"k={n_splits} folds; lower folds.k or add patients"
        )
    strata = fold_strata(images["label"], images[unit], k=n_splits, dataset=dataset)
    fold = pd.Series(-1, index=images.index)
    with warnings.catch_warnings():
        # sklearn warns when a stratum has fewer members than folds; fold_strata logged it.
        warnings.simplefilter("ignore", UserWarning)
        if leaky:
            splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            splits = splitter.split(images, strata)
        else:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            splits = splitter.split(images, strata, groups=images["group"])
        for i, (_, test) in enumerate(splits):
            fold.iloc[test] = i
    return fold


def check_no_leakage(folds: pd.DataFrame, group: str = "patient") -> None:
    """Fail if any group of any dataset has images in more than one fold.

    Rows marked ``leaky`` (the random protocol, leaky by design) are not checked.

    Parameters
    ----------
    folds : pandas.DataFrame
        ``dataset``, ``fold``, the ``group`` column and optionally ``leaky``.
    group : str
        The column that must not span folds.

    Raises
    ------
    LeakageError
        Naming the dataset, the groups and their folds.
    """
    if "leaky" in folds:
        folds = folds[~folds["leaky"].astype(bool)]
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


def compare_labelled_sets(manifest: pd.DataFrame, state_path: str | Path) -> str:
    """Say how the labelled images differ from the previous run's; remember this run's.

    ``state_path`` (under ``results_dir/cache``) keeps the image ids, labels
    and patients of the last fold assignment. Returns ``""`` on the first run
    or when nothing changed, else a sentence such as ``"the labelled set
    changed since the last fold assignment: 60 -> 63 images (3 new, 0 gone,
    0 relabelled)"``.
    """
    state_path = Path(state_path)
    now = {
        str(r.image_id): [str(r.label), str(r.patient)]
        for r in manifest[["image_id", "label", "patient"]].itertuples(index=False)
    }
    before = None
    if state_path.is_file():
        try:
            before = json.loads(state_path.read_text())
        except ValueError:
            before = None
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path.with_name(f".{state_path.name}.tmp")
    tmp.write_text(json.dumps(now, sort_keys=True))
    os.replace(tmp, state_path)
    if before is None or before == now:
        return ""
    new = len(now.keys() - before.keys())
    gone = len(before.keys() - now.keys())
    changed = sum(before[k] != now[k] for k in now.keys() & before.keys())
    return (
        f"the labelled set changed since the last fold assignment: {len(before)} -> "
        f"{len(now)} images ({new} new, {gone} gone, {changed} relabelled or regrouped)"
    )

"""Reliance test: how far the trained model leans on the background around the cell.

The shortcut controls (:mod:`leukflow.evaluate.controls`) retrain everything
on altered crops; this test keeps the main model exactly as trained and scores
it on each test fold's crops altered two ways:

- ``cell_only``: the background painted black, the cell kept;
- ``swapped_background``: the cell kept, the background taken from a crop of
  an image of another class in the same test fold (the model has not trained
  on it), the donor's own cell filled with the donor's median background colour.

A figure that falls on ``swapped_background`` says the model reads the class
from the background. The cell is found in each crop as the controls find it
(:func:`leukflow.evaluate.controls.cell_mask`: the central grey-Otsu component,
holes filled, grown by 2 px); ROI crops carry no stored mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from leukflow.evaluate.classifiers import _concat_rows, _test_rows, head_predictions
from leukflow.evaluate.controls import cell_mask

#: Reliance test -> what its crops keep.
RELIANCE_KINDS = {
    "cell_only": "the cell; background black",
    "swapped_background": "the cell; background from a crop of another class",
}


def without_reliance(metrics: pd.DataFrame) -> pd.DataFrame:
    """Drop the reliance test's rows of a metrics.csv table (``control`` ``reliance_*``).

    They share their dataset, encoder and classifier with the model's own rows;
    readers that key on those (comparison, cross-dataset diagonal, ``leukflow
    metrics``) take the model's own rows only.
    """
    if "control" not in metrics:
        return metrics
    return metrics[~metrics["control"].astype(str).str.startswith("reliance_")]


def _check(crops: np.ndarray, masks: np.ndarray, where: str) -> None:
    if crops.ndim != 4 or crops.shape[-1] != 3 or masks.shape != crops.shape[:3]:
        raise ValueError(
            f"{where}: expected (n, S, S, 3) crops and (n, S, S) masks; got {crops.shape} "
            f"and {masks.shape}"
        )


def paint_background(crops: np.ndarray, masks: np.ndarray, value: int = 0) -> np.ndarray:
    """Paint every pixel outside each crop's cell ``value`` (black by default).

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8.
    masks : numpy.ndarray
        ``(n, S, S)`` bool, True on the cell.

    Returns
    -------
    numpy.ndarray
        ``(n, S, S, 3)`` uint8.
    """
    _check(crops, masks, "paint_background")
    return np.where(masks[..., None], crops, np.uint8(value)).astype(np.uint8)


def swap_background(
    crops: np.ndarray, masks: np.ndarray, donors: np.ndarray, donor_masks: np.ndarray
) -> np.ndarray:
    """Keep each crop's cell and put it on its donor's background.

    Under the donor's own cell, the donor's median background colour stands in
    (the donor's cell must not leak its class). A donor without background
    pixels gives mid-grey.

    Parameters
    ----------
    crops, donors : numpy.ndarray
        ``(n, S, S, 3)`` uint8; ``donors[i]`` gives crop ``i`` its background.
    masks, donor_masks : numpy.ndarray
        ``(n, S, S)`` bool cell masks of ``crops`` and ``donors``.

    Returns
    -------
    numpy.ndarray
        ``(n, S, S, 3)`` uint8.
    """
    _check(crops, masks, "swap_background")
    _check(donors, donor_masks, "swap_background (donors)")
    if len(donors) != len(crops):
        raise ValueError(f"swap_background: {len(crops)} crops but {len(donors)} donors")
    background = donors.copy()
    for i in range(len(donors)):
        outside = donors[i][~donor_masks[i]]
        fill = np.median(outside, axis=0) if len(outside) else np.full(3, 128.0)
        background[i][donor_masks[i]] = np.round(fill).astype(np.uint8)
    return np.where(masks[..., None], crops, background).astype(np.uint8)


def pick_donors(labels: np.ndarray, folds: np.ndarray, *, seed: int) -> np.ndarray:
    """For each ROI, a random ROI of another class in the same fold (else in any fold).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int row of each ROI's donor; -1 where no ROI has another class.
    """
    labels, folds = np.asarray(labels).astype(str), np.asarray(folds)
    rng = np.random.default_rng(seed)
    donors = np.full(len(labels), -1)
    for i in range(len(labels)):
        other = labels != labels[i]
        same_fold = np.flatnonzero(other & (folds == folds[i]))
        pool = same_fold if len(same_fold) else np.flatnonzero(other)
        if len(pool):
            donors[i] = rng.choice(pool)
    return donors


def reliance_crops(
    crops: np.ndarray, kind: str, *, labels: np.ndarray, folds: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Make the crops of reliance test ``kind`` (see :data:`RELIANCE_KINDS`).

    A crop without another-class donor keeps its own background for
    ``swapped_background`` (a one-class dataset has nothing to swap).
    """
    if kind not in RELIANCE_KINDS:
        raise ValueError(f"reliance_crops: expected one of {sorted(RELIANCE_KINDS)}; got {kind!r}")
    masks = (
        np.stack([cell_mask(c) for c in crops]) if len(crops) else np.zeros(crops.shape[:3], bool)
    )
    if kind == "cell_only":
        return paint_background(crops, masks)
    donors = pick_donors(labels, folds, seed=seed)
    own = donors < 0
    donors = np.where(own, np.arange(len(crops)), donors)
    swapped = swap_background(crops, masks, crops[donors], masks[donors])
    return np.where(own[:, None, None, None], crops, swapped)


def reliance_predictions(
    crops: np.ndarray,
    rois: pd.DataFrame,
    *,
    embed: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray | None]],
    models: Mapping[str, Mapping[int, object]],
    head_classes: list[str] | None,
    positive_label: str,
) -> pd.DataFrame:
    """ROI predictions of the unchanged models on (altered) test-fold crops.

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n_rois, S, S, 3)`` uint8, row-aligned with ``rois``.
    rois : pandas.DataFrame
        ``roi_id, image_id, label, fold``.
    embed : callable
        ``(fold, crops) -> (embeddings, head softmax or None)`` with that fold's encoder.
    models : mapping
        Classifier name -> fold -> fitted pipeline (``predict_proba``, ``classes_``).
    head_classes : list of str or None
        The head's classes: also score the head as ``cnn_softmax``; None: not.
    positive_label : str
        The positive class.

    Returns
    -------
    pandas.DataFrame
        The columns of :func:`leukflow.evaluate.classifiers.fit_predict_folds`:
        one block per classifier, then ``cnn_softmax``.
    """
    folds = sorted(int(k) for k in rois["fold"].unique() if k >= 0)
    labels = sorted(map(str, rois["label"].unique()))
    parts = []
    head: dict[int, np.ndarray] = {}
    for fold in folds:
        test = (rois["fold"] == fold).to_numpy()
        emb, softmax = embed(fold, crops[test])
        for name, per_fold in models.items():
            clf = per_fold[fold]
            # as fit_predict_folds: the classifier's own call, and its probabilities
            parts.append(_test_rows(rois, test, name, fold, clf.predict(emb),
                                    clf.predict_proba(emb), [str(c) for c in clf.classes_],
                                    labels, positive_label))  # fmt: skip
        if head_classes is not None and softmax is not None:
            head[fold] = np.zeros((len(rois), len(head_classes)))
            head[fold][test] = softmax
    table = _concat_rows(parts, labels)
    if head:
        heads = head_predictions(head, head_classes, rois, positive_label=positive_label)
        table = pd.concat([table, heads], ignore_index=True)
    return table

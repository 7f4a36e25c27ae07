"""QA: how well segmentation matches the ground truth a dataset brings.

Two kinds of ground truth come with the manifest (see the README's contract):

``mask``
    an expert mask (``mask_path``): Dice, IoU and SSIM of the method's mask
    (every labelled pixel) against the whole cell and against the nucleus
    (:func:`leukflow.segment.masks.truth_masks` reads both conventions).
``boxes`` / ``points``
    white-cell boxes (BCCD) or blast centres (ALL-IDB1 ``.xyc``) in
    ``annotations``: cells hit by a ROI (recall) and ROIs that hit no cell
    (false ROIs). A box is hit when a ROI's region centroid lies in it, a point
    when it lies in a ROI's crop box. ALL-IDB1 marks blasts only, so its false
    ROIs include every other white cell.

Each method is run exactly as segmentation runs it (:func:`segment_field`), on
the images with ground truth only. ``kmeans`` choosing k against the masks
(``select_by_masks``) is scored against the masks it chose by: its rows carry
``oracle = True``, an upper bound rather than a held-out score.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from leukflow.core.figures import subplots
from leukflow.core.parallel import parallel_map
from leukflow.data.io import atomic_path, read_image
from leukflow.segment import (
    FieldSegmentation,
    SegmentParams,
    field_rois,
    match_rois_to_boxes,
    match_rois_to_points,
    read_truth,
    resize_nearest,
    score_mask,
    segment_field,
)

log = logging.getLogger(__name__)

MASK_SCORES = [
    f"{metric}_{target}" for target in ("cell", "nucleus") for metric in ("dice", "iou", "ssim")
]
PER_IMAGE_COLUMNS = [
    "image_id", "method", "label", "truth", "n_rois", "reason", *MASK_SCORES,
    "n_cells", "hits", "false_rois", "quality", "oracle",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "method", "truth", "n_images", "n_without_rois", *MASK_SCORES,
    "dice_cell_median", "dice_nucleus_median", "n_cells", "hits", "recall",
    "false_rois", "false_rois_per_image", "oracle", "note",
]  # fmt: skip
NO_TRUTH_NOTE = "no ground truth: no image of this dataset has a mask or box/point annotations"


def ground_truth(mask_path: str, annotations: str) -> dict[str, Any]:
    """Read the ground truth of one manifest row.

    Parameters
    ----------
    mask_path : str
        ``""`` when none.
    annotations : str
        The manifest's JSON text: ``{"boxes": [...]}``, ``{"points": [...]}`` or ``{}``.

    Returns
    -------
    dict
        Any of ``mask`` (the path), ``boxes`` (``(n, 4)`` x0, y0, x1, y1) and
        ``points`` (``(n, 2)`` x, y); empty when the row has none.
    """
    truth: dict[str, Any] = {}
    if isinstance(mask_path, str) and mask_path:
        truth["mask"] = mask_path
    notes = json.loads(annotations) if isinstance(annotations, str) and annotations else {}
    if "boxes" in notes:
        truth["boxes"] = np.asarray(notes["boxes"], dtype=float).reshape(-1, 4)
    if "points" in notes:
        truth["points"] = np.asarray(notes["points"], dtype=float).reshape(-1, 2)
    return truth


def images_with_truth(images: pd.DataFrame) -> pd.DataFrame:
    """Keep the manifest rows that have a mask or box/point annotations."""
    keep = [
        bool(ground_truth(m, a))
        for m, a in zip(images["mask_path"], images["annotations"], strict=True)
    ]
    return images[keep]


def _segment_with_truth(
    row: dict, params: SegmentParams
) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray] | None, FieldSegmentation]:
    root = Path(row["root"])
    rgb = read_image(root / row["path"])
    truth = ground_truth(row["mask_path"], row["annotations"])
    masks = read_truth(root / truth["mask"]) if "mask" in truth else None
    return rgb, truth, masks, segment_field(rgb, params, masks)


def score_image(row: dict, params: SegmentParams) -> dict[str, Any]:
    """Score one method on one image against the image's ground truth.

    Parameters
    ----------
    row : dict
        A manifest row (``image_id``, ``root``, ``path``, ``label``, ``mask_path``,
        ``annotations``).
    params : SegmentParams
        The method and its parameters.

    Returns
    -------
    dict
        One row of :data:`PER_IMAGE_COLUMNS`. ``quality`` ranks the overlays:
        the mean of whole-cell and nucleus Dice for masks; for annotations the
        F1 of recall and ROI precision (1 when there is nothing to find and
        nothing is found).
    """
    _, truth, masks, seg = _segment_with_truth(row, params)
    rois, _ = field_rois(seg, row["image_id"], params)
    out: dict[str, Any] = dict.fromkeys(PER_IMAGE_COLUMNS, np.nan)
    out.update(
        image_id=row["image_id"], method=params.method, label=row["label"],
        truth="+".join(truth), n_rois=len(rois), reason=seg.reason,
        oracle=bool(masks is not None and params.uses_masks),
    )  # fmt: skip
    if masks is not None:
        pred = seg.labels > 0
        for target in ("cell", "nucleus"):
            scores = score_mask(pred, resize_nearest(masks[target], pred.shape))
            for metric in ("dice", "iou", "ssim"):
                out[f"{metric}_{target}"] = scores[metric]
        out["quality"] = (out["dice_cell"] + out["dice_nucleus"]) / 2
    if "boxes" in truth or "points" in truth:
        n_cells = hits = false = 0
        if "boxes" in truth:
            boxes = pd.DataFrame(truth["boxes"], columns=["x0", "y0", "x1", "y1"])
            h, f = match_rois_to_boxes(rois, boxes)
            n_cells, hits, false = n_cells + len(boxes), hits + h, false + f
        if "points" in truth:
            h, f = match_rois_to_points(rois, truth["points"])
            n_cells, hits, false = n_cells + len(truth["points"]), hits + h, false + f
        recall = hits / n_cells if n_cells else 1.0
        precision = (len(rois) - false) / len(rois) if len(rois) else 1.0
        quality = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        out.update(n_cells=n_cells, hits=hits, false_rois=false)
        if masks is None:
            out["quality"] = quality
    return out


def _score_task(task: tuple[dict, dict]) -> dict[str, Any]:
    row, params = task
    return score_image(row, SegmentParams(**params))


def score_segmentation(
    images: pd.DataFrame,
    params: SegmentParams,
    *,
    methods: Sequence[str] = (),
    n_workers: int = 1,
) -> pd.DataFrame:
    """Score ``params.method`` and ``methods`` on every image with ground truth.

    Parameters
    ----------
    images : pandas.DataFrame
        Manifest rows of one dataset.
    params : SegmentParams
        The run's segmentation; each method in ``methods`` runs with the same
        parameters (its own from ``params``) and only ``method`` replaced.
    methods : sequence of str
        Further methods to score; duplicates of ``params.method`` are ignored.
    n_workers : int
        Worker processes.

    Returns
    -------
    pandas.DataFrame
        :data:`PER_IMAGE_COLUMNS`, one row per image with ground truth and method.
    """
    names = list(dict.fromkeys([params.method, *methods]))
    rows = images_with_truth(images).to_dict("records")
    tasks = [(row, asdict(replace(params, method=m))) for m in names for row in rows]
    log.info("QA: %d images with ground truth x %d methods %s", len(rows), len(names), names)
    scored = list(parallel_map(_score_task, tasks, n_workers, desc="qa", chunksize=4))
    return pd.DataFrame(scored, columns=PER_IMAGE_COLUMNS)


def summarise_qa(per_image: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """One row per method and kind of ground truth; a note when there is none.

    Parameters
    ----------
    per_image : pandas.DataFrame
        :func:`score_segmentation`'s table.
    methods : sequence of str
        The methods scored (a row each even without ground truth).

    Returns
    -------
    pandas.DataFrame
        :data:`SUMMARY_COLUMNS`: mean mask scores, median Dice, and for
        annotations the pooled ``recall`` (hits / cells) and
        ``false_rois_per_image``.
    """
    if per_image.empty:
        rows = [
            {**dict.fromkeys(SUMMARY_COLUMNS, np.nan), "method": m, "truth": "none",
             "n_images": 0, "n_without_rois": 0, "oracle": False, "note": NO_TRUTH_NOTE}
            for m in dict.fromkeys(methods)
        ]  # fmt: skip
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    rows = []
    for (method, truth), part in per_image.groupby(["method", "truth"], sort=False):
        row: dict[str, Any] = {
            "method": method, "truth": truth, "n_images": len(part),
            "n_without_rois": int((part["n_rois"] == 0).sum()),
            **part[MASK_SCORES].mean().to_dict(),
            "dice_cell_median": part["dice_cell"].median(),
            "dice_nucleus_median": part["dice_nucleus"].median(),
            "n_cells": part["n_cells"].sum(min_count=1), "hits": part["hits"].sum(min_count=1),
            "false_rois": part["false_rois"].sum(min_count=1),
            "oracle": bool(part["oracle"].any()), "note": "",
        }  # fmt: skip
        if pd.notna(row["n_cells"]):
            row["recall"] = row["hits"] / row["n_cells"] if row["n_cells"] else np.nan
            row["false_rois_per_image"] = row["false_rois"] / len(part)
        if row["oracle"]:
            row["note"] = "kmeans chose k and segment against these masks: an upper bound"
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def pick_examples(per_image: pd.DataFrame, n: int = 3) -> dict[str, pd.DataFrame]:
    """Pick the ``n`` best, median and worst images by ``quality`` (ties: image id order).

    Returns
    -------
    dict
        ``best``, ``median``, ``worst`` -> rows of ``per_image`` (possibly
        overlapping when there are fewer than ``3 * n`` images).
    """
    ranked = per_image.sort_values(["quality", "image_id"], ascending=[False, True])
    ranked = ranked.reset_index(drop=True)
    mid = max(0, (len(ranked) - n) // 2)
    return {
        "best": ranked.head(n),
        "median": ranked.iloc[mid : mid + n],
        "worst": ranked.tail(n).iloc[::-1],
    }


def plot_overlays(
    images: pd.DataFrame,
    per_image: pd.DataFrame,
    params: SegmentParams,
    path: str | Path,
    *,
    title: str,
    n: int = 3,
) -> None:
    """Draw a PNG grid: rows best, median and worst images of ``params.method``; n columns.

    Each panel shows the field as segmented with the method's regions outlined in
    magenta and its ROI boxes dashed; the ground truth in green (whole cell,
    boxes, points) and cyan (nucleus). Without ground truth the figure says so.
    """
    scored = per_image[per_image["method"] == params.method]
    fig, axes = subplots(3, n, figsize=(3.2 * n, 3.4 * 3), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    if scored.empty:
        axes[1, n // 2].text(
            0.5, 0.5, NO_TRUTH_NOTE.replace(": ", ":\n"), ha="center", va="center", wrap=True
        )
    else:
        rows = images.set_index("image_id")
        for r, (case, picked) in enumerate(pick_examples(scored, n).items()):
            for c, rec in enumerate(picked.itertuples(index=False)):
                row = {"image_id": rec.image_id, **rows.loc[rec.image_id].to_dict()}
                _draw(axes[r, c], row, params)
                axes[r, c].set_title(
                    f"{case}: {rec.image_id}\nquality {rec.quality:.2f}, {rec.n_rois} ROI",
                    fontsize=8,
                )
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _draw(ax: plt.Axes, row: dict, params: SegmentParams) -> None:
    _, truth, masks, seg = _segment_with_truth(row, params)
    s = seg.scale
    ax.imshow(seg.rgb)
    if masks is not None:
        for target, colour in (("cell", "lime"), ("nucleus", "cyan")):
            mask = resize_nearest(masks[target], seg.labels.shape)
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=colour, linewidths=1)
    for x0, y0, x1, y1 in truth.get("boxes", np.zeros((0, 4))) * s:
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="lime", lw=1))
    points = truth.get("points", np.zeros((0, 2))) * s
    if len(points):
        ax.plot(points[:, 0], points[:, 1], "x", color="lime", ms=6)
    if seg.labels.any():
        ax.contour(seg.labels > 0, levels=[0.5], colors="magenta", linewidths=1)
    rois, _ = field_rois(seg, row["image_id"], params)
    for roi in rois.itertuples(index=False):
        corner, side = (roi.x0 * s, roi.y0 * s), (roi.x1 - roi.x0) * s
        ax.add_patch(plt.Rectangle(corner, side, side, fill=False, ec="magenta", lw=0.8, ls="--"))
    ax.set_xlim(-0.5, seg.rgb.shape[1] - 0.5)  # ROI boxes may reach past the field
    ax.set_ylim(seg.rgb.shape[0] - 0.5, -0.5)
    ax.set_axis_off()

"""Many fields in parallel: dask tasks over chunks of images, one ROI table out."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import dask
import numpy as np
import pandas as pd

from leukflow.io import CropStoreWriter, InvalidInputError, read_image
from leukflow.parallel import single_threaded_worker
from leukflow.segment.masks import truth_masks
from leukflow.segment.rois import (
    IMAGE_COLUMNS,
    ROI_COLUMNS,
    SegmentParams,
    field_roi_records,
    segment_field,
)

log = logging.getLogger(__name__)

#: Per image and k, the best kmeans candidate's scores against the expert mask.
K_SCORE_COLUMNS = ["image_id", "k", "segment", "ssim", "dice", "iou", "score", "chosen"]


class SegmentedImages(NamedTuple):
    """What :func:`segment_images` returns.

    Attributes
    ----------
    rois : pandas.DataFrame
        :data:`ROI_COLUMNS`, in image order.
    crops : numpy.ndarray
        ``(n_rois, roi_size_px, roi_size_px, 3)`` uint8, row-aligned with ``rois``.
    images : pandas.DataFrame
        :data:`IMAGE_COLUMNS`, one row per image, those without ROIs included
        (``reason``: a read error or one of ``too_dark``, ``saturated``,
        ``blank``, ``no_cell``).
    k_scores : pandas.DataFrame
        :data:`K_SCORE_COLUMNS` (kmeans choosing k against masks only).
    """

    rois: pd.DataFrame
    crops: np.ndarray
    images: pd.DataFrame
    k_scores: pd.DataFrame


def read_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Read an expert mask file as ``{"cell": ..., "nucleus": ...}`` bool masks."""
    return truth_masks(read_image(path))


def _segment_chunk(
    paths: Sequence[str], image_ids: Sequence[str], mask_paths: Sequence[str], params: dict
) -> SegmentedImages:
    p = SegmentParams(**params)
    roi_rows, crops, images, k_scores = [], [], [], []
    for path, image_id, mask_path in zip(paths, image_ids, mask_paths, strict=True):
        try:
            rgb = read_image(path)
            truth = read_truth(mask_path) if (p.uses_masks and mask_path) else None
        except InvalidInputError as err:  # changed or vanished since ingest
            log.warning("%s: %s", image_id, err)
            images.append(
                {"image_id": image_id, "n_rois": 0, "reason": err.reason, "note": str(err),
                 "scale": 1.0, "k": 0}
            )  # fmt: skip
            continue
        seg = segment_field(rgb, p, truth)
        rois, stack = field_roi_records(seg, image_id, p)
        roi_rows += rois
        crops.append(stack)
        images.append(
            {"image_id": image_id, "n_rois": len(rois), "reason": seg.reason, "note": seg.note,
             "scale": seg.scale, "k": seg.k}
        )  # fmt: skip
        k_scores += [{"image_id": image_id, **row} for row in seg.k_scores]
    return SegmentedImages(
        pd.DataFrame(roi_rows, columns=ROI_COLUMNS),
        np.concatenate(crops) if crops else _no_crops(p.roi_size_px),
        pd.DataFrame(images, columns=IMAGE_COLUMNS),
        pd.DataFrame(k_scores, columns=K_SCORE_COLUMNS),
    )


def _no_crops(size: int) -> np.ndarray:
    return np.zeros((0, size, size, 3), np.uint8)


def _concat(parts: Sequence[SegmentedImages], size: int, keep_crops: bool) -> SegmentedImages:
    """One :class:`SegmentedImages` from the chunks' (crops dropped unless ``keep_crops``)."""

    def cat(tables: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
        tables = [t for t in tables if len(t)]
        if not tables:
            return pd.DataFrame(columns=columns)
        return pd.concat(tables, ignore_index=True)[columns]

    crops = [p.crops for p in parts] if keep_crops else []
    return SegmentedImages(
        cat([p.rois for p in parts], ROI_COLUMNS),
        np.concatenate(crops) if crops else _no_crops(size),
        cat([p.images for p in parts], IMAGE_COLUMNS),
        cat([p.k_scores for p in parts], K_SCORE_COLUMNS),
    )


def iter_segmented(
    paths: Sequence[str | Path],
    image_ids: Sequence[str],
    *,
    params: SegmentParams,
    mask_paths: Sequence[str | Path] | None = None,
    n_workers: int = 1,
    chunk_size: int = 8,
) -> Iterator[SegmentedImages]:
    """Yield the results of :func:`segment_images` chunk by chunk, in image order.

    dask computes the chunks in waves of ``8 * n_workers`` tasks on one
    process pool, so at most one wave of results is in memory: a caller that
    writes each chunk to disk (:class:`leukflow.io.CropStoreWriter`) keeps
    memory flat in the number of images.
    """
    if len(paths) != len(image_ids):
        raise ValueError(f"segment_images: {len(paths)} paths but {len(image_ids)} image ids")
    masks = ["" if m is None else str(m) for m in (mask_paths or [""] * len(paths))]
    if len(masks) != len(paths):
        raise ValueError(f"segment_images: {len(paths)} paths but {len(masks)} mask paths")
    paths = [str(p) for p in paths]
    kwargs = asdict(params)
    tasks = [
        dask.delayed(_segment_chunk)(paths[i : i + chunk_size], image_ids[i : i + chunk_size],
                                     masks[i : i + chunk_size], kwargs)
        for i in range(0, len(paths), chunk_size)
    ]  # fmt: skip
    log.info(
        "segmenting %d images with %s in %d tasks on %d workers",
        len(paths), params.method, len(tasks), n_workers,
    )  # fmt: skip
    if n_workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield from dask.compute(task, scheduler="sync")
        return
    wave = 8 * n_workers
    with ProcessPoolExecutor(n_workers, initializer=single_threaded_worker) as pool:
        for start in range(0, len(tasks), wave):
            # chunksize=1: each task is already a chunk of images; dask would batch 6
            yield from dask.compute(
                *tasks[start : start + wave], scheduler="processes", pool=pool, chunksize=1
            )


def segment_images(
    paths: Sequence[str | Path],
    image_ids: Sequence[str],
    *,
    params: SegmentParams,
    mask_paths: Sequence[str | Path] | None = None,
    n_workers: int = 1,
    chunk_size: int = 8,
) -> SegmentedImages:
    """Segment many fields in parallel with dask, one task per chunk of images.

    Parameters
    ----------
    paths, image_ids : sequence
        Image files and their ids, in the order the outputs keep.
    params : SegmentParams
        Method, its parameters, and crop parameters.
    mask_paths : sequence, optional
        Expert mask file per image (``""`` for none); read only by ``kmeans``
        with ``select_by_masks``.
    n_workers : int
        Worker processes (the rule's ``threads``); 1 runs in this process.
    chunk_size : int
        Images per task.

    Returns
    -------
    SegmentedImages
        ``rois``, ``crops``, ``images`` (one row per image, with the reason
        when it gave no ROI) and ``k_scores``.
    """
    results = list(
        iter_segmented(
            paths, image_ids, params=params, mask_paths=mask_paths,
            n_workers=n_workers, chunk_size=chunk_size,
        )
    )  # fmt: skip
    out = _concat(results, params.roi_size_px, keep_crops=True)
    missing = out.images[out.images["n_rois"] == 0]
    if len(missing):
        log.info(
            "%d of %d images gave no ROI: %s",
            len(missing), len(paths), missing["reason"].value_counts().to_dict(),
        )  # fmt: skip
    return out


def segment_to_store(
    paths: Sequence[str | Path],
    image_ids: Sequence[str],
    *,
    params: SegmentParams,
    crops_path: str | Path,
    attrs: dict,
    mask_paths: Sequence[str | Path] | None = None,
    n_workers: int = 1,
    chunk_size: int = 8,
) -> SegmentedImages:
    """Segment like :func:`segment_images`, streaming the crops into a zarr store.

    The crops of each chunk go to ``crops_path`` as soon as the chunk is done
    (atomically: the store appears under its name only when complete); only
    the small tables are gathered. The returned ``crops`` is empty.
    """
    parts = []
    with CropStoreWriter(crops_path, params.roi_size_px, attrs) as store:
        for part in iter_segmented(
            paths, image_ids, params=params, mask_paths=mask_paths,
            n_workers=n_workers, chunk_size=chunk_size,
        ):  # fmt: skip
            store.append(part.crops)
            parts.append(part._replace(crops=None))
    return _concat(parts, params.roi_size_px, keep_crops=False)


def summarise_k_scores(k_scores: pd.DataFrame, labels: pd.Series) -> pd.DataFrame:
    """Mean kmeans score per class and k (S2's table), and over all images.

    Parameters
    ----------
    k_scores : pandas.DataFrame
        :data:`K_SCORE_COLUMNS`.
    labels : pandas.Series
        Image id -> class label.

    Returns
    -------
    pandas.DataFrame
        ``label`` (a class, or ``all``), ``k``, ``n_images``, mean ``ssim``,
        ``dice``, ``iou``, ``score``, ``n_chosen`` (images whose best k it is)
        and ``best`` (the k of highest mean score in that class).
    """
    columns = ["label", "k", "n_images", "ssim", "dice", "iou", "score", "n_chosen", "best"]
    if k_scores.empty:
        return pd.DataFrame(columns=columns)
    scores = k_scores.assign(label=k_scores["image_id"].map(labels).astype(str))
    parts = [scores, scores.assign(label="all")]
    table = (
        pd.concat(parts)
        .groupby(["label", "k"], sort=True)
        .agg(
            n_images=("image_id", "size"),
            ssim=("ssim", "mean"),
            dice=("dice", "mean"),
            iou=("iou", "mean"),
            score=("score", "mean"),
            n_chosen=("chosen", "sum"),
        )
        .reset_index()
    )
    top = table.groupby("label")["score"].transform("max")
    first = table[table["score"] == top].groupby("label")["k"].transform("min")
    table["best"] = False
    table.loc[first.index, "best"] = table.loc[first.index, "k"] == first
    return table[columns]


def match_rois_to_boxes(rois: pd.DataFrame, boxes: pd.DataFrame) -> tuple[int, int]:
    """Count annotated cells that a ROI hits, and ROIs that hit no cell.

    A ROI hits a box when the centroid of its segmented region lies inside it.

    Parameters
    ----------
    rois : pandas.DataFrame
        ``centroid_x, centroid_y`` of one image's ROIs.
    boxes : pandas.DataFrame
        ``x0, y0, x1, y1`` of the same image's annotated white cells.

    Returns
    -------
    hits : int
        Boxes containing at least one ROI centroid.
    false_rois : int
        ROIs whose centroid lies in no box.
    """
    cx = rois["centroid_x"].to_numpy(dtype=float)[:, None]
    cy = rois["centroid_y"].to_numpy(dtype=float)[:, None]
    b = boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=float).reshape(-1, 4)
    inside = (cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])
    return int(inside.any(axis=0).sum()), int((~inside.any(axis=1)).sum())


def match_rois_to_points(rois: pd.DataFrame, points: np.ndarray) -> tuple[int, int]:
    """Count annotated points inside a ROI's crop box, and ROIs holding no point.

    Parameters
    ----------
    rois : pandas.DataFrame
        ``x0, y0, x1, y1`` crop boxes (end exclusive) of one image's ROIs.
    points : numpy.ndarray
        ``(n, 2)`` annotated ``x, y`` (e.g. ALL-IDB1 blast centres).

    Returns
    -------
    hits : int
        Points inside at least one ROI box.
    false_rois : int
        ROIs whose box holds no point.
    """
    p = np.asarray(points, dtype=float).reshape(-1, 2)
    x, y = p[:, 0][:, None], p[:, 1][:, None]
    box = rois[["x0", "y0", "x1", "y1"]].to_numpy(dtype=float).reshape(-1, 4)
    inside = (x >= box[:, 0]) & (x < box[:, 2]) & (y >= box[:, 1]) & (y < box[:, 3])
    return int(inside.any(axis=1).sum()), int((~inside.any(axis=0)).sum())

"""Segment: smear fields -> white-cell masks -> square ROI crops.

S0's method: the grey image holds three populations (white-cell nuclei darkest,
red cells, background); multi-Otsu thresholding with three classes separates
them and the darkest class marks white cells. A closing joins the lobes of one
nucleus, small specks (platelets, noise) are dropped by area, and every
remaining connected region yields one square crop centred on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
from skimage import color, filters, measure, morphology, transform

from leukflow.io import read_image

log = logging.getLogger(__name__)

ROI_COLUMNS = [
    "roi_id", "image_id", "x0", "y0", "x1", "y1", "area_px", "centroid_x", "centroid_y",
]  # fmt: skip


@dataclass(frozen=True)
class SegmentParams:
    """Parameters of :func:`segment_cells` and :func:`extract_rois` (see the config schema)."""

    channel: str = "grey"
    classes: int = 3
    min_area_px: int = 250
    closing_radius_px: int = 4
    roi_margin: float = 0.4
    roi_size_px: int = 64


def segment_cells(
    rgb: np.ndarray,
    *,
    channel: str = "grey",
    classes: int = 3,
    min_area_px: int = 250,
    closing_radius_px: int = 4,
) -> np.ndarray:
    """Label white cells (their nuclei) in a smear field.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    channel : str
        Intensity thresholded (:data:`CHANNELS`): ``grey`` (S0 as published),
        ``red``, or ``red_minus_blue`` (purple nuclei against red cells).
    classes : int
        Multi-Otsu classes; pixels of the darkest class are white-cell candidates.
    min_area_px : int
        Regions smaller than this after clean-up are dropped.
    closing_radius_px : int
        Radius of the disk used to close gaps between nucleus lobes.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32 label image, 0 = background, 1..n = white cells.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"segment_cells: expected an (H, W, 3) RGB image; got shape {rgb.shape}")
    grey = _intensity(rgb, channel)
    if np.ptp(grey) == 0:
        return np.zeros(grey.shape, dtype=np.int32)
    try:
        thresholds = filters.threshold_multiotsu(grey, classes=classes)
    except ValueError:  # fewer grey levels than classes: nothing to separate
        return np.zeros(grey.shape, dtype=np.int32)
    mask = grey < thresholds[0]
    mask = morphology.opening(mask, morphology.disk(1))
    if closing_radius_px:
        mask = morphology.closing(mask, morphology.disk(closing_radius_px))
    mask = morphology.remove_small_holes(mask, max_size=min_area_px)
    mask = morphology.remove_small_objects(mask, max_size=min_area_px - 1)
    return measure.label(mask).astype(np.int32)


CHANNELS = ("grey", "red", "red_minus_blue")


def _intensity(rgb: np.ndarray, channel: str) -> np.ndarray:
    """Map RGB to one float channel in which nuclei are the darkest pixels."""
    if channel == "grey":
        return color.rgb2gray(rgb)
    if channel == "red":
        return rgb[..., 0] / 255.0
    if channel == "red_minus_blue":  # purple nuclei: blue > red; red cells: red > blue
        return (rgb[..., 0].astype(np.float64) - rgb[..., 2] + 255.0) / 510.0
    raise ValueError(f"segment_cells: channel must be one of {CHANNELS}; got {channel!r}")


def extract_rois(
    rgb: np.ndarray, labels: np.ndarray, *, roi_margin: float = 0.4, roi_size_px: int = 64
) -> tuple[pd.DataFrame, np.ndarray]:
    """Cut one square crop per labelled region.

    The square is centred on the region's box, with side ``(1 + 2 * roi_margin)``
    times the box's longer side; parts outside the field repeat the edge pixels.

    Returns
    -------
    rois : pandas.DataFrame
        One row per region: crop box ``x0, y0, x1, y1`` (exclusive ends, field
        coordinates, may extend past the field), ``area_px``, ``centroid_x/y``.
    crops : numpy.ndarray
        ``(n, roi_size_px, roi_size_px, 3)`` uint8.
    """
    rows, crops = [], []
    for region in measure.regionprops(labels):
        r0, c0, r1, c1 = region.bbox
        side = int(np.ceil(max(r1 - r0, c1 - c0) * (1 + 2 * roi_margin)))
        y0 = (r0 + r1 - side) // 2
        x0 = (c0 + c1 - side) // 2
        crop = _crop_padded(rgb, y0, x0, side)
        crop = transform.resize(crop, (roi_size_px, roi_size_px), anti_aliasing=True)
        crops.append(np.round(crop * 255).astype(np.uint8))
        cy, cx = region.centroid
        rows.append(
            {"x0": x0, "y0": y0, "x1": x0 + side, "y1": y0 + side,
             "area_px": int(region.area), "centroid_x": float(cx), "centroid_y": float(cy)}
        )  # fmt: skip
    stack = np.stack(crops) if crops else np.zeros((0, roi_size_px, roi_size_px, 3), np.uint8)
    return pd.DataFrame(rows, columns=ROI_COLUMNS[2:]), stack


def _crop_padded(rgb: np.ndarray, y0: int, x0: int, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    pad = [(max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w)), (0, 0)]
    crop = rgb[max(0, y0) : y0 + side, max(0, x0) : x0 + side]
    return np.pad(crop, pad, mode="edge") if any(sum(p) for p in pad) else crop


def _segment_chunk(
    paths: Sequence[str], image_ids: Sequence[str], params: dict
) -> tuple[pd.DataFrame, np.ndarray]:
    p = SegmentParams(**params)
    tables, crops = [], []
    for path, image_id in zip(paths, image_ids, strict=True):
        rgb = read_image(path)
        labels = segment_cells(
            rgb,
            channel=p.channel,
            classes=p.classes,
            min_area_px=p.min_area_px,
            closing_radius_px=p.closing_radius_px,
        )
        rois, stack = extract_rois(rgb, labels, roi_margin=p.roi_margin, roi_size_px=p.roi_size_px)
        rois.insert(0, "image_id", image_id)
        rois.insert(0, "roi_id", [f"{image_id}#{i}" for i in range(len(rois))])
        tables.append(rois)
        crops.append(stack)
    return pd.concat(tables, ignore_index=True), np.concatenate(crops)


def _single_threaded_worker() -> None:
    # One process per core: BLAS/OpenMP threads inside it would oversubscribe.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def segment_images(
    paths: Sequence[str | Path],
    image_ids: Sequence[str],
    *,
    params: SegmentParams,
    n_workers: int = 1,
    chunk_size: int = 8,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Segment many fields in parallel with dask, one task per chunk of images.

    Parameters
    ----------
    paths, image_ids : sequence
        Image files and their ids, in the order the outputs keep.
    params : SegmentParams
        Segmentation and crop parameters.
    n_workers : int
        Worker processes (the rule's ``threads``); 1 runs in this process.
    chunk_size : int
        Images per task.

    Returns
    -------
    rois : pandas.DataFrame
        :data:`ROI_COLUMNS`, in image order.
    crops : numpy.ndarray
        ``(n_rois, roi_size_px, roi_size_px, 3)`` uint8, row-aligned with ``rois``.
    """
    if len(paths) != len(image_ids):
        raise ValueError(f"segment_images: {len(paths)} paths but {len(image_ids)} image ids")
    paths = [str(p) for p in paths]
    tasks = [
        dask.delayed(_segment_chunk)(paths[i : i + chunk_size], image_ids[i : i + chunk_size],
                                     asdict(params))
        for i in range(0, len(paths), chunk_size)
    ]  # fmt: skip
    log.info("segmenting %d images in %d tasks on %d workers", len(paths), len(tasks), n_workers)
    if n_workers <= 1 or len(tasks) <= 1:
        results = dask.compute(*tasks, scheduler="sync")
    else:
        with ProcessPoolExecutor(n_workers, initializer=_single_threaded_worker) as pool:
            results = dask.compute(*tasks, scheduler="processes", pool=pool)
    size = params.roi_size_px
    if not results:
        return pd.DataFrame(columns=ROI_COLUMNS), np.zeros((0, size, size, 3), np.uint8)
    rois = pd.concat([r for r, _ in results], ignore_index=True)
    return rois[ROI_COLUMNS], np.concatenate([c for _, c in results])


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
    cx = rois["centroid_x"].to_numpy()[:, None]
    cy = rois["centroid_y"].to_numpy()[:, None]
    b = boxes[["x0", "y0", "x1", "y1"]].to_numpy(dtype=float)
    inside = (cx >= b[:, 0]) & (cx <= b[:, 2]) & (cy >= b[:, 1]) & (cy <= b[:, 3])
    return int(inside.any(axis=0).sum()), int((~inside.any(axis=1)).sum())

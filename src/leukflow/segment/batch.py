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

from leukflow.core.parallel import single_threaded_worker
from leukflow.data import cache
from leukflow.data.io import CropStoreWriter, InvalidInputError, read_image, sha256_file
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


def cache_space(params: SegmentParams) -> str:
    """Name the cache folder of segmentations made with ``params`` by this code."""
    return cache.namespace("segment", asdict(params), cache.SEGMENT_SOURCES)


def _segment_chunk(
    paths: Sequence[str],
    image_ids: Sequence[str],
    mask_paths: Sequence[str],
    shas: Sequence[str],
    params: dict,
    cache_dir: str,
) -> SegmentedImages:
    p = SegmentParams(**params)
    space = cache_space(p) if cache_dir else ""
    roi_rows, crops, images, k_scores = [], [], [], []
    for path, image_id, mask_path, sha in zip(paths, image_ids, mask_paths, shas, strict=True):
        try:
            entry = None
            if space and sha:
                mask_sha = sha256_file(mask_path) if (p.uses_masks and mask_path) else ""
                entry = cache.entry_path(cache_dir, space, sha, mask_sha)
                hit = cache.load_arrays(entry)
                if hit is not None:
                    rois, stack, image, scores = _from_entry(*hit, image_id)
                    roi_rows += rois
                    crops.append(stack)
                    images.append({**image, "cached": True})
                    k_scores += scores
                    continue
            rgb = read_image(path)
            truth = read_truth(mask_path) if (p.uses_masks and mask_path) else None
        except InvalidInputError as err:  # changed or vanished since ingest
            log.warning("%s: %s", image_id, err)
            images.append(
                {"image_id": image_id, "n_rois": 0, "reason": err.reason, "note": str(err),
                 "scale": 1.0, "k": 0, "cached": False}
            )  # fmt: skip
            continue
        seg = segment_field(rgb, p, truth)
        rois, stack = field_roi_records(seg, image_id, p)
        image = {"image_id": image_id, "n_rois": len(rois), "reason": seg.reason,
                 "note": seg.note, "scale": seg.scale, "k": seg.k}  # fmt: skip
        scores = [{"image_id": image_id, **row} for row in seg.k_scores]
        if entry is not None:
            _save_entry(entry, rois, stack, image, scores)
        roi_rows += rois
        crops.append(stack)
        images.append({**image, "cached": False})
        k_scores += scores
    return SegmentedImages(
        pd.DataFrame(roi_rows, columns=ROI_COLUMNS),
        np.concatenate(crops) if crops else _no_crops(p.roi_size_px),
        pd.DataFrame(images, columns=[*IMAGE_COLUMNS, "cached"]),
        pd.DataFrame(k_scores, columns=K_SCORE_COLUMNS),
    )


_ENTRY_INTS = ("x0", "y0", "x1", "y1", "area_px")
_ENTRY_FLOATS = ("centroid_x", "centroid_y")


def _save_entry(path: Path, rois: list[dict], crops: np.ndarray, image: dict, scores: list):
    arrays = {c: np.array([r[c] for r in rois], dtype=np.int64) for c in _ENTRY_INTS}
    arrays |= {c: np.array([r[c] for r in rois], dtype=np.float64) for c in _ENTRY_FLOATS}
    drop_id = lambda row: {k: v for k, v in row.items() if k != "image_id"}  # noqa: E731
    meta = {"image": drop_id(image), "k_scores": [drop_id(r) for r in scores]}
    cache.save_arrays(path, {**arrays, "crops": crops}, meta)


def _from_entry(arrays: dict, meta: dict, image_id: str):
    """ROI records, crops, image row and k scores of a cache entry, under ``image_id``."""
    n = len(arrays["crops"])
    rois = [
        {"roi_id": f"{image_id}#{i}", "image_id": image_id,
         **{c: int(arrays[c][i]) for c in _ENTRY_INTS},
         **{c: float(arrays[c][i]) for c in _ENTRY_FLOATS}}
        for i in range(n)
    ]  # fmt: skip
    scores = [{"image_id": image_id, **row} for row in meta["k_scores"]]
    return rois, arrays["crops"], {"image_id": image_id, **meta["image"]}, scores


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
    if parts and all("cached" in p.images for p in parts):
        cached = sum(int(p.images["cached"].sum()) for p in parts)
        n = sum(len(p.images) for p in parts)
        log.info("segmented %d images; %d read from the cache", n - cached, cached)
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
    image_sha256: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Iterator[SegmentedImages]:
    """Yield the results of :func:`segment_images` chunk by chunk, in image order.

    dask computes the chunks in waves of ``8 * n_workers`` tasks on one
    process pool, so at most one wave of results is in memory: a caller that
    writes each chunk to disk (:class:`leukflow.data.io.CropStoreWriter`) keeps
    memory flat in the number of images. With ``cache_dir`` and the images'
    ``image_sha256``, a field segmented before with the same parameters and
    code is read from :mod:`leukflow.data.cache` instead; the ``images`` tables of
    the chunks then carry a ``cached`` column.
    """
    n = len(paths)
    masks = ["" if m is None else str(m) for m in (mask_paths or [""] * n)]
    shas = list(image_sha256) if image_sha256 is not None else [""] * n
    for name, values in (("image ids", image_ids), ("mask paths", masks), ("hashes", shas)):
        if len(values) != n:
            raise ValueError(f"segment_images: {n} paths but {len(values)} {name}")
    paths = [str(p) for p in paths]
    kwargs = asdict(params)
    where = str(cache_dir) if cache_dir else ""
    tasks = [
        dask.delayed(_segment_chunk)(paths[i : i + chunk_size], image_ids[i : i + chunk_size],
                                     masks[i : i + chunk_size], shas[i : i + chunk_size],
                                     kwargs, where)
        for i in range(0, n, chunk_size)
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
    image_sha256: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
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
    image_sha256 : sequence of str, optional
        Content hash of each image (the manifest's ``sha256``); with
        ``cache_dir``, keys of the per-image cache (:mod:`leukflow.data.cache`).
    cache_dir : str or Path, optional
        Where segmentations are cached; ``None`` computes every field.

    Returns
    -------
    SegmentedImages
        ``rois``, ``crops``, ``images`` (one row per image, with the reason
        when it gave no ROI) and ``k_scores``.
    """
    results = list(
        iter_segmented(
            paths, image_ids, params=params, mask_paths=mask_paths, n_workers=n_workers,
            chunk_size=chunk_size, image_sha256=image_sha256, cache_dir=cache_dir,
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
    image_sha256: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> SegmentedImages:
    """Segment like :func:`segment_images`, streaming the crops into a zarr store.

    The crops of each chunk go to ``crops_path`` as soon as the chunk is done
    (atomically: the store appears under its name only when complete); only
    the small tables are gathered. The returned ``crops`` is empty.
    """
    parts = []
    with CropStoreWriter(crops_path, params.roi_size_px, attrs) as store:
        for part in iter_segmented(
            paths, image_ids, params=params, mask_paths=mask_paths, n_workers=n_workers,
            chunk_size=chunk_size, image_sha256=image_sha256, cache_dir=cache_dir,
        ):  # fmt: skip
            store.append(part.crops)
            parts.append(part._replace(crops=None))
    return _concat(parts, params.roi_size_px, keep_crops=False)


#: Peak memory of one segmentation worker: interpreter and libraries, plus
#: bytes per pixel of the largest field (float copies, masks and labels),
#: measured with benchmarks/segment.py (about 270 MB + 43 B/px; with margin).
WORKER_BASE_MB = 400
WORKER_BYTES_PER_PX = 64


def workers_for_memory(threads: int, mem_mb: int | None, max_pixels: int) -> int:
    """Worker processes that fit ``mem_mb`` (the job's memory) for fields of ``max_pixels``.

    At most ``threads``, at least 1; each worker is budgeted
    :data:`WORKER_BASE_MB` plus :data:`WORKER_BYTES_PER_PX` per pixel.
    """
    if not mem_mb:
        return max(1, threads)
    per_worker = WORKER_BASE_MB + WORKER_BYTES_PER_PX * max_pixels / 2**20
    return int(max(1, min(threads, mem_mb // per_worker)))


def batch_images(
    manifest: pd.DataFrame,
    dataset: str,
    batch: int,
    batch_size: int,
    files: Sequence[str | Path] | None = None,
) -> pd.DataFrame:
    """Return the manifest rows of one segmentation batch, in the batch's order.

    Parameters
    ----------
    manifest : pandas.DataFrame
        The run's manifest.
    dataset, batch : str, int
        Which batch.
    batch_size : int
        Images per batch, for a batch without ``files``.
    files : sequence of path, optional
        The image files of the batch's members (from the batch ledger,
        :mod:`leukflow.segment.ledger`), in ledger order; their mask files may be
        listed too and are ignored. Without them the batch is the
        ``batch``-th slice of ``batch_size`` of the dataset's sorted ids, what
        a first ledger gives.

    Returns
    -------
    pandas.DataFrame
        The members' manifest rows (a member that ingest rejected has none).
    """
    images = manifest[manifest["dataset"] == dataset]
    if files is None:
        images = images.sort_values("image_id", kind="stable")
        return images.iloc[batch * batch_size : (batch + 1) * batch_size]
    where = [str(Path(r) / p) for r, p in zip(images["root"], images["path"], strict=True)]
    rank = {str(f): i for i, f in enumerate(files)}
    order = pd.Series([rank.get(w, -1) for w in where], index=images.index)
    return images.loc[order[order >= 0].sort_values(kind="stable").index]


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

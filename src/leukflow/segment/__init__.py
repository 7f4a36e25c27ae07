"""Segment: fields -> cell label images -> ROI records and square crops.

The published methods live in :mod:`~leukflow.segment.methods` as one function
each, ``method(rgb, **params) -> (H, W) int32 labels``, registered by name in
:data:`METHODS`:

``multiotsu`` (S0)
    darkest of 3 multi-Otsu classes of one intensity channel: nuclei.
``kmeans`` (S2)
    5x5 Gaussian blur, k-means colour clusters; k and the segment chosen
    against an expert mask when there is one, else a fixed k.
``otsu_contours`` (S4, ALL-IDB2)
    grey Otsu threshold, connected components of at least 100 px.
``center_crop`` (S4, C-NMC)
    the middle 20-80% of the image.
``none``
    the image is already one cell.

Any method's regions of touching cells can be cut apart
(:func:`~leukflow.segment.methods.split_touching`, ``split_touching``).

:func:`~leukflow.segment.rois.segment_field` adds what every method shares
(downscaling of huge fields, the checks that give a reason instead of ROIs,
keeping the central region), :func:`extract_rois` cuts the same ROI record from
any label image, and :func:`segment_images` runs chunks of images as dask tasks
(:func:`segment_to_store` streams their crops to disk as they finish).
:mod:`~leukflow.segment.masks` reads expert masks and scores masks against them.
"""

from leukflow.segment.batch import (
    K_SCORE_COLUMNS,
    SegmentedImages,
    batch_images,
    cache_space,
    iter_segmented,
    match_rois_to_boxes,
    match_rois_to_points,
    read_truth,
    segment_images,
    segment_to_store,
    summarise_k_scores,
    workers_for_memory,
)
from leukflow.segment.masks import dice, iou, resize_nearest, score_mask, ssim, truth_masks
from leukflow.segment.methods import (
    CHANNELS,
    METHODS,
    keep_central,
    kmeans_candidates,
    kmeans_clusters,
    label_regions,
    segment_cells,
    select_kmeans,
    split_touching,
)
from leukflow.segment.rois import (
    IMAGE_COLUMNS,
    NO_ROI_REASONS,
    ROI_COLUMNS,
    FieldSegmentation,
    SegmentParams,
    check_field,
    extract_rois,
    field_rois,
    segment_field,
)

__all__ = [
    "CHANNELS",
    "IMAGE_COLUMNS",
    "K_SCORE_COLUMNS",
    "METHODS",
    "NO_ROI_REASONS",
    "ROI_COLUMNS",
    "FieldSegmentation",
    "SegmentParams",
    "SegmentedImages",
    "batch_images",
    "cache_space",
    "check_field",
    "dice",
    "extract_rois",
    "field_rois",
    "iou",
    "iter_segmented",
    "keep_central",
    "kmeans_candidates",
    "kmeans_clusters",
    "label_regions",
    "match_rois_to_boxes",
    "match_rois_to_points",
    "read_truth",
    "resize_nearest",
    "score_mask",
    "segment_cells",
    "segment_field",
    "segment_images",
    "segment_to_store",
    "select_kmeans",
    "split_touching",
    "ssim",
    "summarise_k_scores",
    "truth_masks",
    "workers_for_memory",
]  # fmt: skip

"""One field -> checks, downscaling, a method's labels -> ROI records and crops.

Every method ends here: :func:`segment_field` turns a field into a label image
(or a reason why it holds no cell) and :func:`extract_rois` cuts the same ROI
record from any label image: crop box, area, centroid, and a square crop at
``roi_size_px`` with or without its background masked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage as ndi
from skimage import color, transform

from leukflow.segment import defaults
from leukflow.segment.masks import TARGETS, resize_nearest
from leukflow.segment.methods import (
    KMEANS_SEGMENTS,
    METHODS,
    keep_central,
    segment_cells,
    select_kmeans,
    split_touching,
)

log = logging.getLogger(__name__)

ROI_COLUMNS = [
    "roi_id", "image_id", "x0", "y0", "x1", "y1", "area_px", "centroid_x", "centroid_y",
]  # fmt: skip
#: One row per image of ``segment/<dataset>/images.parquet``.
IMAGE_COLUMNS = ["image_id", "n_rois", "reason", "note", "scale", "k"]
#: Why an image gave no ROI (besides the read errors of :func:`leukflow.data.io.read_image`).
NO_ROI_REASONS = ("too_dark", "saturated", "blank", "no_cell")

#: Field checks, on a block-averaged, lightly smoothed grey thumbnail: ``too_dark``
#: when even its brightest part is below this grey level...
DARK_MAX_GREY = 0.15
#: ...``saturated`` when at least this share of pixels is clipped white (all
#: channels >= 250)...
SATURATED_MIN_SHARE = 0.99
#: ...and ``blank`` when its grey range (max - min) is below this.
BLANK_MAX_RANGE = 0.08

KEEP_REGIONS = ("all", "central")
KMEANS_DEFAULTS: dict[str, Any] = defaults.KMEANS
#: kmeans keys passed to :func:`~leukflow.segment.methods.segment_kmeans`; the rest select k.
KMEANS_FIXED_KEYS = ("k", "seed", "segment", "min_area_px", "max_fit_px")
OTSU_CONTOURS_DEFAULTS: dict[str, Any] = defaults.OTSU_CONTOURS
CENTER_CROP_DEFAULTS: dict[str, Any] = defaults.CENTER_CROP
_DEFAULT = defaults.SEGMENTATION


@dataclass(frozen=True)
class SegmentParams:
    """Parameters of :func:`segment_field` and :func:`extract_rois` (see the config schema).

    Every default is the schema's (:mod:`leukflow.segment.defaults`).

    ``channel``, ``classes``, ``min_area_px`` and ``closing_radius_px`` are the
    ``multiotsu`` method's; ``kmeans``, ``otsu_contours`` and ``center_crop``
    hold those methods' parameters (keys left out take their defaults).
    ``split_touching`` cuts regions of touching cells apart
    (:func:`~leukflow.segment.methods.split_touching`, with the method's
    ``min_area_px`` as the smallest piece) where the method finds several
    cells per image (see :attr:`splits`).
    """

    method: str = _DEFAULT["method"]
    channel: str = _DEFAULT["channel"]
    classes: int = _DEFAULT["classes"]
    min_area_px: int = _DEFAULT["min_area_px"]
    closing_radius_px: int = _DEFAULT["closing_radius_px"]
    kmeans: Mapping[str, Any] = field(default_factory=dict)
    otsu_contours: Mapping[str, Any] = field(default_factory=dict)
    center_crop: Mapping[str, Any] = field(default_factory=dict)
    keep_regions: str = _DEFAULT["keep_regions"]
    split_touching: bool = _DEFAULT["split_touching"]
    mask_background: bool = _DEFAULT["mask_background"]
    roi_margin: float = _DEFAULT["roi_margin"]
    roi_size_px: int = _DEFAULT["roi_size_px"]
    max_image_px: int = _DEFAULT["max_image_px"]

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> SegmentParams:
        """Build from a mapping that holds every field (the validated ``segmentation`` config).

        Keys that are not fields (``chunk_size``...) are ignored; a missing
        field is a ``KeyError``, never a silent default.
        """
        return cls(**{f.name: settings[f.name] for f in fields(cls)})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"SegmentParams: method must be one of {sorted(METHODS)}; got {self.method!r}"
            )
        if self.keep_regions not in KEEP_REGIONS:
            raise ValueError(
                f"SegmentParams: keep_regions must be one of {KEEP_REGIONS}; "
                f"got {self.keep_regions!r}"
            )
        for name, known in (
            ("kmeans", KMEANS_DEFAULTS),
            ("otsu_contours", OTSU_CONTOURS_DEFAULTS),
            ("center_crop", CENTER_CROP_DEFAULTS),
        ):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                raise ValueError(
                    f"SegmentParams: unknown {name} parameters {unknown}; "
                    f"expected some of {sorted(known)}"
                )
        km = self.kmeans_params
        if not 2 <= km["k_min"] <= km["k_max"] or km["k"] < 2:
            raise ValueError(
                "SegmentParams: kmeans expects 2 <= k_min <= k_max and k >= 2; got "
                f"k_min={km['k_min']}, k_max={km['k_max']}, k={km['k']}"
            )
        if km["segment"] not in KMEANS_SEGMENTS or km["target"] not in TARGETS:
            raise ValueError(
                f"SegmentParams: kmeans segment must be one of {KMEANS_SEGMENTS} and target "
                f"one of {TARGETS}; got {km['segment']!r} and {km['target']!r}"
            )

    @property
    def kmeans_params(self) -> dict[str, Any]:
        """The kmeans parameters with their defaults filled in."""
        return {**KMEANS_DEFAULTS, **self.kmeans}

    def method_params(self) -> dict[str, Any]:
        """Keyword parameters of the method's function in :data:`METHODS`."""
        if self.method == "multiotsu":
            return {
                "channel": self.channel,
                "classes": self.classes,
                "min_area_px": self.min_area_px,
                "closing_radius_px": self.closing_radius_px,
            }
        if self.method == "kmeans":
            return {key: self.kmeans_params[key] for key in KMEANS_FIXED_KEYS}
        if self.method == "otsu_contours":
            return {**OTSU_CONTOURS_DEFAULTS, **self.otsu_contours}
        if self.method == "center_crop":
            return {**CENTER_CROP_DEFAULTS, **self.center_crop}
        return {}

    @property
    def splits(self) -> bool:
        """Whether ``split_touching`` applies to this method.

        Not where a method makes one region per image on purpose
        (``center_crop``, ``none``, ``otsu_contours`` merging its components).
        """
        if not self.split_touching or self.method in ("center_crop", "none"):
            return False
        return not (self.method == "otsu_contours" and self.method_params()["merge_components"])

    @property
    def split_min_area_px(self) -> int:
        """The smallest piece :func:`split_touching` may leave: the method's own area limit."""
        if self.method == "kmeans":
            return int(self.kmeans_params["min_area_px"])
        if self.method == "otsu_contours":
            return int(self.method_params()["min_area_px"])
        return self.min_area_px

    @property
    def uses_masks(self) -> bool:
        """Whether the method reads the expert masks (kmeans choosing k against them)."""
        return self.method == "kmeans" and bool(self.kmeans_params["select_by_masks"])


@dataclass
class FieldSegmentation:
    """What :func:`segment_field` found in one field.

    Attributes
    ----------
    labels : numpy.ndarray
        ``(h, w)`` int32 labels of the field as segmented (downscaled if ``scale`` < 1).
    rgb : numpy.ndarray
        ``(h, w, 3)`` uint8 field as segmented.
    scale : float
        Segmented width / original width (1.0 unless the field was downscaled).
    reason : str
        ``""`` when a region was found, else one of :data:`NO_ROI_REASONS`.
    note : str
        What was done to the field (downscaling), ``""`` when nothing.
    k : int
        The k used by ``kmeans`` (0 for other methods).
    k_scores : list of dict
        ``kmeans`` with an expert mask: the best candidate's scores per k.
    """

    labels: np.ndarray
    rgb: np.ndarray
    scale: float = 1.0
    reason: str = ""
    note: str = ""
    k: int = 0
    k_scores: list[dict] = field(default_factory=list)


def check_field(rgb: np.ndarray) -> str:
    """Say why a field cannot hold a cell: ``too_dark``, ``saturated``, ``blank`` or ``""``.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 field.

    Returns
    -------
    str
        The first reason that applies (in that order), ``""`` when none.
    """
    # Every b-th pixel is plenty for these whole-field statistics, and keeps
    # the check a small fraction of the segmentation's time on large fields.
    b = max(1, min(rgb.shape[:2]) // 128)
    sample = rgb[::b, ::b]
    thumb = ndi.gaussian_filter(color.rgb2gray(sample), sigma=1.0, mode="nearest")
    if thumb.max() < DARK_MAX_GREY:
        return "too_dark"
    if (sample >= 250).all(axis=-1).mean() >= SATURATED_MIN_SHARE:
        return "saturated"
    if thumb.max() - thumb.min() < BLANK_MAX_RANGE:
        return "blank"
    return ""


def downscale(rgb: np.ndarray, max_image_px: int) -> tuple[np.ndarray, float]:
    """Shrink a field (area-averaging) to at most ``max_image_px`` pixels.

    Returns
    -------
    rgb : numpy.ndarray
        The field, unchanged when it is small enough.
    scale : float
        New width / old width (1.0 when unchanged).
    """
    h, w = rgb.shape[:2]
    if h * w <= max_image_px:
        return rgb, 1.0
    factor = np.sqrt(max_image_px / (h * w))
    new_w, new_h = max(1, int(w * factor)), max(1, int(h * factor))
    small = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BOX)
    return np.asarray(small), new_w / w


def segment_field(
    rgb: np.ndarray,
    params: SegmentParams,
    truth: Mapping[str, np.ndarray] | None = None,
) -> FieldSegmentation:
    """Segment one field with ``params.method``, or say why it holds no cell.

    Fields above ``max_image_px`` are downscaled first (with a note). Fields
    that are too dark, saturated or blank give no labels and that reason; a
    field in which the method finds nothing gives ``no_cell``. Touching cells
    are split (``split_touching``) before the central region is kept.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 field.
    params : SegmentParams
        Method and parameters.
    truth : mapping, optional
        Expert masks (``cell``, ``nucleus``: ``(H, W)`` bool, see
        :func:`~leukflow.segment.masks.truth_masks`); ``kmeans`` with
        ``select_by_masks`` chooses k and the segment against ``truth[target]``.

    Returns
    -------
    FieldSegmentation
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"segment_field: expected an (H, W, 3) RGB image; got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    small, scale = downscale(rgb, params.max_image_px)
    note = ""
    if scale < 1:
        note = (
            f"downscaled from {w}x{h} to {small.shape[1]}x{small.shape[0]} "
            f"(above max_image_px={params.max_image_px})"
        )
    reason = check_field(small)
    if reason:
        return FieldSegmentation(_zeros(small), small, scale, reason, note)
    finish = keep_central if params.keep_regions == "central" else None
    if params.splits:
        central = finish

        def finish(labels: np.ndarray) -> np.ndarray:
            labels = split_touching(labels, min_area_px=params.split_min_area_px)
            return central(labels) if central is not None else labels

    km = params.kmeans_params
    k, k_scores = (km["k"] if params.method == "kmeans" else 0), []
    if params.uses_masks and truth is not None:
        target = resize_nearest(truth[km["target"]], small.shape)
        labels, k_scores = select_kmeans(
            small,
            target,
            k_min=km["k_min"],
            k_max=km["k_max"],
            seed=km["seed"],
            min_area_px=km["min_area_px"],
            max_fit_px=km["max_fit_px"],
            finish=finish,
        )
        k = next(row["k"] for row in k_scores if row["chosen"])
    else:
        labels = segment_cells(small, params.method, **params.method_params())
        if finish is not None:
            labels = finish(labels)
    return FieldSegmentation(
        labels, small, scale, "" if labels.max() else "no_cell", note, k, k_scores
    )


def _zeros(rgb: np.ndarray) -> np.ndarray:
    return np.zeros(rgb.shape[:2], dtype=np.int32)


def extract_rois(
    rgb: np.ndarray,
    labels: np.ndarray,
    *,
    roi_margin: float = _DEFAULT["roi_margin"],
    roi_size_px: int = _DEFAULT["roi_size_px"],
    mask_background: bool = _DEFAULT["mask_background"],
) -> tuple[pd.DataFrame, np.ndarray]:
    """Cut one square crop per labelled region.

    The square is centred on the region's box, with side ``(1 + 2 * roi_margin)``
    times the box's longer side; parts outside the field repeat the edge pixels.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 field.
    labels : numpy.ndarray
        ``(H, W)`` int labels, 0 = background.
    roi_margin : float
        Margin on each side, as a fraction of the box's longer side.
    roi_size_px : int
        Side of the crops after resizing.
    mask_background : bool
        Paint every pixel outside the region black (S4).

    Returns
    -------
    rois : pandas.DataFrame
        One row per region: crop box ``x0, y0, x1, y1`` (exclusive ends, field
        coordinates, may extend past the field), ``area_px``, ``centroid_x/y``.
    crops : numpy.ndarray
        ``(n, roi_size_px, roi_size_px, 3)`` uint8.
    """
    rows, stack = roi_records(
        rgb, labels, roi_margin=roi_margin, roi_size_px=roi_size_px,
        mask_background=mask_background,
    )  # fmt: skip
    return pd.DataFrame(rows, columns=ROI_COLUMNS[2:]), stack


def roi_records(
    rgb: np.ndarray,
    labels: np.ndarray,
    *,
    roi_margin: float,
    roi_size_px: int,
    mask_background: bool,
) -> tuple[list[dict], np.ndarray]:
    """:func:`extract_rois` as plain records: no DataFrame per field on the hot path."""
    rows, crops = [], []
    # find_objects and each region's own box: the same boxes, areas and centroids
    # as skimage's regionprops, without its per-region bookkeeping
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        r0, r1, c0, c1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        rr, cc = np.nonzero(labels[box] == label)
        side = int(np.ceil(max(r1 - r0, c1 - c0) * (1 + 2 * roi_margin)))
        y0 = (r0 + r1 - side) // 2
        x0 = (c0 + c1 - side) // 2
        crop = _crop_padded(rgb, y0, x0, side)
        if mask_background:
            inside = _crop_padded(labels[..., None], y0, x0, side, fill=0) == label
            crop = np.where(inside, crop, 0).astype(np.uint8)
        if crop.shape[0] != roi_size_px:
            crop = transform.resize(crop, (roi_size_px, roi_size_px), anti_aliasing=True)
            crop = np.round(crop * 255).astype(np.uint8)
        crops.append(crop)
        rows.append(
            {"x0": x0, "y0": y0, "x1": x0 + side, "y1": y0 + side, "area_px": len(rr),
             "centroid_x": float((cc + c0).mean()), "centroid_y": float((rr + r0).mean())}
        )  # fmt: skip
    stack = np.stack(crops) if crops else np.zeros((0, roi_size_px, roi_size_px, 3), np.uint8)
    return rows, stack


def _crop_padded(
    img: np.ndarray, y0: int, x0: int, side: int, fill: int | None = None
) -> np.ndarray:
    """``img[y0:y0+side, x0:x0+side]``; outside the field: edge pixels, or ``fill``."""
    h, w = img.shape[:2]
    pad = [(max(0, -y0), max(0, y0 + side - h)), (max(0, -x0), max(0, x0 + side - w)), (0, 0)]
    crop = img[max(0, y0) : y0 + side, max(0, x0) : x0 + side]
    if not any(sum(p) for p in pad):
        return crop
    if fill is None:
        return np.pad(crop, pad, mode="edge")
    return np.pad(crop, pad, mode="constant", constant_values=fill)


def field_rois(
    seg: FieldSegmentation, image_id: str, params: SegmentParams
) -> tuple[pd.DataFrame, np.ndarray]:
    """ROIs of a segmented field, in the original field's pixel coordinates.

    Returns
    -------
    rois : pandas.DataFrame
        :data:`ROI_COLUMNS`; a downscaled field's boxes, areas and centroids are
        mapped back to its original pixels (boxes rounded outwards).
    crops : numpy.ndarray
        ``(n, roi_size_px, roi_size_px, 3)`` uint8, cut from the field as segmented.
    """
    rows, crops = field_roi_records(seg, image_id, params)
    return pd.DataFrame(rows, columns=ROI_COLUMNS), crops


def field_roi_records(
    seg: FieldSegmentation, image_id: str, params: SegmentParams
) -> tuple[list[dict], np.ndarray]:
    """:func:`field_rois` as plain records (one dict per ROI, :data:`ROI_COLUMNS` keys)."""
    margin = params.roi_margin if METHODS[params.method].uses_margin else 0.0
    rows, crops = roi_records(
        seg.rgb,
        seg.labels,
        roi_margin=margin,
        roi_size_px=params.roi_size_px,
        mask_background=params.mask_background,
    )
    s = seg.scale
    out = []
    for i, row in enumerate(rows):
        if s != 1:
            row = {
                "x0": int(np.floor(row["x0"] / s)), "y0": int(np.floor(row["y0"] / s)),
                "x1": int(np.ceil(row["x1"] / s)), "y1": int(np.ceil(row["y1"] / s)),
                "area_px": round(row["area_px"] / s**2),
                "centroid_x": (row["centroid_x"] + 0.5) / s - 0.5,
                "centroid_y": (row["centroid_y"] + 0.5) / s - 0.5,
            }  # fmt: skip
        out.append({"roi_id": f"{image_id}#{i}", "image_id": image_id, **row})
    return out, crops

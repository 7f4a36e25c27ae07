"""Segmentation methods: an RGB field -> an int32 label image, one label per cell.

Each published method is one function ``method(rgb, **params) -> labels`` in
:data:`METHODS`; :func:`segment_cells` dispatches by name. What a region means
depends on the method (a nucleus for ``multiotsu``, a whole cell for ``kmeans``
with ``segment: all_but_brightest``); ROIs are cut from the label image by
:func:`leukflow.segment.rois.extract_rois`, the same for every method.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import color, filters, measure, morphology
from threadpoolctl import threadpool_limits

from leukflow.segment.defaults import CENTER_CROP, KMEANS, OTSU_CONTOURS, SEGMENTATION
from leukflow.segment.masks import dice, iou, score_mask

log = logging.getLogger(__name__)

CHANNELS = ("grey", "red", "red_minus_blue")
KMEANS_SEGMENTS = ("all_but_brightest", "darkest")

#: Gaussian blur before k-means (S2): a 5x5 kernel with OpenCV's sigma for that
#: size, 0.3 * ((5 - 1) / 2 - 1) + 0.8 = 1.1; truncate makes the radius 2 pixels.
KMEANS_BLUR_SIGMA = 1.1
KMEANS_BLUR_TRUNCATE = 2 / KMEANS_BLUR_SIGMA


def _check_rgb(rgb: np.ndarray, who: str) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{who}: expected an (H, W, 3) RGB image; got shape {rgb.shape}")


def _empty(rgb: np.ndarray) -> np.ndarray:
    return np.zeros(rgb.shape[:2], dtype=np.int32)


def _intensity(rgb: np.ndarray, channel: str) -> np.ndarray:
    """Map RGB to one float channel in which nuclei are the darkest pixels."""
    if channel == "grey":
        return color.rgb2gray(rgb)
    if channel == "red":
        return rgb[..., 0] / 255.0
    if channel == "red_minus_blue":  # purple nuclei: blue > red; red cells: red > blue
        return (rgb[..., 0].astype(np.float64) - rgb[..., 2] + 255.0) / 510.0
    raise ValueError(f"segment_cells: channel must be one of {CHANNELS}; got {channel!r}")


def label_regions(mask: np.ndarray, *, min_area_px: int, fill_holes: bool = True) -> np.ndarray:
    """Fill holes, drop regions smaller than ``min_area_px`` and label the rest.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` bool foreground.
    min_area_px : int
        Smallest region kept, in pixels.
    fill_holes : bool
        Fill background enclosed by a region before measuring it.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32 labels, 0 = background.
    """
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    mask = morphology.remove_small_objects(mask, max_size=min_area_px - 1)
    return measure.label(mask).astype(np.int32)


# ------------------------------------------------------------------ S0: multiotsu


def segment_multiotsu(
    rgb: np.ndarray,
    *,
    channel: str = SEGMENTATION["channel"],
    classes: int = SEGMENTATION["classes"],
    min_area_px: int = SEGMENTATION["min_area_px"],
    closing_radius_px: int = SEGMENTATION["closing_radius_px"],
) -> np.ndarray:
    """S0: label white cells (their nuclei) as the darkest multi-Otsu class.

    The grey image holds three populations (white-cell nuclei darkest, red
    cells, background); multi-Otsu thresholding separates them and the darkest
    class marks white cells. A closing joins the lobes of one nucleus, small
    specks (platelets, noise) are dropped by area.

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
    _check_rgb(rgb, "segment_cells")
    grey = _intensity(rgb, channel)
    if np.ptp(grey) == 0:
        return _empty(rgb)
    try:
        thresholds = filters.threshold_multiotsu(grey, classes=classes)
    except ValueError:  # fewer grey levels than classes: nothing to separate
        return _empty(rgb)
    mask = grey < thresholds[0]
    mask = morphology.opening(mask, morphology.disk(1))
    if closing_radius_px:
        mask = morphology.closing(mask, morphology.disk(closing_radius_px))
    mask = morphology.remove_small_holes(mask, max_size=min_area_px)
    mask = morphology.remove_small_objects(mask, max_size=min_area_px - 1)
    return measure.label(mask).astype(np.int32)


# ---------------------------------------------------------------- S2: k-means


def kmeans_clusters(
    rgb: np.ndarray, *, k: int, seed: int = KMEANS["seed"], max_fit_px: int = KMEANS["max_fit_px"]
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster the blurred colours of a field into ``k`` clusters, darkest first.

    The field is blurred with a 5x5 Gaussian; k-means (seeded) is fitted on at
    most ``max_fit_px`` pixels drawn with the same seed, then every pixel is
    assigned to its nearest centre.

    Returns
    -------
    clusters : numpy.ndarray
        ``(H, W)`` int32 cluster index, 0 = the darkest centre (grey), k-1 the brightest.
    centres : numpy.ndarray
        ``(k, 3)`` float64 RGB centres in the same order.
    """
    _check_rgb(rgb, "segment_cells")
    blurred = filters.gaussian(
        rgb.astype(np.float64),
        sigma=KMEANS_BLUR_SIGMA,
        truncate=KMEANS_BLUR_TRUNCATE,
        channel_axis=-1,
        preserve_range=True,
    )
    pixels = blurred.reshape(-1, 3)
    rng = np.random.default_rng(seed)
    fit = pixels
    if len(pixels) > max_fit_px:
        fit = pixels[np.sort(rng.choice(len(pixels), max_fit_px, replace=False))]
    # scikit-learn is imported here, not at the top: the other methods do not
    # need it, and it costs each segmentation job a second of start-up.
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    # One image is a small problem: OpenMP threads cost more than they give (25x
    # slower on a busy 2-core machine), and parallelism comes from processes.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        # fewer distinct colours than k: some centres coincide, which is harmless here
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(fit)
        assigned = model.predict(pixels)
    order = np.argsort(color.rgb2gray(model.cluster_centers_[None] / 255.0)[0], kind="stable")
    rank = np.empty(k, dtype=np.int32)
    rank[order] = np.arange(k, dtype=np.int32)
    clusters = rank[assigned].reshape(rgb.shape[:2])
    return clusters, model.cluster_centers_[order]


def kmeans_candidates(clusters: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Candidate masks of one clustering: each cluster, and the j darkest together.

    S2 scores each cluster; a whole cell (nucleus plus cytoplasm) spans two
    clusters once k >= 3, so the unions of the j darkest clusters (j = 2..k-1)
    are candidates too.

    Returns
    -------
    dict of str to numpy.ndarray
        ``"cluster i/k"`` (0 = darkest) and ``"darkest j/k"`` -> ``(H, W)`` bool.
    """
    out = {f"cluster {i}/{k}": clusters == i for i in range(k)}
    out.update({f"darkest {j}/{k}": clusters < j for j in range(2, k)})
    return out


def segment_kmeans(
    rgb: np.ndarray,
    *,
    k: int = KMEANS["k"],
    seed: int = KMEANS["seed"],
    segment: str = KMEANS["segment"],
    min_area_px: int = KMEANS["min_area_px"],
    max_fit_px: int = KMEANS["max_fit_px"],
) -> np.ndarray:
    """S2 without ground truth: k-means colour clusters with a fixed ``k``.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    k : int
        Number of clusters (S2 recommends 3).
    seed : int
        Seed of the k-means initialisation and of the pixel sample.
    segment : str
        ``all_but_brightest``: every cluster but the brightest (the background),
        i.e. whole cells on single-cell crops; ``darkest``: the darkest cluster
        (nuclei), for smear fields.
    min_area_px : int
        Regions smaller than this (after hole filling) are dropped.
    max_fit_px : int
        At most this many pixels fit the clusters.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32 label image.
    """
    if segment not in KMEANS_SEGMENTS:
        raise ValueError(f"kmeans: segment must be one of {KMEANS_SEGMENTS}; got {segment!r}")
    if k < 2:
        raise ValueError(f"kmeans: expected k >= 2; got {k}")
    clusters, _ = kmeans_clusters(rgb, k=k, seed=seed, max_fit_px=max_fit_px)
    mask = clusters == 0 if segment == "darkest" else clusters < k - 1
    return label_regions(mask, min_area_px=min_area_px)


# ------------------------------------------------------- S4: Otsu, crops, none


def segment_otsu_contours(
    rgb: np.ndarray,
    *,
    min_area_px: int = OTSU_CONTOURS["min_area_px"],
    merge_components: bool = OTSU_CONTOURS["merge_components"],
) -> np.ndarray:
    """S4 on ALL-IDB2: Otsu threshold of the grey image, connected components.

    Pixels darker than Otsu's threshold are objects; components smaller than
    ``min_area_px`` are dropped (S4: 100 px). With ``merge_components`` the
    kept components form one region (one ROI per single-cell image, whose
    background ``mask_background`` paints black, as S4 does); otherwise each
    component is its own region.
    """
    _check_rgb(rgb, "segment_cells")
    grey = color.rgb2gray(rgb)
    if np.ptp(grey) == 0:
        return _empty(rgb)
    mask = morphology.remove_small_objects(
        grey < filters.threshold_otsu(grey), max_size=min_area_px - 1, connectivity=2
    )
    if merge_components:
        return mask.astype(np.int32)
    return measure.label(mask, connectivity=2).astype(np.int32)


def segment_center_crop(
    rgb: np.ndarray,
    *,
    start_fraction: float = CENTER_CROP["start_fraction"],
    end_fraction: float = CENTER_CROP["end_fraction"],
) -> np.ndarray:
    """S4 on C-NMC: one region from ``start_fraction`` to ``end_fraction`` of each side.

    C-NMC cells sit centred on a black background; S4 keeps the middle (20% to
    80% of the height and width) and resizes it.
    """
    _check_rgb(rgb, "segment_cells")
    if not 0 <= start_fraction < end_fraction <= 1:
        raise ValueError(
            "center_crop: expected 0 <= start_fraction < end_fraction <= 1; "
            f"got {start_fraction} and {end_fraction}"
        )
    h, w = rgb.shape[:2]
    r0, c0 = round(start_fraction * h), round(start_fraction * w)
    r1, c1 = max(round(end_fraction * h), r0 + 1), max(round(end_fraction * w), c0 + 1)
    labels = _empty(rgb)
    labels[r0:r1, c0:c1] = 1
    return labels


def segment_whole_image(rgb: np.ndarray) -> np.ndarray:
    """``none``: the image is already one cell; one region covers all of it."""
    _check_rgb(rgb, "segment_cells")
    return np.ones(rgb.shape[:2], dtype=np.int32)


# ------------------------------------------------------- touching cells apart


def split_touching(
    labels: np.ndarray,
    *,
    min_area_px: int = 250,
    max_neck_ratio: float = 0.5,
    max_fill: float = 1.25,
) -> np.ndarray:
    """Split regions of touching cells along their necks (distance-transform watershed).

    Each region's Euclidean distance transform has one peak per round cell;
    a watershed from those peaks (h-maxima of height 1 px) cuts the region
    where the peaks meet (flooding 8-connected, so every pixel of the region
    goes to a piece). Two neighbouring pieces (touching across an edge or
    only at a corner) stay apart only if they look like two round cells that
    pinch where they touch, not like the lobes of one nucleus (lobes are
    elongated, or joined by a thick bridge):

    * the neck (the largest distance value on their shared border) is
      narrower than ``max_neck_ratio`` times the smaller piece's inscribed
      radius ``r``;
    * both pieces are round: area at most ``max_fill`` times ``pi r**2`` of
      their own ``r`` (a disc: 1; a lobe or a sausage: well above);
    * each piece has at least ``min_area_px`` pixels.

    Pairs that fail are merged back, the widest neck first, and the merged
    piece is judged again, until every remaining border passes. A region
    made of separate components (``otsu_contours`` with ``merge_components``:
    one cell per image on purpose) is left whole.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` int labels, 0 = background.
    min_area_px : int
        Smallest piece a split may leave.
    max_neck_ratio : float
        Largest neck, as a fraction of the smaller piece's inscribed radius.
    max_fill : float
        Largest area of a piece, as a multiple of the disc of its inscribed radius.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32 labels 1..n, numbered region by region (a region that
        is not split keeps its pixels).
    """
    from skimage.segmentation import watershed

    out = np.zeros(labels.shape, dtype=np.int32)
    n = 0
    for label, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        pieces = _split_region(labels[box] == label, min_area_px, max_neck_ratio, max_fill,
                               watershed)  # fmt: skip
        view = out[box]
        for piece in np.unique(pieces[pieces > 0]):
            n += 1
            view[pieces == piece] = n
    return out


def _split_region(
    region: np.ndarray, min_area_px: int, max_neck: float, max_fill: float, watershed
) -> np.ndarray:
    """One region's pieces: ``(h, w)`` int labels (1 = the whole region when not split)."""
    whole = region.astype(np.int32)
    if region.sum() < 2 * min_area_px:
        return whole
    if ndi.label(region, structure=np.ones((3, 3)))[1] > 1:  # grouped on purpose: keep it
        return whole
    padded = np.pad(region, 1)
    dist = ndi.distance_transform_edt(padded)
    peaks = measure.label(morphology.h_maxima(dist, 1.0))
    if peaks.max() < 2:
        return whole
    pieces = watershed(-dist, peaks, mask=padded, connectivity=2)  # 8-connected, as regions are
    while True:
        ids = np.unique(pieces[pieces > 0])
        if len(ids) < 2:
            return whole
        radius = {i: float(dist[pieces == i].max()) for i in ids}
        round_ = {i: (pieces == i).sum() <= max_fill * np.pi * radius[i] ** 2 for i in ids}
        area = {i: int((pieces == i).sum()) for i in ids}
        worst, worst_score = None, -1.0
        for a, b, neck in _borders(pieces, dist):
            small = min(radius[a], radius[b])
            ok = (
                neck < max_neck * small
                and round_[a]
                and round_[b]
                and min(area[a], area[b]) >= min_area_px
            )
            if not ok and neck / small > worst_score:
                worst, worst_score = (a, b), neck / small
        if worst is None:
            return pieces[1:-1, 1:-1]
        pieces[pieces == worst[1]] = worst[0]


def _borders(pieces: np.ndarray, dist: np.ndarray) -> list[tuple[int, int, float]]:
    """Adjacent piece pairs ``(a, b, neck)``: neck = largest distance on their border.

    Pieces touch across an edge or a corner (the region is one 8-connected
    component): pieces that meet only diagonally are neighbours too.
    """
    necks: dict[tuple[int, int], float] = {}
    for shift in ((0, -1), (-1, 0), (-1, -1), (-1, 1)):
        a = pieces
        b = np.roll(pieces, shift, axis=(0, 1))
        d = np.maximum(dist, np.roll(dist, shift, axis=(0, 1)))
        touch = (a > 0) & (b > 0) & (a != b)
        for u, v, value in zip(a[touch], b[touch], d[touch], strict=True):
            key = (int(min(u, v)), int(max(u, v)))
            necks[key] = max(necks.get(key, 0.0), float(value))
    return [(a, b, neck) for (a, b), neck in necks.items()]


# ------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """A segmentation method: its function and how its ROIs are cut.

    Attributes
    ----------
    function : callable
        ``function(rgb, **params) -> (H, W) int32 labels``.
    uses_margin : bool
        The ROI is the region's box plus ``roi_margin``; False: exactly the region's box.
    """

    function: Callable[..., np.ndarray]
    uses_margin: bool = True


METHODS: dict[str, Method] = {
    "multiotsu": Method(segment_multiotsu),
    "kmeans": Method(segment_kmeans),
    "otsu_contours": Method(segment_otsu_contours),
    "center_crop": Method(segment_center_crop, uses_margin=False),
    "none": Method(segment_whole_image, uses_margin=False),
}


def segment_cells(rgb: np.ndarray, method: str = "multiotsu", **params) -> np.ndarray:
    """Label the cells of a field with one of :data:`METHODS`.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB field.
    method : str
        A key of :data:`METHODS`.
    **params
        The method's keyword parameters (see its function).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` int32 label image, 0 = background, 1..n = cells.
    """
    if method not in METHODS:
        raise ValueError(f"segment_cells: method must be one of {sorted(METHODS)}; got {method!r}")
    return METHODS[method].function(rgb, **params)


def keep_central(labels: np.ndarray) -> np.ndarray:
    """Keep only the region whose centroid is nearest the image centre, as label 1.

    For datasets of single-cell crops, where the cell sits in the middle and
    neighbouring red cells or fragments are cut by the border.
    """
    regions = measure.regionprops(labels)
    if len(regions) <= 1:
        return (labels > 0).astype(np.int32)
    cy, cx = (labels.shape[0] - 1) / 2, (labels.shape[1] - 1) / 2
    best = min(regions, key=lambda r: (r.centroid[0] - cy) ** 2 + (r.centroid[1] - cx) ** 2)
    return (labels == best.label).astype(np.int32)


def select_kmeans(
    rgb: np.ndarray,
    truth: np.ndarray,
    *,
    k_min: int = KMEANS["k_min"],
    k_max: int = KMEANS["k_max"],
    seed: int = KMEANS["seed"],
    min_area_px: int = KMEANS["min_area_px"],
    max_fit_px: int = KMEANS["max_fit_px"],
    finish: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """S2 with ground truth: pick k and the segment that best match an expert mask.

    For every k in ``k_min..k_max`` the field is clustered (:func:`kmeans_clusters`)
    and every candidate (:func:`kmeans_candidates`, after hole filling, the
    area limit and ``finish``) is scored against ``truth`` by the mean of SSIM,
    Dice and IoU; the best candidate per k is kept, and the best k overall
    (ties: the smaller k, then the earlier candidate).

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 field.
    truth : numpy.ndarray
        ``(H, W)`` bool expert mask (whole cell or nucleus).
    k_min, k_max : int
        Range of k, both included.
    seed, min_area_px, max_fit_px
        As in :func:`segment_kmeans`.
    finish : callable, optional
        Applied to each candidate's labels before scoring (e.g. :func:`keep_central`).

    Returns
    -------
    labels : numpy.ndarray
        ``(H, W)`` int32 labels of the chosen candidate.
    scores : list of dict
        One per k: ``k``, ``segment`` (best candidate's name), ``ssim``,
        ``dice``, ``iou``, ``score``, ``chosen`` (bool).
    """
    if not 2 <= k_min <= k_max:
        raise ValueError(f"kmeans: expected 2 <= k_min <= k_max; got k_min={k_min}, k_max={k_max}")
    if truth.shape != rgb.shape[:2]:
        raise ValueError(f"kmeans: mask shape {truth.shape} differs from image {rgb.shape[:2]}")
    rows, best_labels, best_score, best_k = [], _empty(rgb), -np.inf, k_min
    for k in range(k_min, k_max + 1):
        clusters, _ = kmeans_clusters(rgb, k=k, seed=seed, max_fit_px=max_fit_px)
        row: dict = {"k": k, "score": -np.inf}
        for name, mask in kmeans_candidates(clusters, k).items():
            labels = label_regions(mask, min_area_px=min_area_px)
            if finish is not None:
                labels = finish(labels)
            pred = labels > 0
            d, j = dice(pred, truth), iou(pred, truth)
            if (d + j + 1) / 3 <= row["score"]:  # SSIM <= 1: cannot beat this k's best
                continue
            scores = score_mask(pred, truth)
            if scores["score"] > row["score"]:
                row = {"k": k, "segment": name, **scores}
                if scores["score"] > best_score:
                    best_score, best_labels, best_k = scores["score"], labels, k
        rows.append(row)
    for row in rows:
        row["chosen"] = row["k"] == best_k
    return best_labels, rows

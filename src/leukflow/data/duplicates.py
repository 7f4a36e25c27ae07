"""Duplicate search: the same cell under shifts, flips, rotations, rescaling and re-encoding.

Single-cell sets are often cut from the same smear fields more than once, so
one cell can reach a run as several files: the same pixels in another format
(``exact``), a re-encoded or re-stained copy (``near``), or a re-cut copy,
shifted, flipped, rotated by 90 degrees or rescaled (``shifted``). All of them
must fall in one fold group, or a "grouped" figure still leaks.

The search works on the 64x64 grey thumbnail ingest stores per image
(:func:`leukflow.data.ingest.image_thumbnail`) in two stages:

1. Candidates. Each thumbnail gets up to :data:`N_KEYPOINTS` keypoints (the
   strongest blobs of its band-passed version) with descriptors that shifts,
   flips, rotations, small rescaling and brightness/contrast changes barely
   move (:func:`describe`). Each image, in the order it entered the index,
   lets every keypoint vote for the images of its :data:`N_MATCHES` nearest
   keypoints among earlier images (a k-d tree); its :data:`N_CANDIDATES`
   most-voted images are its candidates. No other pair is ever aligned.
2. Verification. The later image's thumbnail is turned by each of the 8
   flips/rotations and zoomed by each of :data:`SCALES`; phase correlation of
   2x-reduced versions gives each version its offset; the best versions are
   scored at full size by the correlation of the band-passed thumbnails on
   their overlap, and the best is polished to fractions of a pixel and a
   continuous scale. A pair is a duplicate when the overlap covers at least
   :data:`MIN_OVERLAP` of the smaller image and ``1 - correlation`` is at most
   ``max_distance``.

The index (keypoints, content hashes and every verified pair with its score)
can be kept in a file, so a re-run with new images searches only the new
images against all (:func:`find_duplicates`, ``cache_dir``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import fft, ndimage

from leukflow.data import cache
from leukflow.data.ingest import THUMBNAIL_PX, image_thumbnail  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: Columns of ``duplicates.csv``.
DUPLICATE_COLUMNS = [
    "image_id_a", "image_id_b", "kind", "distance", "transform", "scale", "dy", "dx", "overlap",
]  # fmt: skip
#: The 8 flips and 90-degree rotations, by the name written in ``transform``:
#: the operation that turns image b to a's orientation.
TRANSFORMS = (
    "identity", "rot90", "rot180", "rot270", "flip_lr", "flip_ud", "transpose", "transverse",
)  # fmt: skip
#: Zoom factors of b's thumbnail tried in the verification (+-15%).
SCALES = (1 / 1.1, 1.0, 1.1)
#: Versions of b (by phase-correlation peak) scored at full size per pair.
N_REFINE = 4
#: Earlier images (nearest by descriptor) that each image is verified against.
N_CANDIDATES = 5
#: Default largest 1 - correlation of a duplicate pair (``ingest.duplicate_max_distance``).
DEFAULT_MAX_DISTANCE = 0.08
#: Smallest overlap, as a fraction of the smaller image, of a duplicate pair.
MIN_OVERLAP = 0.5
#: Side of the zero-padded canvas of the phase correlation of 2x-reduced
#: (32x32) thumbnails: offsets up to half a thumbnail do not wrap around.
_CANVAS_PX = 48
#: Keypoints described per thumbnail, and nearest keypoints each one votes for.
N_KEYPOINTS = 16
N_MATCHES = 5
#: Keypoints of images before a block preselected by the k-d tree, and the
#: descriptor values it works on (the most varied ones: a k-d tree on all 25 is
#: slower than comparing every pair).
N_PRESELECT = 32
_TREE_DIMS = [0, 1, 6, 22, 19, 23, 16, 2]
_BLOCK = 512  # images compared directly with each other
#: Zooms of an image's thumbnail that it also searches with (their own and :func:`zoomed_keys`).
QUERY_SCALES = (1 / 1.1, 1.1)
_RINGS = np.array([1.5, 3.0, 4.5, 6.0, 8.0, 10.0])  # ring radii around a keypoint, pixels
_ANGLES = 16  # samples on each ring
_KEY_DIM = 1 + 4 * len(_RINGS)  # centre, ring means and 3 harmonics per ring
_BAND_SIGMAS_PX = (1.0, 4.0)  # difference of Gaussians the verification aligns on
#: Finer difference of Gaussians of the second check (detail that distinct
#: look-alike cells do not share, which a copy keeps through re-encoding).
_FINE_SIGMAS_PX = (0.7, 2.0)
#: Pixels next to either image's border left out of each score: there a
#: band-pass sees the reflected border, which a shifted copy does not have.
_MARGIN_PX = 6
_FINE_MARGIN_PX = 3
#: 1 - correlation of each score that the default threshold allows; the
#: reported distance is the larger of the two, rescaled so that
#: ``DEFAULT_MAX_DISTANCE`` is each score's limit.
_BAND_LIMIT = 0.05
_FINE_LIMIT = 0.12
_POLISH_BELOW = 0.3  # distances worth refining to fractions of a pixel
_NEAR_SCALE = 0.02  # a pair within this zoom and offset (thumbnail pixels) is "near"
_NEAR_OFFSET_PX = 0.5


def thumbnails_of(manifest: pd.DataFrame) -> np.ndarray:
    """Stack the stored thumbnails of a manifest into one ``(n, 64, 64)`` uint8 array.

    Raises
    ------
    ValueError
        When a ``thumbnail`` cell is not a 64x64 uint8 thumbnail (a manifest
        from an older leukflow: run ingest again).
    """
    out = np.empty((len(manifest), THUMBNAIL_PX, THUMBNAIL_PX), np.uint8)
    for i, (image_id, raw) in enumerate(zip(manifest["image_id"], manifest["thumbnail"],
                                            strict=True)):  # fmt: skip
        if not isinstance(raw, bytes) or len(raw) != THUMBNAIL_PX**2:
            got = len(raw) if isinstance(raw, bytes) else type(raw).__name__
            raise ValueError(
                f"find_duplicates: {image_id}: expected a {THUMBNAIL_PX}x{THUMBNAIL_PX} uint8 "
                f"thumbnail ({THUMBNAIL_PX**2} bytes), got {got}; ingest the images again"
            )
        out[i] = np.frombuffer(raw, np.uint8).reshape(THUMBNAIL_PX, THUMBNAIL_PX)
    return out


def _standardise(thumbs: np.ndarray) -> np.ndarray:
    """Zero mean and unit standard deviation per thumbnail (brightness and contrast)."""
    x = thumbs - thumbs.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    return x / np.where(std > 1e-3, std, 1.0)


def _taper(size_px: int, edge_px: int = 8) -> np.ndarray:
    """2-D window: 1 inside, a raised cosine over ``edge_px`` at each border."""
    ramp = np.ones(size_px)
    rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge_px) + 0.5) / edge_px)
    ramp[:edge_px] = rise
    ramp[-edge_px:] = rise[::-1]
    return np.outer(ramp, ramp)


def describe(thumb: np.ndarray) -> np.ndarray:
    """Keypoint descriptors of a thumbnail, blind to shifts, flips, rotations and contrast.

    Keypoints are the strongest local extrema of the band-passed thumbnail
    (blobs such as nuclei, lobes and red cells), so a shifted copy has them
    at the same places of its content. Each is described by the grey values
    on rings around it, normalised by the patch's mean and spread, reduced to
    the magnitudes of their angular harmonics (blind to rotations and flips).

    Parameters
    ----------
    thumb : numpy.ndarray
        ``(64, 64)`` grey thumbnail.

    Returns
    -------
    numpy.ndarray
        ``(k, 25)`` float32, ``k <= N_KEYPOINTS`` (0 for a flat image).
    """
    x = _standardise(np.asarray(thumb, np.float32))
    smooth = ndimage.gaussian_filter(x, 1.0)
    strength = np.abs(ndimage.gaussian_filter(x, 1.5) - ndimage.gaussian_filter(x, 4.0))
    peaks = strength == ndimage.maximum_filter(strength, 7)
    border = 6
    peaks[:border] = peaks[-border:] = False
    peaks[:, :border] = peaks[:, -border:] = False
    peaks &= strength > 1e-3
    ys, xs = np.nonzero(peaks)
    keep = np.argsort(-strength[ys, xs], kind="stable")[:N_KEYPOINTS]
    ys, xs = ys[keep], xs[keep]
    angles = 2 * np.pi * np.arange(_ANGLES) / _ANGLES
    yy = ys[:, None, None] + _RINGS[None, :, None] * np.sin(angles)[None, None, :]
    xx = xs[:, None, None] + _RINGS[None, :, None] * np.cos(angles)[None, None, :]
    rings = ndimage.map_coordinates(smooth, [yy.ravel(), xx.ravel()], order=1, mode="nearest")
    rings = rings.reshape(len(ys), len(_RINGS), _ANGLES)
    centre = smooth[ys, xs]
    values = np.concatenate([rings.reshape(len(ys), -1), centre[:, None]], axis=1)
    mean = values.mean(axis=1, keepdims=True)
    spread = values.std(axis=1, keepdims=True) + 1e-3
    rings = (rings - mean[:, :, None]) / spread[:, :, None]
    harmonics = np.abs(np.fft.rfft(rings, axis=2))[:, :, :4] / _ANGLES
    return np.concatenate(
        [
            (centre[:, None] - mean) / spread,
            harmonics[:, :, 0],
            harmonics[:, :, 1:].reshape(len(ys), -1),
        ],
        axis=1,
    ).astype(np.float32)


def zoomed_keys(thumb: np.ndarray) -> list[np.ndarray]:
    """Descriptors an image also searches with: those of its zoomed thumbnail.

    The ring radii of :func:`describe` are fixed, so a copy with a 10-15%
    wider or narrower field of view describes its blobs a little differently;
    searching also with the thumbnail zoomed by each of :data:`QUERY_SCALES`
    finds such copies that the index, which holds each image at scale 1 only,
    would miss.
    """
    thumb = np.asarray(thumb, np.float32)
    return [
        describe(ndimage.zoom(thumb, s, order=1, grid_mode=True, mode="nearest"))
        for s in QUERY_SCALES
    ]


def earlier_candidates(
    keys: np.ndarray,
    owner: np.ndarray,
    queries: np.ndarray,
    query_owner: np.ndarray,
    n_images: int,
    k: int,
) -> list[tuple[int, int]]:
    """Candidate pairs ``(i, j)``, ``i < j``: each queried image ``j`` with its best earlier ones.

    Every query keypoint of ``j`` votes for the images of its
    :data:`N_MATCHES` nearest keypoints among images before ``j``; ``j``'s
    candidates are the ``k`` images with most votes. Images go in blocks of
    :data:`_BLOCK` (counted from the first image, wherever the queries
    start). Inside a block, keypoints are compared directly; against the
    images before the block, a k-d tree on the :data:`_TREE_DIMS` most varied
    descriptor values preselects :data:`N_PRESELECT` keypoints that are then
    ranked on all values. Both depend only on the images before ``j``, so
    adding images later pairs them as a search of all images at once would.

    Parameters
    ----------
    keys : numpy.ndarray
        ``(m, d)`` keypoint descriptors of all images (:func:`describe`),
        grouped by image.
    owner : numpy.ndarray
        ``(m,)`` the image (position in the index) of each keypoint, ascending.
    queries, query_owner : numpy.ndarray
        The same for the images to find candidates for (their own and :func:`zoomed_keys`).
    n_images : int
        Images in the index.
    k : int
        Candidates per image.
    """
    pairs: list[tuple[int, int]] = []
    if len(query_owner) == 0:
        return pairs
    first = np.searchsorted(owner, np.arange(n_images + 1))
    q_first = np.searchsorted(query_owner, np.arange(n_images + 1))
    for lo in range(int(query_owner[0]) // _BLOCK * _BLOCK, n_images, _BLOCK):
        hi = min(lo + _BLOCK, n_images)
        qs = slice(q_first[lo], q_first[hi])
        voted_d, voted = _block_votes(keys, owner, first[lo], first[hi], queries[qs],
                                      query_owner[qs])  # fmt: skip
        for j in np.unique(query_owner[qs]):
            rows = slice(q_first[j] - q_first[lo], q_first[j + 1] - q_first[lo])
            ok = np.isfinite(voted_d[rows])
            if not ok.any():
                continue
            images, votes = np.unique(voted[rows][ok], return_counts=True)
            top = images[np.lexsort((images, -votes))][:k]
            pairs += [(int(i), int(j)) for i in top]
    return pairs


def _block_votes(
    keys: np.ndarray, owner: np.ndarray, lo: int, hi: int, query: np.ndarray, query_owner
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and images of the nearest earlier keypoints of a block's query keypoints.

    ``keys[lo:hi]`` are the keypoints of the block's images.
    """
    from sklearn.neighbors import KDTree

    cand_d = np.full((len(query), 0), np.inf, np.float32)
    cand_i = np.zeros((len(query), 0), np.int64)
    if lo > 0 and len(query):
        m = min(N_PRESELECT, lo)
        tree = KDTree(keys[:lo, _TREE_DIMS], leaf_size=40)
        cand_i = tree.query(query[:, _TREE_DIMS], k=m, return_distance=False)
        cand_d = np.sqrt(((keys[cand_i] - query[:, None]) ** 2).sum(axis=2)).astype(np.float32)
    # inside the block: every keypoint against those of earlier images of the block
    near_d, near = _nearest_inside(query, query_owner, keys[lo:hi], owner[lo:hi])
    all_d = np.concatenate([cand_d, near_d], axis=1)
    all_i = np.concatenate([cand_i, near + lo], axis=1)
    best = np.argsort(all_d, axis=1, kind="stable")[:, :N_MATCHES]
    voted_d = np.take_along_axis(all_d, best, axis=1)
    return voted_d, owner[np.take_along_axis(all_i, best, axis=1)]


def _nearest_inside(
    query: np.ndarray, query_owner: np.ndarray, keys: np.ndarray, owner: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances and positions in ``keys`` of each query's nearest keypoints of earlier images."""
    m = N_MATCHES
    dist = np.full((len(query), m), np.inf, np.float32)
    index = np.zeros((len(query), m), np.int64)
    norms = (keys**2).sum(axis=1)
    rows = 1024
    for lo in range(0, len(query), rows):
        hi = min(lo + rows, len(query))
        # only earlier images count, so only the keypoints before this slice's last image
        cols = int(np.searchsorted(owner, query_owner[hi - 1]))
        mm = min(m, cols)
        if mm == 0:
            continue
        q = query[lo:hi]
        d2 = (q**2).sum(axis=1)[:, None] + norms[None, :cols] - 2 * q @ keys[:cols].T
        d2[query_owner[lo:hi, None] <= owner[None, :cols]] = np.inf
        near = np.argpartition(d2, mm - 1, axis=1)[:, :mm]
        dist[lo:hi, :mm] = np.sqrt(np.maximum(np.take_along_axis(d2, near, axis=1), 0))
        index[lo:hi, :mm] = near
    return dist, index


@dataclass(frozen=True)
class Match:
    """The best alignment of image b onto image a found by :func:`align`."""

    distance: float  #: 1 - correlation of the band-passed thumbnails on the overlap
    transform: str  #: the flip/rotation that turns b to a's orientation
    scale: float  #: side of b's field of view over the side of a's
    dy: float  #: row of b's top-left corner in a, in a's thumbnail pixels
    dx: float  #: column of b's top-left corner in a, in a's thumbnail pixels
    overlap: float  #: overlap as a fraction of the smaller field of view


def _dihedral(x: np.ndarray, name: str) -> np.ndarray:
    """Apply one of :data:`TRANSFORMS` to the last two axes."""
    ops = {
        "identity": lambda a: a,
        "rot90": lambda a: np.rot90(a, 1, axes=(-2, -1)),
        "rot180": lambda a: np.rot90(a, 2, axes=(-2, -1)),
        "rot270": lambda a: np.rot90(a, 3, axes=(-2, -1)),
        "flip_lr": lambda a: a[..., ::-1],
        "flip_ud": lambda a: a[..., ::-1, :],
        "transpose": lambda a: np.swapaxes(a, -2, -1),
        "transverse": lambda a: np.swapaxes(a, -2, -1)[..., ::-1, ::-1],
    }
    return ops[name](x)


def _band(x: np.ndarray, sigmas: tuple[float, float] = _BAND_SIGMAS_PX) -> np.ndarray:
    small, large = sigmas
    return ndimage.gaussian_filter(x, small) - ndimage.gaussian_filter(x, large)


def _reduce2(x: np.ndarray) -> np.ndarray:
    """Average 2x2 blocks of the last two axes (odd edges dropped)."""
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return x.reshape(*x.shape[:-2], h // 2, 2, w // 2, 2).mean(axis=(-3, -1))


def _coarse(x: np.ndarray) -> np.ndarray:
    """Reduce a thumbnail 2x, standardise and taper it, as the coarse stage sees it."""
    half = _reduce2(x)
    return _standardise(half) * _taper(half.shape[0], edge_px=4)


def _spectra(xs: list[np.ndarray]) -> np.ndarray:
    """Spectra of coarse thumbnails, each zero-padded to the canvas."""
    canvas = np.zeros((len(xs), _CANVAS_PX, _CANVAS_PX), np.float32)
    for n, x in enumerate(xs):
        canvas[n, : x.shape[0], : x.shape[1]] = x
    return fft.rfft2(canvas, workers=1)


class Reference:
    """What the verification needs of an image that b is aligned onto."""

    def __init__(self, thumb: np.ndarray) -> None:
        thumb = np.asarray(thumb, np.float32)
        self.band = _band(thumb)
        self.fine = _band(thumb, _FINE_SIGMAS_PX)
        self.spectrum = _spectra([_coarse(thumb)])[0]


class Versions:
    """The 8 turned and 5 zoomed versions of one thumbnail, as aligned onto references."""

    def __init__(self, thumb: np.ndarray) -> None:
        thumb = np.asarray(thumb, np.float32)
        size = thumb.shape[-1]
        self.band: list[np.ndarray] = []  # per (scale, transform)
        self.keys: list[tuple[float, str]] = []
        whole = _band(thumb)
        fine = _band(thumb, _FINE_SIGMAS_PX)
        self.turned_band = {
            name: np.ascontiguousarray(_dihedral(whole, name)) for name in TRANSFORMS
        }
        self.turned_fine = {
            name: np.ascontiguousarray(_dihedral(fine, name)) for name in TRANSFORMS
        }
        coarse = []
        for scale in SCALES:
            side = round(size * scale)
            zoomed = ndimage.zoom(thumb, side / size, order=1, grid_mode=True, mode="nearest")
            banded, small = _band(zoomed), _coarse(zoomed)
            for name in TRANSFORMS:
                self.keys.append((side / size, name))
                self.band.append(np.ascontiguousarray(_dihedral(banded, name)))
                coarse.append(_dihedral(small, name))
        self.spectra = _spectra(coarse)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two band-passed patches (zero mean by construction)."""
    denom = np.sqrt(np.einsum("ij,ij->", a, a) * np.einsum("ij,ij->", b, b))
    return float(np.einsum("ij,ij->", a, b) / denom) if denom > 1e-6 else 0.0


def align(
    a: np.ndarray | Reference, b: np.ndarray | Versions, *, n_refine: int = N_REFINE
) -> Match:
    """Best alignment of thumbnail b onto thumbnail a over flips, rotations, zooms and shifts.

    Phase correlation of 2x-reduced thumbnails gives each version of b its
    offset; the ``n_refine`` versions with the highest peaks are scored at
    full size, on their overlap, at that offset and the 8 around it.

    Parameters
    ----------
    a, b : numpy.ndarray
        ``(64, 64)`` grey thumbnails (or their prepared :class:`Reference`
        and :class:`Versions`).
    n_refine : int
        Versions of b scored on their overlap.

    Returns
    -------
    Match
        The version and offset with the highest band-passed correlation on an
        overlap of at least :data:`MIN_OVERLAP`; distance 1 when none has one.
    """
    ref = a if isinstance(a, Reference) else Reference(a)
    versions = b if isinstance(b, Versions) else Versions(b)
    return align_many([ref], versions, n_refine=n_refine)[0]


def align_many(
    refs: list[Reference], versions: Versions, *, n_refine: int = N_REFINE
) -> list[Match]:
    """:func:`align` of one image's versions onto several references at once."""
    cross = np.stack([r.spectrum for r in refs])[:, None] * np.conj(versions.spectra)[None]
    cross /= np.abs(cross) + np.float32(1e-6)
    surface = fft.irfft2(cross, s=(_CANVAS_PX, _CANVAS_PX), workers=1)
    flat = surface.reshape(len(refs), len(versions.keys), -1)
    peak = flat.argmax(axis=2)
    heights = np.take_along_axis(flat, peak[..., None], axis=2)[..., 0]
    order = np.argsort(-heights, axis=1)[:, :n_refine]
    found = [_refine(ref, versions, peak[n], order[n]) for n, ref in enumerate(refs)]
    return [_polish(ref, versions, m) if m.distance < _POLISH_BELOW else _far(m)
            for ref, m in zip(refs, found, strict=True)]  # fmt: skip


def _far(match: Match) -> Match:
    """Put a match too far to polish on the distance scale of :func:`_with_fine_check`."""
    distance = min(1.0, DEFAULT_MAX_DISTANCE * match.distance / _BAND_LIMIT)
    return Match(distance, match.transform, match.scale, match.dy, match.dx, match.overlap)


def _warped_distance(
    band_a: np.ndarray, band_b: np.ndarray, dy: float, dx: float, scale: float, margin_px: int
) -> float:
    """1 - correlation of ``band_a`` and ``band_b`` placed at ``(dy, dx)`` and zoomed by ``scale``.

    Pixels within ``margin_px`` of either image's border are left out; an
    overlap below :data:`MIN_OVERLAP` scores 1.
    """
    size = band_a.shape[0]
    if not 1 / 1.2 <= scale <= 1.2:
        return 1.0
    grid_y, grid_x = _GRID
    by, bx = (grid_y - dy) / scale, (grid_x - dx) / scale
    inside = (by >= 0) & (by <= size - 1) & (bx >= 0) & (bx <= size - 1)
    if inside.sum() < MIN_OVERLAP * min(size, size * scale) ** 2:
        return 1.0
    lo, hi = margin_px / scale, size - 1 - margin_px / scale
    inside &= (by >= lo) & (by <= hi) & (bx >= lo) & (bx <= hi) & _INTERIOR[margin_px]
    warped = ndimage.map_coordinates(band_b, [by[inside], bx[inside]], order=1)
    a = band_a[inside]
    a, warped = a - a.mean(), warped - warped.mean()
    return 1 - _ncc(a[None], warped[None])


def _interior(margin_px: int) -> np.ndarray:
    inside = np.zeros((THUMBNAIL_PX, THUMBNAIL_PX), bool)
    inside[margin_px : THUMBNAIL_PX - margin_px, margin_px : THUMBNAIL_PX - margin_px] = True
    return inside


_GRID = np.mgrid[:THUMBNAIL_PX, :THUMBNAIL_PX].astype(np.float32)
_INTERIOR = {m: _interior(m) for m in (_MARGIN_PX, _FINE_MARGIN_PX)}


def _polish(ref: Reference, versions: Versions, match: Match) -> Match:
    """Refine a match's offset and scale to fractions of a pixel (Nelder-Mead on 1 - correlation).

    The grid search leaves up to half a pixel and half a scale step of
    misalignment, which costs a true copy more correlation than a distinct
    cell; only pairs that are close already are polished.
    """
    from scipy.optimize import minimize

    size = ref.band.shape[0]
    band_b = versions.turned_band[match.transform]

    def cost(params: np.ndarray) -> float:
        return _warped_distance(ref.band, band_b, *params, _MARGIN_PX)

    start = np.array([match.dy, match.dx, match.scale])
    # the start and one step of 0.7 px down, 0.7 px right and 3% of scale
    simplex = start + np.array([[0, 0, 0], [0.7, 0, 0], [0, 0.7, 0], [0, 0, 0.03]])
    result = minimize(cost, start, method="Nelder-Mead",
                      options={"xatol": 0.05, "fatol": 1e-4, "maxfev": 60,
                               "initial_simplex": simplex})  # fmt: skip
    if result.fun < match.distance:
        dy, dx, scale = (float(v) for v in result.x)
        side = size * scale
        overlap = (
            max(0.0, min(size, dy + side) - max(0.0, dy))
            * max(0.0, min(size, dx + side) - max(0.0, dx))
            / min(size, side) ** 2
        )
        match = Match(float(result.fun), match.transform, scale, dy, dx, min(overlap, 1.0))
    return _with_fine_check(ref, versions, match)


def _with_fine_check(ref: Reference, versions: Versions, match: Match) -> Match:
    """Score the match on the fine band too; the distance becomes the worse of the two.

    Each score is divided by what the default threshold allows of it
    (:data:`_BAND_LIMIT`, :data:`_FINE_LIMIT`), times :data:`DEFAULT_MAX_DISTANCE`.
    """
    fine = _warped_distance(
        ref.fine, versions.turned_fine[match.transform], match.dy, match.dx, match.scale,
        _FINE_MARGIN_PX,
    )  # fmt: skip
    distance = DEFAULT_MAX_DISTANCE * max(match.distance / _BAND_LIMIT, fine / _FINE_LIMIT)
    return Match(min(distance, 1.0), match.transform, match.scale, match.dy, match.dx,
                 match.overlap)  # fmt: skip


def _refine(ref: Reference, versions: Versions, peak: np.ndarray, chosen: np.ndarray) -> Match:
    size = ref.band.shape[0]
    best = Match(1.0, "identity", 1.0, 0.0, 0.0, 0.0)
    for v in chosen:
        cy, cx = np.unravel_index(peak[v], (_CANVAS_PX, _CANVAS_PX))
        cy = cy - _CANVAS_PX if cy >= _CANVAS_PX // 2 else cy
        cx = cx - _CANVAS_PX if cx >= _CANVAS_PX // 2 else cx
        scale, name = versions.keys[v]
        band_b = versions.band[v]
        side = band_b.shape[0]
        for dy in (2 * cy - 1, 2 * cy, 2 * cy + 1):
            for dx in (2 * cx - 1, 2 * cx, 2 * cx + 1):
                y0, y1 = max(0, dy), min(size, dy + side)
                x0, x1 = max(0, dx), min(size, dx + side)
                if y1 <= y0 or x1 <= x0:
                    continue
                overlap = (y1 - y0) * (x1 - x0) / min(size, side) ** 2
                if overlap < MIN_OVERLAP:
                    continue
                # scored away from both images' borders
                m = _MARGIN_PX
                y0, y1 = max(m, dy + m), min(size - m, dy + side - m)
                x0, x1 = max(m, dx + m), min(size - m, dx + side - m)
                corr = _ncc(ref.band[y0:y1, x0:x1], band_b[y0 - dy : y1 - dy, x0 - dx : x1 - dx])
                if 1 - corr < best.distance:
                    best = Match(1 - corr, name, scale, float(dy), float(dx), float(overlap))
    return best


#: Cache stage of the search index (see :mod:`leukflow.data.cache`).
INDEX_SOURCES = ("data/duplicates.py",)
_INDEX_PARAMS = {
    "n_candidates": N_CANDIDATES, "n_keypoints": N_KEYPOINTS, "n_matches": N_MATCHES,
    "n_preselect": N_PRESELECT, "query_scales": QUERY_SCALES,
    "scales": SCALES, "min_overlap": MIN_OVERLAP, "n_refine": N_REFINE,
}  # fmt: skip
_MATCH_FIELDS = ("distance", "transform", "scale", "dy", "dx", "overlap")
_SWAPS_AXES = {"rot90", "rot270", "transpose", "transverse"}


def _verify_chunk(task: tuple[np.ndarray, np.ndarray, list[list[int]]]) -> list[list[Match]]:
    """Align each query thumbnail onto its candidates (one worker's share)."""
    queries, refs, candidates = task
    prepared: dict[int, Reference] = {}
    out = []
    for q, cands in zip(queries, candidates, strict=True):
        for c in cands:
            if c not in prepared:
                prepared[c] = Reference(refs[c])
        out.append(align_many([prepared[c] for c in cands], Versions(q)))
    return out


def verify_pairs(
    thumbs: np.ndarray, pairs: list[tuple[int, int]], *, n_workers: int = 1
) -> list[Match]:
    """Align the later image of each candidate pair onto the earlier one.

    Parameters
    ----------
    thumbs : numpy.ndarray
        ``(n, 64, 64)`` thumbnails.
    pairs : list of (int, int)
        ``(i, j)`` indices into ``thumbs``, ``i < j``.
    n_workers : int
        Worker processes.

    Returns
    -------
    list of Match
        One per pair, in the order given.
    """
    from leukflow.core.parallel import parallel_map

    by_query: dict[int, list[int]] = {}
    for i, j in pairs:
        by_query.setdefault(j, []).append(i)
    queries = list(by_query)
    matches: dict[tuple[int, int], Match] = {}
    chunk = 64  # query images per task: about a megabyte of thumbnails
    wave = 64 * chunk  # queries whose tasks exist at once: memory stays flat
    for start in range(0, len(queries), wave):
        tasks = []
        part_queries = queries[start : start + wave]
        for lo in range(0, len(part_queries), chunk):
            part = part_queries[lo : lo + chunk]
            refs = sorted({i for q in part for i in by_query[q]})
            local = {i: n for n, i in enumerate(refs)}
            tasks.append((
                thumbs[part],
                thumbs[refs],
                [[local[i] for i in by_query[q]] for q in part],
            ))  # fmt: skip
        done = parallel_map(_verify_chunk, tasks, n_workers, desc="verify duplicates",
                            chunksize=1)  # fmt: skip
        for q, per_query in zip(part_queries, (m for found in done for m in found), strict=True):
            for i, match in zip(by_query[q], per_query, strict=True):
                matches[(i, q)] = match
    return [matches[p] for p in pairs]


#: Arrays of an index file (:func:`_save_index`).
_INDEX_ARRAYS = ("hashes", "keys", "owner", "pair_a", "pair_b", *_MATCH_FIELDS)


def _load_index(path: Path | None) -> tuple[list[str], tuple, pd.DataFrame] | None:
    """Read the stored index; ``None`` (rebuild it) when absent, unreadable or incomplete."""
    if path is None:
        return None
    hit = cache.load_arrays(path)
    if hit is None:
        return None
    arrays, _ = hit
    missing = [name for name in _INDEX_ARRAYS if name not in arrays]
    if missing:
        log.warning("%s: index lacks %s (older or damaged file); rebuilding it",
                    path, ", ".join(missing))  # fmt: skip
        return None
    table = pd.DataFrame({"a": arrays["pair_a"], "b": arrays["pair_b"]})
    for field in _MATCH_FIELDS:
        table[field] = arrays[field]
    keys = (arrays["keys"], arrays["owner"])
    return arrays["hashes"].tolist(), keys, table


def _save_index(path: Path, hashes: list[str], keys: tuple, table: pd.DataFrame) -> None:
    arrays = {"hashes": np.array(hashes, dtype=str), "keys": keys[0], "owner": keys[1],
              "pair_a": table["a"].to_numpy(str), "pair_b": table["b"].to_numpy(str)}  # fmt: skip
    for field in _MATCH_FIELDS:
        arrays[field] = table[field].to_numpy(str if field == "transform" else np.float64)
    cache.save_arrays(path, arrays, {"n_images": len(hashes)})


def search_index(
    hashes: list[str],
    thumbs: np.ndarray,
    *,
    index_path: str | Path | None = None,
    n_workers: int = 1,
) -> pd.DataFrame:
    """Verify candidate pairs of distinct contents, searching only what the index lacks.

    Parameters
    ----------
    hashes : list of str
        One content hash per thumbnail, all different (``pixel_sha256``).
    thumbs : numpy.ndarray
        ``(n, 64, 64)`` thumbnails, in the order images should enter the index.
    index_path : str or Path, optional
        File of the index. Contents already in it keep their place and pairs;
        only the others are searched (against all) and appended. An index
        holding a content that ``hashes`` lacks is rebuilt from scratch.
    n_workers : int
        Worker processes of the verification.

    Returns
    -------
    pandas.DataFrame
        ``a``, ``b`` (content hashes; a entered the index first) and the
        :class:`Match` fields of every candidate pair, accepted or not.
    """
    path = Path(index_path) if index_path else None
    stored = _load_index(path)
    position = {h: n for n, h in enumerate(hashes)}
    if stored is not None and not set(stored[0]) <= set(position):
        log.info("%s: images left the run since it was built; rebuilding the index", path)
        stored = None
    if stored is None:
        old_hashes, old_keys, old_owner, old_table = [], [], [], None
    else:
        old_hashes, (keys, owner), old_table = stored
        old_keys, old_owner = [keys], [owner]
    known = set(old_hashes)
    new = [n for n, h in enumerate(hashes) if h not in known]
    order = [position[h] for h in old_hashes] + new
    new_keys, new_owner, queries, query_owner = [], [], [], []
    for n, pos in enumerate(new, start=len(old_hashes)):
        found = describe(thumbs[pos])
        searched = np.concatenate([found, *zoomed_keys(thumbs[pos])])
        new_keys.append(found)
        new_owner.append(np.full(len(found), n, np.int64))
        queries.append(searched)
        query_owner.append(np.full(len(searched), n, np.int64))
    empty_keys, empty_owner = np.zeros((0, _KEY_DIM), np.float32), np.zeros(0, np.int64)
    keys = np.concatenate([*old_keys, *new_keys, empty_keys])
    owner = np.concatenate([*old_owner, *new_owner, empty_owner])
    pairs = earlier_candidates(keys, owner, np.concatenate([*queries, empty_keys]),
                               np.concatenate([*query_owner, empty_owner]), len(order),
                               N_CANDIDATES)  # fmt: skip
    log.info(
        "duplicate index: %d images known, %d new, %d candidate pairs to verify",
        len(old_hashes), len(new), len(pairs),
    )  # fmt: skip
    ordered = thumbs[order]
    matches = verify_pairs(ordered, pairs, n_workers=n_workers)
    ordered_hashes = [hashes[n] for n in order]
    table = pd.DataFrame(
        [{"a": ordered_hashes[i], "b": ordered_hashes[j], **m.__dict__}
         for (i, j), m in zip(pairs, matches, strict=True)],
        columns=["a", "b", *_MATCH_FIELDS],
    )  # fmt: skip
    if old_table is not None:
        table = pd.concat([old_table, table], ignore_index=True)
    if path is not None:
        _save_index(path, ordered_hashes, (keys, owner), table)
    return table


def index_file(cache_dir: str | Path) -> Path:
    """Where :func:`find_duplicates` keeps its index under a cache folder."""
    return (
        Path(cache_dir)
        / cache.namespace("duplicates", _INDEX_PARAMS, INDEX_SOURCES)
        / ("index.npz")
    )


def _pixels_of_smaller(match: pd.Series, a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """Convert an offset in a's thumbnail pixels to pixels of the smaller image."""
    if a["width"] * a["height"] <= b["width"] * b["height"]:
        per_y, per_x = a["height"] / THUMBNAIL_PX, a["width"] / THUMBNAIL_PX
    else:
        h, w = (b["width"], b["height"]) if match["transform"] in _SWAPS_AXES else (
            b["height"], b["width"])  # fmt: skip
        per_y = h / (THUMBNAIL_PX * match["scale"])
        per_x = w / (THUMBNAIL_PX * match["scale"])
    return round(match["dy"] * per_y, 1), round(match["dx"] * per_x, 1)


def find_duplicates(
    manifest: pd.DataFrame,
    *,
    max_distance: float,
    twins: Mapping[str, str] | None = None,
    cache_dir: str | Path | None = None,
    n_workers: int = 1,
) -> pd.DataFrame:
    """Find copies of one image or cell across every dataset of a run.

    ``exact`` duplicates decode to the same pixels (the same file re-saved in
    another format counts). The other pairs come from the two-stage search
    described in this module: ``near`` when the best alignment is the image
    as it is (no flip, zoom or offset), ``shifted`` otherwise.

    A ``folds.twin`` dataset (``<name>_random`` or ``<name>_grouped``) holds
    the same files as the dataset it copies. Searching its images too would
    pair every image with its own copy; instead the search skips the twins and
    repeats the pairs within a dataset for its twin, so the twin's folds group
    the same copies together.

    Parameters
    ----------
    manifest : pandas.DataFrame
        ``image_id``, ``dataset``, ``width``, ``height``, ``pixel_sha256`` and
        ``thumbnail`` of every image, as ingest writes them; no image is
        decoded again.
    max_distance : float
        Largest ``1 - correlation`` (band-passed thumbnails, on the overlap)
        of a duplicate pair; 0 keeps exact duplicates only.
    twins : mapping, optional
        Twin dataset -> the dataset it copies.
    cache_dir : str or Path, optional
        Folder of the search index (:func:`index_file`): a re-run searches
        only contents the index has not seen.
    n_workers : int
        Worker processes of the verification.

    Returns
    -------
    pandas.DataFrame
        :data:`DUPLICATE_COLUMNS`: ``image_id_a`` (the earlier image),
        ``image_id_b``, ``kind`` (``exact``, ``near`` or ``shifted``),
        ``distance``, ``transform`` (of :data:`TRANSFORMS`, turning b to a's
        orientation), ``scale`` (side of b's field of view over a's),
        ``dy``, ``dx`` (where b's top-left corner lies in a, in pixels of the
        smaller image) and ``overlap`` (fraction of the smaller image). Each
        twin's pairs follow, ids renamed ``<name>/...`` -> ``<twin>/...``.
    """
    twins = twins or {}
    if twins:
        manifest = manifest[~manifest["dataset"].isin(twins)]
    rows = []
    for _, same in manifest.groupby("pixel_sha256", sort=False):
        first, *copies = same["image_id"].tolist()
        rows += [{"image_id_a": first, "image_id_b": c, "kind": "exact", "distance": 0.0,
                  "transform": "identity", "scale": 1.0, "dy": 0.0, "dx": 0.0, "overlap": 1.0}
                 for c in copies]  # fmt: skip
    unique = manifest.drop_duplicates("pixel_sha256").set_index("pixel_sha256", drop=False)
    if max_distance > 0 and len(unique) > 1:
        table = search_index(
            unique["pixel_sha256"].tolist(),
            thumbnails_of(unique),
            index_path=index_file(cache_dir) if cache_dir else None,
            n_workers=n_workers,
        )
        for match in table[table["distance"] <= max_distance].to_dict("records"):
            a, b = unique.loc[match["a"]], unique.loc[match["b"]]
            if a.name not in unique.index or b.name not in unique.index:
                continue
            # the same view: no turn, and zoom and offset within what resampling leaves
            near = (
                match["transform"] == "identity"
                and abs(match["scale"] - 1) <= _NEAR_SCALE
                and max(abs(match["dy"]), abs(match["dx"])) <= _NEAR_OFFSET_PX
            )
            dy, dx = _pixels_of_smaller(pd.Series(match), a, b)
            rows.append({
                "image_id_a": a["image_id"], "image_id_b": b["image_id"],
                "kind": "near" if near else "shifted",
                "distance": round(float(match["distance"]), 4),
                "transform": match["transform"], "scale": round(float(match["scale"]), 4),
                "dy": dy, "dx": dx, "overlap": round(float(match["overlap"]), 3),
            })  # fmt: skip
    duplicates = pd.DataFrame(rows, columns=DUPLICATE_COLUMNS)
    parts = [duplicates]
    for twin, name in twins.items():
        prefix = f"{name}/"
        inside = duplicates["image_id_a"].str.startswith(prefix) & duplicates[
            "image_id_b"
        ].str.startswith(prefix)
        renamed = duplicates[inside].copy()
        for col in ("image_id_a", "image_id_b"):
            renamed[col] = f"{twin}/" + renamed[col].str.slice(len(prefix))
        parts.append(renamed)
    duplicates = pd.concat(parts, ignore_index=True)
    log.info(
        "%d duplicate pairs (%s)", len(duplicates), duplicates["kind"].value_counts().to_dict()
    )
    return duplicates


def plot_duplicates(
    manifest: pd.DataFrame, duplicates: pd.DataFrame, path: str | Path, *, max_pairs: int = 24
) -> None:
    """Draw found pairs side by side, for checking by eye, as a PNG.

    Shifted pairs come first, then near, then exact ones (the least certain
    first), each image as decoded from its file, titled with the pair's kind,
    distance, transform, scale and overlap.

    Parameters
    ----------
    manifest : pandas.DataFrame
        ``image_id``, ``root`` and ``path`` of every image.
    duplicates : pandas.DataFrame
        The pairs, as :func:`find_duplicates` returns them.
    path : str or Path
        The PNG to write (its folder is created).
    max_pairs : int
        Pairs drawn at most.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leukflow.data.io import InvalidInputError, read_image

    rank = {"shifted": 0, "near": 1, "exact": 2}
    shown = duplicates.assign(_rank=duplicates["kind"].map(rank)).sort_values(
        ["_rank", "distance"], ascending=[True, False], kind="stable"
    )[:max_pairs]
    files = {i: Path(r) / p for i, r, p in manifest[["image_id", "root", "path"]].itertuples(
        index=False)}  # fmt: skip
    cols = 2  # pairs per row
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if shown.empty:
        axes[0, 0].set_title("no duplicate pairs found", loc="left")
    for n, pair in enumerate(shown.itertuples(index=False)):
        for side, image_id in enumerate((pair.image_id_a, pair.image_id_b)):
            ax = axes[n // cols, 2 * (n % cols) + side]
            try:
                ax.imshow(read_image(files[image_id]))
            except (KeyError, InvalidInputError) as err:
                ax.text(0.5, 0.5, f"unreadable: {err}", ha="center", wrap=True, fontsize=5)
            ax.set_title(image_id, fontsize=5)
        axes[n // cols, 2 * (n % cols)].text(
            0, -0.25,
            f"{pair.kind} d={pair.distance:.3f} {pair.transform} x{pair.scale:.2f} "
            f"overlap {pair.overlap:.2f}",
            transform=axes[n // cols, 2 * (n % cols)].transAxes, fontsize=5,
        )  # fmt: skip
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""HOG features (S4's SVM baseline): a fixed, untrained "encoder"."""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2gray
from skimage.feature import hog
from skimage.transform import resize


def hog_features(
    crops: np.ndarray,
    *,
    input_size_px: int,
    orientations: int = 9,
    pixels_per_cell: int = 8,
    cells_per_block: int = 2,
) -> np.ndarray:
    """Histograms of oriented gradients of grey, resized crops.

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8.
    input_size_px : int
        Crops are resized to this side first.
    orientations, pixels_per_cell, cells_per_block : int
        See :func:`skimage.feature.hog` (L2-Hys block normalisation).

    Returns
    -------
    numpy.ndarray
        ``(n, dim)`` float32, ``dim`` from :func:`hog_dim`.
    """
    dim = hog_dim(input_size_px, orientations, pixels_per_cell, cells_per_block)
    out = np.empty((len(crops), dim), dtype=np.float32)
    for i, crop in enumerate(crops):
        grey = rgb2gray(crop)
        if grey.shape != (input_size_px, input_size_px):
            grey = resize(grey, (input_size_px, input_size_px), anti_aliasing=True)
        out[i] = hog(
            grey,
            orientations=orientations,
            pixels_per_cell=(pixels_per_cell, pixels_per_cell),
            cells_per_block=(cells_per_block, cells_per_block),
            block_norm="L2-Hys",
            feature_vector=True,
        )
    return out


def hog_dim(
    input_size_px: int, orientations: int = 9, pixels_per_cell: int = 8, cells_per_block: int = 2
) -> int:
    """Length of :func:`hog_features`' vectors; ``ValueError`` if the crop is too small."""
    cells = input_size_px // pixels_per_cell
    blocks = cells - cells_per_block + 1
    if blocks < 1:
        raise ValueError(
            f"hog: input_size_px={input_size_px} holds fewer than cells_per_block="
            f"{cells_per_block} cells of {pixels_per_cell} px"
        )
    return blocks * blocks * cells_per_block * cells_per_block * orientations

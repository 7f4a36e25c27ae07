"""Shortcut controls: how much of a figure comes from the cell itself.

On small single-site sets the colour of the background around a cell, or the
red cells beside it, can separate the classes on its own. A control reruns
the same encoders and classifiers on altered ROI crops:

- ``cell_only``: the background painted black, the cell kept (as S4 does);
- ``background_only``: the cell painted black, the background kept.

The cell is found in each crop by S4's ALL-IDB2 segmentation (grey Otsu,
components of at least 100 px), keeping the component nearest the centre
with its holes filled, grown by 2 px. When ``background_only`` scores near the main figure,
the classifier did not need the cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage as ndi

from leukflow.segment import keep_central, segment_cells

#: Control name -> what it keeps.
CONTROLS = {
    "cell_only": "the cell; background black",
    "background_only": "the background; cell black",
}


def cell_mask(crop: np.ndarray) -> np.ndarray:
    """Find the cell of an ``(S, S, 3)`` uint8 ROI crop: its central Otsu component.

    Grown by 2 px, so that a pale cytoplasm rim just outside Otsu's threshold
    counts as cell. A crop without a component (blank) has an empty mask.
    """
    labels = segment_cells(crop, "otsu_contours", min_area_px=100, merge_components=False)
    labels = keep_central(labels)
    return ndi.binary_dilation(ndi.binary_fill_holes(labels > 0), iterations=2)


def control_crop(crop: np.ndarray, control: str) -> np.ndarray:
    """Paint the background (``cell_only``) or the cell (``background_only``) of ``crop`` black."""
    if control not in CONTROLS:
        raise ValueError(f"control_crop: expected one of {sorted(CONTROLS)}; got {control!r}")
    mask = cell_mask(crop)
    keep = mask if control == "cell_only" else ~mask
    return np.where(keep[..., None], crop, 0).astype(np.uint8)


def iter_control_crops(
    crops: str | Path | zarr.Array, control: str, block_rows: int = 1024
) -> Iterator[tuple[np.ndarray, float]]:
    """Yield blocks of control crops of a crop store, with the black share of each block."""
    array = zarr.open_array(str(crops), mode="r") if isinstance(crops, str | Path) else crops
    for start in range(0, array.shape[0], block_rows):
        block = np.asarray(array[start : start + block_rows])
        out = np.stack([control_crop(c, control) for c in block]) if len(block) else block
        masked = float((out == 0).all(axis=-1).mean()) if len(block) else 0.0
        yield out, masked

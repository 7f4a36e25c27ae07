"""Expert masks and how well a segmentation matches them (Dice, IoU, SSIM).

Two mask conventions are read, both as RGB arrays (:func:`leukflow.data.io.read_image`):

- grey (R = G = B), as segmentation_WBC (Zheng 2018): 0 background (red cells
  included), 128 cytoplasm, 255 nucleus. Stray grey values go to the nearest of
  the three. A binary 0/255 mask is thus a nucleus that is also the whole cell.
- colour, as ALL-IDB2: white background, cyan (0, 255, 255) nucleus, blue
  (0, 0, 255) cytoplasm. Any other non-white colour counts as cell.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

#: What a mask can be scored against.
TARGETS = ("cell", "nucleus")


def truth_masks(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Decode an expert mask into whole-cell and nucleus masks.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB or ``(H, W)`` uint8 grey mask.

    Returns
    -------
    dict
        ``{"cell": bool (H, W), "nucleus": bool (H, W)}``; the nucleus lies inside the cell.
    """
    if mask.ndim == 2:
        mask = np.repeat(mask[..., None], 3, axis=2)
    if mask.ndim != 3 or mask.shape[2] != 3:
        raise ValueError(f"truth_masks: expected an (H, W) or (H, W, 3) mask; got {mask.shape}")
    m = mask.astype(np.int16)
    r, g, b = m[..., 0], m[..., 1], m[..., 2]
    if (r == g).all() and (g == b).all():
        level = np.abs(r[..., None] - np.array([0, 128, 255])).argmin(axis=-1)
        return {"cell": level > 0, "nucleus": level == 2}
    cell = ~((r >= 200) & (g >= 200) & (b >= 200))
    nucleus = (r < 128) & (g >= 128) & (b >= 128)
    return {"cell": cell, "nucleus": nucleus}


def resize_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize a 2-D mask to ``shape[:2]`` by nearest neighbour (a downscaled field's truth)."""
    if mask.shape[:2] == tuple(shape[:2]):
        return mask
    rows = (np.arange(shape[0]) * mask.shape[0] / shape[0]).astype(int)
    cols = (np.arange(shape[1]) * mask.shape[1] / shape[1]).astype(int)
    return mask[rows][:, cols]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|A & B| / (|A| + |B|) of two bool masks; 1 when both are empty."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1 when both are empty."""
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


def ssim(pred: np.ndarray, truth: np.ndarray) -> float:
    """Structural similarity of two bool masks as 0/1 images (7x7 windows, or smaller)."""
    win = min(7, *pred.shape)
    win -= 1 - win % 2  # odd
    if win < 3:
        return float((pred == truth).mean())
    return float(
        structural_similarity(
            pred.astype(np.float64), truth.astype(np.float64), data_range=1.0, win_size=win
        )
    )


def score_mask(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice, IoU, SSIM and their mean (``score``, S2's criterion) of ``pred`` against ``truth``."""
    if pred.shape != truth.shape:
        raise ValueError(f"score_mask: shapes differ: {pred.shape} vs {truth.shape}")
    out = {"ssim": ssim(pred, truth), "dice": dice(pred, truth), "iou": iou(pred, truth)}
    out["score"] = (out["ssim"] + out["dice"] + out["iou"]) / 3
    return out

"""Embed: ROI crops -> penultimate-layer embeddings of a trained encoder."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from leukflow.models import pick_device, to_tensor

log = logging.getLogger(__name__)


def embed_crops(
    model: nn.Module,
    crops: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    device: torch.device | None = None,
) -> np.ndarray:
    """Run crops through ``model`` without its final layer.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier whose last layer is ``model.fc`` (left untouched: a copy
        with ``fc`` replaced by the identity does the work).
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8.
    mean, std : sequence of float
        The normalisation the model was trained with.
    batch_size : int
        Crops per forward pass.
    device : torch.device, optional
        Defaults to :func:`~leukflow.models.pick_device`.

    Returns
    -------
    numpy.ndarray
        ``(n, dim)`` float32.
    """
    device = device or pick_device()
    body = copy.deepcopy(model)
    body.fc = nn.Identity()
    body = body.eval().to(device)
    out = []
    with torch.inference_mode():
        for i in range(0, len(crops), batch_size):
            x = to_tensor(crops[i : i + batch_size], mean, std).to(device)
            out.append(body(x).float().cpu().numpy())
    if not out:
        dim = model.fc.in_features
        return np.zeros((0, dim), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)

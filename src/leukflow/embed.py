"""Embed: ROI crops -> embeddings (and head probabilities) of a trained encoder.

Crops are read in row blocks by DataLoader workers (decoding the zarr chunks),
moved to the device (pinned memory on CUDA), resized and normalised there,
and run through the backbone under ``torch.inference_mode``; on CUDA with
bf16 autocast, channels-last memory and cuDNN autotuning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset

from leukflow.hog import hog_features
from leukflow.io import EmbeddingStoreWriter, sha256_file
from leukflow.models import (
    Encoder,
    encoder_from_checkpoint,
    load_checkpoint,
    normalise,
    pick_device,
    to_unit,
)

log = logging.getLogger(__name__)


class CropBlocks(Dataset):
    """Blocks of ``block_rows`` consecutive crops of an array or a zarr store.

    A store path is opened lazily in each worker process, so that workers
    decode chunks in parallel.
    """

    def __init__(self, crops: np.ndarray | zarr.Array | str | Path, block_rows: int):
        self._source = crops
        self._array = None if isinstance(crops, str | Path) else crops
        self.n_rows = int(self._open().shape[0])
        self.block_rows = block_rows

    def _open(self):
        if self._array is None:
            self._array = zarr.open_array(str(self._source), mode="r")
        return self._array

    def __len__(self) -> int:
        return -(-self.n_rows // self.block_rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        block = self._open()[i * self.block_rows : (i + 1) * self.block_rows]
        return torch.from_numpy(np.ascontiguousarray(block))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if isinstance(self._source, str | Path):
            state["_array"] = None  # each worker opens its own handle
        return state


def iter_embeddings(
    model: Encoder | None,
    crops: np.ndarray | zarr.Array | str | Path,
    *,
    input_size_px: int,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    with_probs: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(embeddings, probabilities)`` for consecutive blocks of crops.

    Parameters
    ----------
    model : Encoder or None
        The trained encoder (left unchanged); ``None`` computes HOG features.
    crops : numpy.ndarray, zarr.Array, str or Path
        ``(n, S, S, 3)`` uint8 crops, or the path of a crop store.
    input_size_px : int
        Side the network sees (crops are resized on the device).
    mean, std : sequence of float
        The normalisation the model was trained with.
    batch_size : int
        Crops per forward pass.
    num_workers : int
        DataLoader processes that read and decode the crops.
    device : torch.device, optional
        Defaults to :func:`~leukflow.models.pick_device`.
    with_probs : bool
        Also return the head's softmax probabilities.

    Yields
    ------
    embeddings : numpy.ndarray
        ``(b, dim)`` float32.
    probabilities : numpy.ndarray or None
        ``(b, n_classes)`` float32 when ``with_probs``.
    """
    device = device or pick_device()
    cuda = device.type == "cuda"
    blocks = CropBlocks(crops, batch_size)
    loader = DataLoader(
        blocks,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=cuda,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    if model is None:
        for block in loader:
            yield hog_features(block.numpy(), input_size_px=input_size_px), None
        return
    was_training = model.training
    model.eval().to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda),
        ):
            for block in loader:
                x = normalise(to_unit(block.to(device, non_blocking=True), input_size_px),
                              mean, std)  # fmt: skip
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                features, logits = model.embed(x)
                probs = logits.float().softmax(1).cpu().numpy() if with_probs else None
                yield features.float().cpu().numpy(), probs
    finally:
        model.train(was_training)


def embed_crops(
    model: Encoder | None,
    crops: np.ndarray | zarr.Array | str | Path,
    *,
    input_size_px: int,
    dim: int,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray | None]:
    """All embeddings (and probabilities) of ``crops`` in memory: see :func:`iter_embeddings`.

    Returns
    -------
    embeddings : numpy.ndarray
        ``(n, dim)`` float32.
    probabilities : numpy.ndarray or None
        ``(n, n_classes)`` float32 when ``with_probs=True``.
    """
    embs, probs = [], []
    for emb, prob in iter_embeddings(model, crops, input_size_px=input_size_px, **kwargs):
        embs.append(emb)
        probs.append(prob)
    if not embs:
        n_classes = model.head.out_features if model is not None else 0
        empty = np.zeros((0, n_classes), np.float32) if kwargs.get("with_probs") else None
        return np.zeros((0, dim), np.float32), empty
    return (
        np.concatenate(embs),
        np.concatenate(probs) if probs[0] is not None else None,
    )


def store_attrs(checkpoint: dict, *, leukflow_version: str) -> dict:
    """Group attributes of an embedding store, from one of its checkpoints."""
    return {
        "architecture": checkpoint["arch"],
        "input_size_px": checkpoint["input_size_px"],
        "training": checkpoint["training"],
        "leaky": checkpoint["training"] == "all_labels",
        "normalisation": checkpoint["normalisation"],
        "weights": checkpoint["weights"],
        "weights_sha256": checkpoint["weights_sha256"],
        "classes": checkpoint["classes"],
        "has_probs": bool(checkpoint["has_head"]),
        "leukflow_version": leukflow_version,
    }


def embed_rois(
    checkpoints: Sequence[str | Path],
    crops: np.ndarray | zarr.Array | str | Path,
    store: str | Path,
    *,
    leukflow_version: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> dict:
    """Embed every ROI with each checkpoint into one embedding store.

    Parameters
    ----------
    checkpoints : sequence of path
        ``fold_<k>.pt`` per fold, or one ``all.pt`` (an encoder shared by every
        fold); the file stem names the store's array.
    crops : numpy.ndarray, zarr.Array, str or Path
        ``(n_rois, S, S, 3)`` uint8 crops or a crop store path.
    store : str or Path
        The embedding store (``.zarr``), written atomically by one
        :class:`~leukflow.io.EmbeddingStoreWriter`.
    leukflow_version : str
        Recorded in the attributes.
    batch_size, num_workers, device
        See :func:`iter_embeddings`.

    Returns
    -------
    dict
        The store's group attributes. Each array ``<stem>`` is float32
        ``(n_rois, dim)`` with attrs ``weights_sha256`` (of the checkpoint),
        ``normalisation`` (``mean``, ``std``), ``classes``,
        ``train_roi_ids_sha256``; when the encoder has a trained head,
        ``probs/<stem>`` holds its ``(n_rois, n_classes)`` softmax, columns in
        the order of its ``classes`` attribute (see
        :func:`leukflow.io.open_probabilities`).
    """
    loaded = [(Path(p).stem, load_checkpoint(p), sha256_file(p)) for p in checkpoints]
    if not loaded:
        raise ValueError("embed_rois: no checkpoints given")
    attrs = store_attrs(loaded[0][1], leukflow_version=leukflow_version)
    with EmbeddingStoreWriter(store, attrs) as writer:
        for name, ckpt, sha in loaded:
            model = None if ckpt["arch"] == "hog" else encoder_from_checkpoint(ckpt)
            dim = ckpt["dim"] if model is None else model.dim
            ids = "\0".join(ckpt["train_roi_ids"]).encode()
            emb = writer.add_array(name, dim, {
                "weights_sha256": sha,
                "normalisation": {"mean": ckpt["mean"], "std": ckpt["std"]},
                "classes": ckpt["classes"],
                "train_roi_ids_sha256": hashlib.sha256(ids).hexdigest(),
            })  # fmt: skip
            probs = None
            if ckpt["has_head"]:
                probs = writer.add_array(
                    f"probs/{name}", len(ckpt["classes"]), {"classes": ckpt["classes"]}
                )
            for e, p in iter_embeddings(
                model,
                crops,
                input_size_px=ckpt["input_size_px"],
                mean=ckpt["mean"],
                std=ckpt["std"],
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                with_probs=probs is not None,
            ):
                emb.append(e)
                if probs is not None:
                    probs.append(p)
            log.info("%s: embedded every ROI, %d-d", name, dim)
    return attrs

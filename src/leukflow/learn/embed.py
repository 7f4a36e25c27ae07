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

from leukflow.data import cache
from leukflow.data.grow import common_prefix, load_mirror, save_mirror
from leukflow.data.io import EmbeddingStoreWriter, RowAppender, sha256_file
from leukflow.learn.hog import hog_features
from leukflow.learn.models import (
    Encoder,
    encoder_from_checkpoint,
    load_checkpoint,
    normalise,
    pick_device,
    to_unit,
)
from leukflow.learn.stain import normalise_stain

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
    stain: dict | None = None,
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
        Defaults to :func:`~leukflow.learn.models.pick_device`.
    with_probs : bool
        Also return the head's softmax probabilities.
    stain : dict, optional
        The checkpoint's stain normalisation target (``checkpoint["stain"]``),
        applied before ``mean`` and ``std`` as in training; None: none.

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
                x = to_unit(block.to(device, non_blocking=True), input_size_px)
                x = normalise(normalise_stain(x, stain), mean, std)
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


def embed_as_trained(
    checkpoint: dict, crops: np.ndarray, *, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Embed crops as a checkpoint's encoder saw its training crops.

    Its input size, stain normalisation and channel statistics; HOG for
    ``arch: hog``. Returns the embeddings and, when the checkpoint has a
    trained head, its softmax (else None).
    """
    model = None if checkpoint["arch"] == "hog" else encoder_from_checkpoint(checkpoint)
    dim = checkpoint["dim"] if model is None else model.dim
    return embed_crops(
        model, crops, input_size_px=checkpoint["input_size_px"], dim=dim,
        mean=checkpoint["mean"], std=checkpoint["std"], device=device,
        stain=checkpoint.get("stain"),  # absent from checkpoints before stain normalisation
        with_probs=bool(checkpoint["has_head"]) and model is not None,
    )  # fmt: skip


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


def model_digest(checkpoint: dict) -> str:
    """SHA-256 of what decides a frozen encoder's embeddings (not of the file).

    Architecture, input size and, for networks, the normalisation and every
    weight: two checkpoints of one frozen encoder digest alike even when they
    were written by different runs.
    """
    digest = hashlib.sha256(f"{checkpoint['arch']}|{checkpoint['input_size_px']}".encode())
    if checkpoint["arch"] != "hog":
        digest.update(repr((checkpoint["mean"], checkpoint["std"])).encode())
        for name, tensor in sorted(checkpoint["state_dict"].items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _image_runs(keys: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(key, start, stop)`` of each run of equal consecutive keys (an image's ROIs)."""
    runs, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append((keys[start], start, i))
            start = i
    return runs


def _frozen_embeddings(
    model: Encoder | None,
    ckpt: dict,
    crops: zarr.Array | np.ndarray,
    roi_keys: Sequence[str],
    cache_dir: str | Path,
    *,
    dim: int,
    images_per_block: int = 256,
    **kwargs,
) -> Iterator[np.ndarray]:
    """Yield a frozen encoder's embeddings in ROI order, image by image from the cache.

    ``roi_keys`` names each ROI's source (its image's content hash and the
    segmentation that cut it); ROIs of one image are consecutive. Images seen
    before with the same encoder are read from :mod:`leukflow.data.cache`; the rest
    are embedded and stored there.
    """
    space = cache.namespace("embed", {"model": model_digest(ckpt)}, cache.EMBED_SOURCES)
    runs = _image_runs(list(roi_keys))
    n_cached = 0
    for first in range(0, len(runs), images_per_block):
        block = runs[first : first + images_per_block]
        found = {}
        for key, start, stop in block:
            hit = cache.load_arrays(cache.entry_path(cache_dir, space, key))
            if hit is not None and hit[0]["embeddings"].shape == (stop - start, dim):
                found[key] = hit[0]["embeddings"]
        missing = [(k, a, b) for k, a, b in block if k not in found]
        n_cached += len(block) - len(missing)
        if missing:
            rows = np.concatenate([np.arange(a, b) for _, a, b in missing])
            taken = crops[rows] if isinstance(crops, np.ndarray) else crops.oindex[rows]
            emb, _ = embed_crops(model, taken, dim=dim, **kwargs)
            offset = 0
            for key, a, b in missing:
                found[key] = emb[offset : offset + b - a]
                offset += b - a
                cache.save_arrays(cache.entry_path(cache_dir, space, key),
                                  {"embeddings": found[key]}, {})  # fmt: skip
        for key, _, _ in block:
            yield found[key]
    log.info("frozen encoder: %d images embedded; %d read from the cache",
             len(runs) - n_cached, n_cached)  # fmt: skip


def _add_arrays(
    writer: EmbeddingStoreWriter, name: str, ckpt: dict, sha: str, dim: int
) -> tuple[RowAppender, RowAppender | None]:
    """Add a checkpoint's embedding array and, when it has a trained head, its softmax's."""
    ids = "\0".join(ckpt["train_roi_ids"]).encode()
    emb = writer.add_array(name, dim, {
        "weights_sha256": sha,
        "normalisation": {"mean": ckpt["mean"], "std": ckpt["std"]},
        "classes": ckpt["classes"],
        "train_roi_ids_sha256": hashlib.sha256(ids).hexdigest(),
    })  # fmt: skip
    if not ckpt["has_head"]:
        return emb, None
    return emb, writer.add_array(
        f"probs/{name}", len(ckpt["classes"]), {"classes": ckpt["classes"]}
    )


def _embed_one(
    writer: EmbeddingStoreWriter,
    name: str,
    ckpt: dict,
    sha: str,
    crops: np.ndarray | zarr.Array | str | Path,
    *,
    roi_keys: Sequence[str] | None,
    cache_dir: str | Path | None,
    batch_size: int,
    num_workers: int,
    device: torch.device | None,
) -> None:
    """Append one checkpoint's embeddings (and head softmax) of ``crops`` to ``writer``."""
    model = None if ckpt["arch"] == "hog" else encoder_from_checkpoint(ckpt)
    dim = ckpt["dim"] if model is None else model.dim
    emb, probs = _add_arrays(writer, name, ckpt, sha, dim)
    seen_as = {key: ckpt[key] for key in ("input_size_px", "mean", "std")}
    seen_as["stain"] = ckpt.get("stain")  # absent from checkpoints before the option
    if ckpt["training"] == "frozen" and cache_dir and roi_keys is not None:
        array = zarr.open_array(str(crops), mode="r") if isinstance(
            crops, str | Path) else crops  # fmt: skip
        for e in _frozen_embeddings(
            model, ckpt, array, roi_keys, cache_dir, dim=dim,
            **seen_as, batch_size=batch_size, device=device,
        ):  # fmt: skip
            emb.append(e)
        log.info("%s: embedded every ROI, %d-d", name, dim)
        return
    for e, p in iter_embeddings(
        model,
        crops,
        **seen_as,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        with_probs=probs is not None,
    ):
        emb.append(e)
        if probs is not None:
            probs.append(p)
    log.info("%s: embedded every ROI, %d-d", name, dim)


def embed_rois(
    checkpoints: Sequence[str | Path],
    crops: np.ndarray | zarr.Array | str | Path,
    store: str | Path,
    *,
    leukflow_version: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | None = None,
    roi_keys: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    roi_ids: Sequence[str] | None = None,
    mirror: str | Path | None = None,
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
        :class:`~leukflow.data.io.EmbeddingStoreWriter`.
    leukflow_version : str
        Recorded in the attributes.
    batch_size, num_workers, device
        See :func:`iter_embeddings`.
    roi_keys : sequence of str, optional
        Per ROI, a key of its source image (content hash and segmentation);
        with ``cache_dir``, a frozen encoder's embeddings are cached per image
        (:mod:`leukflow.data.cache`), so new images cost only themselves.
    cache_dir : str or Path, optional
        The per-image cache.
    roi_ids : sequence of str, optional
        Each ROI's id, for ``mirror``.
    mirror : str or Path, optional
        With a frozen encoder, ``roi_keys`` and ``roi_ids``, the store grows:
        the leading ROIs (same id, same key) that the last store (its mirror,
        :mod:`leukflow.data.grow`) holds by the same model are hard-linked,
        and only the others embedded.

    Returns
    -------
    dict
        The store's group attributes. Each array ``<stem>`` is float32
        ``(n_rois, dim)`` with attrs ``weights_sha256`` (of the checkpoint),
        ``normalisation`` (``mean``, ``std``), ``classes``,
        ``train_roi_ids_sha256``; when the encoder has a trained head,
        ``probs/<stem>`` holds its ``(n_rois, n_classes)`` softmax, columns in
        the order of its ``classes`` attribute (see
        :func:`leukflow.data.io.open_probabilities`).
    """
    loaded = [(Path(p).stem, load_checkpoint(p), sha256_file(p)) for p in checkpoints]
    if not loaded:
        raise ValueError("embed_rois: no checkpoints given")
    attrs = store_attrs(loaded[0][1], leukflow_version=leukflow_version)
    frozen = all(ckpt["training"] == "frozen" for _, ckpt, _ in loaded)
    grows = frozen and mirror is not None and roi_keys is not None and roi_ids is not None
    record = {
        "models": {name: model_digest(ckpt) for name, ckpt, _ in loaded},
        "rows": [f"{i}|{k}" for i, k in zip(roi_ids, roi_keys, strict=True)] if grows else [],
    }
    base, keep = _mirror_prefix(mirror, record) if grows else (None, 0)
    if keep:
        crops = zarr.open_array(str(crops), mode="r") if isinstance(crops, str | Path) else crops
        crops, roi_keys = crops[keep:], list(roi_keys)[keep:]
        log.info("%d ROIs' embeddings linked from the last store; embedding %d", keep, len(crops))
    with EmbeddingStoreWriter(store, attrs, base=base, keep_rows=keep) as writer:
        for name, ckpt, sha in loaded:
            _embed_one(writer, name, ckpt, sha, crops, roi_keys=roi_keys, cache_dir=cache_dir,
                       batch_size=batch_size, num_workers=num_workers, device=device)  # fmt: skip
    if grows:
        save_mirror(store, mirror, record)
    return attrs


def _mirror_prefix(mirror: str | Path, record: dict) -> tuple[Path | None, int]:
    """Return the mirror's store and how many of its rows hold (same models, same ROI keys)."""
    base, meta = load_mirror(mirror)
    if base is None or meta.get("models") != record["models"]:
        return None, 0
    keep = common_prefix(record["rows"], meta.get("rows", []))
    return (base, keep) if keep else (None, 0)

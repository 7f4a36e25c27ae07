"""Models: CNN encoders trained on one fold's ROI crops.

An encoder is a torchvision classifier trained with cross-entropy on the ROI
labels; its penultimate layer is the embedding. It trains from scratch by
default (``weights="none"``) or starts from a local state-dict file; nothing is
ever downloaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn
from tqdm.auto import tqdm

from leukflow.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

ARCHITECTURES = {"resnet18": (torchvision.models.resnet18, 512)}


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_encoder(arch: str, n_classes: int, weights: str = "none") -> nn.Module:
    """Build a torchvision classifier, from scratch or from a local weights file.

    Parameters
    ----------
    arch : str
        Key of :data:`ARCHITECTURES`.
    n_classes : int
        Outputs of the final layer (replaced, so any ``weights`` file fits).
    weights : str
        ``"none"`` or the path of a state dict saved with ``torch.save``; it is
        loaded with ``weights_only=True`` and its classifier layer is ignored.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"build_encoder: unknown arch {arch!r}; expected one of {list(ARCHITECTURES)}"
        )
    factory, dim = ARCHITECTURES[arch]
    model = factory(weights=None)
    if weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"build_encoder: weights file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, _ = model.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("fc.")]:
            raise ValueError(f"build_encoder: {path} does not fit {arch}: missing {missing[:5]}")
        log.info("initialised %s from %s (sha256 %s)", arch, path, sha256_file(path))
    model.fc = nn.Linear(dim, n_classes)
    return model


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of a ``(B, C, H, W)`` batch (cells have no up)."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(2)
    return torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(2, 3))


def channel_stats(crops: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``(n, H, W, 3)`` uint8 crops, scaled to [0, 1]."""
    x = crops.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).tolist(), np.maximum(x.std(0), 1e-3).tolist()


def to_tensor(crops: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 -> normalised ``(n, 3, H, W)`` float32."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_encoder(
    crops: np.ndarray,
    labels: Sequence[str],
    *,
    arch: str,
    weights: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Train an encoder on one fold's training crops.

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8 training crops (the fold's training part only).
    labels : sequence of str
        One label per crop.
    arch, weights : str
        See :func:`build_encoder`.
    epochs, batch_size : int
        Training length and mini-batch size.
    lr : float
        Adam learning rate.
    seed : int
        Seeds initialisation, batch order and augmentation.
    device : torch.device, optional
        Defaults to :func:`pick_device`.

    Returns
    -------
    checkpoint : dict
        ``state_dict``, ``arch``, ``classes``, ``mean``, ``std``, ``input_size_px``:
        everything :func:`load_encoder` needs (tensors, lists and strings only).
    history : pandas.DataFrame
        One row per epoch: ``epoch, loss, accuracy, seconds``.
    """
    if len(crops) != len(labels):
        raise ValueError(f"train_encoder: {len(crops)} crops but {len(labels)} labels")
    device = device or pick_device()
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(
            f"train_encoder: need at least 2 classes in the training part; got {classes}"
        )
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = channel_stats(crops)
    x_all = to_tensor(crops, mean, std)
    y_all = torch.tensor([classes.index(v) for v in labels])
    model = build_encoder(arch, len(classes), weights).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    for epoch in tqdm(range(epochs), desc=f"train {arch}", leave=False):
        model.train()
        start, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            x = _augment(x_all[idx], gen).to(device)
            y = y_all[idx].to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
        rows.append(
            {"epoch": epoch + 1, "loss": total / max(seen, 1),
             "accuracy": correct / max(seen, 1), "seconds": time.perf_counter() - start}
        )  # fmt: skip
        log.info(
            "epoch %d: loss %.4f, accuracy %.3f", epoch + 1, rows[-1]["loss"], rows[-1]["accuracy"]
        )
    checkpoint = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "arch": arch,
        "classes": classes,
        "mean": mean,
        "std": std,
        "input_size_px": int(crops.shape[1]),
    }
    return checkpoint, pd.DataFrame(rows)


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Save a checkpoint atomically (tensors, lists and strings: loadable with weights_only)."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a checkpoint saved by :func:`save_checkpoint` as an eval-mode model."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_encoder(checkpoint["arch"], len(checkpoint["classes"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint

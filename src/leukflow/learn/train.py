"""Train: one encoder on one fold's training ROIs (or on every ROI, or not at all).

Training modes (``training``):

``per_fold``
    Honest: trained on the fold's training ROIs only; cross-entropy, Adam at a
    constant learning rate (S0), flips and 90-degree rotations.
``s1``
    Honest, with S1's recipe: 2 epochs of the head alone, then every layer with
    discriminative learning rates (``lr/100``, ``lr/10``, ``lr`` from the first
    layers to the head), each phase on a one-cycle schedule peaking at ``lr``;
    Adam betas (0.9, 0.99); crops, rotations, flips, shear, brightness and
    contrast. S1 as published uses ``lr`` 1e-3 and batches of 64.
``s4``
    Honest, with S4's YOLOv8 recipe (ultralytics' ``optimizer=auto``, see
    :mod:`leukflow.learn.recipes`): AdamW at ``0.01 / (4 + classes)`` for runs of
    at most 10,000 iterations of 64, else SGD at ``lr``; linear warm-up, then
    linear decay to ``lr/100``; no decay on biases and norms; flips, rotations.
``all_labels``
    S0 as published, leaky: trained once on every ROI, test folds included.
``frozen``
    No training: the weights as loaded (``weights`` should then be pretrained).

Early stopping watches the loss on an inner validation split of the training
ROIs, grouped by patient (never the test fold). A training killed part way
resumes from the state saved after each epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupShuffleSplit
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from leukflow.data.io import atomic_path, sha256_file
from leukflow.learn.hog import hog_dim
from leukflow.learn.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMS,
    Encoder,
    build_encoder,
    channel_stats,
    check_arch,
    normalise,
    pick_device,
    resolve_weights,
    to_unit,
)
from leukflow.learn.recipes import auto_optimizer_choice, s4_lr, s4_optimizer
from leukflow.learn.stain import (
    STAIN_METHODS,
    fit_stain_target,
    hed_jitter,
    normalise_stain,
    normalise_stain_crops,
)

log = logging.getLogger(__name__)

TRAINING_MODES = ("per_fold", "s1", "s4", "all_labels", "frozen")
#: Modes whose encoder is trained on every ROI or on none: one encoder for all folds.
SHARED_MODES = ("all_labels", "frozen")
S1_HEAD_EPOCHS = 2
S1_BETAS = (0.9, 0.99)
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def training_rows(
    folds: np.ndarray, *, fold: int | None, training: str, every_roi: bool = False
) -> np.ndarray:
    """Which ROIs an encoder may train on.

    Parameters
    ----------
    folds : numpy.ndarray
        Test fold of each ROI.
    fold : int or None
        The fold being tested (``None`` for the shared modes).
    training : str
        One of :data:`TRAINING_MODES`.
    every_roi : bool
        Every ROI whatever the mode: an encoder meant for another dataset
        (cross-dataset evaluation), none of whose images it sees.

    Returns
    -------
    numpy.ndarray
        Boolean mask: every ROI outside ``fold`` for ``per_fold``, ``s1`` and ``s4``,
        every ROI for ``all_labels`` and ``frozen`` (frozen uses them only for
        the label-free normalisation statistics) or with ``every_roi``.
    """
    if training not in TRAINING_MODES:
        raise ValueError(f"training: expected one of {TRAINING_MODES}; got {training!r}")
    folds = np.asarray(folds)
    if training in SHARED_MODES or every_roi:
        return np.ones(len(folds), dtype=bool)
    if fold is None:
        raise ValueError(f"training {training!r} trains per fold: give the fold")
    if not (folds == fold).any():
        raise ValueError(f"training_rows: no ROI is in test fold {fold}")
    return folds != fold


def inner_split(
    labels: Sequence[str], groups: Sequence[str], *, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training ROIs into fit and validation parts by whole groups (patients).

    Returns all rows and no validation rows (with a warning) when
    ``val_fraction`` is 0, there are fewer than 2 groups, or the fit part
    would lose a class.
    """
    n = len(labels)
    everything = (np.arange(n), np.arange(0))
    if val_fraction <= 0:
        return everything
    groups = np.asarray(groups)
    if len(np.unique(groups)) < 2:
        log.warning("inner_split: fewer than 2 patient groups; no early stopping")
        return everything
    split = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    fit, val = next(split.split(np.zeros(n), groups=groups))
    if len(val) == 0 or set(np.asarray(labels)[fit]) != set(labels):
        log.warning("inner_split: the validation split would remove a class; no early stopping")
        return everything
    return np.sort(fit), np.sort(val)


# --------------------------------------------------------------- augmentation


def flip_rotate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of a ``(B, C, H, W)`` batch (cells have no up)."""
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=gen).item() < 0.5:
        x = x.flip(2)
    return torch.rot90(x, int(torch.randint(4, (1,), generator=gen)), dims=(2, 3))


def s1_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """S1's augmentations per image of a ``(B, 3, H, W)`` batch in [0, 1].

    Rotation up to 10 degrees, shear up to 0.1, zoom (crop) up to 1.1x with a
    shift of up to 5%, horizontal and vertical flips, brightness +-0.2 and
    contrast x0.8-1.25; reflected borders.
    """
    b = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen) * (hi - lo) + lo

    angle = uniform(-math.pi / 18, math.pi / 18)
    shear = uniform(-0.1, 0.1)
    zoom = uniform(1.0, 1.1)
    flip_h = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    flip_v = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    shift = torch.stack([uniform(-0.05, 0.05), uniform(-0.05, 0.05)], 1)
    brightness = uniform(-0.2, 0.2)
    contrast = torch.exp(uniform(math.log(0.8), math.log(1.25)))
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    shearing = torch.eye(2).repeat(b, 1, 1)
    shearing[:, 0, 1] = shear
    scale = torch.diag_embed(torch.stack([flip_h, flip_v], 1) / zoom[:, None])
    theta = torch.cat([rotation @ shearing @ scale, shift[:, :, None]], 2).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast.to(x).view(b, 1, 1, 1) + mean + brightness.to(x).view(b, 1, 1, 1)
    return x.clamp(0.0, 1.0)


def one_cycle_lr(step: int, total: int, max_lr: float) -> float:
    """One-cycle rate: cosine from max/25 to max over 25% of the steps, then to max/25e4."""
    warm = max(1, round(0.25 * total))

    def anneal(start: float, end: float, t: float) -> float:
        return end + (start - end) * (1 + math.cos(math.pi * min(t, 1.0))) / 2

    if step < warm:
        return anneal(max_lr / 25, max_lr, step / warm)
    return anneal(max_lr, max_lr / 25e4, (step - warm) / max(1, total - warm - 1))


# ------------------------------------------------------------------- resuming


def _fingerprint(crops: np.ndarray, labels: Sequence[str], params: dict) -> str:
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    digest.update("\0".join(map(str, labels)).encode())
    digest.update(np.ascontiguousarray(crops).data)
    return digest.hexdigest()


def _save_state(state: dict, resume_dir: Path) -> None:
    """Keep the previous state as ``prev.pt``, write the new one atomically as ``last.pt``."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    last, prev = resume_dir / "last.pt", resume_dir / "prev.pt"
    if last.is_file():
        os.replace(last, prev)
    with atomic_path(last) as tmp:
        torch.save(state, tmp)


_STATE_KEYS = {"fingerprint", "epoch", "phase", "model", "optimizer", "gen", "torch_rng",
               "best", "best_loss", "best_epoch", "bad_epochs", "history", "stopped"}  # fmt: skip


def _load_state(resume_dir: Path, fingerprint: str) -> dict | None:
    """Return the newest readable state of this very training, or ``None``."""
    for name in ("last.pt", "prev.pt"):
        path = resume_dir / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not _STATE_KEYS <= state.keys():
                raise ValueError("not a leukflow training state")
        except Exception as err:  # a damaged file raises anything from zip to unpickling errors
            log.error("resume checkpoint %s is corrupt (%s); trying an older one", path, err)
            continue
        if state["fingerprint"] != fingerprint:
            log.warning("resume checkpoint %s belongs to other data or settings; ignored", path)
            return None
        log.info("resuming from %s after epoch %d", path, state["epoch"])
        return state
    return None


# ------------------------------------------------------------------- training


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _param_groups(model: Encoder, phase: int, lr: float, weight_decay: float) -> list[dict]:
    """Head only (phase 0) or three groups with discriminative rates (phase 1)."""
    head = list(model.head.parameters())
    if phase == 0:
        return [{"params": head, "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay}]
    body = list(model.backbone.parameters())
    half = len(body) // 2
    return [
        {"params": body[:half], "lr": lr / 100, "lr_scale": 0.01, "weight_decay": weight_decay},
        {"params": body[half:], "lr": lr / 10, "lr_scale": 0.1, "weight_decay": weight_decay},
        {"params": head, "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay},
    ]


def _evaluate(
    model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, idx: np.ndarray, prep, bs: int
) -> tuple[float, float]:
    if len(idx) == 0:
        return math.nan, math.nan
    model.eval()
    total, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(idx), bs):
            j = torch.from_numpy(idx[i : i + bs])
            logits = model(prep(x_all[j])).float()
            y = y_all[j].to(logits.device)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    return total / len(idx), correct / len(idx)


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`train_encoder` trains: the network, the recipe and its schedule.

    Attributes
    ----------
    arch, weights : str
        See :func:`leukflow.learn.models.build_encoder`; ``arch="hog"`` has nothing
        to train and returns its parameters.
    epochs, batch_size : int
        Most epochs (early stopping may end sooner) and mini-batch size.
    lr : float
        Adam learning rate (``s1``: the one-cycle maximum; ``s4``: SGD's rate,
        used only when ultralytics' auto rule picks SGD).
    seed : int
        Seeds initialisation, inner split, batch order, augmentation, dropout.
    training : str
        One of :data:`TRAINING_MODES`.
    input_size_px : int, optional
        Side the network sees (crops are resized); default the crops' side.
    normalisation : str
        ``dataset`` (channel statistics of these crops) or ``imagenet``.
    weight_decay : float
        L2 penalty (S2).
    val_fraction : float
        Share of patient groups held out for early stopping (0: none).
    patience : int
        Epochs without a lower validation loss before stopping (0: never stop);
        the weights of the best epoch are kept.
    norm : str
        ``batch`` (the networks as published) or ``group``: every batch norm
        replaced by group norm (:func:`leukflow.learn.models.build_encoder`).
    hed_jitter_scale, hed_jitter_shift : float
        HED stain augmentation while training (:func:`leukflow.learn.stain.hed_jitter`);
        both 0: none.
    stain_normalisation : str
        ``none``, ``reinhard`` or ``macenko``: every crop mapped onto a target
        fitted on these training crops (:mod:`leukflow.learn.stain`), recorded
        in the checkpoint and applied wherever it embeds.
    """

    arch: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    weights: str = "none"
    training: str = "per_fold"
    input_size_px: int | None = None
    normalisation: str = "dataset"
    weight_decay: float = 0.0
    val_fraction: float = 0.0
    patience: int = 0
    norm: str = "batch"
    hed_jitter_scale: float = 0.0
    hed_jitter_shift: float = 0.0
    stain_normalisation: str = "none"

    def fingerprint_fields(self, size: int, roi_ids: list[str]) -> dict:
        """Return what makes two trainings the same one (a resumed state must match it)."""
        fields = {"arch": self.arch, "weights": self.weights, "training": self.training,
                "size": size, "normalisation": self.normalisation, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
                "seed": self.seed, "val_fraction": self.val_fraction,
                "patience": self.patience, "ids": roi_ids}  # fmt: skip
        robust = {"norm": self.norm, "hed_jitter_scale": self.hed_jitter_scale,
                  "hed_jitter_shift": self.hed_jitter_shift,
                  "stain_normalisation": self.stain_normalisation}  # fmt: skip
        # the options' defaults leave the fingerprint of older states unchanged
        return fields | {k: v for k, v in robust.items() if v != _DEFAULT_SETTINGS[k]}


#: The defaults of :class:`TrainSettings`' optional fields.
_DEFAULT_SETTINGS = {f.name: f.default for f in fields(TrainSettings) if f.default is not MISSING}


def train_encoder(
    crops: np.ndarray,
    labels: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    roi_ids: Sequence[str] | None = None,
    device: torch.device | None = None,
    resume_dir: str | Path | None = None,
    **settings,
) -> tuple[dict, pd.DataFrame]:
    """Train an encoder on the crops it is given (select them with :func:`training_rows`).

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8 training crops.
    labels : sequence of str
        One label per crop.
    groups : sequence of str, optional
        Patient group per crop, for the inner validation split (default: one
        group per crop).
    roi_ids : sequence of str, optional
        Recorded in the checkpoint (``train_roi_ids``, ``val_roi_ids``).
    device : torch.device, optional
        Defaults to :func:`leukflow.learn.models.pick_device`.
    resume_dir : str or Path, optional
        Where the state after each epoch is kept (removed once training ends);
        a training of the same crops and settings resumes from it.
    **settings
        The fields of :class:`TrainSettings` (``arch``, ``epochs``, ``batch_size``,
        ``lr`` and ``seed`` required).

    Returns
    -------
    checkpoint : dict
        ``state_dict``, ``arch``, ``classes``, ``mean``, ``std``,
        ``input_size_px``, ``training``, ``has_head``, ``weights``,
        ``weights_sha256`` (of the initial weights file, "" for none),
        ``normalisation``, ``best_epoch``, ``train_roi_ids``, ``val_roi_ids``
        (tensors, numbers, lists and strings: loadable with weights_only).
    history : pandas.DataFrame
        One row per epoch: :data:`HISTORY_COLUMNS`.
    """
    s = TrainSettings(**settings)
    _check_arguments(crops, labels, s)
    size = int(s.input_size_px or crops.shape[1])
    check_arch(s.arch, size)
    labels = [str(v) for v in labels]
    roi_ids = [str(r) for r in (roi_ids if roi_ids is not None else range(len(crops)))]
    checkpoint = _new_checkpoint(crops, labels, roi_ids, s, size=size)
    if s.arch == "hog" or s.training == "frozen":
        _fill_untrained(checkpoint, seed=s.seed, device=device)
        return checkpoint, pd.DataFrame(columns=HISTORY_COLUMNS)
    history = _train_network(crops, labels, groups, roi_ids, checkpoint, s, device=device,
                             resume_dir=resume_dir)  # fmt: skip
    return checkpoint, history


# ------------------------------------------------------------ training steps


def _check_arguments(crops: np.ndarray, labels: Sequence[str], s: TrainSettings) -> None:
    """Refuse crops and labels of other lengths, unknown options, and options that cannot apply."""
    if len(crops) != len(labels):
        raise ValueError(f"train_encoder: {len(crops)} crops but {len(labels)} labels")
    if s.training not in TRAINING_MODES:
        raise ValueError(f"training: expected one of {TRAINING_MODES}; got {s.training!r}")
    if s.normalisation not in ("dataset", "imagenet"):
        raise ValueError(f"normalisation: expected dataset or imagenet; got {s.normalisation!r}")
    if s.norm not in NORMS:
        raise ValueError(f"norm: expected one of {NORMS}; got {s.norm!r}")
    if s.stain_normalisation not in STAIN_METHODS:
        raise ValueError(
            f"stain_normalisation: expected one of {STAIN_METHODS}; got {s.stain_normalisation!r}"
        )
    if s.stain_normalisation != "none" and (s.arch == "hog" or s.training == "frozen"):
        # a frozen encoder serves every fold: its target would be fitted on test crops too
        raise ValueError(
            f"stain_normalisation {s.stain_normalisation!r} needs a network trained per fold "
            f"or on all labels; got arch {s.arch!r}, training {s.training!r}"
        )


def _new_checkpoint(
    crops: np.ndarray, labels: list[str], roi_ids: list[str], s: TrainSettings, *, size: int
) -> dict:
    """Everything a checkpoint records before training: classes, normalisation, weights.

    The stain target is fitted on ``crops`` (the training crops only), and the
    channel statistics on the crops as the network will see them (stain-normalised).
    """
    arch, weights, training, normalisation = s.arch, s.weights, s.training, s.normalisation
    classes = sorted(set(labels))
    if training != "frozen" and arch != "hog" and len(classes) < 2:
        raise ValueError(
            f"train_encoder: need at least 2 classes in the training part; got {classes}"
        )
    stain = fit_stain_target(crops, s.stain_normalisation)
    if normalisation == "dataset":
        mean, std = channel_stats(normalise_stain_crops(crops, stain))
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    weights_path = resolve_weights(arch, weights) if arch != "hog" else None
    return {
        "arch": arch,
        "classes": classes,
        "mean": mean,
        "std": std,
        "input_size_px": size,
        "training": training,
        "normalisation": normalisation,
        "norm": s.norm,
        "stain": stain,
        "weights": weights,
        "weights_sha256": sha256_file(weights_path) if weights_path else "",
        "has_head": training != "frozen" and arch != "hog",
        "best_epoch": 0,
        "train_roi_ids": roi_ids,
        "val_roi_ids": [],
        "state_dict": {},
    }


@dataclass
class _Data:
    """The crops as tensors, and how a batch of them reaches the network."""

    x: torch.Tensor  # (n, S, S, 3) uint8, pinned when the device is a GPU
    y: torch.Tensor  # (n,) class index
    device: torch.device
    size: int
    mean: list[float]
    std: list[float]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    stain: dict | None = None  # the checkpoint's stain normalisation target
    jitter: tuple[float, float] = (0.0, 0.0)  # HED jitter scale and shift
    # bf16 autocast and channels-last memory: on a GPU (None), or as a benchmark sets them
    bf16: bool | None = None
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        self.bf16 = self.cuda if self.bf16 is None else self.bf16
        self.channels_last = self.cuda if self.channels_last is None else self.channels_last

    @classmethod
    def of(
        cls,
        crops: np.ndarray,
        labels: list[str],
        checkpoint: dict,
        device: torch.device,
        jitter: tuple[float, float] = (0.0, 0.0),
    ) -> _Data:
        """Hold the crops, and the labels as indices of the checkpoint's classes."""
        x = torch.from_numpy(np.ascontiguousarray(crops))
        if device.type == "cuda":
            x = x.pin_memory()
        classes = checkpoint["classes"]
        augment = s1_augment if checkpoint["training"] == "s1" else flip_rotate
        y = torch.tensor([classes.index(v) for v in labels])
        size, mean, std = (checkpoint[k] for k in ("input_size_px", "mean", "std"))
        return cls(x, y, device, size, mean, std, augment, checkpoint["stain"], jitter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def prep(self, batch: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Move a batch to the device: unit range, augmented when ``gen`` is given, normalised.

        Stain normalisation comes first, as in :func:`leukflow.learn.embed.iter_embeddings`.
        """
        x = to_unit(batch.to(self.device, non_blocking=True), self.size)
        x = normalise_stain(x, self.stain)
        if gen is not None:
            x = hed_jitter(x, gen, scale=self.jitter[0], shift=self.jitter[1])
            x = self.augment(x, gen)
        x = normalise(x, self.mean, self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass(frozen=True)
class _Plan:
    """The optimiser's schedule: epochs, batches, rates, and when to stop early."""

    training: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    n_fit: int = 0  # training rows (S4's optimiser choice counts its iterations)
    n_classes: int = 2

    @property
    def s1(self) -> bool:
        return self.training == "s1"

    def phase(self, epoch: int) -> int:
        """0: S1's head-only epochs; 1: every layer (every other mode)."""
        return 0 if self.s1 and epoch < S1_HEAD_EPOCHS else 1

    def phase_span(self, phase: int) -> tuple[int, int]:
        """First epoch and number of epochs of ``phase`` (the one-cycle's length)."""
        start = S1_HEAD_EPOCHS if self.s1 and phase == 1 else 0
        return start, (min(self.epochs, S1_HEAD_EPOCHS) if phase == 0 else self.epochs - start)

    def step_rates(
        self, epoch: int, phase: int, steps: int, base_lr: float
    ) -> Callable[[int], float] | None:
        """Rate of each step of ``epoch`` (``steps`` an epoch); None: the optimiser's own.

        S1: the one-cycle over ``phase``'s steps; S4: warm-up and linear decay
        from the rate its optimiser choice gave (``base_lr``).
        """
        if self.s1:
            start, n_epochs = self.phase_span(phase)
            done, total = (epoch - start) * steps, n_epochs * steps
            return lambda step: one_cycle_lr(done + step, total, self.lr)
        if self.training == "s4":
            return lambda step: s4_lr(epoch * steps + step, steps, self.epochs, base_lr)
        return None

    def optimizer(self, model: Encoder, phase: int) -> torch.optim.Optimizer:
        """Adam over the layers ``phase`` trains (S1: discriminative rates; S4: its auto rule)."""
        for p in model.backbone.parameters():
            p.requires_grad_(phase == 1)
        if self.training == "s4":
            choice = auto_optimizer_choice(
                self.n_fit, self.batch_size, self.epochs, self.n_classes, self.lr
            )
            log.info("s4: %s at lr %g (%d iterations of %d)", choice.name, choice.lr,
                     choice.iterations, max(self.batch_size, 64))  # fmt: skip
            return s4_optimizer(model, choice, self.weight_decay)
        groups = (
            _param_groups(model, phase, self.lr, self.weight_decay)
            if self.s1
            else [{"params": list(model.parameters()), "lr_scale": 1.0}]
        )
        betas = S1_BETAS if self.s1 else (0.9, 0.999)
        return torch.optim.Adam(groups, lr=self.lr, betas=betas, weight_decay=self.weight_decay)


@dataclass
class _Progress:
    """Where a training stands after its last epoch: what a resumed training restores."""

    history: dict[str, list] = field(default_factory=lambda: {c: [] for c in HISTORY_COLUMNS})
    best: dict | None = None  # weights of the epoch of lowest validation loss
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the validation loss last fell
    epoch: int = 0  # epochs done
    stopped: bool = False
    optimizer: dict | None = None  # state of the optimiser of ``phase``, to resume it
    phase: int = -1

    def record(self, row: dict, model: nn.Module, has_val: bool) -> None:
        """Append an epoch's row and keep the best weights (early stopping's bookkeeping)."""
        for key, value in row.items():
            self.history[key].append(value)
        self.epoch = row["epoch"]
        if has_val and row["val_loss"] < self.best_loss:
            self.best, self.best_loss, self.best_epoch = (
                _cpu_state(model),
                row["val_loss"],
                self.epoch,
            )
            self.bad_epochs = 0
        elif has_val:
            self.bad_epochs += 1


def _resume(
    model: nn.Module, gen: torch.Generator, resume_dir: Path | None, fingerprint: str
) -> _Progress:
    """Restore an interrupted training of the same data and settings, or start afresh."""
    state = _load_state(resume_dir, fingerprint) if resume_dir else None
    if state is None:
        return _Progress()
    model.load_state_dict(state["model"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])
    return _Progress(
        history=state["history"], best=state["best"] or None, best_loss=state["best_loss"],
        best_epoch=state["best_epoch"], bad_epochs=state["bad_epochs"], epoch=state["epoch"],
        stopped=state["stopped"], optimizer=state["optimizer"], phase=state["phase"],
    )  # fmt: skip


def _saver(resume_dir: Path | None, fingerprint: str) -> Callable | None:
    """Make the function that keeps the state after each epoch in ``resume_dir`` (or None)."""
    if resume_dir is None:
        return None

    def save(model: nn.Module, optimizer, phase: int, gen: torch.Generator, p: _Progress) -> None:
        _save_state(
            {"fingerprint": fingerprint, "epoch": p.epoch, "phase": phase,
             "model": _cpu_state(model), "optimizer": optimizer.state_dict(),
             "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "best": p.best or {}, "best_loss": p.best_loss, "best_epoch": p.best_epoch,
             "bad_epochs": p.bad_epochs, "history": p.history, "stopped": p.stopped},
            resume_dir,
        )  # fmt: skip

    return save


def _run_epochs(
    model: Encoder,
    data: _Data,
    fit: np.ndarray,
    val: np.ndarray,
    plan: _Plan,
    progress: _Progress,
    gen: torch.Generator,
    *,
    desc: str,
    save: Callable | None,
) -> None:
    """Train from ``progress.epoch`` to ``plan.epochs`` or an early stop, updating ``progress``."""
    steps = sum(1 for i in range(0, len(fit), plan.batch_size)
                if min(plan.batch_size, len(fit) - i) >= 2)  # fmt: skip
    optimizer, phase = None, -1
    end = 0 if progress.stopped else plan.epochs
    for epoch in tqdm(range(progress.epoch, end), desc=desc, leave=False):
        if plan.phase(epoch) != phase:
            phase = plan.phase(epoch)
            optimizer = plan.optimizer(model, phase)
            if progress.optimizer is not None and progress.phase == phase:
                optimizer.load_state_dict(progress.optimizer)
        rates = plan.step_rates(epoch, phase, steps, optimizer.defaults["lr"])
        begin = time.perf_counter()
        loss, accuracy = _train_epoch(model, optimizer, data, fit, gen, plan, rates)
        val_loss, val_acc = _evaluate(model, data.x, data.y, val, data.prep, 2 * plan.batch_size)
        row = {"epoch": epoch + 1, "loss": loss, "accuracy": accuracy, "val_loss": val_loss,
               "val_accuracy": val_acc, "lr": optimizer.param_groups[-1]["lr"],
               "seconds": time.perf_counter() - begin}  # fmt: skip
        log.info("epoch %d: loss %.4f, accuracy %.3f, validation loss %.4f",
                 epoch + 1, loss, accuracy, val_loss)  # fmt: skip
        progress.record(row, model, has_val=len(val) > 0)
        progress.stopped = bool(
            plan.patience and len(val) and progress.bad_epochs >= plan.patience and phase == 1
        )
        if save is not None:
            save(model, optimizer, phase, gen, progress)
        if progress.stopped:
            log.info("early stop after epoch %d; best epoch %d", epoch + 1, progress.best_epoch)
            break


def _initial_model(checkpoint: dict, seed: int, device: torch.device) -> Encoder:
    """Build the encoder to train: seeded initialisation, or the weights file."""
    torch.manual_seed(seed)
    n_classes = max(len(checkpoint["classes"]), 1)
    return build_encoder(
        checkpoint["arch"], n_classes, checkpoint["weights"],
        input_size_px=checkpoint["input_size_px"], norm=checkpoint["norm"],
    ).to(device)  # fmt: skip


def _fill_untrained(checkpoint: dict, *, seed: int, device: torch.device | None) -> None:
    """Complete the checkpoint of an encoder that is not trained (``hog``, ``frozen``).

    HOG records only its parameters (and width); ``frozen`` keeps the weights as loaded.
    """
    if checkpoint["arch"] == "hog":
        checkpoint["dim"] = hog_dim(checkpoint["input_size_px"])
        return
    checkpoint["state_dict"] = _cpu_state(
        _initial_model(checkpoint, seed, device or pick_device())
    )


def _train_network(
    crops: np.ndarray,
    labels: list[str],
    groups: Sequence[str] | None,
    roi_ids: list[str],
    checkpoint: dict,
    s: TrainSettings,
    *,
    device: torch.device | None,
    resume_dir: str | Path | None,
) -> pd.DataFrame:
    """Train the checkpoint's network on ``crops``; fill in its weights; return the history."""
    device = device or pick_device()
    model = _initial_model(checkpoint, s.seed, device)
    fit, val = _split_inner(checkpoint, labels, groups, roi_ids, val_fraction=s.val_fraction,
                            seed=s.seed)  # fmt: skip
    plan = _Plan(training=s.training, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
                 weight_decay=s.weight_decay, patience=s.patience, n_fit=len(fit),
                 n_classes=len(checkpoint["classes"]))  # fmt: skip
    data = _Data.of(crops, labels, checkpoint, device, (s.hed_jitter_scale, s.hed_jitter_shift))
    resume_dir = Path(resume_dir) if resume_dir is not None else None
    settings = s.fingerprint_fields(checkpoint["input_size_px"], roi_ids)
    fingerprint = _fingerprint(crops, labels, settings) if resume_dir else ""
    progress = _train_resumable(model, data, fit, val, plan, seed=s.seed, resume_dir=resume_dir,
                                fingerprint=fingerprint, desc=f"train {s.arch}")  # fmt: skip
    _keep_best(checkpoint, model, progress)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return pd.DataFrame(progress.history, columns=HISTORY_COLUMNS)


def _split_inner(
    checkpoint: dict,
    labels: list[str],
    groups: Sequence[str] | None,
    roi_ids: list[str],
    *,
    val_fraction: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Split the training rows by patient group; record both parts in the checkpoint."""
    fit, val = inner_split(
        labels, groups if groups is not None else roi_ids, val_fraction=val_fraction, seed=seed
    )
    checkpoint["train_roi_ids"] = [roi_ids[i] for i in fit]
    checkpoint["val_roi_ids"] = [roi_ids[i] for i in val]
    return fit, val


def _train_resumable(
    model: Encoder,
    data: _Data,
    fit: np.ndarray,
    val: np.ndarray,
    plan: _Plan,
    *,
    seed: int,
    resume_dir: Path | None,
    fingerprint: str,
    desc: str,
) -> _Progress:
    """Run the epochs from a saved state of this very training, or from the start."""
    if data.channels_last:
        model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed)
    progress = _resume(model, gen, resume_dir, fingerprint)
    _run_epochs(model, data, fit, val, plan, progress, gen, desc=desc,
                save=_saver(resume_dir, fingerprint))  # fmt: skip
    return progress


def _keep_best(checkpoint: dict, model: Encoder, progress: _Progress) -> None:
    """Put the weights of the best validation epoch (else the last) in the checkpoint."""
    if progress.best is not None:
        model.load_state_dict(progress.best)
    checkpoint["best_epoch"] = (
        progress.best_epoch if progress.best is not None else len(progress.history["epoch"])
    )
    checkpoint["state_dict"] = _cpu_state(model.to(memory_format=torch.contiguous_format))


def _train_epoch(
    model: Encoder,
    optimizer: torch.optim.Optimizer,
    data: _Data,
    fit: np.ndarray,
    gen: torch.Generator,
    plan: _Plan,
    rates: Callable[[int], float] | None,
) -> tuple[float, float]:
    """Run one pass over the training rows in a random order: mean loss and accuracy.

    ``rates`` (S1, S4): the rate of each step of this epoch; each parameter
    group runs at its ``lr_scale`` of it.
    """
    batch_size = plan.batch_size
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total, correct, seen, step = 0.0, 0, 0, 0
    order = fit[torch.randperm(len(fit), generator=gen).numpy()]
    for i in range(0, len(fit), batch_size):
        idx = torch.from_numpy(order[i : i + batch_size])
        if len(idx) < 2:  # batch norm needs two samples
            continue
        if rates is not None:
            rate = rates(step)
            for group in optimizer.param_groups:
                group["lr"] = rate * group["lr_scale"]
        step += 1
        x = data.prep(data.x[idx], gen)
        y = data.y[idx].to(data.device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=data.bf16):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(idx)
    return total / max(seen, 1), correct / max(seen, 1)


def train_fold(
    rois: pd.DataFrame,
    crops: np.ndarray,
    *,
    fold: int | None,
    training: str,
    every_roi: bool = False,
    **params,
) -> tuple[dict, pd.DataFrame]:
    """Select the ROIs a fold's encoder may see and train it on them.

    Parameters
    ----------
    rois : pandas.DataFrame
        ``roi_id, label, fold`` and optionally ``group`` (patient group, for
        the inner validation split), row-aligned with ``crops``.
    crops : numpy.ndarray
        ``(n_rois, S, S, 3)`` uint8.
    fold : int or None
        The test fold (``None`` for ``all_labels`` and ``frozen``).
    training : str
        One of :data:`TRAINING_MODES`.
    every_roi : bool
        Train on every ROI whatever the mode (``fold`` is then ``None``): the
        encoder of a cross-dataset evaluation, tested on another dataset.
    **params
        Passed on to :func:`train_encoder`.
    """
    if len(rois) != len(crops):
        raise ValueError(f"train_fold: {len(rois)} ROIs but {len(crops)} crops")
    rows = training_rows(
        rois["fold"].to_numpy(), fold=fold, training=training, every_roi=every_roi
    )
    part = rois[rows]
    log.info("training %s encoder on %d of %d ROIs (test fold %s)",
             training, rows.sum(), len(rows), fold)  # fmt: skip
    return train_encoder(
        crops[rows],
        part["label"].astype(str).tolist(),
        groups=part["group"].astype(str).tolist() if "group" in part else None,
        roi_ids=part["roi_id"].astype(str).tolist(),
        training=training,
        **params,
    )

"""S4's YOLOv8 training recipe: ultralytics' ``optimizer=auto`` and its schedule, in torch.

S4 trained YOLOv8-cls with ultralytics' defaults and ``optimizer=auto``. That
choice ignores the configured rate when the run is short:

* ``iterations = ceil(n_train / max(batch, 64)) * epochs`` (64 is ultralytics'
  nominal batch);
* more than 10,000 iterations: SGD, momentum 0.9, Nesterov, at ``lr``;
* otherwise AdamW, betas (0.9, 0.999), at ``0.002 * 5 / (4 + n_classes)``
  (0.001667 for two classes), whatever ``lr`` says.

Weight decay applies to convolution and linear weights only (not to biases or
norm layers). The rate warms up linearly from 0 over ``max(3 epochs, 100)``
steps and decays linearly per epoch from 1 to ``lrf`` = 0.01 of the base rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: ultralytics' nominal batch size, which the auto rule counts iterations in.
NOMINAL_BATCH = 64
#: More iterations than this: SGD; otherwise AdamW.
SGD_ABOVE_ITERATIONS = 10_000
WARMUP_EPOCHS = 3.0
#: Layers whose weights get no decay (as ultralytics: every normalisation layer).
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)  # fmt: skip
WARMUP_MIN_STEPS = 100
FINAL_LR_FRACTION = 0.01


@dataclass(frozen=True)
class AutoChoice:
    """What ultralytics' ``optimizer=auto`` picks: ``name`` (SGD or AdamW) and ``lr``."""

    name: str
    lr: float
    iterations: int


def auto_optimizer_choice(
    n_train: int, batch_size: int, epochs: int, n_classes: int, lr: float
) -> AutoChoice:
    """Apply ultralytics' ``optimizer=auto`` rule.

    Parameters
    ----------
    n_train : int
        Training images (the fit part).
    batch_size, epochs : int
        The run's batch size and epochs.
    n_classes : int
        Classes of the head (sets AdamW's rate).
    lr : float
        The configured rate, used by SGD only (ultralytics' own SGD rate is
        0.01, S4's ``lr0`` too).

    Returns
    -------
    AutoChoice
    """
    iterations = math.ceil(n_train / max(batch_size, NOMINAL_BATCH)) * epochs
    if iterations > SGD_ABOVE_ITERATIONS:
        return AutoChoice("SGD", lr, iterations)
    return AutoChoice("AdamW", round(0.002 * 5 / (4 + n_classes), 6), iterations)


def s4_optimizer(
    model: nn.Module, choice: AutoChoice, weight_decay: float
) -> torch.optim.Optimizer:
    """Build the optimizer of ``choice`` with weight decay on weights only.

    Each group has ``lr_scale`` 1.0, so :func:`s4_lr` sets every group alike.
    """
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if name == "bias" or isinstance(module, NORM_LAYERS):
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if choice.name == "SGD":
        return torch.optim.SGD(groups, lr=choice.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=choice.lr, betas=(0.9, 0.999))


def s4_lr(step: int, steps_per_epoch: int, epochs: int, base_lr: float) -> float:
    """Rate at ``step`` (0-based over the run): linear warm-up, then linear decay per epoch.

    ``base_lr * f(epoch) * min(step / warmup_steps, 1)`` with
    ``f(e) = (1 - e / epochs) * (1 - lrf) + lrf`` and ``warmup_steps =
    max(round(3 * steps_per_epoch), 100)``, as ultralytics' trainer (whose
    bias warm-up rate is 0 under ``optimizer=auto``).
    """
    epoch = step // max(steps_per_epoch, 1)
    factor = max(1 - epoch / epochs, 0.0) * (1 - FINAL_LR_FRACTION) + FINAL_LR_FRACTION
    warmup = max(round(WARMUP_EPOCHS * steps_per_epoch), WARMUP_MIN_STEPS)
    return base_lr * factor * min(step / warmup, 1.0)

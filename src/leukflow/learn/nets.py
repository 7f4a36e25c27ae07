"""Networks that torchvision lacks: an Xception-like net (S3) and S2's small CNN.

Both end in ``fc`` (a ``Linear`` classifier) after a flat feature vector, as
torchvision's ResNets do, so that :mod:`leukflow.learn.models` treats them alike.
"""

from __future__ import annotations

import torch
from torch import nn


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 convolution, then a pointwise 1x1 convolution (no bias)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
        )
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply both convolutions."""
        return self.pointwise(self.depthwise(x))


class XceptionBlock(nn.Module):
    """``reps`` x (ReLU, separable conv, batch norm), optional stride-2 pooling, residual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reps: int,
        *,
        stride: int = 1,
        relu_first: bool = True,
        grow_first: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(reps):
            grow = (i == 0) if grow_first else (i == reps - 1)
            out = out_channels if grow else channels
            if i > 0 or relu_first:
                layers.append(nn.ReLU(inplace=False))
            layers += [SeparableConv2d(channels, out), nn.BatchNorm2d(out)]
            channels = out
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, padding=1))
        self.body = nn.Sequential(*layers)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum of the block and its (projected) input."""
        return self.body(x) + self.skip(x)


class Xception(nn.Module):
    """Xception (Chollet 2017) built from torch layers: entry, middle and exit flows.

    Parameters
    ----------
    num_classes : int
        Outputs of ``fc``.
    middle_blocks : int
        Repeats of the 728-channel middle-flow block (8 in the paper).

    Notes
    -----
    The embedding is the 2048-d global average of the exit flow. Inputs of
    32 px and more work (the net downsamples 32 times).
    """

    def __init__(self, num_classes: int = 1000, middle_blocks: int = 8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.entry = nn.Sequential(
            XceptionBlock(64, 128, 2, stride=2, relu_first=False),
            XceptionBlock(128, 256, 2, stride=2),
            XceptionBlock(256, 728, 2, stride=2),
        )
        self.middle = nn.Sequential(*(XceptionBlock(728, 728, 3) for _ in range(middle_blocks)))
        self.exit = nn.Sequential(
            XceptionBlock(728, 1024, 2, stride=2, grow_first=False),
            SeparableConv2d(1024, 1536),
            nn.BatchNorm2d(1536),
            nn.ReLU(inplace=True),
            SeparableConv2d(1536, 2048),
            nn.BatchNorm2d(2048),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.fc(self.exit(self.middle(self.entry(self.stem(x)))))


class SmallCNN(nn.Module):
    """S2's custom CNN: conv 32, pool, conv 64, pool, dense 196, dense 96, classifier.

    Parameters
    ----------
    num_classes : int
        Outputs of ``fc``.
    input_size_px : int
        Side of the square input (fixes the size of the first dense layer).

    Notes
    -----
    Batch norm after each convolution and dropout 0.3 before the dense
    layers, as S2 describes; its L2 penalty is the optimiser's weight decay.
    The embedding is the 96-d output of the last dense layer.
    """

    def __init__(self, num_classes: int = 2, input_size_px: int = 64):
        super().__init__()
        if input_size_px < 4:
            raise ValueError(f"SmallCNN: input_size_px must be >= 4; got {input_size_px}")
        side = input_size_px // 4
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.dense = nn.Sequential(
            nn.Dropout(0.3),
            nn.Linear(64 * side * side, 196),
            nn.ReLU(inplace=True),
            nn.Linear(196, 96),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(96, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, num_classes)`` logits."""
        return self.fc(self.dense(self.features(x)))

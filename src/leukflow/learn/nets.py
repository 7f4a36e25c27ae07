"""Networks that torchvision lacks: Xception-like (S3), S2's small CNN, YOLOv8-cls (S4).

Each ends in a ``Linear`` classifier after a flat feature vector (``fc``, as
torchvision's ResNets, or ``model.9.linear`` for YOLOv8), so that
:mod:`leukflow.learn.models` treats them alike.
"""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------ YOLOv8-cls

#: Published YOLOv8 classification scales: (depth multiple, width multiple, max channels).
YOLOV8_SCALES = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 1024)}


class ConvBNSiLU(nn.Module):
    """Convolution (no bias, "same" padding), batch norm, SiLU: YOLOv8's ``Conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, padding=kernel // 2, bias=False
        )
        # YOLOv8's batch-norm settings (ultralytics' initialize_weights)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve, normalise, activate."""
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 ``ConvBNSiLU`` with a residual sum (channels kept)."""

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBNSiLU(channels, channels, 3)
        self.cv2 = ConvBNSiLU(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum of the two convolutions and the input."""
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's CSP block: split in two halves, ``n`` bottlenecks on one, concatenate all.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out.
    n : int
        Bottlenecks; each one's output joins the concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, n: int):
        super().__init__()
        self.c = out_channels // 2
        self.cv1 = ConvBNSiLU(in_channels, 2 * self.c, 1)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, out_channels, 1)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in, H, W)`` -> ``(B, out, H, W)``."""
        y = list(self.cv1(x).chunk(2, 1))
        for block in self.m:
            y.append(block(y[-1]))
        return self.cv2(torch.cat(y, 1))


class ClassifyHead(nn.Module):
    """YOLOv8's ``Classify``: 1x1 conv to 1280 channels, global average, dropout, linear."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.conv = ConvBNSiLU(in_channels, 1280, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))


def _width(channels: int, multiple: float, max_channels: int) -> int:
    # ultralytics' make_divisible(min(c, max) * width, 8)
    return int(math.ceil(min(channels, max_channels) * multiple / 8) * 8)


class YOLOv8Cls(nn.Module):
    """YOLOv8 classification network (Jocher et al. 2023) built from torch layers.

    The CSP-Darknet backbone of ``yolov8-cls.yaml`` (five stride-2 convolutions,
    C2f blocks of 3, 6, 6, 3 bottlenecks times the depth multiple) and the
    ``Classify`` head.

    Parameters
    ----------
    scale : {"n", "s", "m"}
        Depth and width multiples of :data:`YOLOV8_SCALES`.
    num_classes : int
        Outputs of the final linear layer (``model.9.linear``).
    dropout : float
        Dropout before the linear layer (ultralytics' default 0.0).

    Notes
    -----
    The module names are ultralytics' (``model.0.conv``, ``model.2.m.0.cv1``,
    ``model.9.linear``...), so the state dict of an ultralytics classification
    model (``ckpt["model"].float().state_dict()``, saved as a plain file) loads
    as ``weights``. The embedding is the 1280-d pooled output of the head's
    1x1 convolution. Inputs of 32 px and more give a 1x1 map or larger (the
    net downsamples 32 times); 224 px is YOLOv8-cls's default.
    """

    def __init__(self, scale: str = "n", num_classes: int = 1000, dropout: float = 0.0):
        super().__init__()
        if scale not in YOLOV8_SCALES:
            raise ValueError(
                f"YOLOv8Cls: scale must be one of {list(YOLOV8_SCALES)}; got {scale!r}"
            )
        depth, width, max_channels = YOLOV8_SCALES[scale]

        def ch(c: int) -> int:
            return _width(c, width, max_channels)

        def reps(n: int) -> int:
            return max(round(n * depth), 1)

        self.model = nn.Sequential(
            ConvBNSiLU(3, ch(64), 3, 2),  # P1/2
            ConvBNSiLU(ch(64), ch(128), 3, 2),  # P2/4
            C2f(ch(128), ch(128), reps(3)),
            ConvBNSiLU(ch(128), ch(256), 3, 2),  # P3/8
            C2f(ch(256), ch(256), reps(6)),
            ConvBNSiLU(ch(256), ch(512), 3, 2),  # P4/16
            C2f(ch(512), ch(512), reps(6)),
            ConvBNSiLU(ch(512), ch(1024), 3, 2),  # P5/32
            C2f(ch(1024), ch(1024), reps(3)),
            ClassifyHead(ch(1024), num_classes, dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_classes)`` logits."""
        return self.model(x)

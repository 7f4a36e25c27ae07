"""Models: the encoder backbones, their weights, and the input transform.

An :class:`Encoder` is a backbone that maps ``(B, 3, S, S)`` images to a flat
``(B, dim)`` embedding, followed by a linear classification ``head``. The
backbones are torchvision's (ResNet, VGG, DenseNet, MobileNet, Inception v3)
and leukflow's own (:mod:`leukflow.learn.nets`: Xception-like, S2's small CNN,
S4's YOLOv8 classifier in sizes n, s and m);
``hog`` (:mod:`leukflow.learn.hog`) is a fixed feature extractor with no network.

Weights are ``"none"`` (from scratch), the path of a local state-dict file, or
``"torchvision"``: the file torchvision would download, taken from the torch
hub cache when it is there. Nothing is ever downloaded, and files are read with
``torch.load(..., weights_only=True)`` only.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from leukflow.data.io import InvalidInputError, atomic_path
from leukflow.learn.nets import SmallCNN, Xception, YOLOv8Cls
from leukflow.learn.stain import check_stain_target

log = logging.getLogger(__name__)

#: ImageNet channel statistics, for backbones started from ImageNet weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """A weights file that cannot initialise the requested architecture."""


@dataclass(frozen=True)
class Arch:
    """How to build one backbone and where its classifier sits.

    Attributes
    ----------
    factory : callable
        ``(input_size_px, pretrained) -> nn.Module`` with its original classifier.
    head : str
        Dotted name of the final classifier layer (replaced by the identity).
    dim : int
        Width of the embedding (the classifier layer's input).
    min_input_px : int
        Smallest input side the network accepts.
    ignore : tuple of str
        Key prefixes of weights files that are not used (auxiliary heads).
    torchvision : bool
        Whether ``weights: torchvision`` is available.
    """

    factory: Callable[[int, bool], nn.Module]
    head: str
    dim: int
    min_input_px: int = 32
    ignore: tuple[str, ...] = ()
    torchvision: bool = True


def _tv(name: str, **kwargs) -> Callable[[int, bool], nn.Module]:
    return lambda _size, _pretrained: torchvision.models.get_model(name, weights=None, **kwargs)


def _yolov8(scale: str) -> Callable[[int, bool], nn.Module]:
    return lambda _size, _pretrained: YOLOv8Cls(scale)


def _inception(_size: int, pretrained: bool) -> nn.Module:
    # No auxiliary head (training uses the main logits only). Google's weights
    # expect inputs in [-1, 1]: transform_input maps ImageNet-normalised inputs there.
    return torchvision.models.inception_v3(
        weights=None, aux_logits=False, transform_input=pretrained, init_weights=True
    )


ARCHITECTURES: dict[str, Arch] = {
    "resnet18": Arch(_tv("resnet18"), "fc", 512),
    "resnet34": Arch(_tv("resnet34"), "fc", 512),
    "resnet50": Arch(_tv("resnet50"), "fc", 2048),
    "vgg16": Arch(_tv("vgg16"), "classifier.6", 4096),
    "vgg19": Arch(_tv("vgg19"), "classifier.6", 4096),
    "densenet121": Arch(_tv("densenet121"), "classifier", 1024),
    "mobilenet_v2": Arch(_tv("mobilenet_v2"), "classifier.1", 1280),
    "mobilenet_v3_small": Arch(_tv("mobilenet_v3_small"), "classifier.3", 1024),
    "mobilenet_v3_large": Arch(_tv("mobilenet_v3_large"), "classifier.3", 1280),
    "inception_v3": Arch(_inception, "fc", 2048, min_input_px=75, ignore=("AuxLogits.",)),
    "xception": Arch(lambda _s, _p: Xception(), "fc", 2048, torchvision=False),
    "small_cnn": Arch(
        lambda size, _p: SmallCNN(input_size_px=size), "fc", 96, min_input_px=4, torchvision=False
    ),
    **{
        f"yolov8{scale}_cls": Arch(_yolov8(scale), "model.9.linear", 1280, torchvision=False)
        for scale in ("n", "s", "m")
    },
}

#: Every value ``arch`` takes: the networks above and the HOG feature extractor.
KNOWN_ARCHS = (*ARCHITECTURES, "hog")

#: Normalisation layers of the networks: as published, or group norm in place of batch norm.
NORMS = ("batch", "group")
GROUP_NORM_GROUPS = 32


class Encoder(nn.Module):
    """A backbone giving ``(B, dim)`` embeddings and a linear head giving logits.

    Parameters
    ----------
    backbone : torch.nn.Module
        Network whose classifier layer was replaced by the identity.
    dim : int
        Embedding width.
    n_classes : int
        Outputs of the head.
    """

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, n_classes)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images -> ``(B, n_classes)`` logits."""
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(B, dim)`` and logits ``(B, n_classes)`` in one pass."""
        features = self.backbone(x)
        return features, self.head(features)


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_arch(arch: str, input_size_px: int) -> None:
    """Raise ``ValueError`` for an unknown architecture or a too small input."""
    if arch not in KNOWN_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {list(KNOWN_ARCHS)}")
    if arch in ARCHITECTURES and input_size_px < ARCHITECTURES[arch].min_input_px:
        raise ValueError(
            f"{arch} needs inputs of at least {ARCHITECTURES[arch].min_input_px} px; "
            f"got input_size_px={input_size_px}"
        )


def resolve_weights(arch: str, weights: str) -> Path | None:
    """Return the file that ``weights`` names for ``arch`` (``None`` for ``"none"``).

    ``"torchvision"`` names the file torchvision would download, in the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``); it is never downloaded.

    Raises
    ------
    FileNotFoundError
        The file is absent (the message names the expected path).
    ValueError
        ``"torchvision"`` for an architecture torchvision does not ship.
    """
    if weights == "none":
        return None
    if weights == "torchvision":
        if arch not in ARCHITECTURES or not ARCHITECTURES[arch].torchvision:
            raise ValueError(f"weights 'torchvision': torchvision has no weights for {arch}")
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        if not path.is_file():
            raise FileNotFoundError(
                f"weights 'torchvision' for {arch}: expected {path} in the torch hub cache "
                "(leukflow never downloads; copy the file there or give its path)"
            )
        return path
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return path


# torchvision's DenseNet files use old key names ("norm.1" for "norm1").
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _names(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(net: nn.Module, arch: str, path: str | Path) -> None:
    """Load a state-dict file into a backbone that still has its classifier layer.

    The file's classifier layer (any class count) and auxiliary heads are
    ignored; every other tensor must match by name and shape.

    Raises
    ------
    WeightsError
        The file is not a state dict, or does not fit ``arch``: the message
        names the missing, unexpected and mis-shaped keys.
    """
    spec = ARCHITECTURES[arch]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"weights file {path}: cannot be read as a state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path}: expected a state dict of tensors")
    if arch == "densenet121":
        state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    skip = (spec.head + ".", *spec.ignore)
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(skip)}
    # torch itself accepts files older than BatchNorm's num_batches_tracked
    missing = {k for k in own.keys() - state.keys() if not k.endswith("num_batches_tracked")}
    unexpected = state.keys() - own.keys()
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"weights file {path} does not fit {arch}: missing keys [{_names(missing)}]; "
            f"unexpected keys [{_names(unexpected)}]; wrong shapes [{_names(shapes)}]"
        )
    net.load_state_dict(state, strict=False)


def _set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def use_group_norm(net: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` of ``net`` by a ``GroupNorm`` of the same width, in place.

    Group norm (Wu and He 2018) normalises each image by itself, so a batch of
    one site's cells does not set the statistics another site's cells are
    scaled by, and small batches train as large ones. Each layer gets
    ``gcd(32, channels)`` groups, its affine weights start at 1 and 0.

    Returns
    -------
    int
        How many layers were replaced.
    """
    names = [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name in names:
        bn = net.get_submodule(name)
        groups = math.gcd(GROUP_NORM_GROUPS, bn.num_features)
        _set_submodule(net, name, nn.GroupNorm(groups, bn.num_features, eps=bn.eps))
    return len(names)


def build_encoder(
    arch: str,
    n_classes: int,
    weights: str = "none",
    input_size_px: int = 64,
    norm: str = "batch",
) -> Encoder:
    """Build an :class:`Encoder`, from scratch or from a weights file.

    Parameters
    ----------
    arch : str
        Key of :data:`ARCHITECTURES`.
    n_classes : int
        Outputs of the new head.
    weights : str
        ``"none"``, ``"torchvision"`` or a state-dict path (see :func:`resolve_weights`).
    input_size_px : int
        Side of the inputs (S2's small CNN sizes its dense layer by it).
    norm : str
        ``batch`` (as published) or ``group`` (:func:`use_group_norm`, before
        the weights load: a file must then come from a group-norm encoder).
    """
    check_arch(arch, input_size_px)
    if norm not in NORMS:
        raise ValueError(f"build_encoder: norm must be one of {NORMS}; got {norm!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"build_encoder: {arch} is not a network (see leukflow.learn.hog)")
    spec = ARCHITECTURES[arch]
    path = resolve_weights(arch, weights)
    net = spec.factory(input_size_px, path is not None)
    if norm == "group":
        use_group_norm(net)
    if path is not None:
        load_weights(net, arch, path)
        log.info("initialised %s from %s", arch, path)
    _set_submodule(net, spec.head, nn.Identity())
    return Encoder(net, spec.dim, n_classes)


def save_weights(model: Encoder, arch: str, path: str | Path) -> None:
    """Save the backbone as a torchvision-style state dict, usable as ``weights``.

    The head is saved under the architecture's classifier name, which
    :func:`load_weights` ignores, so the file starts any class count.
    """
    spec = ARCHITECTURES[arch]
    state = {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()}
    state |= {f"{spec.head}.{k}": v.detach().cpu() for k, v in model.head.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ------------------------------------------------------------------- transform


def channel_stats(crops: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``(n, H, W, 3)`` uint8 crops, scaled to [0, 1]."""
    total = np.zeros(3)
    squares = np.zeros(3)
    count = 0
    for i in range(0, len(crops), 1024):  # chunks: no float64 copy of every crop
        x = crops[i : i + 1024].reshape(-1, 3).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
        count += len(x)
    mean = total / max(count, 1)
    var = np.maximum(squares / max(count, 1) - mean**2, 0.0)
    return mean.tolist(), np.maximum(np.sqrt(var), 1e-3).tolist()


def to_unit(crops: torch.Tensor, input_size_px: int) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, s, s)`` float32 in [0, 1], resized to ``s``.

    Runs on the tensor's device, so a GPU does the resizing.
    """
    x = crops.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != input_size_px or x.shape[-2] != input_size_px:
        x = F.interpolate(
            x, size=(input_size_px, input_size_px), mode="bilinear", antialias=True,
            align_corners=False,
        ).clamp_(0.0, 1.0)  # fmt: skip
    return x


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Subtract ``mean`` and divide by ``std`` per channel of ``(B, 3, H, W)``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def to_tensor(
    crops: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    input_size_px: int | None = None,
) -> torch.Tensor:
    """``(n, S, S, 3)`` uint8 -> normalised ``(n, 3, s, s)`` float32 (``s`` defaults to S)."""
    x = torch.from_numpy(np.ascontiguousarray(crops))
    return normalise(to_unit(x, input_size_px or crops.shape[1]), mean, std)


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Save a checkpoint atomically (tensors, lists and strings: loadable with weights_only)."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises
    ------
    InvalidInputError
        ``unreadable`` for a file that is not such a checkpoint (damaged, or
        holding pickled objects beyond tensors and plain containers).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise InvalidInputError(
            "unreadable",
            f"{path}: not a leukflow checkpoint loadable with weights_only "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        ) from err
    if not isinstance(checkpoint, dict):
        raise InvalidInputError(
            "unreadable", f"{path}: expected a checkpoint dict; got {type(checkpoint).__name__}"
        )
    try:
        check_stain_target(checkpoint.get("stain"))
    except ValueError as err:
        raise InvalidInputError("unreadable", f"{path}: {err}") from None
    return checkpoint


def encoder_from_checkpoint(checkpoint: dict) -> Encoder:
    """Rebuild the eval-mode :class:`Encoder` a checkpoint holds."""
    # checkpoints written before the norm option hold batch-norm networks
    model = build_encoder(
        checkpoint["arch"], len(checkpoint["classes"]),
        input_size_px=checkpoint["input_size_px"], norm=checkpoint.get("norm", "batch"),
    )  # fmt: skip
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()

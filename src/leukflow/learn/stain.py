"""Stain: colour robustness for the encoders, on ``(B, 3, H, W)`` batches in [0, 1].

Two tools, both off unless an encoder's config asks for them:

- **HED jitter** (augmentation, training only; Tellez et al. 2019): each
  image is split into haematoxylin, eosin and DAB optical densities
  (scikit-image's ``rgb2hed`` matrices), each channel scaled by
  ``alpha ~ U(1 - scale, 1 + scale)`` and shifted by ``beta ~ U(-shift, shift)``,
  and recombined (``hed2rgb``).
- **Stain normalisation** (training and inference alike): each crop is mapped
  onto a target fitted on the training crops only, by Reinhard et al. (2001;
  the per-image mean and std of each CIELAB channel moved to the target's) or
  Macenko et al. (2009; the image's two stain vectors and their 99th-percentile
  concentrations replaced by the target's). The target lives in the
  checkpoint, so embedding, ``leukflow predict`` and ``serve`` apply the
  very transform the encoder was trained with.

Everything runs in torch on the batch's device, so the work is a few matrix
products per batch, not a Python loop per image. ``torchstain`` offers the
same normalisers but fits a target on one image and normalises one image at a
time; leukflow needs a target from every training crop and batches of crops.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed

#: ``stain_normalisation`` values.
STAIN_METHODS = ("none", "reinhard", "macenko")

_LOG_ADJUST = math.log(1e-6)  # scikit-image's scaling of the optical densities
# sRGB (D65) -> XYZ, and the D65 white point, as scikit-image's rgb2lab
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))  # fmt: skip
_WHITE = (0.95047, 1.0, 1.08883)
_MACENKO_BETA = 0.15  # optical density below which a pixel is background
_MACENKO_ALPHA = 1.0  # percentile of the extreme angles (robust minimum and maximum)
_MIN_TISSUE_PX = 16  # fewer stained pixels: the crop is left as it is


def _matrix(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=like.dtype, device=like.device)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> ``(B, H*W, 3)``."""
    return x.flatten(2).transpose(1, 2)


def _image(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, H*W, 3)`` -> the ``(B, 3, H, W)`` shape of ``like``."""
    return p.transpose(1, 2).reshape(like.shape)


# ------------------------------------------------------------------ HED jitter


def rgb_to_hed(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HED optical densities, as ``skimage.color.rgb2hed`` (not clipped at 0).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1].

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)``: haematoxylin, eosin, DAB. ``rgb2hed`` clips negative
        densities to 0; this does not, so that :func:`hed_to_rgb` inverts it exactly.
    """
    od = torch.log(x.clamp(min=1e-6)) / _LOG_ADJUST
    return _image(_pixels(od) @ _matrix(hed_from_rgb, x), x)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """HED optical densities -> RGB in [0, 1], as ``skimage.color.hed2rgb``."""
    log_rgb = -(_pixels(hed) * -_LOG_ADJUST) @ _matrix(rgb_from_hed, hed)
    return _image(torch.exp(log_rgb), hed).clamp(0.0, 1.0)


def hed_jitter(
    x: torch.Tensor, gen: torch.Generator, *, scale: float, shift: float
) -> torch.Tensor:
    """Perturb each image's H, E and D channels (Tellez et al. 2019).

    Parameters
    ----------
    x : torch.Tensor
        ``(B, 3, H, W)`` float in [0, 1].
    gen : torch.Generator
        CPU generator drawing ``alpha`` and ``beta`` (one per image and channel).
    scale, shift : float
        ``alpha ~ U(1 - scale, 1 + scale)``, ``beta ~ U(-shift, shift)``; both 0:
        ``x`` unchanged.

    Returns
    -------
    torch.Tensor
        ``(B, 3, H, W)`` in [0, 1].
    """
    if scale == 0 and shift == 0:
        return x
    b = len(x)
    alpha = 1 + (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * scale
    beta = (torch.rand(b, 3, 1, 1, generator=gen) * 2 - 1) * shift
    return hed_to_rgb(rgb_to_hed(x) * alpha.to(x) + beta.to(x))


# ------------------------------------------------------------------ CIELAB


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """Convert sRGB in [0, 1] to CIELAB (D65) as ``skimage.color.rgb2lab``; ``(B, 3, H, W)``."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = _pixels(lin) @ _matrix(_XYZ_FROM_RGB, x).T / _matrix(_WHITE, x)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lab = torch.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )
    return _image(lab, x)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) -> sRGB in [0, 1] (clipped), the inverse of :func:`rgb_to_lab`."""
    p = _pixels(lab)
    fy = (p[..., 0] + 16) / 116
    f = torch.stack([p[..., 1] / 500 + fy, fy, fy - p[..., 2] / 200], -1)
    xyz = torch.where(f**3 > 0.008856, f**3, (f - 16 / 116) / 7.787) * _matrix(_WHITE, lab)
    lin = (xyz @ torch.linalg.inv(_matrix(_XYZ_FROM_RGB, lab)).T).clamp(min=0.0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return _image(rgb, lab).clamp(0.0, 1.0)


# ----------------------------------------------------------------- Reinhard


def _reinhard_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean and std of each CIELAB channel: two ``(B, 3)`` tensors."""
    lab = rgb_to_lab(x).flatten(2)
    return lab.mean(2), lab.std(2, correction=0).clamp(min=1e-3)


def _reinhard(x: torch.Tensor, target: dict) -> torch.Tensor:
    mean, std = _reinhard_stats(x)
    t_mean, t_std = _matrix(target["mean"], x), _matrix(target["std"], x)
    lab = rgb_to_lab(x)
    lab = (lab - mean[..., None, None]) / std[..., None, None] * t_std[:, None, None]
    return lab_to_rgb(lab + t_mean[:, None, None])


# ------------------------------------------------------------------ Macenko


def _optical_density(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B, H*W, 3)`` optical densities (8-bit floor)."""
    return -torch.log(_pixels(x).clamp(min=1 / 255))


def _macenko_fit(od: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stain vectors and maximal concentrations of each image's pixels.

    Parameters
    ----------
    od : torch.Tensor
        ``(B, N, 3)`` optical densities.

    Returns
    -------
    stains : torch.Tensor
        ``(B, 3, 2)`` unit stain vectors (haematoxylin first).
    max_c : torch.Tensor
        ``(B, 2)`` 99th percentile of each stain's concentration on stained pixels.
    ok : torch.Tensor
        ``(B,)`` bool: enough stained pixels for an estimate.
    """
    # stained: optical density longer than beta (Macenko thresholds every channel,
    # but a smear's red cells absorb too little red light to pass that)
    tissue = od.norm(dim=-1) > _MACENKO_BETA  # (B, N)
    count = tissue.sum(1)
    ok = count >= _MIN_TISSUE_PX
    w = tissue.to(od.dtype)[..., None]
    mean = (od * w).sum(1) / count.clamp(min=1)[:, None]
    centred = (od - mean[:, None]) * w
    cov = centred.transpose(1, 2) @ centred / count.clamp(min=2)[:, None, None]
    eye = torch.eye(3, dtype=od.dtype, device=od.device)
    _, vectors = torch.linalg.eigh(torch.where(ok[:, None, None], cov, eye))
    plane = vectors[..., 1:]  # the two largest eigenvectors, (B, 3, 2)
    proj = od @ plane
    angle = torch.atan2(proj[..., 1], proj[..., 0]).masked_fill(~tissue, math.nan)
    lo = torch.nanquantile(angle, _MACENKO_ALPHA / 100, dim=1).nan_to_num(0.0)
    hi = torch.nanquantile(angle, 1 - _MACENKO_ALPHA / 100, dim=1).nan_to_num(0.0)
    v_lo = plane @ torch.stack([torch.cos(lo), torch.sin(lo)], -1)[..., None]
    v_hi = plane @ torch.stack([torch.cos(hi), torch.sin(hi)], -1)[..., None]
    # haematoxylin is the vector with the larger red density
    h_first = (v_lo[:, 0, 0] > v_hi[:, 0, 0])[:, None, None]
    stains = torch.where(h_first, torch.cat([v_lo, v_hi], 2), torch.cat([v_hi, v_lo], 2))
    stains = stains * torch.where(stains.sum(1, keepdim=True) < 0, -1.0, 1.0)
    conc = torch.linalg.pinv(stains) @ od.transpose(1, 2)  # (B, 2, N)
    conc = conc.masked_fill(~tissue[:, None], math.nan)
    max_c = torch.nanquantile(conc, 0.99, dim=2).nan_to_num(1.0).clamp(min=1e-6)
    return stains, max_c, ok


def _macenko(x: torch.Tensor, target: dict) -> torch.Tensor:
    od = _optical_density(x)
    stains, max_c, ok = _macenko_fit(od)
    conc = torch.linalg.pinv(stains) @ od.transpose(1, 2)  # (B, 2, N)
    t_stains, t_max = _matrix(target["stains"], x), _matrix(target["max_c"], x)
    conc = conc * (t_max[None] / max_c)[..., None]
    rgb = torch.exp(-(t_stains @ conc)).transpose(1, 2).reshape(len(x), *x.shape[2:], 3)
    out = rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0)
    return torch.where(ok[:, None, None, None], out, x)


# -------------------------------------------------------------- fit and apply


def fit_stain_target(crops: np.ndarray, method: str, *, max_pixels: int = 262_144) -> dict:
    """Fit a normalisation target on training crops (never test crops).

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n, S, S, 3)`` uint8 crops the encoder trains on.
    method : str
        One of :data:`STAIN_METHODS`.
    max_pixels : int
        Macenko: at most this many pixels, evenly spaced over the crops, are pooled.

    Returns
    -------
    dict
        ``{"method": ...}`` plus, for ``reinhard``, ``mean`` and ``std`` (the
        mean over crops of each crop's CIELAB mean and std, 3 floats each);
        for ``macenko``, ``stains`` (3 x 2, haematoxylin then eosin) and
        ``max_c`` (2 floats) of every crop's pixels pooled. Plain lists: the
        checkpoint stays loadable with ``weights_only``.
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"stain_normalisation: expected one of {STAIN_METHODS}; got {method!r}")
    if method == "none":
        return {"method": "none"}
    if len(crops) == 0:
        raise ValueError("fit_stain_target: no training crops to fit a stain target on")
    if method == "reinhard":
        means, stds = [], []
        for i in range(0, len(crops), 512):
            m, s = _reinhard_stats(_unit(crops[i : i + 512]))
            means.append(m)
            stds.append(s)
        mean, std = torch.cat(means).mean(0), torch.cat(stds).mean(0)
        return {"method": method, "mean": mean.tolist(), "std": std.tolist()}
    pixels = crops.reshape(-1, 3)
    step = max(1, len(pixels) // max_pixels)
    pooled = _unit(pixels[::step][None, None])  # one (1, 3, 1, N) "image"
    stains, max_c, ok = _macenko_fit(_optical_density(pooled))
    if not ok[0]:
        raise ValueError(
            "fit_stain_target: the training crops have too few stained pixels for macenko"
        )
    return {"method": method, "stains": stains[0].tolist(), "max_c": max_c[0].tolist()}


#: The finite numbers each method's target holds, by key and shape.
_TARGET_SHAPES = {"reinhard": {"mean": (3,), "std": (3,)},
                  "macenko": {"stains": (3, 2), "max_c": (2,)}}  # fmt: skip


def check_stain_target(target: object) -> None:
    """Raise ValueError unless ``target`` has the shape :func:`fit_stain_target` gives.

    A checkpoint may come from someone else's results folder: its target is
    checked before any crop is normalised with it.
    """
    if target is None:
        return
    if not isinstance(target, dict) or target.get("method") not in STAIN_METHODS:
        raise ValueError(f"stain target: expected a method among {STAIN_METHODS}")
    for key, shape in _TARGET_SHAPES.get(target["method"], {}).items():
        try:
            values = np.asarray(target[key], dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            values = None
        if values is None or values.shape != shape or not np.isfinite(values).all():
            raise ValueError(f"stain target: {key} must be {shape} finite numbers")


def _unit(crops: np.ndarray) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 -> ``(n, 3, H, W)`` float64 in [0, 1] (fits in double)."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).double() / 255.0


def normalise_stain(x: torch.Tensor, target: dict | None) -> torch.Tensor:
    """Map each image of a ``(B, 3, H, W)`` batch in [0, 1] onto ``target``.

    ``target`` is :func:`fit_stain_target`'s dict; ``None`` or method ``none``:
    ``x`` unchanged. A crop with too few stained pixels for Macenko is left as it is.
    """
    if not target or target["method"] == "none" or len(x) == 0:
        return x
    if target["method"] not in STAIN_METHODS:
        raise ValueError(f"normalise_stain: unknown method {target['method']!r}")
    fn = _reinhard if target["method"] == "reinhard" else _macenko
    return fn(x.float(), target).to(x.dtype)


def normalise_stain_crops(crops: np.ndarray, target: dict | None) -> np.ndarray:
    """:func:`normalise_stain` on ``(n, S, S, 3)`` uint8 crops; returns uint8 crops."""
    if not target or target["method"] == "none":
        return crops
    out = np.empty_like(crops)
    for i in range(0, len(crops), 512):
        x = normalise_stain(_unit(crops[i : i + 512]).float(), target)
        out[i : i + 512] = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return out

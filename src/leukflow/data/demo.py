"""Synthetic demo dataset of Giemsa-stained blood-smear fields.

The pipeline's default dataset: each field is a 640 x 480 RGB image of pale red
cells on plasma with one to four white cells, either mature lymphocytes
(healthy) or lymphoblasts (acute lymphoblastic leukemia, ALL). Fields are
rendered with the Beer-Lambert law: every stained structure adds an optical
density (absorbance) per colour channel, and the transmitted light is
``plasma * exp(-density)``, so overlapping cells darken the way they do under
a microscope.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

HEIGHT, WIDTH = 480, 640
PLASMA = np.array([230.0, 220.0, 215.0], dtype=np.float32)
CELL_COLUMNS = ["image", "cell", "kind", "x0", "y0", "x1", "y1", "nucleus_area_px", "cell_area_px"]
BLAST_FRACTION = 0.85  # share of white cells that are blasts in an ALL field
TOUCH_PROB = 0.15  # share of fields with two touching white cells
RBC_SPACING = 0.75  # least distance between red cell centres, in sums of radii
RBC_SATURATION = 1.0  # two overlapping red cells are 1.37 times as dense as one


def _density(rgb: tuple[int, int, int]) -> np.ndarray:
    """Optical density, shape (3,) float32, that turns plasma into colour `rgb`."""
    return np.log(PLASMA / np.asarray(rgb, dtype=np.float32))


OD_RBC = _density((215, 150, 150))
OD_CYTOPLASM = _density((172, 182, 212))
OD_NUCLEUS = _density((80, 42, 125))


def _window(cy: float, cx: float, half: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Slices of the image around (cy, cx), clipped, and offsets dy (h, 1), dx (1, w)."""
    y0, x0 = max(int(cy) - half, 0), max(int(cx) - half, 0)
    y1, x1 = min(int(cy) + half + 1, HEIGHT), min(int(cx) + half + 1, WIDTH)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def _blob(rng: np.random.Generator, dy, dx, radius: float, wobble: float, edge=1.0) -> np.ndarray:
    """Soft mask in [0, 1], shape (h, w) float32, of a disk with a wobbly outline.

    The radius varies with the angle by harmonics 2-4 of total relative
    amplitude up to `wobble`; the outline ramps from 1 to 0 over `edge` pixels.
    """
    amps = wobble * rng.dirichlet([3.0, 2.0, 1.0]) * rng.uniform(0.5, 1.0)
    phases = rng.uniform(0, 2 * np.pi, 3)
    r = radius * (1 + np.cos(np.arctan2(dy, dx)[..., None] * [2, 3, 4] + phases) @ amps)
    return np.clip((r - np.hypot(dy, dx)) / edge + 0.5, 0, 1).astype(np.float32)


def _add_rbc(od: np.ndarray, rng: np.random.Generator, cy: float, cx: float, r: float) -> None:
    """Add the density of one red cell (soft edge, paler centre) to `od` in place."""
    sl, dy, dx = _window(cy, cx, int(r * 1.2) + 3)
    if dy.size == 0 or dx.size == 0:
        return
    body = _blob(rng, dy, dx, r, wobble=0.06, edge=1.2)
    pallor = 1 - rng.uniform(0.3, 0.5) * np.exp(-(dy**2 + dx**2) / (0.5 * r) ** 2)
    colour = OD_RBC * rng.normal(1.0, 0.08) * rng.normal(1.0, 0.04, 3).astype(np.float32)
    od[sl] += (body * pallor)[..., None] * colour


def _add_wbc(
    od: np.ndarray, rng: np.random.Generator, kind: str, cy: float, cx: float, radius: float
) -> dict:
    """Add one white cell to `od` in place; return its box and areas (hard masks)."""
    blast = kind == "blast"
    r_nuc = radius * np.sqrt(rng.uniform(0.8, 0.9) if blast else rng.uniform(0.6, 0.75))
    sl, dy, dx = _window(cy, cx, int(radius * 1.1) + 3)
    cell = _blob(rng, dy, dx, radius, wobble=0.04, edge=1.2)
    shift, angle = (radius - r_nuc) * rng.uniform(0, 0.6), rng.uniform(0, 2 * np.pi)
    ndy, ndx = dy - shift * np.sin(angle), dx - shift * np.cos(angle)
    nucleus = np.minimum(_blob(rng, ndy, ndx, r_nuc, 0.1 if blast else 0.04), cell)
    # Chromatin: coarse dark clumps in lymphocytes, fine and even in blasts.
    sigma, amp = (0.7, 0.08) if blast else (1.6, 0.3)
    texture = ndimage.gaussian_filter(rng.standard_normal(cell.shape).astype(np.float32), sigma)
    chromatin = np.clip(1 + amp * texture / (texture.std() + 1e-6), 0.4, 1.8)
    chromatin *= rng.uniform(0.85, 0.95) if blast else rng.uniform(1.05, 1.2)
    if blast:  # one to three small, paler nucleoli
        for _ in range(rng.integers(1, 4)):
            rho, phi = r_nuc * rng.uniform(0, 0.5), rng.uniform(0, 2 * np.pi)
            sy, sx = ndy - rho * np.sin(phi), ndx - rho * np.cos(phi)
            chromatin *= 1 - 0.45 * _blob(rng, sy, sx, rng.uniform(1.8, 3.2), 0.1)
    cyto = (cell - nucleus) * (rng.uniform(1.05, 1.3) if blast else rng.uniform(0.9, 1.1))
    od[sl] += cyto[..., None] * OD_CYTOPLASM + (nucleus * chromatin)[..., None] * OD_NUCLEUS
    hard = cell >= 0.5
    rows, cols = np.flatnonzero(hard.any(axis=1)), np.flatnonzero(hard.any(axis=0))
    y0, x0 = sl[0].start, sl[1].start
    return {
        "kind": kind,
        "x0": x0 + int(cols[0]),
        "y0": y0 + int(rows[0]),
        "x1": x0 + int(cols[-1]) + 1,
        "y1": y0 + int(rows[-1]) + 1,
        "nucleus_area_px": int((nucleus >= 0.5).sum()),
        "cell_area_px": int(hard.sum()),
    }


def _place_wbcs(rng: np.random.Generator, radii: np.ndarray, touching: bool) -> list:
    """Centres (cy, cx) inside the field for white cells of `radii`; may drop some."""
    centres: list[tuple[float, float]] = []
    for i, r in enumerate(radii):
        m = r * 1.1 + 4
        for _ in range(200):
            if touching and i == 1:  # second cell touches the first one
                (py, px), ang = centres[0], rng.uniform(0, 2 * np.pi)
                d = radii[0] + r - rng.uniform(0, 2)
                cy, cx = py + d * np.sin(ang), px + d * np.cos(ang)
            else:
                cy, cx = rng.uniform(m, HEIGHT - m), rng.uniform(m, WIDTH - m)
            inside = m <= cy <= HEIGHT - m and m <= cx <= WIDTH - m
            gaps = [np.hypot(cy - y, cx - x) - r - radii[j] for j, (y, x) in enumerate(centres)]
            if inside and ((touching and i == 1) or all(g > 8 for g in gaps)):
                centres.append((cy, cx))
                break
        else:
            break
    return centres


def _draw_field(rng: np.random.Generator, label: str) -> tuple[np.ndarray, list[dict]]:
    """Render one field; return the image, shape (480, 640, 3) uint8, and its white cells."""
    touching = rng.random() < TOUCH_PROB
    n_wbc = max(int(rng.integers(1, 5)), 2 if touching else 1)
    is_blast = rng.random(n_wbc) < (BLAST_FRACTION if label == "ALL" else 0.0)
    radii = np.where(is_blast, rng.uniform(20, 30, n_wbc), rng.uniform(16, 23, n_wbc))
    centres = _place_wbcs(rng, radii, touching)

    od = np.zeros((HEIGHT, WIDTH, 3), dtype=np.float32)
    wy, wx = np.array([c[0] for c in centres]), np.array([c[1] for c in centres])
    wr = radii[: len(centres)]
    n_rbc, k = int(rng.integers(80, 151)), 0
    ry, rx, rr = np.empty(n_rbc), np.empty(n_rbc), np.empty(n_rbc)
    for _ in range(n_rbc * 20):
        r, cy, cx = rng.uniform(14, 20), rng.uniform(-8, HEIGHT + 8), rng.uniform(-8, WIDTH + 8)
        if np.any(np.hypot(wy - cy, wx - cx) < wr + 0.4 * r) or np.any(
            np.hypot(ry[:k] - cy, rx[:k] - cx) < RBC_SPACING * (rr[:k] + r)
        ):
            continue
        ry[k], rx[k], rr[k], k = cy, cx, r, k + 1
        _add_rbc(od, rng, cy, cx, r)
        if k == n_rbc:
            break
    # Red-cell density saturates (1 at one cell's thickness): overlaps darken less than 2x.
    u = od[..., 1:2] / OD_RBC[1]
    gain = np.expm1(-RBC_SATURATION * u) / np.expm1(-RBC_SATURATION)
    od *= np.divide(gain, u, out=np.ones_like(u), where=u > 1e-6)
    cells = [
        _add_wbc(od, rng, "blast" if is_blast[j] else "lymphocyte", cy, cx, radii[j])
        for j, (cy, cx) in enumerate(centres)
    ]

    # Stain (hue, contrast), brightness, illumination, optics and sensor noise.
    stain = rng.normal(1.0, 0.06, 3).astype(np.float32) * rng.uniform(0.9, 1.1)
    yy = np.linspace(-0.5, 0.5, HEIGHT, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, WIDTH, dtype=np.float32)[None, :]
    gy, gx, vignette = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.0, 0.04)
    illum = 1 + gy * yy + gx * xx - vignette * (yy**2 + xx**2)
    light = PLASMA * np.float32(rng.uniform(0.96, 1.03))
    img = light * illum[..., None] * np.exp(-od * stain)
    blur = rng.uniform(0.5, 1.2)
    img = ndimage.gaussian_filter(img, sigma=(blur, blur, 0))
    img += rng.uniform(1.5, 3.5) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cells


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write `df` to `path` through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def draw_demo_dataset(
    out_dir: str | Path, n_fields: int = 60, seed: int = 0, fields_per_patient: int = 3
) -> pd.DataFrame:
    """Draw the synthetic demo dataset of blood-smear fields.

    Parameters
    ----------
    out_dir : str or Path
        Output folder; created if needed. Receives ``images/field_000.png`` ...
        (RGB, 480 x 640 x 3 uint8), ``cells.csv`` and, last, ``labels.csv``,
        so the existence of ``labels.csv`` means the dataset is complete.
    n_fields : int, default 60
        Number of fields (images), at least 2.
    seed : int, default 0
        Non-negative seed; the same seed gives byte-identical files, and field
        ``i`` does not depend on `n_fields`.
    fields_per_patient : int, default 3
        Fields per patient, at least 1; leftover fields go to the last
        patient. ``n_fields // fields_per_patient`` patients (at least 2)
        alternate between ALL and healthy, starting with ALL.

    Returns
    -------
    pandas.DataFrame
        One row per field with columns ``image`` (str, path relative to
        `out_dir`), ``label`` (``"ALL"`` or ``"healthy"``) and ``patient``
        (str, ``"P00"`` ...), as written to ``labels.csv``.

    Notes
    -----
    ``cells.csv`` holds the ground truth of the planted white cells, one row
    each: ``image``, ``cell`` (index in the field), ``kind`` (``"blast"`` or
    ``"lymphocyte"``), the cell's bounding box ``x0, y0, x1, y1`` in pixels
    (``x1``, ``y1`` exclusive), ``nucleus_area_px`` and ``cell_area_px``.

    """
    args = {"n_fields": n_fields, "seed": seed, "fields_per_patient": fields_per_patient}
    for name, value in args.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if n_fields < 2:
        raise ValueError(f"n_fields must be at least 2, got {n_fields}")
    if fields_per_patient < 1:
        raise ValueError(f"fields_per_patient must be at least 1, got {fields_per_patient}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    n_patients = n_fields // fields_per_patient
    if n_patients < 2:
        raise ValueError(
            f"need at least two patients (one ALL, one healthy): n_fields={n_fields} "
            f"< 2 * fields_per_patient={fields_per_patient}"
        )
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels.csv").unlink(missing_ok=True)  # dataset incomplete until rewritten
    start = time.perf_counter()
    width, pwidth = max(3, len(str(n_fields - 1))), max(2, len(str(n_patients - 1)))
    labels, cells = [], []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n_fields)):
        patient = min(i // fields_per_patient, n_patients - 1)
        label = "ALL" if patient % 2 == 0 else "healthy"
        image = f"images/field_{i:0{width}d}.png"
        img, wbcs = _draw_field(np.random.default_rng(child), label)
        tmp = out_dir / (image + ".tmp")
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, out_dir / image)
        labels.append({"image": image, "label": label, "patient": f"P{patient:0{pwidth}d}"})
        cells += [{"image": image, "cell": j, **wbc} for j, wbc in enumerate(wbcs)]
    _write_csv(pd.DataFrame(cells, columns=CELL_COLUMNS), out_dir / "cells.csv")
    labels_df = pd.DataFrame(labels, columns=["image", "label", "patient"])
    _write_csv(labels_df, out_dir / "labels.csv")
    logger.info(
        "drew %d demo fields (%d patients, %d white cells) in %s in %.1f s",
        n_fields, n_patients, len(cells), out_dir, time.perf_counter() - start,
    )  # fmt: skip
    return labels_df

"""Tests of segmentation (leukflow.segment) on synthetic fields with known answers."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import measure
from skimage.draw import disk

from leukflow import segment
from leukflow.segment import (
    ROI_COLUMNS,
    SegmentParams,
    extract_rois,
    segment_cells,
    segment_images,
)

BACKGROUND = (230, 220, 215)
RED_CELL = (215, 150, 150)
NUCLEUS = (90, 50, 130)
#: A red cell as dark as a nucleus in grey (0.240 vs 0.252) but red, not purple.
DARK_RED_CELL = (140, 40, 40)

H, W = 200, 240
NUCLEI = [(40, 50, 12), (60, 150, 10), (140, 60, 14), (150, 180, 11)]  # (row, col, radius)
RED_CELLS = [(30, 100, 15), (100, 100, 16), (170, 120, 15), (100, 210, 15)]
MARGIN = 0.4
SIZE = 64


def field(nuclei=(), red_cells=(), *, seed=0, noise=4.0, red=RED_CELL, shape=(H, W)):
    """A smear field: pale background, red-cell discs, then nucleus discs, seeded noise."""
    img = np.empty((*shape, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for cy, cx, r in red_cells:
        img[disk((cy, cx), r, shape=shape)] = red
    for cy, cx, r in nuclei:
        img[disk((cy, cx), r, shape=shape)] = NUCLEUS
    img += np.random.default_rng(seed).normal(0.0, noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _regions(labels):
    return sorted(measure.regionprops(labels), key=lambda r: (r.centroid[0], r.centroid[1]))


def _nearest(planted, y, x):
    return min(planted, key=lambda n: math.dist((n[0], n[1]), (y, x)))


def _match(regions, planted):
    """Pair every planted (row, col, r) with the region whose centroid is nearest."""
    out = []
    for cy, cx, r in planted:
        best = min(regions, key=lambda reg: math.dist(reg.centroid, (cy, cx)))
        out.append((best, (cy, cx, r)))
    return out


# ---------------------------------------------------------------- segment_cells


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_finds_each_nucleus_once_at_its_centre(seed):
    labels = segment_cells(field(NUCLEI, RED_CELLS, seed=seed))
    assert labels.dtype == np.int32
    assert labels.shape == (H, W)
    assert labels.max() == len(NUCLEI)
    assert set(np.unique(labels)) == set(range(len(NUCLEI) + 1))
    regions = _regions(labels)
    matched = _match(regions, NUCLEI)
    assert len({id(reg) for reg, _ in matched}) == len(NUCLEI)  # one region per nucleus
    for reg, (cy, cx, r) in matched:
        assert math.dist(reg.centroid, (cy, cx)) < 1.0, (reg.centroid, cy, cx)
        assert reg.area == pytest.approx(math.pi * r**2, rel=0.1)


def test_segment_ignores_red_cells():
    labels = segment_cells(field(NUCLEI, RED_CELLS))
    for cy, cx, _ in RED_CELLS:
        assert labels[cy, cx] == 0
    for cy, cx, _ in NUCLEI:
        assert labels[cy, cx] > 0


def test_segment_noise_free_field_matches_planted_discs():
    img = field(NUCLEI, RED_CELLS, noise=0.0)
    labels = segment_cells(img)
    assert labels.max() == len(NUCLEI)
    yy, xx = np.mgrid[:H, :W]
    for cy, cx, r in NUCLEI:
        planted = np.zeros((H, W), dtype=bool)
        planted[disk((cy, cx), r, shape=(H, W))] = True
        found = labels == labels[cy, cx]
        assert not (found & ~planted).any()  # nothing outside the disc
        inner = (yy - cy) ** 2 + (xx - cx) ** 2 < (r - 1) ** 2
        assert found[inner].all()  # the whole interior
        # Only single-pixel nubs on the rim may be lost to the opening.
        assert (planted & ~found).sum() <= 8


def test_segment_drops_discs_smaller_than_min_area():
    # Disc areas (pixels): r=12 -> 437, r=8 -> ~197, r=6 -> ~113.
    nuclei = [(50, 50, 12), (150, 150, 6), (50, 180, 8)]
    img = field(nuclei, RED_CELLS[1:2])
    regions = _regions(segment_cells(img, min_area_px=250))
    assert len(regions) == 1
    assert math.dist(regions[0].centroid, (50, 50)) < 1.0

    regions = _regions(segment_cells(img, min_area_px=150))
    assert len(regions) == 2
    centres = sorted((round(r.centroid[0]), round(r.centroid[1])) for r in regions)
    assert centres == [(50, 50), (50, 180)]

    assert segment_cells(img, min_area_px=1000).max() == 0


def test_touching_nuclei_give_one_region():
    # Two r=12 discs whose edges are 1 px apart: the closing joins them and nothing
    # splits them again (no watershed), so they are ONE region covering both.
    pair = [(100, 100, 12), (100, 124, 12)]
    labels = segment_cells(field(pair, RED_CELLS[:1]))
    regions = _regions(labels)
    assert len(regions) == 1
    (reg,) = regions
    assert math.dist(reg.centroid, (100, 112)) < 1.0
    assert reg.area == pytest.approx(2 * math.pi * 12**2, rel=0.1)
    assert labels[100, 100] == labels[100, 124] == reg.label
    rois, crops = extract_rois(field(pair, RED_CELLS[:1]), labels)
    assert len(rois) == 1
    assert crops.shape == (1, SIZE, SIZE, 3)


def test_nuclei_further_apart_than_the_closing_stay_separate():
    pair = [(100, 100, 12), (100, 135, 12)]  # edges 12 px apart, closing radius 4
    regions = _regions(segment_cells(field(pair, RED_CELLS[:1]), closing_radius_px=4))
    assert len(regions) == 2


def test_blank_noisy_field_gives_no_regions():
    for seed in range(3):
        assert segment_cells(field(seed=seed)).max() == 0


@pytest.mark.parametrize("colour", [BACKGROUND, NUCLEUS, (0, 0, 0), (255, 255, 255)])
def test_single_colour_field_gives_no_regions(colour):
    img = np.empty((50, 60, 3), dtype=np.uint8)
    img[:] = colour
    labels = segment_cells(img)
    assert labels.shape == (50, 60)
    assert labels.dtype == np.int32
    assert labels.max() == 0
    rois, crops = extract_rois(img, labels, roi_size_px=SIZE)
    assert list(rois.columns) == ROI_COLUMNS[2:]
    assert len(rois) == 0
    assert crops.shape == (0, SIZE, SIZE, 3)
    assert crops.dtype == np.uint8


def test_field_without_white_cells_labels_red_cells():
    # Known limitation of the 3-class Otsu method: with no nuclei present the red
    # cells become the darkest class, so a field of red cells only yields red-cell ROIs.
    labels = segment_cells(field((), RED_CELLS))
    assert labels.max() == len(RED_CELLS)
    for cy, cx, _ in RED_CELLS:
        assert labels[cy, cx] > 0


@pytest.mark.parametrize(
    "shape",
    [(20, 30), (20, 30, 4), (20, 30, 1), (3, 20, 30)],
    ids=["2d", "rgba", "one-channel", "channels-first"],
)
def test_segment_rejects_non_rgb(shape):
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) RGB image; got shape"):
        segment_cells(np.zeros(shape, dtype=np.uint8))


def test_red_minus_blue_separates_purple_nuclei_from_dark_red_cells():
    img = field(NUCLEI, RED_CELLS, red=DARK_RED_CELL)

    # grey: red cells are as dark as nuclei, so both land in the darkest class.
    grey = segment_cells(img, channel="grey")
    assert grey.max() == len(NUCLEI) + len(RED_CELLS)
    for cy, cx, _ in RED_CELLS + NUCLEI:
        assert grey[cy, cx] > 0

    # red_minus_blue: purple (blue > red) is darkest, red cells are brightest.
    rmb = segment_cells(img, channel="red_minus_blue")
    assert rmb.max() == len(NUCLEI)
    for cy, cx, _ in RED_CELLS:
        assert rmb[cy, cx] == 0
    for reg, (cy, cx, r) in _match(_regions(rmb), NUCLEI):
        assert math.dist(reg.centroid, (cy, cx)) < 1.0
        assert reg.area == pytest.approx(math.pi * r**2, rel=0.1)


def test_red_channel_also_finds_nuclei():
    labels = segment_cells(field(NUCLEI, RED_CELLS, red=DARK_RED_CELL), channel="red")
    assert labels.max() == len(NUCLEI)


def test_unknown_channel():
    with pytest.raises(ValueError, match=r"channel must be one of .*got 'blue'"):
        segment_cells(field(NUCLEI), channel="blue")


# ----------------------------------------------------------------- extract_rois


def test_rois_are_square_centred_and_sized_by_margin():
    img = field(NUCLEI, RED_CELLS)
    labels = segment_cells(img)
    rois, crops = extract_rois(img, labels, roi_margin=MARGIN, roi_size_px=SIZE)
    assert list(rois.columns) == ROI_COLUMNS[2:]
    assert len(rois) == len(NUCLEI)
    assert crops.shape == (len(NUCLEI), SIZE, SIZE, 3)
    assert crops.dtype == np.uint8
    for row in rois.itertuples(index=False):
        cy, cx, r = _nearest(NUCLEI, row.centroid_y, row.centroid_x)
        side = row.x1 - row.x0
        assert row.y1 - row.y0 == side  # square
        assert abs(side - math.ceil(2 * r * (1 + 2 * MARGIN))) <= 2
        # Box centre in continuous coordinates; the disc's centre pixel spans [c, c+1).
        assert abs((row.x0 + row.x1) / 2 - (cx + 0.5)) <= 1
        assert abs((row.y0 + row.y1) / 2 - (cy + 0.5)) <= 1
        assert row.area_px == pytest.approx(math.pi * r**2, rel=0.1)
        assert row.centroid_x == pytest.approx(cx, abs=1)
        assert row.centroid_y == pytest.approx(cy, abs=1)


def test_crop_shows_the_nucleus_in_the_middle():
    img = field(NUCLEI, RED_CELLS)
    _, crops = extract_rois(img, segment_cells(img), roi_margin=MARGIN, roi_size_px=SIZE)
    assert len(crops) == len(NUCLEI)
    for crop in crops:
        centre = crop[SIZE // 2 - 4 : SIZE // 2 + 4, SIZE // 2 - 4 : SIZE // 2 + 4].reshape(-1, 3)
        np.testing.assert_allclose(centre.mean(0), NUCLEUS, atol=6)
        corners = np.stack([crop[0, 0], crop[0, -1], crop[-1, 0], crop[-1, -1]])
        assert (corners[:, 2] < corners[:, 0]).all()  # corners are not purple nucleus


def test_crop_without_resize_equals_the_field_pixels():
    img = field(NUCLEI[:1], noise=3.0)
    labels = segment_cells(img)
    rois, _ = extract_rois(img, labels, roi_margin=MARGIN, roi_size_px=SIZE)
    side = int(rois.loc[0, "x1"] - rois.loc[0, "x0"])
    _, crops = extract_rois(img, labels, roi_margin=MARGIN, roi_size_px=side)
    x0, y0, x1, y1 = (int(rois.loc[0, c]) for c in ("x0", "y0", "x1", "y1"))
    assert 0 <= y0 < y1 <= H
    assert 0 <= x0 < x1 <= W
    np.testing.assert_array_equal(crops[0], img[y0:y1, x0:x1])


def test_roi_at_the_border_is_edge_padded_to_full_size():
    nuclei = [(5, 100, 12), (150, 60, 12)]
    img = field(nuclei, RED_CELLS[1:2])
    rois, crops = extract_rois(img, segment_cells(img), roi_margin=MARGIN, roi_size_px=SIZE)
    assert len(rois) == 2
    assert crops.shape == (2, SIZE, SIZE, 3)
    top = rois.loc[rois["centroid_y"].idxmin()]
    assert top["y0"] < 0  # box sticks out of the field...
    assert top["x1"] - top["x0"] == top["y1"] - top["y0"]
    # ...and the part above the field repeats the first row: with roi_size_px equal to the
    # side there is no resampling, so the padded rows equal field row 0 exactly.
    side = int(top["x1"] - top["x0"])
    _, exact = extract_rois(img, segment_cells(img), roi_margin=MARGIN, roi_size_px=side)
    crop = exact[rois["centroid_y"].idxmin()]
    pad = -int(top["y0"])
    x0, x1 = int(top["x0"]), int(top["x1"])
    for i in range(pad):
        np.testing.assert_array_equal(crop[i], img[0, x0:x1])
    np.testing.assert_array_equal(crop[pad:], img[: side - pad, x0:x1])


def test_roi_at_a_corner_is_padded_on_two_sides():
    img = field([(H - 4, W - 4, 14)], RED_CELLS[1:2])
    rois, crops = extract_rois(img, segment_cells(img), roi_margin=MARGIN, roi_size_px=SIZE)
    assert len(rois) == 1
    assert rois.loc[0, "x1"] > W
    assert rois.loc[0, "y1"] > H
    assert crops.shape == (1, SIZE, SIZE, 3)


# -------------------------------------------------------------- segment_images


@pytest.fixture(scope="module")
def field_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fields")
    layouts = [
        (NUCLEI, RED_CELLS),
        ((), RED_CELLS[:0]),  # blank: no ROI
        (NUCLEI[:2], RED_CELLS[:2]),
        (NUCLEI[1:], RED_CELLS[2:]),
    ]
    paths, ids = [], []
    for i, (nuclei, red_cells) in enumerate(layouts):
        path = folder / f"f{i}.png"
        Image.fromarray(field(nuclei, red_cells, seed=10 + i)).save(path)
        paths.append(path)
        ids.append(f"demo/images/f{i}")
    return paths, ids, [len(n) for n, _ in layouts]


def test_segment_images_sequential_matches_per_image_calls(field_files):
    paths, ids, counts = field_files
    params = SegmentParams(roi_size_px=32)
    rois, crops = segment_images(paths, ids, params=params, n_workers=1, chunk_size=3)
    assert list(rois.columns) == ROI_COLUMNS
    assert len(rois) == sum(counts)
    assert crops.shape == (sum(counts), 32, 32, 3)
    assert crops.dtype == np.uint8
    expected_ids = [f"{i}#{k}" for i, n in zip(ids, counts, strict=True) for k in range(n)]
    assert list(rois["roi_id"]) == expected_ids
    assert list(rois["image_id"]) == [r.split("#")[0] for r in expected_ids]
    assert rois["roi_id"].is_unique
    # Same numbers as segmenting each image by hand.
    start = 0
    for path, n in zip(paths, counts, strict=True):
        img = np.asarray(Image.open(path))
        one, one_crops = extract_rois(img, segment_cells(img), roi_size_px=32)
        part = rois.iloc[start : start + n, 2:].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, one, check_dtype=False)
        np.testing.assert_array_equal(crops[start : start + n], one_crops)
        start += n


def test_segment_images_processes_give_identical_results(field_files, monkeypatch):
    pools = []

    class RecordingPool(segment.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(segment, "ProcessPoolExecutor", RecordingPool)
    paths, ids, _ = field_files
    params = SegmentParams(roi_size_px=32)
    seq_rois, seq_crops = segment_images(paths, ids, params=params, n_workers=1, chunk_size=1)
    assert pools == []
    par_rois, par_crops = segment_images(paths, ids, params=params, n_workers=2, chunk_size=1)
    assert len(pools) == 1  # the worker processes really ran
    pd.testing.assert_frame_equal(par_rois, seq_rois)
    np.testing.assert_array_equal(par_crops, seq_crops)
    assert par_rois["roi_id"].str.startswith(tuple(ids)).all()


def test_segment_images_passes_params(field_files):
    paths, ids, _ = field_files
    params = replace(SegmentParams(roi_size_px=16), min_area_px=10_000)
    rois, crops = segment_images(paths, ids, params=params)
    assert len(rois) == 0
    assert crops.shape == (0, 16, 16, 3)
    big = replace(SegmentParams(roi_size_px=16), min_area_px=500)  # only r=14 (~609 px) stays
    rois, _ = segment_images(paths, ids, params=big)
    assert list(rois["image_id"]) == [ids[0], ids[3]]  # the r=14 nucleus of fields 0 and 3


def test_segment_images_empty_input():
    rois, crops = segment_images([], [], params=SegmentParams(roi_size_px=16))
    assert list(rois.columns) == ROI_COLUMNS
    assert len(rois) == 0
    assert crops.shape == (0, 16, 16, 3)


def test_segment_images_length_mismatch(field_files):
    paths, ids, _ = field_files
    with pytest.raises(ValueError, match="4 paths but 3 image ids"):
        segment_images(paths, ids[:3], params=SegmentParams())

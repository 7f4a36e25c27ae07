"""Tests of the duplicate search (leukflow.data.duplicates)."""

import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from leukflow.data.duplicates import (
    DEFAULT_MAX_DISTANCE,
    DUPLICATE_COLUMNS,
    find_duplicates,
    index_file,
    plot_duplicates,
)
from leukflow.data.ingest import image_thumbnail


def _field(seed: int, size_px: int = 260) -> np.ndarray:
    """A smear-like RGB field: pale background with dark blobs of random sizes."""
    rng = np.random.default_rng(seed)
    grey = np.full((size_px, size_px), 220.0)
    yy, xx = np.mgrid[:size_px, :size_px]
    for _ in range(40):
        cy, cx = rng.uniform(0, size_px, 2)
        r = rng.uniform(4, 16)
        grey -= rng.uniform(40, 120) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    grey = ndimage.gaussian_filter(grey + rng.normal(0, 3, grey.shape), 1.0)
    rgb = np.stack([grey, grey * 0.9, grey * 1.05], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _reencode(rgb: np.ndarray, fmt: str) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _manifest(images: dict[str, np.ndarray], dataset: str = "d") -> pd.DataFrame:
    rows = [
        {
            "image_id": f"{dataset}/{name}",
            "dataset": dataset,
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "pixel_sha256": hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest(),
            "thumbnail": image_thumbnail(rgb).tobytes(),
        }
        for name, rgb in images.items()
    ]
    return pd.DataFrame(rows)


def _copies() -> dict[str, np.ndarray]:
    """An original crop, its shifted, turned, rescaled and re-encoded copies, distinct crops."""
    field = _field(0)
    images = {"orig": field[40:160, 40:160]}
    # 30 px down, 20 px left (25% and 17% of the side), re-encoded as JPEG
    images["shifted"] = _reencode(field[70:190, 20:140], "JPEG")
    # 20 px right, turned a quarter counter-clockwise, saved as TIFF
    images["turned"] = _reencode(np.rot90(field[40:160, 60:180]).copy(), "TIFF")
    # 12% wider field of view, shrunk to 100 px, mirrored, brighter, BMP
    wide = Image.fromarray(field[33:167, 33:167]).resize((100, 100), Image.Resampling.BILINEAR)
    brighter = np.clip(np.asarray(wide, float)[:, ::-1] * 1.05 + 4, 0, 255).astype(np.uint8)
    images["rescaled"] = _reencode(brighter, "BMP")
    for seed in range(1, 7):
        images[f"other{seed}"] = _field(seed)[40:160, 40:160]
    return images


@pytest.fixture(scope="module")
def found():
    return find_duplicates(_manifest(_copies()), max_distance=DEFAULT_MAX_DISTANCE)


def test_copies_are_found_with_their_transform_scale_and_offset(found):
    assert list(found.columns) == DUPLICATE_COLUMNS
    by_pair = {frozenset((a, b)): row for a, b, row in zip(
        found["image_id_a"], found["image_id_b"], found.itertuples(), strict=True)}  # fmt: skip
    shifted = by_pair[frozenset(("d/orig", "d/shifted"))]
    assert (shifted.kind, shifted.transform) == ("shifted", "identity")
    # b's top-left corner lies 30 px down and 20 px left in a; overlap 0.75 * 0.83
    sign = 1 if shifted.image_id_a == "d/orig" else -1
    assert (shifted.dy, shifted.dx) == pytest.approx((30 * sign, -20 * sign), abs=2.5)
    assert shifted.scale == pytest.approx(1.0, abs=0.03)
    assert shifted.overlap == pytest.approx(0.75 * 100 / 120, abs=0.05)
    turned = by_pair[frozenset(("d/orig", "d/turned"))]
    # np.rot90 turned the copy counter-clockwise; turning it back is rot270
    assert turned.transform == ("rot270" if turned.image_id_a == "d/orig" else "rot90")
    assert abs(turned.dx) == pytest.approx(20, abs=2.5)
    assert turned.dy == pytest.approx(0, abs=2.5)
    rescaled = by_pair[frozenset(("d/orig", "d/rescaled"))]
    assert rescaled.transform == "flip_lr"
    expected = 134 / 120 if rescaled.image_id_a == "d/orig" else 120 / 134
    assert rescaled.scale == pytest.approx(expected, abs=0.04)
    assert (found["distance"] <= DEFAULT_MAX_DISTANCE).all()


def test_distinct_crops_are_not_joined(found):
    pairs = set(zip(found["image_id_a"], found["image_id_b"], strict=True))
    assert not any("other" in a or "other" in b for a, b in pairs)
    copies = {"d/orig", "d/shifted", "d/turned", "d/rescaled"}
    assert {x for pair in pairs for x in pair} == copies


def test_exact_and_near_copies_keep_their_kinds():
    field = _field(3)
    crop = field[40:160, 40:160]
    images = {"a": crop, "a_bmp": _reencode(crop, "BMP"), "a_jpeg": _reencode(crop, "JPEG"),
              "b": _field(4)[40:160, 40:160]}  # fmt: skip
    pairs = find_duplicates(_manifest(images), max_distance=DEFAULT_MAX_DISTANCE)
    kinds = {(a, b): k for a, b, k in pairs[["image_id_a", "image_id_b", "kind"]].itertuples(
        index=False)}  # fmt: skip
    assert kinds == {("d/a", "d/a_bmp"): "exact", ("d/a", "d/a_jpeg"): "near"}
    # 0 keeps exact duplicates only
    assert find_duplicates(_manifest(images), max_distance=0)["kind"].tolist() == ["exact"]


def test_adding_images_to_the_index_equals_a_search_from_scratch(tmp_path, monkeypatch):
    from leukflow.data import duplicates

    images = _copies()
    old = _manifest({k: v for k, v in images.items() if k not in ("turned", "other5")})
    everything = pd.concat([old, _manifest({k: images[k] for k in ("turned", "other5")})],
                           ignore_index=True)  # fmt: skip
    scratch = find_duplicates(everything, max_distance=DEFAULT_MAX_DISTANCE)
    find_duplicates(old, max_distance=DEFAULT_MAX_DISTANCE, cache_dir=tmp_path)
    assert index_file(tmp_path).is_file()
    verified = []
    real_verify = duplicates.verify_pairs

    def counting(thumbs, pairs, **kwargs):
        verified.extend(pairs)
        return real_verify(thumbs, pairs, **kwargs)

    monkeypatch.setattr(duplicates, "verify_pairs", counting)
    added = find_duplicates(everything, max_distance=DEFAULT_MAX_DISTANCE, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(added, scratch)
    # only pairs with one of the two new images were aligned (they entered last)
    n_old = len(old)
    assert verified
    assert all(j >= n_old for _, j in verified)
    # an index that holds an image no longer in the run is rebuilt, not trusted
    fewer = everything[everything["image_id"] != "d/other1"].reset_index(drop=True)
    expected = scratch[~scratch[["image_id_a", "image_id_b"]].isin(["d/other1"]).any(axis=1)]
    again = find_duplicates(fewer, max_distance=DEFAULT_MAX_DISTANCE, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, expected.reset_index(drop=True))


def test_an_old_manifest_thumbnail_is_refused_with_the_image_named():
    manifest = _manifest({"a": _field(1)[:64, :64], "b": _field(2)[:64, :64]})
    manifest.loc[0, "thumbnail"] = np.zeros(256, np.float16).tobytes()
    with pytest.raises(ValueError, match="d/a: expected a 64x64 uint8 thumbnail"):
        find_duplicates(manifest, max_distance=DEFAULT_MAX_DISTANCE)


def test_plot_duplicates_draws_the_pairs(tmp_path, found):
    images = _copies()
    for name, rgb in images.items():
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
    manifest = pd.DataFrame({"image_id": [f"d/{n}" for n in images], "root": str(tmp_path),
                             "path": [f"{n}.png" for n in images]})  # fmt: skip
    plot_duplicates(manifest, found, tmp_path / "qa" / "duplicates.png")
    with Image.open(tmp_path / "qa" / "duplicates.png") as im:
        assert im.width > 400
        assert im.height > 200
    plot_duplicates(manifest, found.iloc[:0], tmp_path / "none.png")
    assert (tmp_path / "none.png").stat().st_size > 0


#: Pairs of the real data checked by eye: the same cell, re-cut (Zheng) or in
#: two overlapping fields (BCCD).
ZHENG_PAIRS = [(112, 139), (166, 171), (70, 72), (56, 92), (71, 84), (157, 158), (167, 169),
               (60, 90), (30, 86), (51, 73), (19, 75), (26, 89), (54, 91)]  # fmt: skip
BCCD_PAIRS = [
    (37, 38), (384, 393), (205, 276), (230, 257), (227, 260), (242, 249), (231, 256),
    (386, 391), (206, 278), (382, 395), (244, 247), (223, 263), (226, 261), (204, 277),
    (224, 264), (233, 254), (243, 250), (236, 253), (248, 249), (381, 397), (229, 258),
    (237, 252),
]  # fmt: skip


@pytest.mark.realdata
def test_real_data_pairs_are_exactly_those_checked_by_eye(shared_data):
    from leukflow.data.ingest import ingest_datasets
    from leukflow.evaluate.folds import group_patients

    specs = {
        "zheng": {"format": "zheng", "root": str(shared_data / "segmentation_WBC")},
        "bccd": {"format": "bccd", "root": str(shared_data / "BCCD_Dataset" / "BCCD")},
    }
    manifest, _ = ingest_datasets(specs, min_size_px=32, n_workers=2)
    pairs = find_duplicates(manifest, max_distance=DEFAULT_MAX_DISTANCE, n_workers=2)
    found = {frozenset(p) for p in zip(pairs["image_id_a"], pairs["image_id_b"], strict=True)}
    expected = {frozenset((f"zheng/Dataset 1/{a:03d}", f"zheng/Dataset 1/{b:03d}"))
                for a, b in ZHENG_PAIRS}  # fmt: skip
    field = "bccd/JPEGImages/BloodImage_{:05d}".format
    expected |= {frozenset((field(a), field(b))) for a, b in BCCD_PAIRS}
    assert found == expected
    exact = pairs[pairs["kind"] == "exact"]
    assert exact[["image_id_a", "image_id_b"]].values.tolist() == [
        ["zheng/Dataset 1/112", "zheng/Dataset 1/139"]
    ]
    # every real copy is the cell as it is, re-cut: no flip, scale within 15%
    assert (pairs["transform"] == "identity").all()
    assert pairs["scale"].between(1 / 1.2, 1.2).all()
    # groups stay the size of the true copies: 2, and 3 for BCCD 242/248/249
    sizes = group_patients(manifest, pairs).value_counts()
    assert sizes.max() == 3
    assert (sizes == 3).sum() == 1


def test_an_index_file_lacking_arrays_is_rebuilt(tmp_path, caplog):
    from leukflow.data import cache, duplicates

    images = {k: v for k, v in _copies().items() if k in ("orig", "shifted", "other1")}
    manifest = _manifest(images)
    expected = find_duplicates(manifest, max_distance=DEFAULT_MAX_DISTANCE)
    path = index_file(tmp_path)
    find_duplicates(manifest, max_distance=DEFAULT_MAX_DISTANCE, cache_dir=tmp_path)
    arrays, meta = cache.load_arrays(path)
    # an index written without the keypoints and the scores' overlap (older or damaged)
    cache.save_arrays(path, {k: v for k, v in arrays.items() if k not in ("keys", "overlap")},
                      meta)  # fmt: skip
    with caplog.at_level("WARNING", logger=duplicates.__name__):
        assert duplicates._load_index(path) is None
    assert "lacks keys, overlap" in caplog.text
    again = find_duplicates(manifest, max_distance=DEFAULT_MAX_DISTANCE, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, expected)
    assert set(cache.load_arrays(path)[0]) >= {"keys", "overlap"}

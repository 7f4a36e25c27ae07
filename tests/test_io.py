"""Tests of file formats (leukflow.data.io): images, tables, crop and embedding stores."""

import hashlib
import io
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import zarr
from crafted import png_bomb
from PIL import Image

from leukflow.data.io import (
    InvalidInputError,
    atomic_path,
    open_embeddings,
    open_image,
    read_crops,
    read_image,
    read_table,
    sha256_file,
    write_crops,
    write_embeddings,
    write_image,
    write_table,
)


def _rgb(h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- read_image


def test_read_image_rgb_png_round_trips_exactly(tmp_path):
    rgb = _rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (5, 7, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_read_image_rgba_drops_alpha(tmp_path):
    rgb = _rgb()
    alpha = np.linspace(0, 255, 35).astype(np.uint8).reshape(5, 7, 1)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (5, 7, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)  # colour kept as is, not blended with alpha


def test_read_image_grey_is_repeated_to_three_channels(tmp_path):
    grey = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (5, 7, 3)
    assert out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_read_image_palette_is_expanded_to_rgb(tmp_path):
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]
    index = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    im = Image.fromarray(index, mode="P")
    im.putpalette(palette + [0] * (768 - len(palette)))
    im.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P"
    out = read_image(tmp_path / "p.png")
    expected = np.array(palette, dtype=np.uint8).reshape(4, 3)[index]
    assert out.shape == (2, 4, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_read_image_16bit_grey_is_scaled_by_its_maximum(tmp_path):
    grey16 = np.array([[0, 1000, 2000], [3000, 4000, 0]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")  # a genuine 16-bit file, not converted on save
    out = read_image(tmp_path / "g16.png")
    expected = np.round(grey16 / 4000 * 255).astype(np.uint8)  # [[0, 64, 128], [191, 255, 0]]
    assert out.shape == (2, 3, 3)
    assert out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_read_image_16bit_all_zero_stays_zero(tmp_path):
    Image.fromarray(np.zeros((3, 4), dtype=np.uint16)).save(tmp_path / "z16.png")
    out = read_image(tmp_path / "z16.png")
    assert out.shape == (3, 4, 3)
    assert not out.any()


def test_read_image_missing_file(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file") as info:
        read_image(tmp_path / "nope.png")
    assert info.value.reason == "missing_file"


def test_read_image_directory_is_a_missing_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InvalidInputError, match="no such file") as info:
        read_image(tmp_path / "dir.png")
    assert info.value.reason == "missing_file"


def test_read_image_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"file is empty \(0 bytes\)") as info:
        read_image(tmp_path / "empty.png")
    assert info.value.reason == "empty_file"


def test_read_image_text_file_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a PNG\n" * 10)
    with pytest.raises(InvalidInputError, match="not an image file") as info:
        read_image(tmp_path / "notes.png")
    assert info.value.reason == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_read_image_truncated_file_is_unreadable(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, format=fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="cannot decode image") as info:
        read_image(path)
    assert info.value.reason == "unreadable"
    assert str(path) in str(info.value)


def test_read_image_too_large(tmp_path, monkeypatch):
    Image.fromarray(_rgb(10, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr("leukflow.data.io.MAX_IMAGE_PIXELS", 99)
    with pytest.raises(InvalidInputError, match="decompression bomb") as info:
        read_image(tmp_path / "big.png")
    assert info.value.reason == "too_large"


def test_read_image_decompression_bomb_is_too_large_before_any_decode(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(40_000, 40_000))
    assert bomb.stat().st_size < 1000
    with pytest.raises(InvalidInputError, match=r"bomb\.png: .*decompression bomb") as info:
        read_image(bomb)
    assert info.value.reason == "too_large"


def test_open_image_refuses_above_its_own_limit_below_pillows(tmp_path):
    bomb = io.BytesIO(png_bomb(5_000, 5_000))  # 25 Mpx: Pillow would decode it
    with pytest.raises(InvalidInputError, match=r"up\.png: 5000x5000 = 25,000,000 pixels") as info:
        with open_image(bomb, name="up.png", max_pixels=1_000_000):
            pass
    assert info.value.reason == "too_large"


def test_invalid_input_error_is_a_value_error():
    err = InvalidInputError("some_reason", "some message")
    assert isinstance(err, ValueError)
    assert err.reason == "some_reason"
    assert str(err) == "some message"


def test_write_image_round_trip(tmp_path):
    rgb = _rgb(6, 9, seed=3)
    write_image(rgb, tmp_path / "sub" / "w.png")
    np.testing.assert_array_equal(read_image(tmp_path / "sub" / "w.png"), rgb)
    assert _listing(tmp_path / "sub") == ["w.png"]


# ------------------------------------------------------------------------- tables


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["d/a", "d/b", "d/c"],
            "width": [640, 480, 1],
            "score": [0.25, 1.5, -3.0],
            "flag": [True, False, True],
        }
    )


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_table_round_trip(tmp_path, suffix):
    df = _frame()
    path = tmp_path / "out" / f"table{suffix}"
    write_table(df, path)
    pd.testing.assert_frame_equal(read_table(path), df)
    assert _listing(path.parent) == [path.name]  # no temporary left behind


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_table_replaces_existing_file(tmp_path, suffix):
    path = tmp_path / f"table{suffix}"
    write_table(_frame(), path)
    smaller = _frame().iloc[:1]
    write_table(smaller, path)
    pd.testing.assert_frame_equal(read_table(path), smaller)


def test_csv_round_trip_keeps_numeric_looking_text(tmp_path):
    df = pd.DataFrame(
        {
            "image_id": ["d/a", "d/b"],
            "patient": ["007", "008"],
            "label": ["1", "0"],
            "fold": [0, 1],
        }
    )
    path = tmp_path / "folds.csv"
    write_table(df, path)
    back = read_table(path)
    assert list(back["patient"]) == ["007", "008"]
    assert list(back["label"]) == ["1", "0"]
    assert back["fold"].dtype == np.int64  # folds stay numbers


def test_write_table_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"write_table: unsupported suffix '\.tsv'"):
        write_table(_frame(), tmp_path / "table.tsv")
    assert _listing(tmp_path) == []


def test_read_table_unknown_suffix(tmp_path):
    (tmp_path / "table.xlsx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"read_table: unsupported suffix '\.xlsx'"):
        read_table(tmp_path / "table.xlsx")


# ------------------------------------------------------------------ atomic writes


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp != target
        assert tmp.name == target.name
        tmp.write_text("new")
        assert not target.exists()  # nothing under the final name until the body ends
    assert target.read_text() == "new"
    assert _listing(tmp_path) == ["out.txt"]


def test_atomic_path_leaves_original_untouched_when_body_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("original")

    def body():
        with atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("job killed")

    with pytest.raises(RuntimeError, match="job killed"):
        body()
    assert target.read_text() == "original"
    assert _listing(tmp_path) == ["out.txt"]  # no temporary directory left


def test_atomic_path_replaces_a_directory(tmp_path):
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "old").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert _listing(target) == ["new"]
    assert _listing(tmp_path) == ["store.zarr"]


def test_atomic_path_directory_untouched_when_body_raises(tmp_path):
    target = tmp_path / "store.zarr"
    target.mkdir()
    (target / "old").write_text("old")

    def body():
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "new").write_text("new")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        body()
    assert _listing(target) == ["old"]
    assert _listing(tmp_path) == ["store.zarr"]


# --------------------------------------------------------------------- crop stores


def test_crops_round_trip_with_attrs(tmp_path):
    crops = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "crops.zarr"
    write_crops(crops, path, {"roi_size_px": 8, "source": "test"})
    out = read_crops(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, crops)
    assert dict(zarr.open_array(str(path), mode="r").attrs) == {
        "roi_size_px": 8,
        "source": "test",
    }
    assert _listing(tmp_path) == ["crops.zarr"]


def test_crops_round_trip_more_than_one_chunk(tmp_path):
    crops = np.random.default_rng(2).integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
    write_crops(crops, tmp_path / "c.zarr", {})
    np.testing.assert_array_equal(read_crops(tmp_path / "c.zarr"), crops)


def test_crops_round_trip_empty(tmp_path):
    crops = np.zeros((0, 8, 8, 3), dtype=np.uint8)
    write_crops(crops, tmp_path / "c.zarr", {})
    out = read_crops(tmp_path / "c.zarr")
    assert out.shape == (0, 8, 8, 3)
    assert out.dtype == np.uint8


def test_write_crops_overwrites_existing_store(tmp_path):
    path = tmp_path / "c.zarr"
    write_crops(np.zeros((3, 4, 4, 3), np.uint8), path, {})
    write_crops(np.full((2, 4, 4, 3), 7, np.uint8), path, {})
    np.testing.assert_array_equal(read_crops(path), np.full((2, 4, 4, 3), 7, np.uint8))


@pytest.mark.parametrize(
    "crops",
    [
        np.zeros((2, 8, 8), np.uint8),  # no channel axis
        np.zeros((2, 8, 8, 4), np.uint8),  # RGBA
        np.zeros((8, 8, 3), np.uint8),  # a single crop without the n axis
        np.zeros((2, 8, 8, 3), np.float32),  # wrong dtype
        np.zeros((2, 8, 8, 3), np.uint16),
    ],
    ids=["3d", "rgba", "single", "float32", "uint16"],
)
def test_write_crops_rejects_bad_shape_or_dtype(tmp_path, crops):
    with pytest.raises(ValueError, match=r"expected \(n, S, S, 3\) uint8 crops"):
        write_crops(crops, tmp_path / "c.zarr", {})
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------- embedding stores


def test_embeddings_round_trip_with_attrs(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {"fold_0": rng.normal(size=(6, 5)), "fold_1": rng.normal(size=(6, 5))}
    path = tmp_path / "emb.zarr"
    write_embeddings(
        arrays,
        path,
        {"arch": "resnet18", "input_size_px": 64},
        {"fold_0": {"weights_sha256": "abc"}, "fold_1": {"mean": [0.1, 0.2, 0.3]}},
    )
    stored = open_embeddings(path)
    assert sorted(stored) == ["fold_0", "fold_1"]
    for name, emb in arrays.items():
        assert stored[name].dtype == np.float32
        assert stored[name].shape == (6, 5)
        np.testing.assert_array_equal(stored[name][:], emb.astype(np.float32))
        np.testing.assert_array_equal(stored[name][2:4], emb[2:4].astype(np.float32))
    assert dict(stored["fold_0"].attrs) == {"weights_sha256": "abc"}
    assert dict(stored["fold_1"].attrs) == {"mean": [0.1, 0.2, 0.3]}
    # open_embeddings returns the arrays only; the group attributes sit on the zarr group.
    assert dict(zarr.open_group(str(path), mode="r").attrs) == {
        "arch": "resnet18",
        "input_size_px": 64,
    }
    assert _listing(tmp_path) == ["emb.zarr"]


def test_embeddings_without_array_attrs(tmp_path):
    write_embeddings({"fold_0": np.ones((2, 3), np.float32)}, tmp_path / "e.zarr", {"v": 1})
    stored = open_embeddings(tmp_path / "e.zarr")
    assert dict(stored["fold_0"].attrs) == {}
    np.testing.assert_array_equal(stored["fold_0"][:], np.ones((2, 3), np.float32))


def test_open_embeddings_ignores_snakemake_timestamp(tmp_path):
    path = tmp_path / "e.zarr"
    write_embeddings({"fold_0": np.ones((2, 3), np.float32)}, path, {})
    (path / ".snakemake_timestamp").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stored = open_embeddings(path)
    assert list(stored) == ["fold_0"]


def test_open_embeddings_is_read_only(tmp_path):
    write_embeddings({"fold_0": np.zeros((2, 3), np.float32)}, tmp_path / "e.zarr", {})
    stored = open_embeddings(tmp_path / "e.zarr")
    with pytest.raises((ValueError, PermissionError, OSError)):
        stored["fold_0"][:] = 1.0
    np.testing.assert_array_equal(open_embeddings(tmp_path / "e.zarr")["fold_0"][:], 0.0)


def test_write_embeddings_rejects_non_2d_and_keeps_old_store(tmp_path):
    path = tmp_path / "e.zarr"
    write_embeddings({"fold_0": np.ones((2, 3), np.float32)}, path, {"v": 1})
    with pytest.raises(ValueError, match=r"write_embeddings: fold_1 must be 2-D; got \(2, 3, 4\)"):
        write_embeddings(
            {"fold_0": np.zeros((2, 3)), "fold_1": np.zeros((2, 3, 4))}, path, {"v": 2}
        )
    assert dict(zarr.open_group(str(path), mode="r").attrs) == {"v": 1}
    stored = open_embeddings(path)
    assert list(stored) == ["fold_0"]
    np.testing.assert_array_equal(stored["fold_0"][:], np.ones((2, 3), np.float32))
    assert _listing(tmp_path) == ["e.zarr"]


# ------------------------------------------------------------------------- sha256


@pytest.mark.parametrize("size", [0, 1, 5000])
def test_sha256_file_matches_hashlib(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == expected
    assert sha256_file(path, block_size=7) == expected  # several blocks


def test_crop_store_grows_by_linking_the_parts_it_holds(tmp_path):
    from leukflow.data.grow import files_digest, grow_crops, mirror_dir

    rng = np.random.default_rng(0)
    parts = []
    for b, n in enumerate([200, 150, 7]):
        crops = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        write_crops(crops, tmp_path / f"b{b}.zarr", {})
        parts.append((files_digest([tmp_path / f"b{b}.zarr"]), tmp_path / f"b{b}.zarr"))
    out, mirror = tmp_path / "crops.zarr", mirror_dir(tmp_path / "cache", "d/crops")
    grow = lambda ps: grow_crops(out, ps, roi_size_px=8, attrs={"m": 1}, mirror=mirror)  # noqa: E731
    assert grow(parts[:2]) == {"parts_kept": 0, "rows_kept": 0, "rows_written": 350}
    assert grow(parts) == {"parts_kept": 2, "rows_kept": 350, "rows_written": 7}
    whole = np.concatenate([read_crops(p) for _, p in parts])
    np.testing.assert_array_equal(read_crops(out), whole)
    # a part made again (new digest) is written again, with every part after it
    write_crops(read_crops(parts[1][1])[::-1].copy(), parts[1][1], {})
    parts[1] = (files_digest([parts[1][1]]), parts[1][1])
    assert grow(parts) == {"parts_kept": 1, "rows_kept": 200, "rows_written": 157}
    whole = np.concatenate([read_crops(p) for _, p in parts])
    np.testing.assert_array_equal(read_crops(out), whole)
    # an append that fails half-way leaves the store and its mirror as they were
    before = read_crops(out)
    bad = tmp_path / "bad.zarr"
    write_crops(np.zeros((3, 9, 9, 3), np.uint8), bad, {})
    with pytest.raises(ValueError, match="expected"):
        grow([*parts, ("x", bad)])
    np.testing.assert_array_equal(read_crops(out), before)
    assert grow(parts)["parts_kept"] == 3
    # other attrs: written whole
    assert grow_crops(out, parts, roi_size_px=8, attrs={"m": 2}, mirror=mirror)["rows_kept"] == 0
    # a parts record of another shape (a crafted or foreign cache): written whole, same crops
    assert grow(parts)["rows_kept"] == 0  # back to attrs {"m": 1}
    assert grow(parts)["rows_kept"] == len(whole)
    record = json.loads((mirror / "parts.json").read_text())
    for bad_parts in ([[parts[0][0], "200"]], [[parts[0][0], -5]], {"x": 1}):
        (mirror / "parts.json").write_text(json.dumps({**record, "parts": bad_parts}))
        assert grow(parts)["rows_kept"] == 0
        np.testing.assert_array_equal(read_crops(out), whole)

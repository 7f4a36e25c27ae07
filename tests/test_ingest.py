"""Tests of ingest (leukflow.data.ingest): dataset folders -> manifest + rejects."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from crafted import png_bomb
from PIL import Image

from leukflow.data.datasets import RECORD_COLUMNS, list_demo, list_folders
from leukflow.data.ingest import MANIFEST_COLUMNS, REJECT_COLUMNS, ingest_datasets, ingest_images
from leukflow.data.io import InvalidInputError

MIN_SIZE = 16


def _png(path: Path, h: int, w: int, seed: int = 0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _demo_folder(root: Path) -> dict:
    """A demo-layout dataset with one good file per label and one of each defect.

    Returns the expected outcome per path: ``("ok", (w, h, sha256))`` or
    ``("reject", reason)``.
    """
    expected = {}
    for i, (label, (h, w)) in enumerate([("ALL", (20, 30)), ("normal", (24, 18))]):
        rel = f"images/good_{i}.png"
        data = _png(root / rel, h, w, seed=i)
        expected[rel] = ("ok", (w, h, hashlib.sha256(data).hexdigest(), label, f"p{i}"))
    # A good image in a sub-folder, to check image ids keep the folder.
    data = _png(root / "images/sub/deep.png", 16, 16, seed=9)
    expected["images/sub/deep.png"] = (
        "ok",
        (16, 16, hashlib.sha256(data).hexdigest(), "ALL", "p2"),
    )
    good = _png(root / "images/corrupt.png", 40, 40, seed=5)
    (root / "images/corrupt.png").write_bytes(good[: len(good) // 2])
    expected["images/corrupt.png"] = ("reject", "unreadable")
    (root / "images/empty.png").write_bytes(b"")
    expected["images/empty.png"] = ("reject", "empty_file")
    (root / "images/text.png").write_text("not an image")
    expected["images/text.png"] = ("reject", "not_an_image")
    (root / "images/bomb.png").write_bytes(png_bomb())
    expected["images/bomb.png"] = ("reject", "too_large")
    _png(root / "images/tiny.png", MIN_SIZE - 1, 50, seed=6)
    expected["images/tiny.png"] = ("reject", "too_small")
    _png(root / "images/unlisted.png", 20, 20, seed=7)
    expected["images/unlisted.png"] = ("reject", "missing_label")
    expected["images/gone.png"] = ("reject", "missing_file")  # listed, never written
    _png(root / "images/nolabel.png", 20, 20, seed=8)
    expected["images/nolabel.png"] = ("reject", "missing_label")  # listed, empty label
    (root / "images/readme.txt").write_text("not a candidate: wrong suffix")

    lines = ["image,label,patient"]
    for rel, (kind, info) in expected.items():
        if rel == "images/unlisted.png":
            continue
        if rel == "images/nolabel.png":
            lines.append(f"{rel},,p3")
        elif kind == "ok":
            lines.append(f"{rel},{info[3]},{info[4]}")
        else:
            lines.append(f"{rel},ALL,p9")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return expected


@pytest.fixture
def demo_root(tmp_path):
    root = tmp_path / "demo"
    return root, _demo_folder(root)


def test_ingest_demo_every_file_in_exactly_one_table(demo_root):
    root, expected = demo_root
    manifest, rejects = ingest_datasets(
        {"demo": {"format": "demo", "root": str(root)}}, min_size_px=MIN_SIZE
    )
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert list(rejects.columns) == REJECT_COLUMNS
    in_manifest, in_rejects = list(manifest["path"]), list(rejects["path"])
    assert len(set(in_manifest)) == len(in_manifest)
    assert len(set(in_rejects)) == len(in_rejects)
    assert not set(in_manifest) & set(in_rejects)
    assert set(in_manifest) | set(in_rejects) == set(expected)

    ok = {rel for rel, (kind, _) in expected.items() if kind == "ok"}
    assert set(in_manifest) == ok
    reasons = dict(zip(rejects["path"], rejects["reason"], strict=True))
    assert reasons == {rel: info for rel, (kind, info) in expected.items() if kind == "reject"}
    assert (rejects["dataset"] == "demo").all()
    assert rejects["message"].str.len().gt(0).all()
    assert "readme.txt" not in " ".join(in_manifest + in_rejects)


def test_ingest_demo_manifest_values(demo_root):
    root, expected = demo_root
    manifest, _ = ingest_datasets(
        {"demo": {"format": "demo", "root": str(root)}}, min_size_px=MIN_SIZE
    )
    for row in manifest.itertuples(index=False):
        w, h, sha, label, patient = expected[row.path][1]
        assert (row.width, row.height) == (w, h), row.path
        assert row.sha256 == sha
        assert row.label == label
        assert row.patient == patient
        assert row.dataset == "demo"
        assert row.root == str(root)
        assert row.image_id == "demo/" + row.path.removesuffix(".png")
        assert row.mask_path == ""
        assert row.annotations == "{}"
    assert "demo/images/sub/deep" in set(manifest["image_id"])


def test_ingest_rejects_messages_name_the_file(demo_root):
    root, _ = demo_root
    _, rejects = ingest_datasets(
        {"demo": {"format": "demo", "root": str(root)}}, min_size_px=MIN_SIZE
    )
    for row in rejects.itertuples(index=False):
        assert row.path in row.message, row
    tiny = rejects.loc[rejects["path"] == "images/tiny.png", "message"].item()
    assert "50x15" in tiny
    assert f"min_size_px={MIN_SIZE}" in tiny


def test_min_size_applies_to_the_shorter_side(tmp_path):
    _png(tmp_path / "wide.png", MIN_SIZE, 100)
    _png(tmp_path / "tall.png", 100, MIN_SIZE - 1)
    records = pd.DataFrame(
        {"path": ["wide.png", "tall.png"], "label": ["a", "b"], "patient": ["1", "2"]}
    )
    manifest, rejects = ingest_images(records, dataset="d", root=tmp_path, min_size_px=MIN_SIZE)
    assert list(manifest["path"]) == ["wide.png"]
    # records without mask and annotation columns: none
    assert manifest[["mask_path", "annotations"]].values.tolist() == [["", "{}"]]
    assert list(rejects["path"]) == ["tall.png"]
    assert list(rejects["reason"]) == ["too_small"]


def test_ingest_images_with_no_good_image_gives_empty_manifest(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    records = pd.DataFrame({"path": ["empty.png"], "label": ["a"], "patient": ["1"]})
    manifest, rejects = ingest_images(records, dataset="d", root=tmp_path, min_size_px=1)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 0
    assert list(rejects["reason"]) == ["empty_file"]
    # typed even when empty: a dataset with no usable image must not turn sizes into floats
    assert manifest["width"].dtype == np.int64
    assert manifest["height"].dtype == np.int64


def test_labels_row_without_image_is_rejected_not_a_crash(tmp_path):
    _png(tmp_path / "images/a.png", 20, 20)
    (tmp_path / "labels.csv").write_text("image,label,patient\nimages/a.png,ALL,p1\n,ALL,p2\n")
    manifest, rejects = ingest_datasets(
        {"d": {"format": "demo", "root": str(tmp_path)}}, min_size_px=MIN_SIZE
    )
    assert list(manifest["path"]) == ["images/a.png"]
    assert len(rejects) == 1


def test_list_demo_missing_columns(tmp_path):
    (tmp_path / "labels.csv").write_text("image,label\na.png,ALL\n")
    with pytest.raises(InvalidInputError, match=r"missing columns \['patient'\]") as info:
        list_demo(tmp_path)
    assert info.value.reason == "bad_label_table"


def test_list_demo_keeps_patient_ids_as_text(tmp_path):
    _png(tmp_path / "a.png", 20, 20)
    (tmp_path / "labels.csv").write_text("image,label,patient\na.png,ALL,007\n")
    records, unlabelled = list_demo(tmp_path)
    assert records.to_dict("records") == [
        {"path": "a.png", "label": "ALL", "patient": "007", "mask_path": "", "annotations": "{}"}
    ]
    assert len(unlabelled) == 0


def _folders_dataset(root: Path) -> None:
    _png(root / "ALL/a.png", 20, 20, seed=1)
    _png(root / "ALL/nested/b.jpg", 20, 20, seed=2)  # wrong content for .jpg is fine for PIL
    _png(root / "HEM/c.png", 20, 20, seed=3)
    (root / "HEM/notes.txt").write_text("ignored")
    _png(root / "stray.png", 20, 20, seed=4)  # an image outside any class folder


def test_list_folders_one_class_per_subfolder(tmp_path):
    _folders_dataset(tmp_path)
    records, unlabelled = list_folders(tmp_path)
    assert records[["path", "label", "patient"]].to_dict("records") == [
        {"path": "ALL/a.png", "label": "ALL", "patient": "ALL/a.png"},
        {"path": "ALL/nested/b.jpg", "label": "ALL", "patient": "ALL/nested/b.jpg"},
        {"path": "HEM/c.png", "label": "HEM", "patient": "HEM/c.png"},
    ]
    assert (records["mask_path"] == "").all()
    assert (records["annotations"] == "{}").all()
    assert list(unlabelled.columns) == ["path", "reason", "message"]
    assert list(unlabelled["path"]) == ["stray.png"]
    assert list(unlabelled["reason"]) == ["missing_label"]


def test_list_folders_empty_root(tmp_path):
    records, unlabelled = list_folders(tmp_path)
    assert list(records.columns) == RECORD_COLUMNS
    assert len(records) == 0
    assert len(unlabelled) == 0


def test_ingest_datasets_combines_two_datasets(tmp_path, demo_root):
    demo, expected = demo_root
    folders = tmp_path / "folders"
    _folders_dataset(folders)
    manifest, rejects = ingest_datasets(
        {
            "demo": {"format": "demo", "root": str(demo)},
            "cnmc": {"format": "folders", "root": str(folders)},
        },
        min_size_px=MIN_SIZE,
    )
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert list(rejects.columns) == REJECT_COLUMNS
    n_ok = sum(kind == "ok" for kind, _ in expected.values())
    assert list(manifest["dataset"]) == ["demo"] * n_ok + ["cnmc"] * 3
    assert manifest["image_id"].is_unique
    cnmc = manifest[manifest["dataset"] == "cnmc"]
    assert list(cnmc["image_id"]) == ["cnmc/ALL/a", "cnmc/ALL/nested/b", "cnmc/HEM/c"]
    assert list(cnmc["label"]) == ["ALL", "ALL", "HEM"]
    assert (cnmc["root"] == str(folders)).all()
    assert set(rejects.loc[rejects["dataset"] == "cnmc", "path"]) == {"stray.png"}
    assert (rejects["dataset"] == "demo").sum() == len(expected) - n_ok


def test_ingest_datasets_without_rejects(tmp_path):
    _png(tmp_path / "A/a.png", 20, 20)
    _png(tmp_path / "B/b.png", 20, 20)
    manifest, rejects = ingest_datasets(
        {"f": {"format": "folders", "root": str(tmp_path)}}, min_size_px=MIN_SIZE
    )
    assert list(manifest["image_id"]) == ["f/A/a", "f/B/b"]
    assert list(rejects.columns) == REJECT_COLUMNS
    assert len(rejects) == 0


def test_ingest_datasets_duplicate_image_id(tmp_path):
    _png(tmp_path / "A/x.png", 20, 20)
    _png(tmp_path / "A/x.bmp", 20, 20)  # same id "f/A/x" once the suffix is dropped
    with pytest.raises(InvalidInputError, match="several files map to one image id") as info:
        ingest_datasets({"f": {"format": "folders", "root": str(tmp_path)}}, min_size_px=1)
    assert info.value.reason == "duplicate_id"


def test_image_without_patient_id_is_its_own_group(tmp_path):
    _png(tmp_path / "a.png", 20, 20)
    _png(tmp_path / "b.png", 20, 20)
    (tmp_path / "labels.csv").write_text("image,label,patient\na.png,ALL,\nb.png,ALL,\n")
    manifest, rejects = ingest_datasets(
        {"d": {"format": "demo", "root": str(tmp_path)}}, min_size_px=MIN_SIZE
    )
    assert list(manifest["patient"]) == ["a.png", "b.png"]
    assert len(rejects) == 0


def test_find_duplicates_exact_near_and_distinct(tmp_path):
    from leukflow.data.duplicates import find_duplicates

    rng = np.random.default_rng(0)
    base = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    other = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).save(tmp_path / "a.png")
    Image.fromarray(base).save(tmp_path / "a_copy.bmp")  # same pixels, other format
    Image.fromarray(np.clip(base.astype(int) + 2, 0, 255).astype(np.uint8)).save(
        tmp_path / "a_brighter.png"
    )
    Image.fromarray(other).save(tmp_path / "b.png")
    names = ["a.png", "a_copy.bmp", "a_brighter.png", "b.png"]
    records = pd.DataFrame({"path": names, "label": "x", "patient": names})
    manifest, _ = ingest_images(records, dataset="d", root=tmp_path, min_size_px=1)
    manifest["image_id"] = names
    pairs = find_duplicates(manifest, max_distance=0.005)
    found = {
        (a, b): (k, d)
        for a, b, k, d in pairs[["image_id_a", "image_id_b", "kind", "distance"]].itertuples(
            index=False
        )
    }
    assert found[("a.png", "a_copy.bmp")] == ("exact", 0.0)
    assert found[("a.png", "a_brighter.png")][0] == "near"
    assert not any("b.png" in pair for pair in found)
    assert len(find_duplicates(manifest, max_distance=0.0)) == 1


def test_converted_modes_are_noted_and_unconvertible_rejected(tmp_path, monkeypatch):
    grey16 = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "deep.png")
    Image.new("P", (40, 40), 3).save(tmp_path / "palette.png")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(tmp_path / "print.jpg")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "plain.png")
    names = ["deep.png", "palette.png", "print.jpg", "plain.png"]
    records = pd.DataFrame({"path": names, "label": "x", "patient": names})
    manifest, rejects = ingest_images(records, dataset="d", root=tmp_path, min_size_px=1)
    assert len(rejects) == 0
    notes = dict(zip(manifest["path"], manifest["note"], strict=True))
    assert notes == {
        "deep.png": "converted from I;16",
        "palette.png": "converted from P",
        "print.jpg": "converted from CMYK",
        "plain.png": "",
    }

    def refuse(self, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    _, rejects = ingest_images(records.iloc[1:2], dataset="d", root=tmp_path, min_size_px=1)
    assert rejects[["path", "reason"]].values.tolist() == [["palette.png", "unsupported_mode"]]
    assert "cannot convert mode P" in rejects["message"].iloc[0]


def test_parallel_ingest_equals_serial(tmp_path):
    rng = np.random.default_rng(1)
    names = []
    for i in range(40):
        Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        names.append(f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"")
    records = pd.DataFrame({"path": [*names, "bad.png"], "label": "x", "patient": "p"})
    serial = ingest_images(records, dataset="d", root=tmp_path, min_size_px=1, n_workers=1)
    parallel = ingest_images(records, dataset="d", root=tmp_path, min_size_px=1, n_workers=2)
    pd.testing.assert_frame_equal(serial[0], parallel[0])
    pd.testing.assert_frame_equal(serial[1], parallel[1])
    assert list(parallel[1]["reason"]) == ["empty_file"]


def test_count_summary_line():
    from leukflow.data.ingest import count_summary

    manifest = pd.DataFrame({"note": ["", "converted from P", ""]})
    rejects = pd.DataFrame({"reason": ["unreadable", "too_small", "unreadable"]})
    assert count_summary(manifest, rejects) == (
        "kept 3, rejected 3 by reason (unreadable: 2, too_small: 1), "
        "noted 1 (conversions to 8-bit RGB, TIFF pages, links out: see the note column)"
    )
    assert count_summary(manifest, rejects, ignored={".txt": 2, ".db": 1}).endswith(
        "see the note column); ignored 3 other files: .txt 2, .db 1"
    )


def test_ingest_reads_measurements_of_known_content_from_the_cache(tmp_path, demo_root):
    from leukflow.data.datasets import list_dataset

    root, _ = demo_root
    records, _ = list_dataset("demo", root)
    kwargs = {"dataset": "demo", "root": root, "min_size_px": MIN_SIZE}
    fresh, fresh_rejects = ingest_images(records, **kwargs)
    first, _ = ingest_images(records, cache_dir=tmp_path / "cache", **kwargs)
    # every image that decodes is cached, the too small ones included
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == len(fresh) + (fresh_rejects["reason"] == "too_small").sum()
    again, _ = ingest_images(records, cache_dir=tmp_path / "cache", **kwargs)
    pd.testing.assert_frame_equal(first, fresh)
    pd.testing.assert_frame_equal(again, fresh)
    # the size check still applies to cached measurements
    _, rejects = ingest_images(
        records, cache_dir=tmp_path / "cache", **{**kwargs, "min_size_px": 10_000}
    )
    assert (rejects["reason"] == "too_small").sum() == len(entries)


def test_ingest_does_not_read_a_file_unchanged_since_it_was_hashed(tmp_path, monkeypatch):
    from leukflow.data import ingest

    for name in ("a", "b"):
        Image.new("RGB", (40, 40), (10, 20, 30) if name == "a" else (1, 2, 3)).save(
            tmp_path / f"{name}.png"
        )
    records = pd.DataFrame({"path": ["a.png", "b.png"], "label": "x", "patient": ["p", "q"]})
    kwargs = {"dataset": "d", "root": tmp_path, "min_size_px": 8, "cache_dir": tmp_path / "c"}
    first, _ = ingest_images(records, **kwargs)
    hashed = []
    real = ingest.sha256_file
    monkeypatch.setattr(ingest, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    again, _ = ingest_images(records, **kwargs)
    assert hashed == []  # same path, size and mtime: neither hashed nor decoded
    pd.testing.assert_frame_equal(again, first)
    # an edited file (new mtime) is hashed again and gets its new hash
    Image.new("RGB", (40, 40), (200, 0, 0)).save(tmp_path / "b.png")
    edited, _ = ingest_images(records, **kwargs)
    assert hashed == ["b.png"]
    assert edited["sha256"].iloc[1] == real(tmp_path / "b.png") != first["sha256"].iloc[1]


def test_twin_datasets_get_their_datasets_pairs_not_their_own_copies(tmp_path):
    from leukflow.data.duplicates import find_duplicates

    rng = np.random.default_rng(1)
    base = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(base).save(tmp_path / "a.png")
    Image.fromarray(base).save(tmp_path / "a_copy.bmp")
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    records = pd.DataFrame({"path": ["a.png", "a_copy.bmp", "b.png"], "label": "x",
                            "patient": ["p1", "p2", "p3"]})  # fmt: skip
    tables = [ingest_images(records, dataset=d, root=tmp_path, min_size_px=1)[0]
              for d in ("d", "d_random", "e")]  # fmt: skip
    manifest = pd.concat(tables, ignore_index=True)
    twins = {"d_random": "d"}
    pairs = find_duplicates(manifest, max_distance=0.005, twins=twins)
    found = sorted(map(tuple, pairs[["image_id_a", "image_id_b"]].values.tolist()))
    # within d, within its twin, and across the two configured datasets d and e;
    # never an image of d against its own copy in d_random
    assert found == [
        ("d/a", "d/a_copy"), ("d/a", "e/a"), ("d/a", "e/a_copy"), ("d/b", "e/b"),
        ("d_random/a", "d_random/a_copy"),
    ]  # fmt: skip
    # a twin's image is never searched, even against another dataset's copy
    alone = manifest[manifest["image_id"].isin(["d_random/a", "e/a"])]
    assert find_duplicates(alone, max_distance=0.005, twins=twins).empty

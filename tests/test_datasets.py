"""Tests of the dataset adapters (leukflow.data.datasets) and their path through ingest.

ALL-IDB1, ALL-IDB2 and C-NMC cannot be shipped, so their tests build small
fixtures with the real names and layout; BCCD and segmentation_WBC are also
checked on the real downloads in ../shared/data (skipped when absent).
"""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukflow.core.config import ConfigError, validate_config
from leukflow.data.datasets import (
    LISTERS,
    RECORD_COLUMNS,
    apply_label_map,
    encode_annotations,
    list_allidb1,
    list_dataset,
    list_manifest,
    list_zheng,
    read_xyc,
)
from leukflow.data.ingest import MANIFEST_COLUMNS, REJECT_COLUMNS, ingest_datasets
from leukflow.data.io import InvalidInputError

MIN_SIZE = 8

WHITE, NUCLEUS, CYTOPLASM = (255, 255, 255), (0, 255, 255), (0, 0, 255)


def _image(path: Path, h: int = 24, w: int = 32, seed: int = 0) -> Path:
    """Write a random RGB image in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _idb2_mask(path: Path, h: int, w: int) -> Path:
    """An ALL-IDB2-style expert mask: white background, blue cytoplasm, cyan nucleus."""
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h / 2) ** 2 + (xx - w / 2) ** 2
    mask = np.empty((h, w, 3), dtype=np.uint8)
    mask[:] = WHITE
    mask[r2 < (min(h, w) * 0.45) ** 2] = CYTOPLASM
    mask[r2 < (min(h, w) * 0.25) ** 2] = NUCLEUS
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def _ingest(name: str, spec: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    return ingest_datasets({name: spec}, min_size_px=MIN_SIZE)


def _reasons(rejects: pd.DataFrame) -> dict[str, str]:
    return dict(zip(rejects["path"], rejects["reason"], strict=True))


# ------------------------------------------------------------------ ALL-IDB1


@pytest.fixture
def allidb1(tmp_path) -> Path:
    root = tmp_path / "ALL_IDB1"
    for i, name in enumerate(["Im001_1", "Im002_1", "Im003_0", "Im004_0", "Im005_1"]):
        _image(root / f"{name}.jpg", seed=i)
    (root / "Im001_1.xyc").write_text("100 200\n\n 300\t401 \n")
    (root / "Im002_1.xyc").write_text("7 8\n")
    (root / "Im003_0.xyc").write_text("\n")  # healthy smear: no blasts marked
    # Im004_0 has no .xyc at all; Im005_1's is broken
    (root / "Im005_1.xyc").write_text("12 13\n12 abc\n")
    _image(root / "Im006_2.jpg", seed=6)  # L is neither 0 nor 1
    _image(root / "notes.jpg", seed=7)
    (root / "README.txt").write_text("not an image")
    return root


def test_allidb1_labels_points_and_groups(allidb1):
    manifest, rejects = _ingest("idb1", {"format": "allidb1", "root": str(allidb1)})
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert manifest["label"].value_counts().to_dict() == {"ALL": 2, "healthy": 2}
    by_path = manifest.set_index("path")
    assert by_path.loc["Im001_1.jpg", "label"] == "ALL"
    assert by_path.loc["Im003_0.jpg", "label"] == "healthy"
    assert json.loads(by_path.loc["Im001_1.jpg", "annotations"]) == {
        "points": [[100, 200], [300, 401]]
    }
    assert json.loads(by_path.loc["Im002_1.jpg", "annotations"]) == {"points": [[7, 8]]}
    assert json.loads(by_path.loc["Im003_0.jpg", "annotations"]) == {"points": []}
    assert json.loads(by_path.loc["Im004_0.jpg", "annotations"]) == {}
    # no patient ids in ALL-IDB1: each smear is its own group
    assert (manifest["patient"] == manifest["path"]).all()
    assert (manifest["mask_path"] == "").all()
    assert list(manifest["image_id"]) == [
        "idb1/Im001_1", "idb1/Im002_1", "idb1/Im003_0", "idb1/Im004_0",
    ]  # fmt: skip
    assert _reasons(rejects) == {
        "Im005_1.jpg": "unreadable",
        "Im006_2.jpg": "missing_label",
        "notes.jpg": "missing_label",
    }
    bad_xyc = rejects.loc[rejects["path"] == "Im005_1.jpg", "message"].item()
    assert "Im005_1.xyc" in bad_xyc
    assert "line 2" in bad_xyc


def test_allidb1_xyc_in_its_own_folder(tmp_path):
    # the download's layout: im/ImNNN_L.jpg and xyc/ImNNN_L.xyc
    _image(tmp_path / "im" / "Im010_1.jpg")
    (tmp_path / "xyc").mkdir()
    (tmp_path / "xyc" / "Im010_1.xyc").write_text("5 6\n9 10\n")
    records, rejects = list_allidb1(tmp_path)
    assert records.to_dict("records") == [
        {
            "path": "im/Im010_1.jpg",
            "label": "ALL",
            "patient": "im/Im010_1.jpg",
            "mask_path": "",
            "annotations": '{"points": [[5, 6], [9, 10]]}',
        }
    ]
    assert len(rejects) == 0


def test_read_xyc_whitespace_blank_lines_and_errors(tmp_path):
    path = tmp_path / "a.xyc"
    path.write_text("\n1 2\r\n\n  3.5\t4  \n\n")
    assert read_xyc(path) == [[1, 2], [3.5, 4]]
    path.write_text("1 2 3\n")
    with pytest.raises(InvalidInputError, match=r"line 1: expected two numbers") as info:
        read_xyc(path)
    assert info.value.reason == "unreadable"


def test_encode_annotations():
    assert encode_annotations() == "{}"
    assert json.loads(encode_annotations(boxes=[[1.0, 2.0, 3.5, 4.0]])) == {
        "boxes": [[1, 2, 3.5, 4]]
    }
    assert encode_annotations(points=[]) == '{"points": []}'
    with pytest.raises(ValueError, match="not both"):
        encode_annotations(boxes=[], points=[])


# ------------------------------------------------------------------ ALL-IDB2


@pytest.fixture
def allidb2(tmp_path) -> Path:
    root = tmp_path / "ALL_IDB2"
    for i, name in enumerate(["Im001_1", "Im002_1", "Im003_0", "Im004_0", "Im005_0"]):
        _image(root / "img" / f"{name}.tif", 40, 40, seed=i)
    # masks under root, with the images' own names: never image candidates
    for name in ["Im001_1", "Im002_1", "Im003_0"]:
        _idb2_mask(root / "masks" / f"{name}.tif", 40, 40)
    _idb2_mask(root / "masks" / "Im004_0.tif", 40, 36)  # wrong size
    # Im005_0 has no mask
    return root


def test_allidb2_labels_and_masks(allidb2):
    spec = {"format": "allidb2", "root": str(allidb2), "masks": str(allidb2 / "masks")}
    manifest, rejects = _ingest("idb2", spec)
    assert dict(zip(manifest["path"], manifest["label"], strict=True)) == {
        "img/Im001_1.tif": "ALL",
        "img/Im002_1.tif": "ALL",
        "img/Im003_0.tif": "healthy",
        "img/Im005_0.tif": "healthy",
    }
    assert dict(zip(manifest["path"], manifest["mask_path"], strict=True)) == {
        "img/Im001_1.tif": "masks/Im001_1.tif",
        "img/Im002_1.tif": "masks/Im002_1.tif",
        "img/Im003_0.tif": "masks/Im003_0.tif",
        "img/Im005_0.tif": "",
    }
    assert (manifest["patient"] == manifest["path"]).all()
    assert _reasons(rejects) == {"img/Im004_0.tif": "mask_size_mismatch"}
    message = rejects["message"].item()
    assert "40x40" in message
    assert "36x40" in message
    assert "masks/Im004_0.tif" in message
    # the mask files are read back with their exact colours
    mask = np.asarray(Image.open(allidb2 / manifest["mask_path"].iloc[0]))
    assert {tuple(c) for c in mask.reshape(-1, 3)} == {WHITE, NUCLEUS, CYTOPLASM}


def test_allidb2_masks_folder_outside_root(allidb2, tmp_path):
    outside = tmp_path / "idb2_masks"
    _idb2_mask(outside / "Im003_0.png", 40, 40)
    spec = {"format": "allidb2", "root": str(allidb2 / "img"), "masks": str(outside)}
    manifest, rejects = _ingest("idb2", spec)
    masked = manifest[manifest["mask_path"] != ""]
    assert list(masked["path"]) == ["Im003_0.tif"]
    assert list(masked["mask_path"]) == ["../../idb2_masks/Im003_0.png"]
    assert (Path(masked["root"].item()) / masked["mask_path"].item()).is_file()
    assert len(manifest) == 5
    assert len(rejects) == 0


def test_allidb2_without_masks_and_a_missing_masks_folder(allidb2):
    records, rejects = list_dataset("allidb2", allidb2 / "img")
    assert len(records) == 5
    assert len(rejects) == 0
    assert (records["mask_path"] == "").all()
    with pytest.raises(InvalidInputError, match="allidb2 option masks: expected a folder"):
        list_dataset("allidb2", allidb2, masks=allidb2 / "nowhere")


# ------------------------------------------------------------------ C-NMC 2019


CNMC_FILES = {
    "fold_0/all/UID_11_10_1_all.bmp": ("ALL", "11"),
    "fold_0/all/UID_11_11_2_all.bmp": ("ALL", "11"),
    "fold_0/all/UID_12_3_1_all.bmp": ("ALL", "12"),
    "fold_0/hem/UID_H10_43_1_hem.bmp": ("healthy", "H10"),
    "fold_1/all/UID_13_1_1_all.bmp": ("ALL", "13"),
    "fold_1/hem/UID_H10_44_1_hem.bmp": ("healthy", "H10"),
    "fold_1/hem/UID_H22_1_1_hem.bmp": ("healthy", "H22"),
    "fold_2/hem/UID_H23_9_3_hem.bmp": ("healthy", "H23"),
}


@pytest.fixture
def cnmc(tmp_path) -> Path:
    root = tmp_path / "C-NMC_training_data"
    for i, rel in enumerate(CNMC_FILES):
        _image(root / rel, 30, 30, seed=i)
    _image(root / "fold_2/all/scan.bmp", 30, 30)  # no patient field
    _image(root / "fold_0/UID_14_1_1_all.bmp", 30, 30)  # outside all/ and hem/
    return root


def test_cnmc_labels_and_patients(cnmc):
    manifest, rejects = _ingest("cnmc", {"format": "cnmc", "root": str(cnmc)})
    pairs = zip(manifest["label"], manifest["patient"], strict=True)
    assert dict(zip(manifest["path"], pairs, strict=True)) == CNMC_FILES
    assert manifest["label"].value_counts().to_dict() == {"ALL": 4, "healthy": 4}
    assert manifest.groupby("patient").size().to_dict() == {
        "11": 2, "12": 1, "13": 1, "H10": 2, "H22": 1, "H23": 1,
    }  # fmt: skip
    assert _reasons(rejects) == {
        "fold_2/all/scan.bmp": "missing_patient",
        "fold_0/UID_14_1_1_all.bmp": "missing_label",
    }


# ------------------------------------------------------------------ BCCD (small fixture)


def _voc(path: Path, objects: list[tuple[str, int, int, int, int]]) -> None:
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
        f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for n, a, b, c, d in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}.jpg</filename>{body}</annotation>")


def test_bccd_fixture_boxes_and_label_option(tmp_path):
    _image(tmp_path / "JPEGImages/BloodImage_00000.jpg")
    _image(tmp_path / "JPEGImages/BloodImage_00001.jpg")
    _image(tmp_path / "JPEGImages/BloodImage_00002.jpg")
    _voc(
        tmp_path / "Annotations/BloodImage_00000.xml", [("WBC", 1, 2, 20, 21), ("RBC", 0, 0, 5, 5)]
    )
    _voc(tmp_path / "Annotations/BloodImage_00001.xml", [("RBC", 0, 0, 5, 5)])
    records, rejects = list_dataset("bccd", tmp_path)
    assert list(records["annotations"]) == ['{"boxes": [[1, 2, 20, 21]]}', '{"boxes": []}', "{}"]
    assert (records["label"] == "unlabelled").all()
    assert (records["patient"] == records["path"]).all()
    assert len(rejects) == 0
    records, _ = list_dataset("bccd", tmp_path, label="normal")
    assert (records["label"] == "normal").all()
    with pytest.raises(InvalidInputError, match="no JPEGImages/") as info:
        list_dataset("bccd", tmp_path / "Annotations")
    assert info.value.reason == "bad_layout"


# ------------------------------------------------------------------ Zheng (small fixture)


def _zheng_part(root: Path, n: int, header: str, codes: dict[int, int]) -> None:
    folder = root / f"Dataset {n}"
    for i in [*codes, 9]:  # 009 has no label row
        _image(folder / f"{i:03d}.bmp", 20, 20, seed=i)
        Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    rows = "".join(f"{i},{c}\r\n" for i, c in codes.items())
    (root / f"Class Labels of Dataset {n}.csv").write_text(f"image ID,{header}\r\n{rows}")


def test_zheng_fixture_both_headers_and_one_dataset_as_root(tmp_path):
    _zheng_part(tmp_path, 1, "class label", {1: 2, 2: 1, 3: 5})
    _zheng_part(tmp_path, 2, "class", {1: 3, 2: 4})
    records, rejects = list_zheng(tmp_path)
    assert dict(zip(records["path"], records["label"], strict=True)) == {
        "Dataset 1/001.bmp": "lymphocyte",
        "Dataset 1/002.bmp": "neutrophil",
        "Dataset 1/003.bmp": "basophil",
        "Dataset 2/001.bmp": "monocyte",
        "Dataset 2/002.bmp": "eosinophil",
    }
    assert list(records["mask_path"]) == [p.replace(".bmp", ".png") for p in records["path"]]
    # the masks are not candidates; the unlabelled bmp is
    assert _reasons(rejects) == {
        "Dataset 1/009.bmp": "missing_label",
        "Dataset 2/009.bmp": "missing_label",
    }
    # one Dataset N folder as root: its CSV sits beside it
    records, rejects = list_zheng(tmp_path / "Dataset 2")
    assert list(records["path"]) == ["001.bmp", "002.bmp"]
    assert list(records["mask_path"]) == ["001.png", "002.png"]
    assert list(rejects["path"]) == ["009.bmp"]


def test_zheng_bad_header_and_layout(tmp_path):
    _zheng_part(tmp_path, 1, "kind", {1: 2})
    with pytest.raises(InvalidInputError, match=r"one of \['class label', 'class'\]") as info:
        list_zheng(tmp_path)
    assert info.value.reason == "bad_label_table"
    (tmp_path / "other").mkdir()
    with pytest.raises(InvalidInputError, match="expected 'Dataset N' folders") as info:
        list_zheng(tmp_path / "other")
    assert info.value.reason == "bad_layout"


# ------------------------------------------------------------------ manifest CSV


@pytest.fixture
def manifest_csv(tmp_path) -> Path:
    base = tmp_path / "clinic"
    _image(base / "a.png", seed=1)
    _image(base / "sub/b.png", seed=2)
    _image(base / "c.png", seed=3)  # not listed
    _image(base / "d.png", seed=4)
    _image(base / "masks/a_mask.png", seed=5)  # listed as a mask: not a candidate
    _image(base / "masks/d_mask.png", 10, 10, seed=6)
    _image(tmp_path / "elsewhere.png", seed=7)
    (base / "link.png").symlink_to(tmp_path / "elsewhere.png")
    (base / "inlink.png").symlink_to(base / "a.png")
    csv = base / "manifest.csv"
    csv.write_text(
        "path,label,patient,mask\n"
        "a.png,ALL,007,masks/a_mask.png\n"
        "sub/b.png,healthy,,\n"
        f"{base / 'sub' / '..' / 'd.png'},ALL,p2,masks/d_mask.png\n"
        "../elsewhere.png,ALL,p3,\n"
        f"{tmp_path / 'elsewhere.png'},ALL,p4,\n"
        "link.png,ALL,p5,\n"
        "inlink.png,healthy,p6,\n"
    )
    return csv


def test_manifest_csv_paths_masks_and_outside_root(manifest_csv):
    base = manifest_csv.parent
    manifest, rejects = _ingest("clinic", {"format": "manifest", "root": str(manifest_csv)})
    assert list(manifest["path"]) == ["a.png", "sub/b.png", "inlink.png"]
    assert list(manifest["label"]) == ["ALL", "healthy", "healthy"]
    # patient text kept; a row without one is its own group
    assert list(manifest["patient"]) == ["007", "sub/b.png", "p6"]
    assert list(manifest["mask_path"]) == ["masks/a_mask.png", "", ""]
    assert (manifest["root"] == str(base)).all()
    assert _reasons(rejects) == {
        "../elsewhere.png": "outside_root",
        str(base.parent / "elsewhere.png"): "outside_root",
        "link.png": "outside_root",
        "d.png": "mask_size_mismatch",
        "c.png": "missing_label",
    }
    for row in rejects.itertuples():
        assert row.path in row.message, row


def test_manifest_csv_mask_outside_and_missing_columns(tmp_path):
    _image(tmp_path / "data/a.png")
    _image(tmp_path / "m.png")
    (tmp_path / "data/list.csv").write_text("path,label,mask\na.png,ALL,../m.png\n")
    records, rejects = list_manifest(tmp_path / "data/list.csv")
    assert len(records) == 0
    assert list(rejects["reason"]) == ["outside_root"]
    assert "mask '../m.png'" in rejects["message"].item()
    (tmp_path / "data/list.csv").write_text("image,label\na.png,ALL\n")
    with pytest.raises(InvalidInputError, match=r"missing columns \['path'\]") as info:
        list_manifest(tmp_path / "data/list.csv")
    assert info.value.reason == "bad_label_table"


def test_manifest_root_must_be_an_existing_csv_file(manifest_csv, tmp_path):
    ok = {"datasets": {"c": {"format": "manifest", "root": str(manifest_csv)}}}
    assert validate_config(ok)["datasets"]["c"]["label_map"] == {}
    folder = {"datasets": {"c": {"format": "manifest", "root": str(manifest_csv.parent)}}}
    with pytest.raises(ConfigError, match=r"datasets\.c\.root: expected an existing CSV file"):
        validate_config(folder)
    gone = {"datasets": {"c": {"format": "manifest", "root": str(tmp_path / "gone.csv")}}}
    with pytest.raises(ConfigError, match="which does not exist"):
        validate_config(gone)
    csv_as_folder = {"datasets": {"c": {"format": "folders", "root": str(manifest_csv)}}}
    with pytest.raises(ConfigError, match=r"expected an existing folder.*which is not a folder"):
        validate_config(csv_as_folder)


# ------------------------------------------------------------------ label_map and options


def test_label_map_applied_and_label_not_in_map(allidb1):
    spec = {"format": "allidb1", "root": str(allidb1), "label_map": {"ALL": "blast"}}
    manifest, rejects = _ingest("idb1", spec)
    assert list(manifest["label"]) == ["blast", "blast"]
    not_mapped = rejects[rejects["reason"] == "label_not_in_map"]
    assert sorted(not_mapped["path"]) == ["Im003_0.jpg", "Im004_0.jpg"]
    assert "'healthy' is not in label_map" in not_mapped["message"].iloc[0]
    # every file still in exactly one table
    assert len(manifest) + len(rejects) == 7


def test_label_map_with_yaml_integer_keys(tmp_path):
    _image(tmp_path / "1/a.png")
    _image(tmp_path / "0/b.png")
    records, rejects = list_dataset(
        "folders", tmp_path, label_map={1: "ALL", 0: "healthy"}
    )  # YAML reads `1: ALL` with an integer key
    assert dict(zip(records["path"], records["label"], strict=True)) == {
        "0/b.png": "healthy",
        "1/a.png": "ALL",
    }
    assert len(rejects) == 0


def test_apply_label_map_leaves_empty_labels_for_ingest():
    records = pd.DataFrame(
        {"path": ["a", "b", "c"], "label": ["x", None, "y"], "patient": ["1", "2", "3"]}
    )
    kept, rejects = apply_label_map(records, {"x": "X"})
    assert list(kept["path"]) == ["a", "b"]
    assert kept["label"].tolist()[0] == "X"
    assert pd.isna(kept["label"].tolist()[1])
    assert list(rejects["path"]) == ["c"]
    same, none = apply_label_map(records, {})
    assert same is records
    assert len(none) == 0


def test_options_only_for_their_format(tmp_path, cnmc):
    with pytest.raises(ValueError, match=r"option 'masks' applies to format \('allidb2',\)"):
        list_dataset("cnmc", cnmc, masks=tmp_path)
    with pytest.raises(ValueError, match=r"option 'label' applies to format"):
        list_dataset("cnmc", cnmc, label="x")
    with pytest.raises(ValueError, match="expected a format in"):
        list_dataset("nope", cnmc)
    with pytest.raises(ValueError, match=r"unknown keys \['mask'\]"):
        _ingest("c", {"format": "cnmc", "root": str(cnmc), "mask": "x"})
    # the schema stops a misplaced option before any job
    cfg = {"datasets": {"c": {"format": "cnmc", "root": str(cnmc), "masks": str(tmp_path)}}}
    with pytest.raises(ConfigError, match=r"datasets\.c\.format: expected one of \['allidb2'\]"):
        validate_config(cfg)


def test_validated_config_entries_can_be_passed_to_ingest(cnmc):
    config = validate_config({"datasets": {"c": {"format": "cnmc", "root": str(cnmc)}}})
    manifest, _ = ingest_datasets(config["datasets"], min_size_px=MIN_SIZE)
    assert len(manifest) == len(CNMC_FILES)


def test_every_format_has_a_lister_and_the_schema_lists_them_all():
    from leukflow.core.config import load_schema

    formats = load_schema()["$defs"]["dataset"]["properties"]["format"]["enum"]
    assert sorted(formats) == sorted(LISTERS)
    assert RECORD_COLUMNS == ["path", "label", "patient", "mask_path", "annotations"]


def test_manifest_identical_across_two_runs(allidb1, allidb2, cnmc, manifest_csv):
    datasets = {
        "idb1": {"format": "allidb1", "root": str(allidb1)},
        "idb2": {"format": "allidb2", "root": str(allidb2), "masks": str(allidb2 / "masks")},
        "cnmc": {
            "format": "cnmc",
            "root": str(cnmc),
            "label_map": {"ALL": "ALL", "healthy": "hem"},
        },
        "clinic": {"format": "manifest", "root": str(manifest_csv)},
    }
    first = ingest_datasets(datasets, min_size_px=MIN_SIZE)
    second = ingest_datasets(datasets, min_size_px=MIN_SIZE)
    pd.testing.assert_frame_equal(first[0], second[0])
    pd.testing.assert_frame_equal(first[1], second[1])
    assert list(first[1].columns) == REJECT_COLUMNS
    assert first[0]["image_id"].is_unique
    assert set(first[0]["dataset"]) == set(datasets)


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def real_manifest(shared_data):
    datasets = {
        "bccd": {"format": "bccd", "root": str(shared_data / "BCCD_Dataset" / "BCCD")},
        "zheng": {"format": "zheng", "root": str(shared_data / "segmentation_WBC")},
    }
    return ingest_datasets(datasets, min_size_px=32)


@pytest.mark.realdata
def test_real_bccd_images_and_wbc_boxes(real_manifest, shared_data):
    manifest, rejects = real_manifest
    bccd = manifest[manifest["dataset"] == "bccd"]
    assert len(bccd) == 364
    assert (rejects["dataset"] != "bccd").all()
    assert (bccd["label"] == "unlabelled").all()
    boxes = {
        p: json.loads(a)["boxes"] for p, a in zip(bccd["path"], bccd["annotations"], strict=True)
    }
    counts = pd.Series({p: len(b) for p, b in boxes.items()}).value_counts().to_dict()
    assert counts == {1: 344, 2: 14, 0: 6}
    empty = sorted(Path(p).stem[-5:] for p, b in boxes.items() if not b)
    assert empty == ["00133", "00135", "00171", "00178", "00228", "00327"]
    # the same WBC boxes as upstream's flattened test.csv (which lists x before y)
    flat = pd.read_csv(shared_data / "BCCD_Dataset" / "test.csv")
    flat = flat[flat["cell_type"] == "WBC"]
    expected = {
        f"JPEGImages/{name}": sorted(g[["xmin", "ymin", "xmax", "ymax"]].to_numpy().tolist())
        for name, g in flat.groupby("filename")
    }
    assert {p: sorted(b) for p, b in boxes.items() if b} == expected


@pytest.mark.realdata
def test_real_zheng_labels_and_masks(real_manifest, shared_data):
    manifest, rejects = real_manifest
    zheng = manifest[manifest["dataset"] == "zheng"]
    assert len(zheng) == 400
    assert (rejects["dataset"] != "zheng").all()
    part = zheng["path"].str.split("/").str[0]
    order = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    counts = {
        name: group["label"].value_counts().reindex(order).tolist()
        for name, group in zheng.groupby(part)
    }
    assert counts == {"Dataset 1": [176, 53, 48, 22, 1], "Dataset 2": [33, 37, 15, 12, 3]}
    assert (zheng["patient"] == zheng["path"]).all()
    root = shared_data / "segmentation_WBC"
    for row in zheng.itertuples():
        assert row.mask_path == row.path.removesuffix(".bmp") + ".png"
        with Image.open(root / row.mask_path) as mask:
            assert mask.size == (row.width, row.height), row.path
    assert not zheng["path"].str.endswith(".png").any()
    assert os.path.samefile(zheng["root"].iloc[0], root)


def test_manifest_path_through_a_linked_folder_names_the_file_it_reaches(tmp_path):
    base = tmp_path / "clinic"
    _image(base / "deep/x.png", seed=1)
    (base / "deep/inner").mkdir()
    (base / "alias").symlink_to(base / "deep/inner")
    _image(tmp_path / "secret.png", seed=2)
    (base / "x.png").symlink_to(tmp_path / "secret.png")  # what "alias/../x.png" reads as text
    (base / "list.csv").write_text("path,label\nalias/../x.png,ALL\n")
    records, rejects = list_manifest(base / "list.csv")
    # the OS reads deep/x.png through the link; so does ingest, never the outside file
    assert list(records["path"]) == ["deep/x.png"]
    assert _reasons(rejects) == {"x.png": "missing_label"}

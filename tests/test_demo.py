"""Tests of the synthetic demo dataset (leukflow.data.demo)."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.color import rgb2gray
from skimage.filters import threshold_multiotsu

from leukflow.data import demo
from leukflow.data.demo import draw_demo_dataset

N_FIELDS, FPP = 12, 3
CELL_COLUMNS = ["image", "cell", "kind", "x0", "y0", "x1", "y1", "nucleus_area_px", "cell_area_px"]


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    labels = draw_demo_dataset(out, n_fields=N_FIELDS, seed=0, fields_per_patient=FPP)
    return out, labels, pd.read_csv(out / "cells.csv")


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
    out, _, _ = dataset
    draw_demo_dataset(tmp_path, n_fields=N_FIELDS, seed=0, fields_per_patient=FPP)
    first, again = _hashes(out), _hashes(tmp_path)
    assert len(first) == N_FIELDS + 2  # images, cells.csv, labels.csv; no leftover temp files
    assert first == again


def test_other_seed_gives_different_images(dataset, tmp_path):
    out, _, _ = dataset
    draw_demo_dataset(tmp_path, n_fields=6, seed=1, fields_per_patient=FPP)
    for i in range(6):
        name = f"images/field_{i:03d}.png"
        assert not np.array_equal(_load(out / name), _load(tmp_path / name)), name


def test_field_does_not_depend_on_n_fields(dataset, tmp_path):
    out, _, cells = dataset
    draw_demo_dataset(tmp_path, n_fields=6, seed=0, fields_per_patient=FPP)
    first, fewer = _hashes(out), _hashes(tmp_path)
    for i in range(6):
        name = f"images/field_{i:03d}.png"
        assert fewer[name] == first[name]
    head = cells[cells.image.isin(pd.read_csv(tmp_path / "labels.csv").image)]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cells.csv"), head)


def test_images_are_rgb_640x480_uint8(dataset):
    out, labels, _ = dataset
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        Path(image).name for image in labels.image
    ]
    for image in labels.image:
        img = _load(out / image)
        assert img.shape == (480, 640, 3)
        assert img.dtype == np.uint8
        assert img.std() > 10  # not blank


def test_labels_csv(dataset):
    out, labels, _ = dataset
    on_disk = pd.read_csv(out / "labels.csv")
    assert list(on_disk.columns) == ["image", "label", "patient"]
    pd.testing.assert_frame_equal(on_disk, labels)
    assert list(on_disk.image) == [f"images/field_{i:03d}.png" for i in range(N_FIELDS)]
    assert set(on_disk.label) == {"ALL", "healthy"}
    assert on_disk.patient.str.fullmatch(r"P\d{2}").all()


def test_patients_have_one_label_and_are_balanced(dataset):
    _, labels, _ = dataset
    per_patient = labels.groupby("patient").agg(n=("image", "size"), labels=("label", "nunique"))
    assert len(per_patient) == N_FIELDS // FPP
    assert (per_patient.n == FPP).all()
    assert (per_patient.labels == 1).all()
    patient_label = labels.groupby("patient").label.first()
    assert patient_label.value_counts().to_dict() == {"ALL": 2, "healthy": 2}


def test_leftover_fields_go_to_last_patient(tmp_path):
    labels = draw_demo_dataset(tmp_path, n_fields=7, seed=3, fields_per_patient=3)
    assert labels.patient.value_counts().sort_index().to_dict() == {"P00": 3, "P01": 4}
    assert labels.groupby("patient").label.nunique().eq(1).all()


def test_cells_csv_boxes_and_counts(dataset):
    _, labels, cells = dataset
    assert list(cells.columns) == CELL_COLUMNS
    assert set(cells.kind) <= {"blast", "lymphocyte"}
    counts = cells.groupby("image").size().reindex(labels.image, fill_value=0)
    assert counts.between(1, 4).all()
    for _, group in cells.groupby("image"):
        assert list(group.cell) == list(range(len(group)))
    assert (cells.x0 >= 0).all()
    assert (cells.y0 >= 0).all()
    assert (cells.x1 <= 640).all()
    assert (cells.y1 <= 480).all()
    assert (cells.x1 > cells.x0).all()
    assert (cells.y1 > cells.y0).all()
    box_area = (cells.x1 - cells.x0) * (cells.y1 - cells.y0)
    assert (cells.cell_area_px <= box_area).all()
    assert (cells.nucleus_area_px > 0).all()
    assert (cells.nucleus_area_px < cells.cell_area_px).all()


def test_blasts_are_larger_and_only_in_all_fields(dataset):
    _, labels, cells = dataset
    cells = cells.merge(labels, on="image")
    assert (cells[cells.label == "healthy"].kind == "lymphocyte").all()
    assert (cells[cells.label == "ALL"].kind == "blast").mean() > 0.5
    by_kind = cells.groupby("kind")
    area = by_kind.cell_area_px.mean()
    assert area["blast"] > 1.3 * area["lymphocyte"]
    nc = (cells.nucleus_area_px / cells.cell_area_px).groupby(cells.kind).mean()
    assert 0.55 < nc["lymphocyte"] < 0.8 < nc["blast"] < 0.95


def test_nuclei_are_the_darkest_multiotsu_class(dataset):
    out, labels, cells = dataset
    for image in labels.image:
        grey = rgb2gray(_load(out / image))
        low, _ = threshold_multiotsu(grey, classes=3)
        dark = grey < low
        in_boxes = np.zeros_like(dark)
        for c in cells[cells.image == image].itertuples():
            in_boxes[c.y0 : c.y1, c.x0 : c.x1] = True
            assert dark[c.y0 : c.y1, c.x0 : c.x1].sum() > 0.5 * c.nucleus_area_px, image
        assert dark[in_boxes].sum() >= 0.8 * dark.sum(), image


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_fields": 1}, "n_fields must be at least 2"),
        ({"n_fields": 2.5}, "n_fields must be an integer"),
        ({"n_fields": True}, "n_fields must be an integer"),
        ({"fields_per_patient": 0}, "fields_per_patient must be at least 1"),
        ({"n_fields": 5, "fields_per_patient": 3}, "at least two patients"),
        ({"seed": -1}, "seed must be non-negative"),
    ],
)
def test_invalid_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        draw_demo_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_labels_csv(tmp_path, monkeypatch):
    draw_demo_dataset(tmp_path, n_fields=2, seed=0, fields_per_patient=1)
    assert (tmp_path / "labels.csv").exists()
    real, calls = demo._draw_field, []

    def failing(rng, label):
        calls.append(label)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(rng, label)

    monkeypatch.setattr(demo, "_draw_field", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        draw_demo_dataset(tmp_path, n_fields=4, seed=0, fields_per_patient=1)
    assert not (tmp_path / "labels.csv").exists()

"""Shortcut controls: the cell alone, the background alone, beside the main figure."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr

from leukflow.evaluate.compare import compare_figures
from leukflow.evaluate.controls import cell_mask, control_crop

REPO = Path(__file__).resolve().parents[1]


def _crop(size=64):
    """A dark purple cell in the middle, a red cell cut by the border, pale background."""
    yy, xx = np.mgrid[:size, :size]
    crop = np.full((size, size, 3), (230, 215, 220), np.uint8)
    crop[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < 14**2] = (90, 40, 140)
    crop[(yy - 4) ** 2 + (xx - 4) ** 2 < 9**2] = (200, 110, 120)
    return crop, (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < 14**2


def test_cell_mask_is_the_central_cell_grown_by_two_pixels():
    crop, disc = _crop()
    mask = cell_mask(crop)
    assert mask[disc].all()
    assert not mask[:10, :10].any()  # the red cell at the border is background
    assert 0 < mask.sum() - disc.sum() <= 2 * np.pi * 16 * 2  # a 2 px rim


def test_controls_paint_the_background_or_the_cell_black():
    crop, _ = _crop()
    mask = cell_mask(crop)
    cell_only = control_crop(crop, "cell_only")
    background_only = control_crop(crop, "background_only")
    np.testing.assert_array_equal(cell_only[mask], crop[mask])
    assert (cell_only[~mask] == 0).all()
    np.testing.assert_array_equal(background_only[~mask], crop[~mask])
    assert (background_only[mask] == 0).all()
    blank = np.full((32, 32, 3), 200, np.uint8)  # no cell: nothing to keep, nothing to hide
    assert (control_crop(blank, "cell_only") == 0).all()
    np.testing.assert_array_equal(control_crop(blank, "background_only"), blank)
    with pytest.raises(ValueError, match="cell_only"):
        control_crop(crop, "nucleus_only")


def test_comparison_puts_the_controls_beside_the_grouped_figure():
    rows = []
    for dataset, value in (("d", 0.9), ("d_cell_only", 0.85), ("d_background_only", 0.6)):
        rows.append({"dataset": dataset, "encoder": "e", "classifier": "knn", "level": "roi",
                     "fold": "pooled", "metric": "accuracy", "accuracy": value,
                     "ci_low": value - 0.1, "ci_high": value + 0.05, "leaky": False})  # fmt: skip
    table = compare_figures(
        pd.DataFrame(rows), published=[], twins={}, protocols={"d": "grouped"},
        controls={"d_cell_only": ("d", "cell_only"),
                  "d_background_only": ("d", "background_only")},
    )  # fmt: skip
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["grouped"], row["cell_only"], row["background_only"]) == (0.9, 0.85, 0.6)
    assert row["background_only_ci_low"] == pytest.approx(0.5)


def _run(work: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--cores", "2", *args, "--configfile", "my.yaml"]  # fmt: skip
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)


def _config(controls):
    return {
        "results_dir": "out",
        "datasets": {"demo": {"format": "demo", "root": "demo", "n_fields": 8,
                              "fields_per_patient": 2, "seed": 3}},
        "segmentation": {"roi_size_px": 32},
        "folds": {"k": 2},
        "encoders": {"cnn": {"arch": "small_cnn", "epochs": 1, "batch_size": 16}},
        "classifiers": {"knn": {"n_neighbors": 3}},
        "evaluation": {"shortcut_controls": controls, "n_boot": 200},
    }  # fmt: skip


def test_controls_are_off_for_fields_by_default_and_on_when_asked(tmp_path):
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(_config("auto")))
    plain = _run(tmp_path, "-n")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "control_crops" not in plain.stdout + plain.stderr
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(_config(True)))
    run = _run(tmp_path, "-n")
    out = run.stdout + run.stderr
    assert "demo_cell_only" in out
    assert "demo_background_only" in out
    assert out.count("rule control_crops:") == 2


@pytest.mark.e2e
def test_controls_run_end_to_end_into_metrics_and_comparison(tmp_path):
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(_config(True)))
    run = _run(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    metrics = pd.read_csv(out / "metrics.csv", dtype={"fold": str})
    assert set(zip(metrics["dataset"], metrics["control"], strict=True)) == {
        ("demo", "none"), ("demo_cell_only", "cell_only"),
        ("demo_background_only", "background_only"),
    }  # fmt: skip
    folds = pd.read_csv(out / "folds.csv")
    base = folds[folds["dataset"] == "demo"].set_index("image_id")["fold"]
    copy = folds[folds["dataset"] == "demo_cell_only"].set_index("image_id")["fold"]
    assert copy.rename(lambda i: i.replace("demo_cell_only", "demo")).equals(base)
    comparison = pd.read_csv(out / "comparison.csv")
    pooled = metrics[(metrics["fold"] == "pooled") & (metrics["metric"] == "accuracy")]
    # one model (cnn encoder, knn) on one dataset: a row per level, never an empty table
    assert sorted(zip(comparison["dataset"], comparison["level"], strict=True)) == [
        ("demo", "image"), ("demo", "roi"),
    ]  # fmt: skip
    for row in comparison.itertuples():
        model = (
            (pooled["level"] == row.level)
            & (pooled["encoder"] == row.encoder)
            & (pooled["classifier"] == row.classifier)
        )
        for kind, column in (("none", "grouped"), ("cell_only", "cell_only"),
                             ("background_only", "background_only")):  # fmt: skip
            want = pooled[model & (pooled["control"] == kind)]
            assert len(want) == 1, (kind, row.level)
            assert getattr(row, column) == pytest.approx(want["accuracy"].iloc[0])
            assert getattr(row, f"{column}_ci_low") == pytest.approx(want["ci_low"].iloc[0])
    crops = zarr.open_array(str(out / "segment" / "demo_cell_only" / "crops.zarr"), mode="r")
    base_crops = zarr.open_array(str(out / "segment" / "demo" / "crops.zarr"), mode="r")
    assert crops.shape == base_crops.shape
    assert (crops[:] == 0).mean() > (base_crops[:] == 0).mean() + 0.2  # background black

"""Tests of the background reliance test (leukflow.evaluate.reliance)."""

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from leukflow.evaluate import reliance
from leukflow.evaluate.scoring import ScoringSettings, score_predictions
from leukflow.plan import RunPlan

S = 16


def _crops_and_masks():
    """Two crops with a known 4x4 cell: red cell on green, blue cell on white."""
    crops = np.zeros((2, S, S, 3), np.uint8)
    masks = np.zeros((2, S, S), bool)
    masks[:, 6:10, 6:10] = True
    crops[0] = [0, 200, 0]
    crops[0][masks[0]] = [200, 0, 0]
    crops[1] = [255, 255, 255]
    crops[1][masks[1]] = [0, 0, 200]
    return crops, masks


def test_paint_background_keeps_exactly_the_cell():
    crops, masks = _crops_and_masks()
    out = reliance.paint_background(crops, masks)
    np.testing.assert_array_equal(out[masks], crops[masks])
    assert (out[~masks] == 0).all()
    with pytest.raises(ValueError, match=r"expected \(n, S, S, 3\) crops and \(n, S, S\) masks"):
        reliance.paint_background(crops, masks[:, :4])


def test_swap_background_puts_the_cell_on_the_donor_background_without_the_donor_cell():
    crops, masks = _crops_and_masks()
    out = reliance.swap_background(crops[:1], masks[:1], crops[1:], masks[1:])
    np.testing.assert_array_equal(out[0][masks[0]], crops[0][masks[0]])  # red cell kept
    # the background is the donor's white, including where the donor's blue cell was
    assert (out[0][~masks[0]] == 255).all()
    shifted = masks[1].copy()
    shifted[:] = False
    shifted[0:4, 0:4] = True  # a donor cell away from the crop's cell
    out = reliance.swap_background(crops[:1], masks[:1], crops[1:], shifted[None])
    assert (out[0][0:4, 0:4] == 255).all()  # donor's "cell" filled with its background colour


def test_pick_donors_takes_another_class_in_the_same_fold_first():
    labels = np.array(["ALL", "HEM", "ALL", "HEM", "ALL"])
    folds = np.array([0, 0, 1, 1, 2])
    donors = reliance.pick_donors(labels, folds, seed=0)
    assert donors[0] == 1
    assert donors[1] == 0
    assert donors[2] == 3
    assert donors[3] == 2
    assert labels[donors[4]] == "HEM"  # fold 2 has no HEM: any fold
    assert (reliance.pick_donors(np.array(["a", "a"]), np.array([0, 1]), seed=0) == -1).all()


def _demo_rois(n=12):
    return pd.DataFrame({
        "roi_id": [f"r{i}" for i in range(n)], "image_id": [f"i{i}" for i in range(n)],
        "label": ["ALL", "HEM"] * (n // 2), "fold": [i % 3 for i in range(n)],
    })  # fmt: skip


def _disc_crops(rois):
    """Cells of one colour for both classes; the background colour carries the class."""
    yy, xx = np.mgrid[: S * 2, : S * 2]
    disc = (yy - S) ** 2 + (xx - S) ** 2 < (S // 2) ** 2
    crops = np.empty((len(rois), 2 * S, 2 * S, 3), np.uint8)
    for i, label in enumerate(rois["label"]):
        crops[i] = [230, 200, 150] if label == "ALL" else [150, 200, 230]
        crops[i][disc] = [60, 20, 90]
    return crops


def test_a_model_reading_the_background_fails_the_swap_and_keeps_its_cells():
    rois = _demo_rois()
    crops = _disc_crops(rois)
    labels, folds = rois["label"].to_numpy(), rois["fold"].to_numpy()

    def embed(fold, x):  # mean colour of the crop: the background dominates it
        return x.reshape(len(x), -1, 3).mean(1), None

    models = {"knn": {}}
    for k in range(3):
        train = folds != k
        models["knn"][k] = KNeighborsClassifier(1).fit(embed(k, crops[train])[0], labels[train])
    settings = ScoringSettings(positive_label="ALL", n_boot=20)
    folds_table = rois.assign(patient=rois["image_id"], group=rois["image_id"], leaky=False)
    accuracy = {}
    for kind in ["none", *reliance.RELIANCE_KINDS]:
        x = crops if kind == "none" else reliance.reliance_crops(
            crops, kind, labels=labels, folds=folds)  # fmt: skip
        preds = reliance.reliance_predictions(x, rois, embed=embed, models=models,
                                              head_classes=None, positive_label="ALL")  # fmt: skip
        table = score_predictions(preds, folds_table, settings).metrics
        accuracy[kind] = table.query("level == 'roi' and fold == 'mean'")["accuracy"].item()
    assert accuracy["none"] == 1.0
    assert accuracy["swapped_background"] == 0.0  # every call follows the donor's class
    assert (
        reliance.reliance_crops(crops, "cell_only", labels=labels, folds=folds)[:, 0, 0].max() == 0
    )


def test_reliance_rows_are_left_out_of_readers_keyed_on_the_model():
    table = pd.DataFrame({"control": ["none", "reliance_cell_only", "cell_only"], "x": [1, 2, 3]})
    assert reliance.without_reliance(table)["x"].tolist() == [1, 3]
    assert reliance.without_reliance(table.drop(columns="control"))["x"].tolist() == [1, 2, 3]


def test_plan_runs_the_reliance_test_by_the_option(tmp_path):
    from leukflow.core.config import validate_config

    config = {"results_dir": str(tmp_path), "datasets": {
        "demo": {"format": "demo", "root": str(tmp_path / "d")},
        "cells": {"format": "allidb2", "root": str(tmp_path / "a")}}}  # fmt: skip
    plan = RunPlan.from_config(validate_config(config, check_paths=False))
    assert plan.reliance == ("cells",)  # auto: the single-cell formats
    assert plan.reliance_files() == [f"{tmp_path}/evaluate/cells/resnet18/reliance_metrics.csv"]
    config["evaluation"]["reliance_test"] = True
    assert RunPlan.from_config(config).reliance == ("demo", "cells")
    config["evaluation"]["reliance_test"] = False
    assert RunPlan.from_config(config).reliance_files() == []


@pytest.mark.e2e
def test_e2e_reliance_rows_score_the_unchanged_models_on_altered_test_crops(e2e_run):
    _, out = e2e_run
    metrics = pd.read_csv(out / "metrics.csv", dtype={"fold": str})
    rows = metrics[metrics["control"].str.startswith("reliance_")]
    assert set(rows["control"]) == {"reliance_cell_only", "reliance_swapped_background"}
    assert set(rows["dataset"]) == {"demo"}
    assert set(rows["classifier"]) == {"random_forest", "knn"}
    main = metrics[metrics["control"] == "none"]
    for (control, clf), part in rows.groupby(["control", "classifier"]):
        image = part[(part["level"] == "image") & part["fold"].isin(["0", "1", "2"])]
        assert image["n"].sum() == 12, control  # every ingested image scored once, as the model
        roi = part[(part["level"] == "roi") & part["fold"].isin(["0", "1", "2"])]
        own = main[(main["classifier"] == clf) & (main["level"] == "roi")
                   & main["fold"].isin(["0", "1", "2"])]  # fmt: skip
        assert roi["n"].tolist() == own["n"].tolist()  # the same test ROIs per fold
        assert roi["accuracy"].between(0, 1).all()
        pooled = part[(part["fold"] == "pooled") & (part["metric"] == "accuracy")]
        assert len(pooled) == 2  # roi and image, each with a bootstrap interval
        assert (pooled["ci_low"] <= pooled["accuracy"]).all()
    # comparison.csv still takes the model's own pooled figure, not a reliance row
    comparison = pd.read_csv(out / "comparison.csv")
    own = main[(main["fold"] == "pooled") & (main["metric"] == "accuracy")]
    for r in comparison.itertuples():
        match = own[(own["classifier"] == r.classifier) & (own["level"] == r.level)]
        assert r.grouped == pytest.approx(match["accuracy"].item())

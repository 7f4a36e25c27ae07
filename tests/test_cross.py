"""Cross-dataset evaluation: fit on one dataset, score on another."""

import numpy as np
import pandas as pd
import pytest

from leukflow.cross import COLUMNS, evaluate_cross, plot_cross_matrix, summarise_cross

KNN = {"knn": {"n_neighbors": 1}}


def _train():
    emb = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    rois = pd.DataFrame({
        "roi_id": [f"a/{i}#0" for i in range(4)],
        "image_id": [f"a/{i}" for i in range(4)],
        "label": ["HEM", "HEM", "ALL", "ALL"],
        "group": ["p0", "p0", "p1", "p1"],
    })  # fmt: skip
    return emb, rois


def _test():
    # 1-NN calls: -1.5 -> HEM (right), 1.5 -> ALL (right), 0.5 -> ALL (wrong), -0.5 -> HEM (wrong)
    emb = np.array([[-1.5], [1.5], [0.5], [-0.5]])
    rois = pd.DataFrame({
        "roi_id": [f"b/{i}#0" for i in range(4)],
        "image_id": [f"b/{i}" for i in range(4)],
        "label": ["HEM", "ALL", "HEM", "ALL"],
    })  # fmt: skip
    images = pd.DataFrame({
        "image_id": [f"b/{i}" for i in range(5)],  # b/4: no white cell found
        "label": ["HEM", "ALL", "HEM", "ALL", "ALL"],
        "group": ["q0", "q1", "q2", "q3", "q4"],
    })  # fmt: skip
    return emb, rois, images


def _cross(**kw):
    return evaluate_cross(*_train(), *_test(), classifiers=KNN, positive_label="ALL",
                          n_boot=200, **kw)  # fmt: skip


def _pooled(result, level, metric):
    m = result.metrics
    row = m[(m["level"] == level) & (m["fold"] == "pooled") & (m["metric"] == metric)]
    return row.iloc[0]


def test_cross_scores_the_test_dataset_with_the_train_datasets_classifier():
    result = _cross()
    preds = result.roi_predictions
    assert preds["pred"].tolist() == ["HEM", "ALL", "ALL", "HEM"]
    assert set(preds["roi_id"]) == {f"b/{i}#0" for i in range(4)}  # training ROIs never scored
    roi = _pooled(result, "roi", "accuracy")
    assert roi["accuracy"] == pytest.approx(0.5)
    assert (roi["n"], roi["tp"], roi["tn"]) == (4, 1, 1)
    assert roi["ci_low"] <= 0.5 <= roi["ci_high"]
    # image level: the image without ROIs is called negative (a missed ALL): 2 of 5 right
    image = _pooled(result, "image", "balanced_accuracy")
    assert image["n"] == 5
    assert image["balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert not result.metrics["leaky"].any()
    assert set(result.models) == {("knn", 0)}


def test_cross_labels_absent_from_the_train_dataset_do_not_crash():
    emb, rois, images = _test()
    rois.loc[3, "label"] = images.loc[3, "label"] = "L3"
    result = evaluate_cross(*_train(), emb, rois, images, classifiers=KNN,
                            positive_label="ALL", n_boot=50)  # fmt: skip
    preds = result.roi_predictions
    assert "L3" not in set(preds["pred"])
    assert (preds["proba_L3"] == 0).all()
    # without the positive label in training, every score is 0
    emb_t, rois_t = _train()
    rois_t["label"] = ["HEM", "HEM", "L1", "L1"]
    result = evaluate_cross(emb_t, rois_t, *_test(), classifiers=KNN, positive_label="ALL",
                            n_boot=50)  # fmt: skip
    assert (result.roi_predictions["score"] == 0).all()
    assert _pooled(result, "roi", "sensitivity")["sensitivity"] == 0


def test_cross_refuses_mismatched_rows_and_shared_images():
    emb, rois = _train()
    with pytest.raises(ValueError, match="3 train embeddings for 4 train ROIs"):
        evaluate_cross(emb[:3], rois, *_test(), classifiers=KNN, positive_label="ALL")
    t_emb, t_rois, t_images = _test()
    t_images.loc[0, "image_id"] = "a/0"
    with pytest.raises(ValueError, match="1 images are in both"):
        evaluate_cross(emb, rois, t_emb, t_rois, t_images, classifiers=KNN,
                       positive_label="ALL")  # fmt: skip


def test_summarise_cross_one_row_per_pair_and_level_and_the_plot(tmp_path):
    metrics = _cross().metrics.assign(train="a", test="b", encoder="resnet18")
    table = summarise_cross(metrics)
    assert list(table.columns) == COLUMNS
    assert table[["train", "test", "level", "n"]].values.tolist() == [
        ["a", "b", "roi", 4],
        ["a", "b", "image", 5],
    ]
    roi = table.iloc[0]
    assert roi["accuracy"] == pytest.approx(0.5)
    assert roi["balanced_accuracy"] == pytest.approx(0.5)
    for m in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert (table[f"{m}_ci_low"] <= table[m] + 1e-12).all()
        assert (table[m] <= table[f"{m}_ci_high"] + 1e-12).all()
    within = pd.DataFrame({
        "dataset": ["a"], "encoder": ["resnet18"], "classifier": ["knn"], "level": ["roi"],
        "fold": ["pooled"], "leaky": [False], "metric": ["balanced_accuracy"],
        "balanced_accuracy": [0.9],
    })  # fmt: skip
    png = tmp_path / "cross.png"
    plot_cross_matrix(table, png, within=within)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

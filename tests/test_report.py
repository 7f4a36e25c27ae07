"""Tests of the plots (leukflow.evaluate.plots)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from leukflow.evaluate.plots import (
    PLOTTERS,
    plot_calibration,
    plot_confusion,
    plot_roc,
    plot_wbc_counts,
)

POS = "ALL"


def _levels(labels=(POS, "healthy"), n_images=30, seed=0):
    """ROI and image predictions of one classifier over 3 folds, about 80% right."""
    rng = np.random.default_rng(seed)
    label = np.array(labels)[np.arange(n_images) % len(labels)]
    n_rois = rng.integers(0, 4, n_images)
    images = pd.DataFrame(
        {
            "classifier": "knn",
            "fold": np.arange(n_images) % 3,
            "image_id": [f"i{k}" for k in range(n_images)],
            "label": label,
            "n_rois": n_rois,
        }
    )
    rois = images.loc[images.index.repeat(n_rois)].reset_index(drop=True)
    rois["roi_id"] = rois["image_id"] + "#" + rois.groupby("image_id").cumcount().astype(str)
    right = rng.random(len(rois)) < 0.8
    other = rng.choice(list(labels), len(rois))
    rois["pred"] = np.where(right, rois["label"], other)
    rois["score"] = np.clip(
        np.where(rois["pred"] == POS, 0.75, 0.25) + rng.normal(0, 0.15, len(rois)), 0, 1
    )
    share = rois.groupby("image_id")["score"].mean()
    images["score"] = images["image_id"].map(share).fillna(0.0)
    images["pred"] = np.where(images["score"] >= 0.5, POS, "not_" + POS)
    images["pred_class"] = images["label"].where(rng.random(n_images) < 0.8, labels[0])
    images.loc[images["n_rois"] == 0, "pred_class"] = "no_roi"
    images["confidence"] = np.where(images["n_rois"] > 0, rng.uniform(0.5, 1, n_images), 0.0)
    return {"roi": rois.drop(columns="n_rois"), "image": images}


def _png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("kind", sorted(PLOTTERS))
def test_every_kind_of_plot_is_written(tmp_path, kind):
    path = tmp_path / "sub" / f"knn_{kind}.png"
    PLOTTERS[kind](_levels(), title="demo / resnet18 / knn", positive_label=POS, path=path)
    width, height = _png(path)
    assert 600 <= width <= 2000
    assert 300 <= height <= 1200
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_confusion_adds_multiclass_matrices_for_more_than_two_labels(tmp_path):
    plot_confusion(_levels(), title="t", positive_label=POS, path=tmp_path / "two.png")
    five = _levels(labels=(POS, "b", "c", "d", "e"), n_images=50)
    plot_confusion(five, title="t", positive_label=POS, path=tmp_path / "five.png")
    (w2, h2), (w5, h5) = _png(tmp_path / "two.png"), _png(tmp_path / "five.png")
    assert h5 > 1.7 * h2  # a second row of matrices
    assert w5 > w2  # wider for five labels


def test_plots_survive_a_single_class(tmp_path, monkeypatch):
    from leukflow.evaluate import plots

    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    levels = _levels(labels=("healthy",))  # no ALL anywhere, every call "healthy"
    plot_roc(levels, title="t", positive_label=POS, path=tmp_path / "roc.png")
    plot_calibration(levels, title="t", positive_label=POS, path=tmp_path / "cal.png")
    plot_wbc_counts(levels, title="t", positive_label=POS, path=tmp_path / "wbc.png")
    plot_confusion(levels, title="t", positive_label=POS, path=tmp_path / "cm.png")
    for name in figures:
        _png(tmp_path / name)
    n = {level: len(preds) for level, preds in levels.items()}
    # ROC: undefined on one class, said on each level's panel
    roc_texts = [[t.get_text() for t in ax.texts] for ax in figures["roc.png"].axes]
    assert roc_texts == [["one class only: no ROC"]] * 2
    # binary confusion matrices: every truth negative, the calls as made
    for ax, (level, preds) in zip(figures["cm.png"].axes, levels.items(), strict=True):
        called = int((preds["pred"] == POS).sum())
        assert [int(t.get_text()) for t in ax.texts] == [n[level] - called, called, 0, 0]
    # calibration: the Brier score of all-negative truth is the mean squared score
    cal_legends = [[t.get_text() for t in ax.get_legend().get_texts()]
                   for ax in figures["cal.png"].axes[: len(levels)]]  # fmt: skip
    for texts, (level, preds) in zip(cal_legends, levels.items(), strict=True):
        brier = float(np.mean(preds["score"] ** 2))
        assert texts == ["perfectly calibrated", f"pooled folds (Brier {brier:.3f})"], level
    # WBC counts: one true class; image calls split into correct and false ALL
    images = levels["image"]
    false_all = int((images["pred"] == POS).sum())
    by_class, by_call = (
        [t.get_text() for t in ax.get_legend().get_texts()] for ax in figures["wbc.png"].axes
    )
    assert by_class == [f"healthy ({n['image']})"]
    assert false_all > 0  # the fixture calls some images ALL on their score alone
    assert by_call == [f"correct ({n['image'] - false_all})", f"false {POS} ({false_all})"]


def test_wbc_counts_needs_image_level(tmp_path):
    with pytest.raises(KeyError, match="image"):
        plot_wbc_counts(
            {"roi": _levels()["roi"]}, title="t", positive_label=POS, path=tmp_path / "x.png"
        )
    assert not (tmp_path / "x.png").exists()


def test_training_curves_and_k_selection_curves_are_drawn(tmp_path):
    from leukflow.evaluate.plots import plot_history, plot_k_scores

    history = pd.DataFrame({"epoch": [1, 2, 3], "loss": [0.9, 0.6, 0.4],
                            "accuracy": [0.5, 0.7, 0.8], "val_loss": [1.0, 0.8, 0.7],
                            "val_accuracy": [0.5, 0.6, 0.7]})  # fmt: skip
    table = pd.DataFrame({"label": ["all", "all", "L1", "L1"], "k": [2, 3, 2, 3],
                          "score": [0.7, 0.8, 0.6, 0.9]})  # fmt: skip
    drawn = {
        "history": lambda p: plot_history(history, title="t", path=p),
        "frozen": lambda p: plot_history(history.iloc[:0], title="t", path=p),
        "k": lambda p: plot_k_scores(table, title="t", path=p),
        "no_k": lambda p: plot_k_scores(table.iloc[:0], title="t", path=p),
    }
    for name, draw in drawn.items():
        draw(tmp_path / f"{name}.png")
        pixels = np.asarray(Image.open(tmp_path / f"{name}.png").convert("L"))
        assert pixels.std() > 5, name  # not a blank canvas

"""Tests of encoder training (leukflow.learn.train): modes, honesty, seeds, resuming."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from leukflow.learn import train as train_module
from leukflow.learn.embed import embed_crops
from leukflow.learn.models import build_encoder, encoder_from_checkpoint
from leukflow.learn.train import (
    S1_HEAD_EPOCHS,
    inner_split,
    one_cycle_lr,
    s1_augment,
    train_encoder,
    train_fold,
    training_rows,
)

CPU = torch.device("cpu")
S = 32
TRAIN = {"arch": "resnet18", "batch_size": 8, "lr": 1e-3, "device": CPU}


pytestmark = pytest.mark.usefixtures("one_thread")


def _crops(n=16, size=S, seed=0):
    """Half dark-purple crops ("ALL"), half pale ones ("HEM"), with seeded noise."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(n)[:, None] % 2 == 0, [[90, 50, 130]], [[220, 180, 180]])
    crops = base[:, None, None, :] + rng.normal(0, 20, (n, size, size, 3))
    labels = ["ALL" if i % 2 == 0 else "HEM" for i in range(n)]
    return np.clip(crops, 0, 255).astype(np.uint8), labels


def _rois(n=24, k=3):
    """12 patients of 2 ROIs each; patient p is ALL when p is even; 4 patients per fold."""
    patient = np.arange(n) // 2
    rois = pd.DataFrame({
        "roi_id": [f"r{i:02d}" for i in range(n)],
        "label": np.where(patient % 2 == 0, "ALL", "HEM"),
        "group": [f"P{p}" for p in patient],
        "fold": (patient // 2) % k,
    })  # fmt: skip
    noise, _ = _crops(n)
    base = np.where(rois["label"].to_numpy()[:, None] == "ALL", [[90, 50, 130]], [[220, 180, 180]])
    crops = np.clip(base[:, None, None, :] + noise * 0.1, 0, 255).astype(np.uint8)
    return rois, crops


@pytest.fixture(scope="module")
def trained():
    crops, labels = _crops()
    torch.set_num_threads(1)
    return crops, labels, *train_encoder(crops, labels, epochs=2, seed=0, **TRAIN)


# ---------------------------------------------------------- basic training


def test_checkpoint_and_history(trained):
    _, _, checkpoint, history = trained
    assert checkpoint["arch"] == "resnet18"
    assert checkpoint["classes"] == ["ALL", "HEM"]
    assert checkpoint["input_size_px"] == S
    assert checkpoint["training"] == "per_fold"
    assert checkpoint["has_head"]
    assert checkpoint["weights_sha256"] == ""
    assert checkpoint["state_dict"]["head.weight"].shape == (2, 512)
    assert list(history["epoch"]) == [1, 2]
    assert (history["loss"] > 0).all()
    assert history["val_loss"].isna().all()  # val_fraction 0: no inner split


def test_learns_an_easy_task(trained):
    _, _, _, history = trained
    assert history["loss"].iloc[-1] < 0.5 * history["loss"].iloc[0]
    assert history["accuracy"].iloc[-1] >= 0.9


def test_same_seed_identical_embeddings_other_seed_not(trained):
    crops, labels, checkpoint, _ = trained
    again, _ = train_encoder(crops, labels, epochs=2, seed=0, **TRAIN)
    other, _ = train_encoder(crops, labels, epochs=2, seed=1, **TRAIN)

    def embed(ck):
        emb, _ = embed_crops(encoder_from_checkpoint(ck), crops, input_size_px=S, dim=512,
                             mean=ck["mean"], std=ck["std"], device=CPU)  # fmt: skip
        return emb

    np.testing.assert_array_equal(embed(again), embed(checkpoint))
    assert not np.allclose(embed(other), embed(checkpoint))


def test_needs_two_classes_and_matching_labels():
    crops, labels = _crops(n=4)
    with pytest.raises(ValueError, match=r"need at least 2 classes.*\['ALL'\]"):
        train_encoder(crops, ["ALL"] * 4, epochs=1, seed=0, **TRAIN)
    with pytest.raises(ValueError, match="4 crops but 3 labels"):
        train_encoder(crops, labels[:3], epochs=1, seed=0, **TRAIN)
    with pytest.raises(ValueError, match=r"training: expected one of .*'s1'.*; got 'leaky'"):
        train_encoder(crops, labels, epochs=1, seed=0, training="leaky", **TRAIN)


def test_input_size_resizes_the_crops():
    crops, labels = _crops(n=4)
    ck, _ = train_encoder(crops, labels, epochs=1, seed=0, input_size_px=40,
                          arch="small_cnn", batch_size=4, lr=1e-3, device=CPU)  # fmt: skip
    assert ck["input_size_px"] == 40
    assert ck["state_dict"]["backbone.dense.1.weight"].shape == (196, 64 * 10 * 10)


# ---------------------------------------------------------------- honesty


def test_per_fold_training_never_sees_a_test_fold_roi():
    rois, crops = _rois()
    for fold in range(3):
        ck, _ = train_fold(rois, crops, fold=fold, training="per_fold", epochs=1, seed=0,
                           val_fraction=0.25, patience=1, **TRAIN)  # fmt: skip
        seen = set(ck["train_roi_ids"]) | set(ck["val_roi_ids"])
        test = set(rois.loc[rois["fold"] == fold, "roi_id"])
        assert seen == set(rois["roi_id"]) - test
        assert not set(ck["train_roi_ids"]) & set(ck["val_roi_ids"])
        # the inner split holds out whole patients
        group = rois.set_index("roi_id")["group"]
        assert not set(group[ck["train_roi_ids"]]) & set(group[ck["val_roi_ids"]])
        assert len(ck["val_roi_ids"]) > 0


def test_train_fold_passes_only_training_crops(monkeypatch):
    rois, crops = _rois()
    given = {}

    def spy(crops_, labels, **kwargs):
        given.update(crops=crops_, ids=kwargs["roi_ids"], labels=labels)
        return {}, pd.DataFrame()

    monkeypatch.setattr(train_module, "train_encoder", spy)
    train_fold(rois, crops, fold=1, training="s1", arch="resnet18")
    keep = (rois["fold"] != 1).to_numpy()
    assert given["ids"] == rois.loc[keep, "roi_id"].tolist()
    np.testing.assert_array_equal(given["crops"], crops[keep])
    train_fold(rois, crops, fold=None, training="all_labels", arch="resnet18")
    assert given["ids"] == rois["roi_id"].tolist()  # all_labels: every ROI (leaky)


def test_training_rows():
    folds = np.array([0, 1, 2, 0, 1])
    np.testing.assert_array_equal(
        training_rows(folds, fold=0, training="per_fold"), [False, True, True, False, True]
    )
    assert training_rows(folds, fold=None, training="frozen").all()
    assert training_rows(folds, fold=None, training="all_labels").all()
    with pytest.raises(ValueError, match="trains per fold: give the fold"):
        training_rows(folds, fold=None, training="per_fold")
    with pytest.raises(ValueError, match="no ROI is in test fold 7"):
        training_rows(folds, fold=7, training="s1")


def test_inner_split_groups_and_fallbacks(caplog):
    labels = ["a", "b"] * 10
    groups = [f"P{i // 2}" for i in range(20)]  # each patient has one a and one b
    fit, val = inner_split(labels, groups, val_fraction=0.2, seed=0)
    assert len(val) == 4
    assert not {groups[i] for i in fit} & {groups[i] for i in val}
    fit, val = inner_split(labels, ["one"] * 20, val_fraction=0.2, seed=0)
    assert len(fit) == 20
    assert len(val) == 0
    assert "fewer than 2 patient groups" in caplog.text
    fit, val = inner_split(labels, groups, val_fraction=0.0, seed=0)
    assert len(val) == 0


def test_early_stopping_keeps_the_best_epoch():
    rois, crops = _rois()
    ck, history = train_fold(rois, crops, fold=0, training="per_fold", epochs=6, seed=0,
                             val_fraction=0.25, patience=1, **{**TRAIN, "lr": 0.5})  # fmt: skip
    # lr 0.5 diverges: the validation loss soon stops improving, so training stops early
    assert len(history) < 6
    assert ck["best_epoch"] == int(history["val_loss"].idxmin()) + 1
    assert history["val_loss"].notna().all()


# ------------------------------------------------------------------- modes


def test_frozen_keeps_the_initial_weights(tmp_path):
    torch.manual_seed(3)
    from leukflow.learn.models import save_weights

    source = build_encoder("resnet18", 2)
    save_weights(source, "resnet18", tmp_path / "w.pth")
    crops, labels = _crops(n=4)
    ck, history = train_encoder(crops, labels, training="frozen", weights=str(tmp_path / "w.pth"),
                                normalisation="imagenet", epochs=3, seed=0, **TRAIN)  # fmt: skip
    assert len(history) == 0
    assert not ck["has_head"]
    assert ck["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert len(ck["weights_sha256"]) == 64
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(ck["state_dict"][f"backbone.{k}"], v)


def test_s1_recipe_trains_the_head_first_then_everything(monkeypatch):
    crops, labels = _crops()
    ck2, _ = train_encoder(crops, labels, training="s1", epochs=S1_HEAD_EPOCHS, seed=0,
                               **TRAIN)  # fmt: skip
    torch.manual_seed(0)
    init = build_encoder("resnet18", 2, input_size_px=S).state_dict()
    body = [k for k in init if k.startswith("backbone.") and k.endswith("weight")]
    assert all(torch.equal(ck2["state_dict"][k], init[k]) for k in body)  # head-only phase
    assert not torch.equal(ck2["state_dict"]["head.weight"], init["head.weight"])
    ck3, hist3 = train_encoder(crops, labels, training="s1", epochs=3, seed=0,
                               **{**TRAIN, "batch_size": 4})  # fmt: skip
    assert not torch.equal(
        ck3["state_dict"]["backbone.conv1.weight"], init["backbone.conv1.weight"]
    )
    # one-cycle within each phase: the last step's rate is far below the peak
    assert hist3["lr"].iloc[-1] < TRAIN["lr"] / 100


def test_s1_adam_betas_and_discriminative_rates(monkeypatch):
    made = []
    real_adam = torch.optim.Adam

    def spy(groups, **kwargs):
        opt = real_adam(groups, **kwargs)
        made.append(opt)
        return opt

    monkeypatch.setattr(torch.optim, "Adam", spy)
    crops, labels = _crops(n=8)
    train_encoder(crops, labels, training="s1", epochs=3, seed=0, **TRAIN)
    head_only, everything = made
    assert head_only.defaults["betas"] == (0.9, 0.99)
    assert len(head_only.param_groups) == 1
    assert [g["lr_scale"] for g in everything.param_groups] == [0.01, 0.1, 1.0]
    n_params = sum(len(g["params"]) for g in everything.param_groups)
    assert n_params == len(list(build_encoder("resnet18", 2).parameters()))


def test_one_cycle_schedule():
    rates = [one_cycle_lr(s, 100, 1e-3) for s in range(100)]
    assert rates[0] == pytest.approx(1e-3 / 25)
    assert max(rates) == pytest.approx(1e-3)
    assert int(np.argmax(rates)) == 25
    assert rates[-1] == pytest.approx(1e-3 / 25e4)


def test_s1_augment_keeps_shape_range_and_seed():
    x = torch.rand(4, 3, 16, 16)
    a = s1_augment(x, torch.Generator().manual_seed(0))
    b = s1_augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert a.min() >= 0
    assert a.max() <= 1
    assert not torch.allclose(a, x)


# ---------------------------------------------------------------- resuming


class Killed(RuntimeError):
    pass


def test_a_killed_training_resumes_and_ends_as_if_never_killed(tmp_path, monkeypatch, caplog):
    rois, crops = _rois()
    kw = {"fold": 0, "training": "per_fold", "epochs": 3, "seed": 0, "val_fraction": 0.25,
          "patience": 0, **TRAIN}  # fmt: skip
    whole, whole_history = train_fold(rois, crops, **kw)

    real_save = train_module._save_state
    saves = []

    def save_then_die(state, resume_dir):
        real_save(state, resume_dir)
        saves.append(state["epoch"])
        if state["epoch"] == 2:
            raise Killed("simulated kill after epoch 2")

    monkeypatch.setattr(train_module, "_save_state", save_then_die)
    with pytest.raises(Killed):
        train_fold(rois, crops, resume_dir=tmp_path / "r", **kw)
    assert (tmp_path / "r" / "last.pt").is_file()
    monkeypatch.setattr(train_module, "_save_state", real_save)
    with caplog.at_level(logging.INFO, logger="leukflow.learn.train"):
        resumed, history = train_fold(rois, crops, resume_dir=tmp_path / "r", **kw)
    assert "after epoch 2" in caplog.text
    assert list(history["epoch"]) == [1, 2, 3]
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in whole["state_dict"].items())
    np.testing.assert_array_equal(history["loss"], whole_history["loss"])
    assert not (tmp_path / "r").exists()  # removed once training ends


def test_a_corrupt_checkpoint_is_reported_and_the_last_good_one_used(tmp_path, monkeypatch,
                                                                      caplog):  # fmt: skip
    crops, labels = _crops()
    kw = {"epochs": 3, "seed": 0, **TRAIN}
    whole, _ = train_encoder(crops, labels, **kw)
    real_save = train_module._save_state

    def save_then_die(state, resume_dir):
        real_save(state, resume_dir)
        if state["epoch"] == 2:
            raise Killed

    monkeypatch.setattr(train_module, "_save_state", save_then_die)
    with pytest.raises(Killed):
        train_encoder(crops, labels, resume_dir=tmp_path, **kw)
    monkeypatch.setattr(train_module, "_save_state", real_save)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated, as by a full disk
    with caplog.at_level(logging.INFO, logger="leukflow.learn.train"):
        resumed, history = train_encoder(crops, labels, resume_dir=tmp_path, **kw)
    assert f"resume checkpoint {last} is corrupt" in caplog.text
    assert "prev.pt after epoch 1" in caplog.text
    assert list(history["epoch"]) == [1, 2, 3]
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in whole["state_dict"].items())


def test_a_resume_state_of_other_data_is_ignored(tmp_path, monkeypatch, caplog):
    crops, labels = _crops(n=8)
    real_save = train_module._save_state

    def die(state, resume_dir):
        real_save(state, resume_dir)
        raise Killed

    monkeypatch.setattr(train_module, "_save_state", die)
    with pytest.raises(Killed):
        train_encoder(crops, labels, epochs=2, seed=0, resume_dir=tmp_path, **TRAIN)
    monkeypatch.setattr(train_module, "_save_state", real_save)
    _, history = train_encoder(crops, labels, epochs=2, seed=1, resume_dir=tmp_path, **TRAIN)
    assert "belongs to other data or settings" in caplog.text
    assert list(history["epoch"]) == [1, 2]

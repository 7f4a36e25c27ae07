"""Tests of colour robustness: HED jitter, stain normalisation, group norm (leukflow.learn)."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from skimage import color
from torch import nn

from leukflow.core.config import ConfigError, validate_config
from leukflow.deploy.predict import _fold_encoder
from leukflow.learn import stain
from leukflow.learn.embed import embed_crops
from leukflow.learn.models import (
    build_encoder,
    encoder_from_checkpoint,
    normalise,
    save_checkpoint,
    to_unit,
)
from leukflow.learn.train import train_encoder, train_fold

CPU = torch.device("cpu")
S = 24
TRAIN = {"arch": "small_cnn", "batch_size": 8, "lr": 1e-3, "epochs": 1, "seed": 0, "device": CPU}

pytestmark = pytest.mark.usefixtures("one_thread")

# haematoxylin and eosin optical-density vectors (RGB), as in Macenko et al. 2009
H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])


def _smear_crops(n=6, size=S, stains=(H_VEC, E_VEC), seed=0):
    """Crops drawn by the stain model: a haematoxylin disc (nucleus) on eosin (red cells).

    Returns the uint8 crops and the concentrations they were drawn from.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).astype(float)
    h = disc[None] * rng.uniform(0.8, 1.2, (n, 1, 1)) + rng.uniform(0, 0.05, (n, size, size))
    e = 0.3 + 0.4 * rng.uniform(0, 1, (n, size, size))
    vectors = np.stack([v / np.linalg.norm(v) for v in stains], 1)  # (3, 2)
    od = np.stack([h, e], -1) @ vectors.T
    return np.round(np.exp(-od) * 255).clip(0, 255).astype(np.uint8), np.stack([h, e], -1)


def _unit(crops):
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------ colour spaces


def test_rgb_to_hed_and_lab_match_scikit_image():
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).double() / 255
    hed = stain.rgb_to_hed(x).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.maximum(hed, 0), color.rgb2hed(crops), atol=1e-9)
    lab = stain.rgb_to_lab(x).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(lab, color.rgb2lab(crops), atol=1e-6)
    np.testing.assert_allclose(stain.lab_to_rgb(stain.rgb_to_lab(x)).numpy(), x.numpy(), atol=1e-9)
    mid = x.clamp(0.01, 1)  # away from the 1e-6 floor, HED inverts exactly
    np.testing.assert_allclose(stain.hed_to_rgb(stain.rgb_to_hed(mid)).numpy(), mid.numpy(),
                               atol=1e-9)  # fmt: skip


# ------------------------------------------------------------------ HED jitter


def test_hed_jitter_stays_within_its_bounds_per_image_and_channel():
    crops, _ = _smear_crops(4)
    x = _unit(crops).double()
    assert torch.equal(stain.hed_jitter(x, torch.Generator(), scale=0, shift=0), x)
    scale, shift = 0.1, 0.02
    out = stain.hed_jitter(x, torch.Generator().manual_seed(0), scale=scale, shift=shift)
    again = stain.hed_jitter(x, torch.Generator().manual_seed(0), scale=scale, shift=shift)
    assert torch.equal(out, again)
    assert not torch.equal(out, x)
    before, after = stain.rgb_to_hed(x), stain.rgb_to_hed(out)
    unclipped = ((out > 1e-3) & (out < 1 - 1e-3)).all(1, keepdim=True).expand_as(out)
    bound = scale * before.abs() + shift + 1e-6
    assert ((after - before).abs() <= bound)[unclipped].all()
    # one alpha and beta per image and channel: the change differs between images
    assert not torch.allclose(after[0] - before[0], after[1] - before[1])


# ----------------------------------------------------------- stain normalisation


def test_macenko_recovers_a_smear_stained_with_other_vectors():
    reference, _conc = _smear_crops(8)
    other_h, other_e = np.array([0.55, 0.80, 0.25]), np.array([0.15, 0.90, 0.30])
    restained, _ = _smear_crops(8, stains=(other_h, other_e))
    target = stain.fit_stain_target(reference, "macenko")
    fitted = np.array(target["stains"])  # (3, 2): H then E
    unit_h, unit_e = H_VEC / np.linalg.norm(H_VEC), E_VEC / np.linalg.norm(E_VEC)
    assert fitted[:, 0] @ unit_h > 0.98
    assert fitted[:, 1] @ unit_e > 0.98
    out = stain.normalise_stain_crops(restained, target)
    before = np.abs(restained.astype(int) - reference).mean()
    after = np.abs(out.astype(int) - reference).mean()
    assert after < before / 3, (before, after)


def test_reinhard_moves_each_crop_onto_the_target_statistics():
    crops, _ = _smear_crops(6)
    target = stain.fit_stain_target(crops, "reinhard")
    shifted = np.clip(crops * np.array([0.8, 1.0, 1.15]), 0, 255).astype(np.uint8)
    out = stain.normalise_stain(_unit(shifted).double(), target)
    lab = stain.rgb_to_lab(out).flatten(2)
    np.testing.assert_allclose(lab.mean(2).numpy(), np.tile(target["mean"], (6, 1)), atol=1.0)
    np.testing.assert_allclose(lab.std(2).numpy(), np.tile(target["std"], (6, 1)), rtol=0.05)


def test_normalisation_none_and_blank_crops_are_left_unchanged():
    crops, _ = _smear_crops(3)
    assert stain.normalise_stain_crops(crops, {"method": "none"}) is crops
    blank = np.full((2, S, S, 3), 250, np.uint8)  # no stained pixel: Macenko cannot estimate
    target = stain.fit_stain_target(crops, "macenko")
    np.testing.assert_array_equal(stain.normalise_stain_crops(blank, target), blank)
    with pytest.raises(ValueError, match="too few stained pixels"):
        stain.fit_stain_target(blank, "macenko")
    with pytest.raises(ValueError, match="expected one of"):
        stain.fit_stain_target(crops, "vahadane")


def _fold_rois(n=24, k=3):
    patient = np.arange(n) // 2
    rois = pd.DataFrame({
        "roi_id": [f"r{i:02d}" for i in range(n)],
        "label": np.where(patient % 2 == 0, "ALL", "HEM"),
        "group": [f"P{p}" for p in patient],
        "fold": (patient // 2) % k,
    })  # fmt: skip
    crops, _ = _smear_crops(n)
    return rois, crops


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_stain_target_comes_from_training_fold_crops_only(method):
    rois, crops = _fold_rois()
    test = (rois["fold"] == 1).to_numpy()
    ck, _ = train_fold(rois, crops, fold=1, training="per_fold", stain_normalisation=method,
                       **TRAIN)  # fmt: skip
    assert ck["stain"] == stain.fit_stain_target(crops[~test], method)
    # repaint the test fold: a target that saw it would move
    repainted = crops.copy()
    repainted[test] = 255 - repainted[test]
    again, _ = train_fold(rois, repainted, fold=1, training="per_fold",
                          stain_normalisation=method, **TRAIN)  # fmt: skip
    assert again["stain"] == ck["stain"]
    assert again["mean"] == ck["mean"]


def test_stain_target_is_applied_alike_in_training_embedding_and_predict(tmp_path):
    crops, _ = _smear_crops(8)
    labels = ["ALL", "HEM"] * 4
    ck, _ = train_encoder(crops, labels, stain_normalisation="macenko", **TRAIN)
    assert ck["stain"]["method"] == "macenko"
    model = encoder_from_checkpoint(ck)
    with torch.inference_mode():
        x = stain.normalise_stain(to_unit(torch.from_numpy(crops), S), ck["stain"])
        manual = model.embed(normalise(x, ck["mean"], ck["std"]))[0].numpy()
    kwargs = {"input_size_px": S, "dim": model.dim, "mean": ck["mean"], "std": ck["std"],
              "device": CPU}  # fmt: skip
    embedded, _ = embed_crops(model, crops, stain=ck["stain"], **kwargs)
    np.testing.assert_allclose(embedded, manual, atol=1e-5)
    unnormalised, _ = embed_crops(model, crops, **kwargs)
    assert not np.allclose(unnormalised, manual, atol=1e-3)
    save_checkpoint(ck, tmp_path / "fold_0.pt")
    embed, meta, _, _ = _fold_encoder(tmp_path / "fold_0.pt", CPU)
    assert meta["stain"] == ck["stain"]
    np.testing.assert_allclose(embed(crops), manual, atol=1e-5)


def test_config_refuses_stain_normalisation_for_a_frozen_encoder():
    config = yaml.safe_load(open("config/config.yaml"))
    config["encoders"]["resnet18"].update(training="frozen", stain_normalisation="reinhard")
    with pytest.raises(ConfigError, match="training other than frozen"):
        validate_config(config, check_paths=False)
    with pytest.raises(ValueError, match="needs a network trained per fold"):
        train_encoder(*_smear_crops(4)[:1], ["a", "b"] * 2, training="frozen",
                      stain_normalisation="reinhard", **TRAIN)  # fmt: skip


# ------------------------------------------------------------------ group norm


def _two_and_four(model):
    """Logits of two images alone and in a batch of four, in training mode (dropout off)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x[:2]), model(x)[:2]


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "yolov8n_cls"])
def test_group_norm_replaces_every_batch_norm_and_sees_each_image_alone(arch):
    torch.manual_seed(0)
    model = build_encoder(arch, 2, input_size_px=32, norm="group")
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds
    assert nn.BatchNorm2d not in kinds
    alone, together = _two_and_four(model)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)
    # batch norm, by contrast, scales an image by its batch's statistics
    batch_alone, batch_together = _two_and_four(build_encoder(arch, 2, input_size_px=32))
    assert not torch.allclose(batch_alone, batch_together, atol=1e-3)


def test_hed_jitter_changes_training_reproducibly():
    crops, _ = _smear_crops(16)
    labels = ["ALL", "HEM"] * 8
    plain, _ = train_encoder(crops, labels, **TRAIN)
    jittered, _ = train_encoder(crops, labels, hed_jitter_scale=0.05, hed_jitter_shift=0.05,
                                **TRAIN)  # fmt: skip
    again, _ = train_encoder(crops, labels, hed_jitter_scale=0.05, hed_jitter_shift=0.05,
                             **TRAIN)  # fmt: skip
    weights = "head.weight"
    assert not torch.equal(plain["state_dict"][weights], jittered["state_dict"][weights])
    assert torch.equal(again["state_dict"][weights], jittered["state_dict"][weights])


def test_group_norm_checkpoint_rebuilds_its_network():
    crops, _ = _smear_crops(8)
    ck, _ = train_encoder(crops, ["ALL", "HEM"] * 4, norm="group", **TRAIN)
    assert ck["norm"] == "group"
    assert any(k.endswith("running_mean") for k in ck["state_dict"]) is False
    model = encoder_from_checkpoint(ck)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    with pytest.raises(ValueError, match="norm must be one of"):
        build_encoder("small_cnn", 2, input_size_px=32, norm="layer")


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "reinhard", "mean": [1, 2], "std": [1, 1, 1]},
        {"method": "reinhard", "mean": ["a", "b", "c"], "std": [1, 1, 1]},
        {"method": "macenko", "stains": [[1, 2, 3]], "max_c": [1, 1]},
        {"method": "macenko", "stains": [[1, 0], [0, 1], [1, 1]], "max_c": [float("nan"), 1]},
        {"method": "__import__"},
        "reinhard",
    ],
)
def test_a_checkpoint_with_a_malformed_stain_target_is_unreadable(tmp_path, bad):
    from leukflow.data.io import InvalidInputError
    from leukflow.learn.models import load_checkpoint

    crops, _ = _smear_crops(8)
    for method in stain.STAIN_METHODS:  # what training writes passes
        stain.check_stain_target(stain.fit_stain_target(crops, method))
    path = tmp_path / "encoder.pt"
    torch.save({"arch": "small_cnn", "stain": bad}, path)
    with pytest.raises(InvalidInputError, match=f"{path}: stain target"):
        load_checkpoint(path)


@pytest.mark.e2e
def test_e2e_checkpoint_records_the_colour_options_that_predict_applies(kinds_run):
    """kinds_run's ``small`` encoder trains with group norm, HED jitter and Reinhard.

    test_deploy_kinds checks that predict reproduces its calls; here, that the
    checkpoint carries the target fitted on the training crops.
    """
    _, out = kinds_run
    ck = torch.load(out / "train" / "demo" / "small" / "fold_0.pt", weights_only=True)
    assert ck["norm"] == "group"
    assert ck["stain"]["method"] == "reinhard"
    assert len(ck["stain"]["mean"]) == 3
    assert not any(k.endswith("running_mean") for k in ck["state_dict"])

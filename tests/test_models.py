"""Tests of CNN encoders (leukflow.models) and embedding (leukflow.embed), tiny and on CPU."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from leukflow.embed import embed_crops
from leukflow.models import (
    build_encoder,
    channel_stats,
    load_encoder,
    save_checkpoint,
    to_tensor,
    train_encoder,
)

CPU = torch.device("cpu")
N, S = 16, 32
TRAIN = {"arch": "resnet18", "weights": "none", "batch_size": 8, "lr": 1e-3, "device": CPU}


def _crops(n=N, size=S, seed=0):
    """Half dark-purple crops ("ALL"), half pale ones ("HEM"), with seeded noise."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(n)[:, None] % 2 == 0, [[90, 50, 130]], [[220, 180, 180]])
    crops = base[:, None, None, :] + rng.normal(0, 20, (n, size, size, 3))
    labels = ["ALL" if i % 2 == 0 else "HEM" for i in range(n)]
    return np.clip(crops, 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: OpenMP threads cost more than they give, and on a busy
    # 2-core machine they make a training step 20-50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(one_thread):
    crops, labels = _crops()
    checkpoint, history = train_encoder(crops, labels, epochs=2, seed=0, **TRAIN)
    return crops, labels, checkpoint, history


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ train_encoder


def test_train_encoder_checkpoint_and_history(trained):
    crops, _, checkpoint, history = trained
    assert set(checkpoint) == {"state_dict", "arch", "classes", "mean", "std", "input_size_px"}
    assert checkpoint["arch"] == "resnet18"
    assert checkpoint["classes"] == ["ALL", "HEM"]
    assert checkpoint["input_size_px"] == S
    mean, std = channel_stats(crops)
    assert checkpoint["mean"] == pytest.approx(mean)
    assert checkpoint["std"] == pytest.approx(std)
    state = checkpoint["state_dict"]
    assert state["fc.weight"].shape == (2, 512)
    assert all(t.device.type == "cpu" for t in state.values())
    assert list(history.columns) == ["epoch", "loss", "accuracy", "seconds"]
    assert list(history["epoch"]) == [1, 2]
    assert (history["loss"] > 0).all()
    assert history["accuracy"].between(0, 1).all()
    assert (history["seconds"] >= 0).all()


def test_train_encoder_changes_the_weights(trained):
    _, _, checkpoint, _ = trained
    torch.manual_seed(0)
    initial = build_encoder("resnet18", 2).state_dict()
    assert not torch.equal(initial["conv1.weight"], checkpoint["state_dict"]["conv1.weight"])


def test_train_encoder_same_seed_same_weights(trained):
    crops, labels, checkpoint, history = trained
    again, history_again = train_encoder(crops, labels, epochs=2, seed=0, **TRAIN)
    assert _same_state(again["state_dict"], checkpoint["state_dict"])
    np.testing.assert_array_equal(history_again["loss"], history["loss"])


def test_train_encoder_other_seed_other_weights(trained):
    crops, labels, checkpoint, _ = trained
    other, _ = train_encoder(crops, labels, epochs=2, seed=1, **TRAIN)
    assert other["state_dict"].keys() == checkpoint["state_dict"].keys()
    assert not torch.equal(
        other["state_dict"]["conv1.weight"], checkpoint["state_dict"]["conv1.weight"]
    )
    assert not torch.equal(other["state_dict"]["fc.weight"], checkpoint["state_dict"]["fc.weight"])


def test_train_encoder_learns_an_easy_task(trained):
    # Dark purple vs pale crops: two epochs are enough to fit the training set.
    _, _, _, history = trained
    assert history["loss"].iloc[-1] < 0.5 * history["loss"].iloc[0]
    assert history["accuracy"].iloc[-1] >= 0.9


def test_train_encoder_needs_two_classes():
    crops, _ = _crops(n=4)
    with pytest.raises(ValueError, match=r"need at least 2 classes.*\['ALL'\]"):
        train_encoder(crops, ["ALL"] * 4, epochs=1, seed=0, **TRAIN)


def test_train_encoder_label_count_mismatch():
    crops, labels = _crops(n=4)
    with pytest.raises(ValueError, match="4 crops but 3 labels"):
        train_encoder(crops, labels[:3], epochs=1, seed=0, **TRAIN)


# ------------------------------------------------------------ checkpoints


def test_save_and_load_round_trip(trained, tmp_path):
    crops, _, checkpoint, _ = trained
    path = tmp_path / "fold_0.pt"
    save_checkpoint(checkpoint, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold_0.pt"]

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {k: v for k, v in raw.items() if k != "state_dict"} == {
        k: v for k, v in checkpoint.items() if k != "state_dict"
    }
    assert _same_state(raw["state_dict"], checkpoint["state_dict"])

    model, loaded = load_encoder(path)
    assert not model.training
    assert loaded["classes"] == ["ALL", "HEM"]
    reference = build_encoder("resnet18", 2)
    reference.load_state_dict(checkpoint["state_dict"])
    reference.eval()
    x = to_tensor(crops[:4], checkpoint["mean"], checkpoint["std"])
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        fresh = build_encoder("resnet18", 2).eval()
        assert not torch.allclose(model(x), fresh(x))


# ---------------------------------------------------------------- build_encoder


def test_build_encoder_from_scratch():
    model = build_encoder("resnet18", 3)
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (512, 3)
    with torch.inference_mode():
        assert model.eval()(torch.zeros(2, 3, S, S)).shape == (2, 3)


def test_build_encoder_loads_a_local_weights_file(tmp_path):
    torch.manual_seed(123)
    source = torchvision.models.resnet18(weights=None)  # 1000-class head: must be ignored
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(0)
    model = build_encoder("resnet18", 2, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_mean, source.bn1.running_mean)
    assert model.fc.out_features == 2
    scratch = build_encoder("resnet18", 2)
    assert not torch.equal(scratch.conv1.weight, source.conv1.weight)


def test_build_encoder_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .*nope\.pth does not exist"):
        build_encoder("resnet18", 2, weights=str(tmp_path / "nope.pth"))


def test_build_encoder_weights_for_another_architecture(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit resnet18: missing"):
        build_encoder("resnet18", 2, weights=str(path))


def test_build_encoder_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch 'vgg11'"):
        build_encoder("vgg11", 2)


# ----------------------------------------------------------------- tensors


def test_channel_stats_and_to_tensor():
    crops = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    crops[0, ..., 0] = 255
    crops[..., 1] = 51
    mean, std = channel_stats(crops)
    assert mean == pytest.approx([0.5, 0.2, 0.0])
    assert std == pytest.approx([0.5, 1e-3, 1e-3])  # floor keeps a constant channel finite
    x = to_tensor(crops, mean, std)
    assert x.shape == (2, 3, 4, 4)
    assert x.dtype == torch.float32
    assert torch.allclose(x[0, 0], torch.ones(4, 4))
    assert torch.allclose(x[1, 0], -torch.ones(4, 4))
    assert torch.allclose(x[:, 1], torch.zeros(2, 4, 4), atol=1e-5)


# -------------------------------------------------------------------- embed_crops


def test_embed_crops_is_the_penultimate_layer(trained, tmp_path):
    crops, _, checkpoint, _ = trained
    save_checkpoint(checkpoint, tmp_path / "m.pt")
    model, ck = load_encoder(tmp_path / "m.pt")
    emb = embed_crops(model, crops, mean=ck["mean"], std=ck["std"], batch_size=5, device=CPU)
    assert emb.shape == (N, 512)
    assert emb.dtype == np.float32
    assert isinstance(model.fc, nn.Linear)  # the model itself is left untouched

    body = build_encoder("resnet18", 2)
    body.load_state_dict(checkpoint["state_dict"])
    body.fc = nn.Identity()
    with torch.inference_mode():
        manual = body.eval()(to_tensor(crops, ck["mean"], ck["std"])).numpy()
    np.testing.assert_allclose(emb, manual, rtol=1e-5, atol=1e-5)
    # The embedding feeds the classifier layer: fc(embedding) equals the model's logits.
    with torch.inference_mode():
        logits = model(to_tensor(crops, ck["mean"], ck["std"]))
        torch.testing.assert_close(model.fc(torch.from_numpy(emb)), logits, rtol=1e-4, atol=1e-4)


def test_embed_crops_does_not_depend_on_batch_size(trained):
    crops, _, checkpoint, _ = trained
    model = build_encoder("resnet18", 2)
    model.load_state_dict(checkpoint["state_dict"])
    kw = {"mean": checkpoint["mean"], "std": checkpoint["std"], "device": CPU}
    one = embed_crops(model, crops[:6], batch_size=1, **kw)
    all_at_once = embed_crops(model, crops[:6], batch_size=64, **kw)
    np.testing.assert_allclose(one, all_at_once, rtol=1e-5, atol=1e-5)
    assert model.training  # embed_crops works on a copy; the caller's mode is kept


def test_embed_crops_empty():
    model = build_encoder("resnet18", 2)
    emb = embed_crops(
        model, np.zeros((0, S, S, 3), np.uint8), mean=[0.5] * 3, std=[0.2] * 3, device=CPU
    )
    assert emb.shape == (0, 512)
    assert emb.dtype == np.float32

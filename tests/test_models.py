"""Tests of the encoder backbones, their weights and the input transform (tiny, on CPU)."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from leukflow.learn.embed import embed_crops
from leukflow.learn.hog import hog_dim, hog_features
from leukflow.learn.models import (
    ARCHITECTURES,
    KNOWN_ARCHS,
    Encoder,
    WeightsError,
    build_encoder,
    channel_stats,
    resolve_weights,
    save_weights,
    to_tensor,
)
from leukflow.learn.nets import SmallCNN, Xception
from leukflow.learn.train import train_encoder

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _crops(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------- every backbone


@pytest.mark.parametrize("arch", KNOWN_ARCHS)
def test_each_backbone_trains_one_step_and_embeds_with_its_dimension(arch):
    size = 75 if arch == "inception_v3" else 32
    crops = _crops(4, size)
    checkpoint, history = train_encoder(
        crops, ["ALL", "HEM"] * 2, arch=arch, epochs=1, batch_size=4, lr=1e-3, seed=0, device=CPU
    )
    if arch == "hog":
        model, dim = None, hog_dim(size)
        assert len(history) == 0
        assert not checkpoint["has_head"]
    else:
        dim = ARCHITECTURES[arch].dim
        model = build_encoder(arch, 2, input_size_px=size)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(checkpoint["state_dict"])
        assert history["epoch"].tolist() == [1]
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert any(k.startswith("backbone.") for k in changed)  # the step trained the body
        assert checkpoint["state_dict"]["head.weight"].shape == (2, dim)
    emb, probs = embed_crops(
        model, crops, input_size_px=size, dim=dim, mean=checkpoint["mean"],
        std=checkpoint["std"], with_probs=model is not None, device=CPU,
    )  # fmt: skip
    assert emb.shape == (4, dim)
    assert emb.dtype == np.float32
    assert np.isfinite(emb).all()
    if model is not None:
        assert probs.shape == (4, 2)
        np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_inception_needs_75_px():
    with pytest.raises(ValueError, match=r"inception_v3 needs inputs of at least 75 px; got"):
        build_encoder("inception_v3", 2, input_size_px=64)


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown arch 'vgg11'; expected one of \[.*'xception'"):
        build_encoder("vgg11", 2)
    with pytest.raises(ValueError, match="unknown arch 'vgg11'"):
        train_encoder(_crops(4, 32), ["a", "b"] * 2, arch="vgg11", epochs=1, batch_size=2,
                      lr=1e-3, seed=0)  # fmt: skip


def test_encoder_embed_is_the_input_of_the_head():
    model = build_encoder("resnet18", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        features, logits = model.embed(x)
        assert features.shape == (2, 512)
        torch.testing.assert_close(model.head(features), logits)
        torch.testing.assert_close(model(x), logits)
    assert isinstance(model.backbone.fc, nn.Identity)


def test_small_cnn_is_s2s_layers():
    net = SmallCNN(num_classes=3, input_size_px=64)
    convs = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    dense = [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    assert convs == [32, 64]
    assert dense == [196, 96, 3]
    assert net.dense[1].in_features == 64 * 16 * 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2


def test_xception_uses_separable_convolutions():
    net = Xception(num_classes=2, middle_blocks=1)
    depthwise = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) >= 10
    assert all(m.groups == m.in_channels for m in depthwise)
    assert net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


# ------------------------------------------------------------------- weights


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(1)
    trained = build_encoder("resnet18", 2)
    path = tmp_path / "mine.pth"
    save_weights(trained, "resnet18", path)
    torch.manual_seed(2)
    again = build_encoder("resnet18", 5, weights=str(path))  # another class count: head ignored
    x = torch.randn(2, 3, 32, 32)
    trained.eval(), again.eval()
    with torch.inference_mode():
        torch.testing.assert_close(again.backbone(x), trained.backbone(x), rtol=0, atol=0)
    assert again.head.out_features == 5


def test_a_torchvision_state_dict_loads_and_its_1000_class_head_is_ignored(tmp_path):
    torch.manual_seed(123)
    source = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(source.state_dict(), path)
    model = build_encoder("mobilenet_v3_small", 2, weights=str(path))
    assert torch.equal(model.backbone.features[0][0].weight, source.features[0][0].weight)
    assert torch.equal(model.backbone.classifier[0].weight, source.classifier[0].weight)
    assert model.head.out_features == 2


def test_torchvision_densenet_keys_are_renamed(tmp_path):
    source = torchvision.models.densenet121(weights=None)
    old_style = {
        k.replace("norm1", "norm.1").replace("conv1", "conv.1") if "denselayer" in k else k: v
        for k, v in source.state_dict().items()
        if not k.endswith("num_batches_tracked")  # older than torch 0.4.1, as the real file
    }
    assert any("norm.1" in k for k in old_style)
    torch.save(old_style, tmp_path / "d.pth")
    model = build_encoder("densenet121", 2, weights=str(tmp_path / "d.pth"))
    layer = model.backbone.features.denseblock1.denselayer1
    assert torch.equal(layer.conv1.weight, source.features.denseblock1.denselayer1.conv1.weight)


def test_weights_of_another_architecture_fail_naming_the_keys(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit resnet18: missing keys \[\]; "
                       r"unexpected keys \[layer1\.2\.bn1\.bias.*more\)\]"):  # fmt: skip
        build_encoder("resnet18", 2, weights=str(path))
    small = tmp_path / "conv.pth"
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), small)
    with pytest.raises(WeightsError, match=r"missing keys \[bn1\.bias, .*\]; unexpected keys "
                       r"\[bias, weight\]"):  # fmt: skip
        build_encoder("resnet18", 2, weights=str(small))


def test_weights_with_wrong_shapes_and_not_a_state_dict(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"wrong shapes \[conv1\.weight \(64, 3, 3, 3\) != "):
        build_encoder("resnet18", 2, weights=str(tmp_path / "shape.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read as a state dict"):
        build_encoder("resnet18", 2, weights=str(tmp_path / "junk.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="expected a state dict of tensors"):
        build_encoder("resnet18", 2, weights=str(tmp_path / "list.pth"))


def test_bad_weights_fail_before_any_training(tmp_path, monkeypatch):
    torch.save(nn.Conv2d(3, 4, 3).state_dict(), tmp_path / "conv.pth")
    monkeypatch.setattr(torch.optim, "Adam", None)  # training would crash differently
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        train_encoder(_crops(4, 32), ["a", "b"] * 2, arch="resnet18", weights=str(tmp_path /
                      "conv.pth"), epochs=1, batch_size=2, lr=1e-3, seed=0)  # fmt: skip


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights file .*nope\.pth does not exist"):
        build_encoder("resnet18", 2, weights=str(tmp_path / "nope.pth"))


def test_torchvision_weights_come_from_the_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError, match=f"expected {expected} in the torch hub cache"):
        resolve_weights("resnet18", "torchvision")
    expected.parent.mkdir(parents=True)
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), expected)
    assert resolve_weights("resnet18", "torchvision") == expected
    model = build_encoder("resnet18", 2, weights="torchvision")
    assert torch.equal(model.backbone.conv1.weight, torch.load(expected)["conv1.weight"])
    with pytest.raises(ValueError, match="torchvision has no weights for xception"):
        resolve_weights("xception", "torchvision")


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


def test_to_tensor_resizes_to_the_input_size():
    crops = np.full((3, 32, 32, 3), 128, dtype=np.uint8)
    x = to_tensor(crops, [0.0] * 3, [1.0] * 3, input_size_px=80)
    assert x.shape == (3, 3, 80, 80)
    torch.testing.assert_close(x, torch.full_like(x, 128 / 255))


# --------------------------------------------------------------------- HOG


def test_hog_features_match_skimage():
    from skimage.color import rgb2gray
    from skimage.feature import hog

    crops = _crops(3, 32)
    feats = hog_features(crops, input_size_px=32)
    assert feats.shape == (3, hog_dim(32)) == (3, 324)  # 3x3 blocks of 2x2 cells x 9 bins
    expected = hog(rgb2gray(crops[1]), pixels_per_cell=(8, 8), cells_per_block=(2, 2),
                   block_norm="L2-Hys")  # fmt: skip
    np.testing.assert_allclose(feats[1], expected, rtol=1e-5)
    assert hog_features(crops, input_size_px=64).shape == (3, hog_dim(64))
    with pytest.raises(ValueError, match="fewer than cells_per_block"):
        hog_dim(8)


def test_encoder_class_is_a_module():
    assert issubclass(Encoder, nn.Module)

"""S4's YOLOv8 classifier: the network's published sizes, its recipe, and a tiny training."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from leukflow.learn.embed import embed_crops
from leukflow.learn.models import ARCHITECTURES, build_encoder, encoder_from_checkpoint
from leukflow.learn.nets import C2f, YOLOv8Cls
from leukflow.learn.recipes import auto_optimizer_choice, s4_lr, s4_optimizer
from leukflow.learn.train import train_fold

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


# ultralytics' published parameter counts of yolov8{n,s,m}-cls (1,000 ImageNet classes)
@pytest.mark.parametrize(("scale", "published_m"), [("n", 2.7), ("s", 6.4), ("m", 17.0)])
def test_parameter_counts_match_the_published_sizes(scale, published_m):
    net = YOLOv8Cls(scale, num_classes=1000)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params / 1e6 == pytest.approx(published_m, rel=0.05)
    # the depth multiple: C2f blocks of 3, 6, 6, 3 bottlenecks x 0.33 (n, s) or 0.67 (m)
    blocks = [len(m.m) for m in net.modules() if isinstance(m, C2f)]
    assert blocks == ([1, 2, 2, 1] if scale in "ns" else [2, 4, 4, 2])
    assert net.model[9].linear.in_features == 1280


def test_unknown_scale_is_refused():
    with pytest.raises(ValueError, match=r"scale must be one of \['n', 's', 'm'\]; got 'x'"):
        YOLOv8Cls("x")


def test_embedding_is_the_pooled_1280_d_head_conv_and_a_1000_class_file_loads(tmp_path):
    torch.manual_seed(0)
    source = YOLOv8Cls("n", num_classes=1000).eval()
    # an ultralytics-style state dict (model.0.conv..., model.9.linear) starts any class count
    torch.save(source.state_dict(), tmp_path / "yolov8n-cls.pt")
    model = build_encoder("yolov8n_cls", 2, weights=str(tmp_path / "yolov8n-cls.pt"),
                          input_size_px=64).eval()  # fmt: skip
    assert isinstance(model.backbone.model[9].linear, nn.Identity)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        features, logits = model.embed(x)
        head = source.model[9]
        expected = head.pool(head.conv(source.model[:9](x))).flatten(1)
    assert features.shape == (3, ARCHITECTURES["yolov8n_cls"].dim) == (3, 1280)
    torch.testing.assert_close(features, expected)
    assert logits.shape == (3, 2)


def test_auto_rule_picks_adamw_for_short_runs_and_sgd_beyond_10000_iterations():
    # S4 on ALL-IDB2: ~208 training crops, batch 32 (counted in batches of 64), 15 epochs
    short = auto_optimizer_choice(208, 32, 15, n_classes=2, lr=0.01)
    assert (short.name, short.iterations) == ("AdamW", 4 * 15)
    assert short.lr == pytest.approx(0.001667)  # 0.002 * 5 / (4 + 2), ignoring lr
    # 667 batches of 64 x 15 epochs = 10,005 iterations: SGD at the configured rate
    long = auto_optimizer_choice(667 * 64, 32, 15, n_classes=2, lr=0.01)
    assert (long.name, long.lr, long.iterations) == ("SGD", 0.01, 10_005)
    assert auto_optimizer_choice(666 * 64, 32, 15, n_classes=2, lr=0.01).name == "AdamW"


def test_s4_optimizer_decays_weights_but_not_biases_or_norms():
    net = YOLOv8Cls("n", num_classes=2)
    choice = auto_optimizer_choice(100, 32, 15, n_classes=2, lr=0.01)
    opt = s4_optimizer(net, choice, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4
    assert plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2, 4}  # conv and linear weights
    assert {p.ndim for p in plain["params"]} == {1}  # biases, batch-norm scales and shifts
    n_params = len(list(net.parameters()))
    assert len(decayed["params"]) + len(plain["params"]) == n_params
    sgd = s4_optimizer(net, auto_optimizer_choice(10**6, 32, 15, 2, lr=0.02), 5e-4)
    assert isinstance(sgd, torch.optim.SGD)
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["nesterov"]) == (
        0.02, 0.9, True,
    )  # fmt: skip


def test_s4_schedule_warms_up_then_decays_linearly_per_epoch():
    # 50 steps per epoch: warm-up over max(150, 100) steps
    assert s4_lr(0, 50, 15, 1.0) == 0.0
    assert s4_lr(75, 50, 15, 1.0) == pytest.approx(0.5 * (1 - 1 / 15 * 0.99))
    assert s4_lr(150, 50, 15, 1.0) == pytest.approx(1 - 3 / 15 * 0.99)
    assert s4_lr(14 * 50, 50, 15, 1.0) == pytest.approx(0.01 + 0.99 / 15)
    # few steps per epoch: warm-up takes at least 100 steps
    assert s4_lr(50, 5, 15, 1.0) == pytest.approx(0.5 * (1 - 10 / 15 * 0.99))


def test_yolov8n_trains_one_epoch_with_s4s_recipe_and_embeds():
    """CI's YOLOv8 check: n at 32 px, one epoch of tiny crops, through train_fold."""
    rng = np.random.default_rng(0)
    n = 24
    labels = np.where(np.arange(n) % 2 == 0, "ALL", "HEM")
    base = np.where(labels[:, None] == "ALL", [[90, 50, 130]], [[220, 180, 180]])
    crops = np.clip(base[:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255)
    crops = crops.astype(np.uint8)
    rois = pd.DataFrame({"roi_id": [f"r{i}" for i in range(n)], "label": labels,
                         "group": [f"P{i // 2}" for i in range(n)],
                         "fold": np.arange(n) % 3})  # fmt: skip
    checkpoint, history = train_fold(
        rois, crops, fold=0, training="s4", arch="yolov8n_cls", epochs=1, batch_size=4,
        lr=0.01, weight_decay=5e-4, seed=0, device=CPU,
    )  # fmt: skip
    assert checkpoint["arch"] == "yolov8n_cls"
    assert checkpoint["training"] == "s4"
    assert history["epoch"].tolist() == [1]
    assert math.isfinite(history["loss"].iloc[0])
    # 16 training crops = 4 steps of 4: the last step's rate is 3/100 of AdamW's warm-up target
    assert history["lr"].iloc[0] == pytest.approx(0.001667 * 3 / 100)
    model = encoder_from_checkpoint(checkpoint)
    test = crops[rois["fold"].to_numpy() == 0]
    emb, probs = embed_crops(model, test, input_size_px=32, dim=1280, mean=checkpoint["mean"],
                             std=checkpoint["std"], with_probs=True, device=CPU)  # fmt: skip
    assert emb.shape == (8, 1280)
    assert probs.shape == (8, 2)
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)

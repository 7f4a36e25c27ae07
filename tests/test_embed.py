"""Tests of embedding (leukflow.learn.embed) and the embedding store (leukflow.data.io)."""

import re

import numpy as np
import pytest
import torch
import zarr

from leukflow.data.io import (
    EmbeddingStoreWriter,
    InvalidInputError,
    embeddings_attrs,
    fold_embeddings,
    open_embeddings,
    open_probabilities,
    sha256_file,
    write_crops,
    write_embeddings,
)
from leukflow.learn.embed import embed_crops, embed_rois, iter_embeddings
from leukflow.learn.hog import hog_features
from leukflow.learn.models import encoder_from_checkpoint, save_checkpoint, to_tensor
from leukflow.learn.train import train_encoder

CPU = torch.device("cpu")
S = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _crops(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpt")
    crops, labels = _crops(8), ["ALL", "HEM"] * 4
    paths = []
    for fold in range(2):
        ck, _ = train_encoder(crops, labels, arch="small_cnn", epochs=1, batch_size=4,
                              lr=1e-3, seed=fold, device=CPU)  # fmt: skip
        paths.append(out / f"fold_{fold}.pt")
        save_checkpoint(ck, paths[-1])
    return paths


def test_embed_crops_matches_a_manual_forward_and_the_head(checkpoints):
    ck = torch.load(checkpoints[0], weights_only=True)
    model = encoder_from_checkpoint(ck)
    crops = _crops()
    emb, probs = embed_crops(model, crops, input_size_px=S, dim=96, mean=ck["mean"],
                             std=ck["std"], batch_size=3, with_probs=True, device=CPU)  # fmt: skip
    x = to_tensor(crops, ck["mean"], ck["std"])
    with torch.inference_mode():
        features = model.backbone(x)
        expected_probs = model(x).softmax(1)
    np.testing.assert_allclose(emb, features.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs, expected_probs.numpy(), rtol=1e-5, atol=1e-6)
    one, _ = embed_crops(model, crops, input_size_px=S, dim=96, mean=ck["mean"],
                         std=ck["std"], batch_size=1, device=CPU)  # fmt: skip
    np.testing.assert_allclose(one, emb, rtol=1e-5, atol=1e-6)


def test_embedding_leaves_the_model_in_its_mode(checkpoints):
    model = encoder_from_checkpoint(torch.load(checkpoints[0], weights_only=True)).train()
    embed_crops(model, _crops(4), input_size_px=S, dim=96, device=CPU)
    assert model.training


def test_embed_from_a_crop_store_with_a_worker(checkpoints, tmp_path):
    crops = _crops(9)
    write_crops(crops, tmp_path / "crops.zarr", {})
    ck = torch.load(checkpoints[0], weights_only=True)
    model = encoder_from_checkpoint(ck)
    kw = {"input_size_px": S, "dim": 96, "mean": ck["mean"], "std": ck["std"], "device": CPU,
          "batch_size": 4}  # fmt: skip
    from_store, _ = embed_crops(model, tmp_path / "crops.zarr", num_workers=1, **kw)
    in_memory, _ = embed_crops(model, crops, **kw)
    np.testing.assert_array_equal(from_store, in_memory)
    kw.pop("dim")
    blocks = [len(e) for e, _ in iter_embeddings(model, tmp_path / "crops.zarr", **kw)]
    assert blocks == [4, 4, 1]


def test_empty_crops():
    emb, probs = embed_crops(None, np.zeros((0, S, S, 3), np.uint8), input_size_px=S, dim=324)
    assert emb.shape == (0, 324)
    assert probs is None


def test_embed_rois_round_trips_the_store_with_its_attrs(checkpoints, tmp_path):
    crops = _crops()
    store = tmp_path / "e.zarr"
    attrs = embed_rois(checkpoints, crops, store, leukflow_version="9.9", batch_size=4,
                       device=CPU)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.zarr"]  # no temporary left
    arrays = open_embeddings(store)
    assert sorted(arrays) == ["fold_0", "fold_1"]
    probabilities = open_probabilities(store)
    assert sorted(probabilities) == ["fold_0", "fold_1"]
    group = embeddings_attrs(store)
    assert group == attrs
    assert group["architecture"] == "small_cnn"
    assert group["training"] == "per_fold"
    assert group["leaky"] is False
    assert group["input_size_px"] == S
    assert group["leukflow_version"] == "9.9"
    assert group["normalisation"] == "dataset"
    assert group["classes"] == ["ALL", "HEM"]
    for fold, path in enumerate(checkpoints):
        arr = arrays[f"fold_{fold}"]
        assert arr.shape == (10, 96)
        assert arr.dtype == np.float32
        assert arr.attrs["weights_sha256"] == sha256_file(path)
        assert re.fullmatch(r"[0-9a-f]{64}", arr.attrs["train_roi_ids_sha256"])
        ck = torch.load(path, weights_only=True)
        assert arr.attrs["normalisation"] == {"mean": ck["mean"], "std": ck["std"]}
        expected, probs = embed_crops(encoder_from_checkpoint(ck), crops, input_size_px=S,
                                      dim=96, mean=ck["mean"], std=ck["std"], device=CPU,
                                      batch_size=4, with_probs=True)  # fmt: skip
        np.testing.assert_array_equal(arr[:], expected)
        np.testing.assert_array_equal(probabilities[f"fold_{fold}"][:], probs)
        assert probabilities[f"fold_{fold}"].attrs["classes"] == ["ALL", "HEM"]
    assert not np.allclose(arrays["fold_0"][:], arrays["fold_1"][:])
    lazy = fold_embeddings(store, [0, 1])
    assert isinstance(lazy[1], zarr.Array)
    np.testing.assert_array_equal(lazy[1][3:5], arrays["fold_1"][3:5])


def test_a_shared_encoder_serves_every_fold(tmp_path):
    crops = _crops(6)
    ck, _ = train_encoder(crops, ["a"] * 6, arch="hog", epochs=1, batch_size=2, lr=1.0, seed=0)
    save_checkpoint(ck | {"training": "frozen"}, tmp_path / "all.pt")
    embed_rois([tmp_path / "all.pt"], crops, tmp_path / "h.zarr", leukflow_version="x")
    assert sorted(open_embeddings(tmp_path / "h.zarr")) == ["all"]
    assert open_probabilities(tmp_path / "h.zarr") == {}  # no head: no probabilities
    folds = fold_embeddings(tmp_path / "h.zarr", [0, 1, 2])
    assert folds[0] is folds[2]
    np.testing.assert_allclose(folds[1][:], hog_features(crops, input_size_px=S), rtol=1e-6)


def test_all_labels_stores_are_marked_leaky(checkpoints, tmp_path):
    ck = torch.load(checkpoints[0], weights_only=True) | {"training": "all_labels"}
    save_checkpoint(ck, tmp_path / "all.pt")
    embed_rois([tmp_path / "all.pt"], _crops(3), tmp_path / "s.zarr", leukflow_version="x")
    assert embeddings_attrs(tmp_path / "s.zarr")["leaky"] is True
    assert sorted(open_embeddings(tmp_path / "s.zarr")) == ["all"]
    assert sorted(open_probabilities(tmp_path / "s.zarr")) == ["all"]


def test_missing_folds_are_named(tmp_path):
    write_embeddings({"fold_0": np.zeros((2, 3))}, tmp_path / "e.zarr", {})
    with pytest.raises(
        InvalidInputError, match=r"no embeddings for folds \[1\]; has \['fold_0'\]"
    ):
        fold_embeddings(tmp_path / "e.zarr", [0, 1])


def test_writer_chunks_rows_compresses_and_is_atomic(tmp_path):
    path = tmp_path / "w.zarr"
    rows = np.random.default_rng(0).normal(size=(700, 8)).astype(np.float32)
    with EmbeddingStoreWriter(path, {"architecture": "x"}) as writer:
        arr = writer.add_array("fold_0", 8, {"k": 1})
        for i in range(0, 700, 64):
            arr.append(rows[i : i + 64])
        assert not path.exists()  # nothing under the final name until closed
        with pytest.raises(ValueError, match=r"expected \(n, 8\) rows; got \(2, 3\)"):
            arr.append(np.zeros((2, 3)))
    stored = zarr.open_array(str(path / "fold_0"), mode="r")
    np.testing.assert_array_equal(stored[:], rows)
    assert stored.chunks == (max(256, (1 << 20) // 8), 8)
    assert "zstd" in str(stored.compressors).lower()

    def fail_half_way():
        with EmbeddingStoreWriter(path, {}) as writer:
            writer.add_array("fold_0", 8, {}).append(rows[:5])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_half_way()
    np.testing.assert_array_equal(open_embeddings(path)["fold_0"][:], rows)  # old store kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.zarr"]


@pytest.mark.parametrize("arch", ["hog", "small_cnn"])
def test_frozen_embeddings_are_cached_per_image(arch, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="leukflow.learn.embed")
    crops = _crops(12, seed=3)
    ck, _ = train_encoder(crops, ["ALL", "HEM"] * 6, arch=arch, training="frozen", epochs=1,
                          batch_size=4, lr=1e-3, normalisation="imagenet", seed=0,
                          device=CPU)  # fmt: skip
    save_checkpoint(ck, tmp_path / "all.pt")
    write_crops(crops, tmp_path / "crops.zarr", {})
    keys = ["a"] * 3 + ["b"] * 5 + ["c"] * 4  # three images' ROIs

    def run(name, keys, store):
        embed_rois([tmp_path / "all.pt"], store, tmp_path / name, leukflow_version="t",
                   batch_size=4, device=CPU, roi_keys=keys,
                   cache_dir=tmp_path / "cache")  # fmt: skip
        return [m for m in caplog.messages if m.startswith("frozen encoder")][-1]

    plain = tmp_path / "plain.zarr"
    embed_rois([tmp_path / "all.pt"], tmp_path / "crops.zarr", plain, leukflow_version="t",
               batch_size=4, device=CPU)  # fmt: skip
    assert run("one.zarr", keys, tmp_path / "crops.zarr") == (
        "frozen encoder: 3 images embedded; 0 read from the cache"
    )
    assert run("two.zarr", keys, tmp_path / "crops.zarr") == (
        "frozen encoder: 0 images embedded; 3 read from the cache"
    )
    # a fourth image: only it is embedded
    more = np.concatenate([crops, _crops(2, seed=9)])
    write_crops(more, tmp_path / "more.zarr", {})
    assert run("three.zarr", [*keys, "d", "d"], tmp_path / "more.zarr") == (
        "frozen encoder: 1 images embedded; 3 read from the cache"
    )
    want = open_embeddings(plain)["all"][:]
    for name in ("one.zarr", "two.zarr"):
        np.testing.assert_array_equal(open_embeddings(tmp_path / name)["all"][:], want)
    three = open_embeddings(tmp_path / "three.zarr")["all"][:]
    np.testing.assert_array_equal(three[:12], want)
    assert three.shape[0] == 14


def test_a_frozen_store_grows_by_the_new_rois_only(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="leukflow.learn.embed")
    crops = _crops(300, seed=4)  # over one zarr chunk of rows: links and a cut chunk
    ck, _ = train_encoder(crops[:6], ["a"] * 6, arch="hog", epochs=1, batch_size=2, lr=1.0,
                          seed=0)  # fmt: skip
    save_checkpoint(ck | {"training": "frozen"}, tmp_path / "all.pt")
    keys = [f"img{i // 3}" for i in range(300)]  # three ROIs per image
    ids = [f"d/img{i // 3}#{i % 3}" for i in range(300)]

    def run(name, n, mirror):
        write_crops(crops[:n], tmp_path / f"{name}_crops.zarr", {})
        embed_rois([tmp_path / "all.pt"], tmp_path / f"{name}_crops.zarr", tmp_path / name,
                   leukflow_version="t", device=CPU, roi_keys=keys[:n],
                   cache_dir=tmp_path / f"cache_{name}", roi_ids=ids[:n],
                   mirror=mirror)  # fmt: skip
        return open_embeddings(tmp_path / name)["all"]

    mirror = tmp_path / "mirror"
    first = run("grown.zarr", 270, mirror)[:]
    grown = run("grown.zarr", 300, mirror)
    assert "270 ROIs' embeddings linked from the last store; embedding 30" in caplog.messages
    fresh = run("fresh.zarr", 300, None)
    np.testing.assert_array_equal(grown[:], fresh[:])
    np.testing.assert_array_equal(grown[:270], first)
    # the first chunk of rows is the mirror's file itself (hard-linked, not written)
    chunk = tmp_path / "grown.zarr" / "all" / "c" / "0" / "0"
    assert chunk.stat().st_ino == (mirror / "store" / "all" / "c" / "0" / "0").stat().st_ino
    # a ROI edited in place (same id, another image content): embedded again from it on
    caplog.clear()
    keys[279:282] = ["edited"] * 3  # image 93's three ROIs
    run("grown.zarr", 300, mirror)
    assert "279 ROIs' embeddings linked from the last store; embedding 21" in caplog.messages

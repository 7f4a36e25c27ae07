"""Untrusted inputs: one list of formats, every file accounted for, odd TIFFs, confined paths.

The fuzz test corrupts real images from ../shared/data and sends them through
ingest and predict: nothing may escape as an exception, and every file ends in
the manifest or the rejects.
"""

import io
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from leukflow.data.datasets import list_demo
from leukflow.data.ingest import ingest_datasets, ingest_images
from leukflow.data.io import (
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    InvalidInputError,
    is_image_candidate,
    read_image_noted,
)

MIN_SIZE = 8


def _save(path: Path, rgb: np.ndarray, fmt: str, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, format=fmt, **kwargs)
    return path


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_predictor():
    """A real Predictor whose encoder is each crop's mean colour: no training run needed.

    Enough to drive predict's reading, segmentation, chunking and CSV code.
    """
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from leukflow.deploy.predict import FoldModel, Predictor
    from leukflow.segment import SegmentParams

    calls: list[int] = []

    def embed(crops: np.ndarray) -> np.ndarray:
        calls.append(len(crops))
        return crops.reshape(len(crops), -1, 3).mean(1).astype(np.float32) / 255

    rng = np.random.default_rng(0)
    clf = Pipeline([("lr", LogisticRegression())]).fit(
        rng.random((40, 3)), np.array(["ALL", "healthy"] * 20)
    )
    meta = {"arch": "mean", "classes": ["ALL", "healthy"], "input_size_px": 64}
    predictor = Predictor(
        results_dir=Path("."), dataset="d", encoder="mean", classifier="lr",
        params=SegmentParams(), folds=[FoldModel(0, embed, clf, meta)],
        classes=["ALL", "healthy"], positive_label="ALL", image_aggregation="any_positive",
        any_positive_threshold=0.5, device=torch.device("cpu"),
    )  # fmt: skip
    predictor.embed_calls = calls
    return predictor


def _reason(path: Path) -> str:
    with pytest.raises(InvalidInputError) as info:
        read_image_noted(path)
    return info.value.reason


# ------------------------------------------------------------ one list of formats


def test_one_format_list_is_shared_by_ingest_predict_and_serve(tmp_path):
    from leukflow.core import config
    from leukflow.data.datasets import list_folders
    from leukflow.deploy import serve
    from leukflow.deploy.predict import iter_image_paths

    assert set(IMAGE_SUFFIXES) == {s for v in IMAGE_FORMATS.values() for s in v}
    assert config.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert serve.ACCEPTED_FORMATS is IMAGE_FORMATS
    assert is_image_candidate("a.GIF")
    assert not is_image_candidate("a.txt")
    names = ["a.png", "b.JPEG", "c.tif", "d.bmp", "e.gif", "f.webp", "g.txt"]
    for name in names:
        (tmp_path / "x" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "x" / name).write_bytes(b"x")
    taken = [p.name for p in iter_image_paths([tmp_path])]
    records, _rejects = list_folders(tmp_path)
    assert taken == sorted(records["path"].str.slice(2)) == names[:-1]


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "PPM", "ICO"])
def test_other_format_named_png_is_unsupported_format(tmp_path, fmt):
    path = _save(tmp_path / "cell.png", _rgb(), fmt)
    with pytest.raises(InvalidInputError, match=rf"cell.png: a {fmt} image") as info:
        read_image_noted(path)
    assert info.value.reason == "unsupported_format"


def test_accepted_format_under_another_accepted_name_is_read(tmp_path):
    rgb = _rgb()
    path = _save(tmp_path / "cell.png", rgb, "BMP")
    assert np.array_equal(read_image_noted(path)[0], rgb)


def test_damaged_header_of_an_accepted_format_is_unreadable_and_text_is_not_an_image(tmp_path):
    png = io.BytesIO()
    Image.fromarray(_rgb()).save(png, format="PNG")
    (tmp_path / "broken.png").write_bytes(png.getvalue()[:16] + b"\0" * 30)
    assert _reason(tmp_path / "broken.png") == "unreadable"
    (tmp_path / "notes.png").write_text("hello, not an image")
    assert _reason(tmp_path / "notes.png") == "not_an_image"


def test_decoder_messages_hold_no_object_reprs():
    from leukflow.data.io import decode_image

    with pytest.raises(InvalidInputError) as info:
        decode_image(io.BytesIO(b"GIF89a" + b"\0" * 40), name="up.png")
    with pytest.raises(InvalidInputError) as info2:
        decode_image(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 40), name="up.png")
    for err in (info.value, info2.value):
        assert "object at 0x" not in str(err), str(err)
        assert "<_io" not in str(err), str(err)
        assert str(err).startswith("up.png: ")


# --------------------------------------------------------------------- TIFF


def test_multi_page_tiff_uses_page_one_and_says_so(tmp_path):
    first, second = _rgb(seed=1), _rgb(seed=2)
    path = tmp_path / "pages.tif"
    Image.fromarray(first).save(path, save_all=True, append_images=[Image.fromarray(second)] * 2)
    rgb, note = read_image_noted(path)
    assert np.array_equal(rgb, first)
    assert note == "page 1 of 3"
    animated = tmp_path / "animated.png"
    Image.fromarray(first).save(animated, save_all=True, append_images=[Image.fromarray(second)])
    rgb, note = read_image_noted(animated)
    assert np.array_equal(rgb, first)
    assert note == "frame 1 of 2"


def test_48_bit_rgb_tiff_is_scaled_to_8_bits_and_noted(tmp_path):
    rgb16 = np.random.default_rng(3).integers(0, 65536, (20, 30, 3), dtype=np.uint16)
    path = tmp_path / "deep.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb")
    rgb, note = read_image_noted(path)
    assert np.array_equal(rgb, (rgb16 >> 8).astype(np.uint8))  # scaled by 1/256, no wrap
    assert note == "scaled from 48-bit RGB to 8 bits per channel"


def test_float_tiff_is_scaled_over_its_range_never_wrapped(tmp_path):
    values = np.linspace(-3.0, 5.0, 20 * 30, dtype=np.float32).reshape(20, 30)
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    rgb, note = read_image_noted(path)
    grey = rgb[..., 0].astype(int).ravel()
    assert grey[0] == 0
    assert grey[-1] == 255
    assert (np.diff(grey) >= 0).all()  # monotonic: a wrap would jump back down
    assert note.startswith("converted from F (float, -3..5 scaled to 0..255)")


def test_float_tiff_with_nan_is_rejected(tmp_path):
    values = np.ones((20, 30), dtype=np.float32)
    values[3, 4] = np.nan
    path = tmp_path / "nan.tif"
    Image.fromarray(values, mode="F").save(path)
    with pytest.raises(InvalidInputError, match=r"nan\.tif: .*NaN") as info:
        read_image_noted(path)
    assert info.value.reason == "unsupported_mode"


def test_float_rgb_tiff_is_rejected_not_altered(tmp_path):
    path = tmp_path / "float_rgb.tif"
    tifffile.imwrite(path, np.ones((20, 30, 3), np.float32), photometric="rgb")
    assert _reason(path) == "unreadable"


# ------------------------------------------------------ every file accounted for


def _folders(root: Path) -> None:
    for i in range(2):
        _save(root / "ALL" / f"a{i}.png", _rgb(seed=i), "PNG")
    _save(root / "healthy" / "h0.bmp", _rgb(seed=5), "BMP")
    _save(root / "healthy" / "h1.gif", _rgb(seed=6), "GIF")
    _save(root / "healthy" / "h2.png", _rgb(seed=7), "WEBP")  # renamed
    (root / "ALL" / "notes.txt").write_text("x")
    (root / "healthy" / "more.txt").write_text("y")
    (root / "healthy" / "Thumbs.db").write_bytes(b"\0")
    (root / "README.md").write_text("the dataset's own readme")


def test_folders_dataset_accounts_for_every_file(tmp_path, caplog):
    root = tmp_path / "set"
    _folders(root)
    with caplog.at_level(logging.INFO, logger="leukflow.data.ingest"):
        manifest, rejects = ingest_datasets(
            {"set": {"format": "folders", "root": str(root)}}, min_size_px=MIN_SIZE
        )
    assert sorted(manifest["path"]) == ["ALL/a0.png", "ALL/a1.png", "healthy/h0.bmp"]
    assert dict(zip(rejects["path"], rejects["reason"], strict=True)) == {
        "healthy/h1.gif": "unsupported_format",
        "healthy/h2.png": "unsupported_format",
    }
    closing = caplog.records[-1].getMessage()
    assert closing.endswith("; ignored 3 other files: .txt 2, .db 1"), closing


@pytest.mark.realdata
def test_real_datasets_ignore_only_files_their_adapters_do_not_read(shared_data):
    from leukflow.data.datasets import ignored_files, list_dataset

    for fmt, root, expected in [
        ("zheng", shared_data / "segmentation_WBC", {}),
        ("bccd", shared_data / "BCCD_Dataset" / "BCCD", {".txt": 4}),  # ImageSets/Main/*.txt
    ]:
        records, rejects = list_dataset(fmt, root)
        used = {*records["path"], *records["mask_path"], *rejects["path"]}
        assert ignored_files(fmt, root, used) == expected, fmt


# ---------------------------------------------------------- confined paths


def test_demo_labels_cannot_point_outside_the_dataset(tmp_path):
    root = tmp_path / "demo"
    _save(root / "images" / "in.png", _rgb(), "PNG")
    _save(tmp_path / "secret.png", _rgb(seed=1), "PNG")
    (root / "labels.csv").write_text(
        "image,label,patient\nimages/in.png,ALL,p1\n../secret.png,ALL,p2\n"
        f"{tmp_path / 'secret.png'},ALL,p3\n"
    )
    records, rejects = list_demo(root)
    assert records["path"].tolist() == ["images/in.png"]
    assert rejects["reason"].tolist() == ["outside_root", "outside_root"]
    assert "resolves outside the dataset's folder" in rejects["message"].iloc[0]


def test_symlink_out_of_a_folders_dataset_is_kept_and_noted(tmp_path):
    root = tmp_path / "set"
    _save(root / "ALL" / "a.png", _rgb(), "PNG")
    outside = _save(tmp_path / "elsewhere" / "b.png", _rgb(seed=1), "PNG")
    os.symlink(outside, root / "ALL" / "b.png")
    manifest, rejects = ingest_datasets(
        {"set": {"format": "folders", "root": str(root)}}, min_size_px=MIN_SIZE
    )
    notes = dict(zip(manifest["path"], manifest["note"], strict=True))
    assert notes["ALL/a.png"] == ""
    assert notes["ALL/b.png"] == f"symlink to {outside.resolve()}, outside the dataset folder"
    assert rejects.empty
    from leukflow.data.datasets import ignored_files

    os.symlink(outside.parent, root / "linked")  # a linked folder is counted, not lost
    assert ignored_files("folders", root, set(manifest["path"])) == {"(linked folder)": 1}


# --------------------------------------------------------------------- fuzz


def _corrupt(data: bytes, kind: str, rng: np.random.Generator, others: list[bytes]) -> bytes:
    if kind == "truncate":
        return data[: int(rng.integers(0, len(data)))]
    if kind == "flip":
        buf = bytearray(data)
        for i in rng.integers(0, len(buf), size=int(rng.integers(1, 64))):
            buf[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf)
    if kind == "header":  # another image's first bytes on this one's body
        head = others[int(rng.integers(0, len(others)))]
        cut = int(rng.integers(8, 200))
        return head[:cut] + data[cut:]
    if kind == "header_flip":  # flips in the first 64 bytes, where the header lies
        buf = bytearray(data)
        for i in rng.integers(0, min(64, len(buf)), size=int(rng.integers(1, 6))):
            buf[i] = int(rng.integers(0, 256))
        return bytes(buf)
    return data  # "rename": intact bytes under another image suffix


FUZZ_KINDS = ("truncate", "flip", "header", "header_flip", "rename")


@pytest.fixture(scope="module")
def fuzz_files(shared_data, tmp_path_factory):
    """About 200 corrupted copies of real images, seeded, with wrong extensions too."""
    rng = np.random.default_rng(15)
    zheng = sorted((shared_data / "segmentation_WBC" / "Dataset 1").glob("*.bmp"))[:20]
    bccd = sorted((shared_data / "BCCD_Dataset" / "BCCD" / "JPEGImages").glob("*.jpg"))[:5]
    sources = []
    for p in zheng + bccd:  # real files in every accepted format
        rgb = np.asarray(Image.open(p).convert("RGB"))
        if p in bccd:
            rgb = rgb[::4, ::4]  # smaller fields keep the test fast
        for fmt in ("PNG", "JPEG", "TIFF", "BMP"):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format=fmt)
            sources.append((fmt, buf.getvalue()))
    root = tmp_path_factory.mktemp("fuzz") / "set"
    suffixes = [*sorted(IMAGE_SUFFIXES), ".gif", ".webp"]
    heads = [data[:256] for _, data in sources]
    for i in range(200):
        fmt, data = sources[int(rng.integers(0, len(sources)))]
        kind = FUZZ_KINDS[i % len(FUZZ_KINDS)]
        suffix = suffixes[int(rng.integers(0, len(suffixes)))] if kind == "rename" else (
            IMAGE_FORMATS[fmt][0])  # fmt: skip
        path = root / ("ALL" if i % 2 else "healthy") / f"f{i:03d}_{kind}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_corrupt(data, kind, rng, heads))
    return root


@pytest.mark.realdata
def test_fuzzed_real_images_through_ingest(fuzz_files):
    manifest, rejects = ingest_datasets(
        {"fuzz": {"format": "folders", "root": str(fuzz_files)}}, min_size_px=MIN_SIZE
    )
    files = {p.relative_to(fuzz_files).as_posix() for p in fuzz_files.rglob("*") if p.is_file()}
    assert len(files) == 200
    assert set(manifest["path"]) | set(rejects["path"]) == files
    assert not set(manifest["path"]) & set(rejects["path"])
    # damage is met and named; intact bytes under a wrong name are read by their content
    assert {"unreadable", "not_an_image"} <= set(rejects["reason"])
    renamed = {f for f in files if "_rename." in f}
    assert renamed <= set(manifest["path"])


@pytest.mark.realdata
def test_fuzzed_real_images_through_predict(fuzz_files, tiny_predictor):
    from leukflow.deploy.predict import iter_image_paths, predict_images

    paths = list(iter_image_paths([fuzz_files]))
    assert len(paths) == 200
    preds = list(predict_images(tiny_predictor, ((str(p), p) for p in paths), chunk_size=16))
    table = pd.DataFrame([p.image for p in preds])
    assert table["image"].tolist() == [str(p) for p in paths]
    assert set(table["status"]) == {"ok", "error"}
    errors = table[table["status"] == "error"]
    assert (errors["reason"] != "").all()
    assert errors["message"].str.len().gt(0).all()
    assert set(errors["reason"]) <= {"unreadable", "unsupported_format", "not_an_image",
                                     "empty_file", "too_large", "unsupported_mode"}  # fmt: skip


def test_ingest_images_reject_rows_come_from_records_only(tmp_path):
    """ingest_images keeps its contract: one row per listed record, nothing more."""
    root = tmp_path
    _save(root / "x.png", _rgb(), "GIF")
    records = pd.DataFrame({"path": ["x.png"], "label": ["ALL"], "patient": ["p"]})
    manifest, rejects = ingest_images(records, dataset="d", root=root, min_size_px=MIN_SIZE)
    assert manifest.empty
    assert rejects["reason"].tolist() == ["unsupported_format"]


# ------------------------------------------------------------------ predict


def test_predict_holds_a_bounded_number_of_pixels_per_chunk(tiny_predictor, monkeypatch):
    from leukflow.deploy import predict

    chunks = []
    classify = predict._classify_chunk

    def spy(pred, chunk):
        chunks.append(len(chunk))
        return classify(pred, chunk)

    monkeypatch.setattr(predict, "_classify_chunk", spy)
    fields = [(f"f{i}", _rgb(200, 300, seed=i)) for i in range(5)]  # 60,000 pixels each
    found = list(predict.predict_images(tiny_predictor, fields, chunk_size=8,
                                        max_chunk_pixels=120_000))  # fmt: skip
    assert [f.image["image"] for f in found] == [name for name, _ in fields]
    assert chunks == [2, 2, 1]  # two fields reach 120,000 pixels; not one chunk of five
    chunks.clear()
    list(predict.predict_images(tiny_predictor, fields, chunk_size=8))
    assert chunks == [5]  # under the default bound, chunk_size decides


def test_predict_csvs_escape_names_that_start_a_formula(tiny_predictor, tmp_path, monkeypatch):
    from leukflow.deploy.predict import image_table_path, predict_paths

    monkeypatch.chdir(tmp_path)  # relative names, as a user types them
    names = ["=cmd.png", "+1.png", "@sum.png", "-2.png", "plain.png"]
    for name in names:
        _save(tmp_path / name, _rgb(), "PNG")
    (tmp_path / "=bad.png").write_bytes(b"not an image at all")
    names.append("=bad.png")
    images = predict_paths(tiny_predictor, names, out="preds.csv", progress=False)
    assert images["image"].tolist() == names  # returned as given
    table = pd.read_csv(image_table_path("preds.csv"), dtype=str, keep_default_na=False)
    assert table["image"].tolist() == ["'=cmd.png", "'+1.png", "'@sum.png", "'-2.png",
                                       "plain.png", "'=bad.png"]  # fmt: skip
    assert table["message"].iloc[-1].startswith("'=bad.png: not an image file")
    for column in ("image", "message", "overlay"):
        assert not table[column].str.match(r"[=+\-@]").any(), table[column].tolist()


# -------------------------------------------------------------------- serve


def _png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_csv_download_for_any_file_name(tiny_predictor):
    from urllib.parse import unquote

    from leukflow.deploy.serve import create_app

    client = create_app(tiny_predictor).test_client()
    for name in ("血液_fält.png", "it's; ü.png", "=HYPERLINK(1).png"):
        posted = client.post("/upload", data={"image": (io.BytesIO(_png_bytes(_rgb())), name)})
        assert posted.status_code == 303, posted.text
        csv = client.get(posted.headers["Location"] + ".csv")
        assert csv.status_code == 200
        header = csv.headers["Content-Disposition"]
        header.encode("latin-1")  # a header must be Latin-1: this is what failed before
        encoded = header.split("filename*=UTF-8''")[1]
        assert unquote(encoded) == Path(name).stem + "_cells.csv"
        first_cells = [line.split(",")[0] for line in csv.text.splitlines()[1:]]
        assert not any(c.startswith(("=", "+", "-", "@")) for c in first_cells), first_cells
    from leukflow.deploy.serve import content_disposition

    assert content_disposition('say "hi".png') == (
        "attachment; filename=\"say _hi__cells.csv\"; filename*=UTF-8''say%20%22hi%22_cells.csv"
    )


def test_serve_errors_show_no_object_reprs(tiny_predictor):
    from leukflow.deploy.serve import create_app

    client = create_app(tiny_predictor).test_client()
    for data in (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"hello, not an image"):
        page = client.post("/upload", data={"image": (io.BytesIO(data), "odd.png")})
        assert page.status_code == 400
        assert "odd.png" in page.text
        assert "object at 0x" not in page.text
        assert "&lt;_io" not in page.text


def test_serve_keeps_overlays_of_at_most_two_megapixels(tiny_predictor):
    from leukflow.deploy.serve import create_app

    client = create_app(tiny_predictor).test_client()
    big = np.full((1500, 2000, 3), 235, np.uint8)  # 3 MP
    posted = client.post("/upload", data={"image": (io.BytesIO(_png_bytes(big)), "big.png")})
    assert posted.status_code == 303
    overlay = Image.open(io.BytesIO(client.get(posted.headers["Location"] + "/overlay.png").data))
    assert overlay.width * overlay.height <= 2_000_000
    assert abs(overlay.width / overlay.height - 2000 / 1500) < 0.01


def test_serve_answers_503_with_retry_after_when_all_decoding_slots_are_busy(tiny_predictor):
    import threading

    from leukflow.deploy import serve

    entered, release = threading.Event(), threading.Event()
    original = serve._analyse

    def slow(*args):
        entered.set()
        release.wait(10)
        return original(*args)

    app = serve.create_app(tiny_predictor, max_decoding=1, decode_wait_s=0.3)
    upload = {"image": (io.BytesIO(_png_bytes(_rgb())), "a.png")}
    serve._analyse = slow
    try:
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(r=app.test_client().post("/upload", data=upload))
        )
        worker.start()
        assert entered.wait(10)
        busy = app.test_client().post(
            "/upload", data={"image": (io.BytesIO(_png_bytes(_rgb())), "b.png")}
        )
        release.set()
        worker.join(10)
    finally:
        serve._analyse = original
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "1"
    assert "busy" in busy.text
    assert first["r"].status_code == 303


# ----------------------------------------------------- results folders


def test_provenance_names_cannot_climb_out_of_the_results_folder(tmp_path):
    import json

    from leukflow.core.provenance import read_provenance
    from leukflow.deploy.predict import load_predictor

    config = {"datasets": {"../../elsewhere": {}}, "encoders": {"resnet18": {}},
              "classifiers": {"knn": {}}}  # fmt: skip
    (tmp_path / "provenance.json").write_text(json.dumps({"config": config}))
    with pytest.raises(InvalidInputError, match=r"provenance\.json: datasets names") as info:
        load_predictor(tmp_path)
    assert info.value.reason == "bad_provenance"
    (tmp_path / "provenance.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not a JSON file") as info:
        read_provenance(tmp_path)
    assert info.value.reason == "unreadable"


def test_a_crafted_checkpoint_runs_nothing_and_is_unreadable(tmp_path):
    import pickle

    from leukflow.learn.models import load_checkpoint

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "fold_0.pt"
    path.write_bytes(pickle.dumps({"arch": "resnet18", "state_dict": Payload()}))
    with pytest.raises(InvalidInputError, match=r"fold_0\.pt: not a leukflow checkpoint") as info:
        load_checkpoint(path)
    assert info.value.reason == "unreadable"
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InvalidInputError, match=r"cut\.pt"):
        load_checkpoint(tmp_path / "cut.pt")

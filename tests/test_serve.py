"""leukflow serve: the review page, over real HTTP and in a real browser."""

import io
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import requests
from browser import assert_not_blank, screenshot
from crafted import png_bomb
from PIL import Image

from leukflow.deploy.predict import load_predictor
from leukflow.deploy.serve import UploadError, check_upload, create_app


def png_bytes(width: int, height: int, colour=(230, 200, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------ unit tests


def test_check_upload_refuses_by_content_type_and_pixels():
    check_upload(png_bytes(20, 10), "ok.png", max_pixels=200)
    with pytest.raises(UploadError, match="200 pixels is above the limit of 199") as err:
        check_upload(png_bytes(20, 10), "big.png", max_pixels=199)
    assert err.value.status == 413
    with pytest.raises(UploadError, match=r"notes.txt: expected an image file .*got .txt") as err:
        check_upload(b"hello", "notes.txt", max_pixels=10**6)
    assert err.value.status == 415
    with pytest.raises(UploadError, match=r"fake\.png: not an image file") as err:
        check_upload(b"hello", "fake.png", max_pixels=10**6)
    assert err.value.status == 400
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(
        UploadError, match=r"renamed\.png: a GIF image; expected one of PNG, JPEG, TIFF, BMP"
    ) as err:
        check_upload(gif.getvalue(), "renamed.png", max_pixels=10**6)
    assert err.value.status == 415
    with pytest.raises(UploadError, match="the file is empty"):
        check_upload(b"", "empty.png", max_pixels=10**6)
    with pytest.raises(UploadError, match=r"bomb\.png: .*decompression bomb") as err:
        check_upload(png_bomb(), "bomb.png", max_pixels=10**6)
    assert err.value.status == 413


# ------------------------------------------------------- on a small trained run


@pytest.fixture(scope="module")
def client(e2e_run):
    _, out = e2e_run
    app = create_app(load_predictor(out, classifier="knn"), max_upload_mb=1, max_pixels=400_000)
    return app.test_client()


@pytest.mark.e2e
def test_upload_limits_answer_4xx_with_a_message(client):
    page = client.post("/upload", data={}, content_type="multipart/form-data")
    assert page.status_code == 400
    assert "No file was uploaded" in page.text
    big = client.post("/upload", data={"image": (io.BytesIO(png_bytes(700, 700)), "big.png")})
    assert big.status_code == 413
    assert "big.png: 700x700 = 490,000 pixels is above the limit of 400,000" in big.text
    huge = client.post("/upload", data={"image": (io.BytesIO(b"0" * 2_000_000), "huge.png")})
    assert huge.status_code == 413
    assert "larger than the limit of 1 MB" in huge.text
    truncated = png_bytes(300, 200)[:-40]
    bad = client.post("/upload", data={"image": (io.BytesIO(truncated), "cut.png")})
    assert bad.status_code == 400
    assert "cannot use this image (unreadable): cut.png" in bad.text
    bomb = client.post("/upload", data={"image": (io.BytesIO(png_bomb()), "bomb.png")})
    assert bomb.status_code == 413
    assert "bomb.png: Image size (1600000000 pixels) exceeds limit" in bomb.text
    assert client.get("/results/nope").status_code == 404


@pytest.mark.e2e
def test_a_blank_field_is_called_with_its_reason(client):
    page = client.post(
        "/upload", data={"image": (io.BytesIO(png_bytes(300, 200)), "blank.png")},
        follow_redirects=True,
    )  # fmt: skip
    assert page.status_code == 200
    assert "Image call: <b>healthy</b>" in page.text
    assert "No cell found: blank" in page.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(e2e_run):
    """``leukflow serve`` in a subprocess on a free port; its base URL."""
    _, out = e2e_run
    port = free_port()
    cmd = [sys.executable, "-m", "leukflow.cli", "serve", "--model", str(out),
           "--classifier", "random_forest", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "leukflow serve did not answer in 120 s"
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_serve_over_http_outlines_the_cells_and_offers_the_csv(server, e2e_run, tmp_path):
    work, _ = e2e_run
    index = requests.get(server, timeout=10)
    assert "classifier random_forest" in index.text
    assert 'type="file" name="image"' in index.text
    field = work / "demo" / "images" / "field_001.png"
    with open(field, "rb") as f:
        page = requests.post(f"{server}/upload", files={"image": ("field_001.png", f)}, timeout=60)
    assert page.status_code == 200
    assert page.url.startswith(f"{server}/results/")
    assert 'id="call"' in page.text
    assert "Image call: <b>" in page.text
    csv = requests.get(f"{page.url}.csv", timeout=10)
    assert csv.status_code == 200
    assert csv.headers["Content-Disposition"] == (
        "attachment; filename=\"field_001_cells.csv\"; filename*=UTF-8''field_001_cells.csv"
    )
    cells = pd.read_csv(io.StringIO(csv.text))
    rois = pd.read_parquet(work / "out" / "rois.parquet")
    assert len(cells) == (rois["image_id"] == "demo/images/field_001").sum() > 0
    flagged = page.text.count('<tr class="review"><td>')
    assert page.text.count("<tr><td>") + flagged == len(cells)  # one table row per cell
    assert flagged == (cells["review"] == True).sum()  # noqa: E712
    if 0 < flagged < len(cells):  # the cells to review come first
        assert page.text.index('<tr class="review">') < page.text.index("<tr><td>")
    for label in cells["label"]:
        assert f"<td>{label}</td>" in page.text
    overlay = requests.get(f"{page.url}/overlay.png", timeout=10)
    assert overlay.headers["Content-Type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(overlay.content))).shape == (480, 640, 3)
    bad = requests.post(f"{server}/upload", files={"image": ("a.txt", b"x")}, timeout=10)
    assert bad.status_code == 415
    assert "a.txt: expected an image file" in bad.text
    # a real browser renders the result page: overlay, call and table visible
    pixels = screenshot(page.url, tmp_path / "review.png")
    assert_not_blank(pixels)
    red = np.logical_or.reduce(
        [(pixels == c).all(-1) for c in [(220, 20, 60), (30, 90, 230), (240, 130, 0)]]
    )
    assert red.sum() > 200, "the overlay's cell outlines are not on the screenshot"

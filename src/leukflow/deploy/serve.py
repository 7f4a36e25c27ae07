"""Serve: a local review page for a trained run (``leukflow serve``).

Upload a smear field or a single-cell image; the page shows the segmented
cells outlined on the image, each cell's class and probability, the
image-level call, and offers the per-cell CSV. The models are loaded once
(:func:`leukflow.deploy.predict.load_predictor`) and every upload goes through
:func:`leukflow.deploy.predict.predict_images`, exactly as ``leukflow predict`` does.

Uploads are limited in bytes, type (:data:`leukflow.data.io.IMAGE_FORMATS`,
checked by content and not only by name) and pixels; a bad file gets the
upload page back with a message and a 4xx status. At most ``max_decoding``
uploads are decoded and analysed at once; another waits up to
``decode_wait_s`` seconds, then gets 503 with ``Retry-After``, so memory stays
bounded however many arrive together. Results are kept in memory for the last
:data:`KEEP_RESULTS` uploads only, their overlays downscaled to at most
:data:`KEPT_OVERLAY_PIXELS`. The page is meant for one person on their own
machine: it binds to 127.0.0.1 by default and runs Werkzeug's threaded server.
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import numpy as np
import pandas as pd
from flask import Flask, Response, abort, redirect, render_template_string, request, url_for
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from leukflow.data.io import (
    IMAGE_FORMATS,
    IMAGE_SUFFIXES,
    InvalidInputError,
    decode_image,
    open_image,
)
from leukflow.deploy.predict import (
    Predictor,
    draw_overlay,
    predict_images,
    spreadsheet_safe,
)

log = logging.getLogger(__name__)

#: Pillow formats accepted, whatever the file is called: the one list of leukflow.data.io.
ACCEPTED_FORMATS = IMAGE_FORMATS
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PIXELS = 40_000_000
#: Uploads decoded and analysed at once; the others wait.
DEFAULT_MAX_DECODING = 2
#: How long an upload waits for a decoding slot before it gets 503.
DEFAULT_DECODE_WAIT_S = 5.0
#: Uploads whose results stay available (page, overlay, CSV); older ones are dropped.
KEEP_RESULTS = 32
#: Largest overlay kept per result, in pixels; larger images are shown downscaled.
KEPT_OVERLAY_PIXELS = 2_000_000


@dataclass
class Review:
    """One upload's results."""

    filename: str
    image: dict[str, Any]
    rois: pd.DataFrame
    overlay_png: bytes


_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } .model { color: #555; font-size: 0.9em; }
.error { background: #fde8e8; border: 1px solid #c0392b; padding: 0.7em; color: #8e1b10; }
.call { font-size: 1.3em; padding: 0.6em; margin: 0.6em 0; border-radius: 4px; }
.positive { background: #fde2e6; border: 2px solid #dc143c; }
.negative { background: #e3ebfc; border: 2px solid #1e5ae6; }
table { border-collapse: collapse; margin: 0.8em 0; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
img.overlay { max-width: 100%; border: 1px solid #999; }
tr.review td { background: #fff1dc; } tr.review td:first-child { border-left: 4px solid #f08200; }
form { margin: 1em 0; padding: 1em; background: #f4f4f4; }
"""

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leukflow review{{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>leukflow review</h1>
<p class="model">model: {{ p.results_dir }} &middot; dataset {{ p.dataset }} &middot;
encoder {{ p.encoder }} &middot; classifier {{ p.classifier }} &middot;
{% if p.vote %}{{ p.vote }} vote of {{ p.members|join(', ') }}{% else %}{{ p.folds|length }}
fold models averaged{% endif %} &middot; classes {{ p.classes|join(', ') }} &middot;
image call by {{ p.image_aggregation }} &middot; device {{ p.device }}</p>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<form method="post" action="{{ url_for('upload') }}" enctype="multipart/form-data">
<label>Smear field or cell image ({{ formats }}; at most {{ max_mb }} MB and
{{ "{:,}".format(max_pixels) }} pixels):
<input type="file" name="image" accept="{{ accept }}" required></label>
<button type="submit">Analyse</button></form>
{{ body|safe }}
</body></html>"""

_RESULT = """
<h2>{{ r.filename }}</h2>
{% set positive = r.image.label == p.positive_label %}
<p class="call {{ 'positive' if positive else 'negative' }}" id="call">
Image call: <b>{{ r.image.label }}</b>
(score {{ '%.2f'|format(r.image.score) }}, {{ p.image_aggregation }} over
{{ r.image.n_rois }} cell{{ '' if r.image.n_rois == 1 else 's' }};
most likely class {{ r.image.pred_class }})
{% if r.image.reason %}<br>No cell found: {{ r.image.reason }}{% endif %}
{% if r.image.review is sameas true %}<br><b id="image-review">Review:</b> {{ n_review }} of
{{ r.image.n_rois }} cells have a prediction set that is not one class (outlined in orange,
listed first){% endif %}</p>
<p><a id="csv" href="{{ url_for('result_csv', token=token) }}" download>Download the
per-cell CSV</a></p>
<img class="overlay" alt="segmented cells" src="{{ url_for('result_overlay', token=token) }}">
<table id="cells"><tr><th>cell</th><th>box x0, y0, x1, y1</th><th>class</th>
<th>probability</th><th>P({{ p.positive_label }})</th><th>prediction set</th></tr>
{% for c in cells %}<tr{% if c.review is sameas true %} class="review"{% endif %}><td>{{
c.roi }}</td><td>{{ c.x0 }}, {{ c.y0 }}, {{ c.x1 }},
{{ c.y1 }}</td><td>{{ c.label }}</td><td>{{ '%.3f'|format(c.prob) }}</td>
<td>{{ '%.3f'|format(c.score) }}</td><td>{{ c.prediction_set|replace('|', ', ') }}
{% if c.review is sameas true %}(review){% endif %}</td></tr>{% endfor %}
</table>
"""


class UploadError(ValueError):
    """An upload that cannot be analysed, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_upload(data: bytes | BinaryIO, filename: str, *, max_pixels: int) -> None:
    """Refuse an upload by type or pixel count before it is decoded.

    Parameters
    ----------
    data : bytes or seekable binary file object
        The file's content; a file object is read for its header only and
        left at its start.
    filename : str
        Its name, as sent.
    max_pixels : int
        Largest width x height accepted.

    Raises
    ------
    UploadError
        400 for an empty or unreadable file, 415 for another type, 413 for
        too many pixels.
    """
    suffix = Path(filename).suffix.lower()
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    stream.seek(0, io.SEEK_END)
    empty = stream.tell() == 0
    stream.seek(0)
    if empty:
        raise UploadError(400, f"{filename or 'the upload'}: the file is empty")
    if suffix not in IMAGE_SUFFIXES:
        raise UploadError(
            415,
            f"{filename}: expected an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"got {suffix or 'a name without suffix'}",
        )
    try:
        with open_image(_Borrowed(stream), name=filename, max_pixels=max_pixels):
            pass  # the header only: format, size, bomb
    except InvalidInputError as err:
        status = {"too_large": 413, "unsupported_format": 415}.get(err.reason, 400)
        raise UploadError(status, str(err)) from err
    finally:
        stream.seek(0)


class _Borrowed:
    """A file object that Pillow may close without closing the upload beneath it."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def close(self) -> None:
        """Leave the upload open: it is read again once a decoding slot is free."""


def create_app(
    predictor: Predictor,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoding: int = DEFAULT_MAX_DECODING,
    decode_wait_s: float = DEFAULT_DECODE_WAIT_S,
) -> Flask:
    """Build the review page's Flask app around a loaded predictor.

    Parameters
    ----------
    predictor : Predictor
        From :func:`leukflow.deploy.predict.load_predictor`.
    max_upload_mb : float
        Largest request accepted (413 above).
    max_pixels : int
        Largest image accepted, in pixels (413 above).
    max_decoding : int
        Uploads decoded and analysed at once (decoded pixels are where memory
        goes); at least 1.
    decode_wait_s : float
        How long another upload waits for a slot before it is answered 503
        with ``Retry-After``.

    Returns
    -------
    flask.Flask
        Routes: ``/`` (upload form), ``POST /upload``, ``/results/<token>``
        (page), ``/results/<token>/overlay.png``, ``/results/<token>.csv``.
    """
    if max_decoding < 1:
        raise ValueError(f"create_app: max_decoding must be at least 1; got {max_decoding}")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    results: OrderedDict[str, Review] = OrderedDict()
    lock = threading.Lock()  # one prediction at a time: the models are shared
    slots = threading.BoundedSemaphore(max_decoding)
    retry_after_s = max(1, round(decode_wait_s))

    def page(body: str = "", error: str = "", title: str = "", status: int = 200) -> Response:
        html = render_template_string(
            _BASE, p=predictor, body=body, error=error, title=title, style=_STYLE,
            max_mb=f"{max_upload_mb:g}", max_pixels=max_pixels,
            accept=",".join(sorted(IMAGE_SUFFIXES)), formats=", ".join(IMAGE_FORMATS),
        )  # fmt: skip
        return Response(html, status=status, mimetype="text/html")

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_err: Exception) -> Response:
        return page(
            error=f"The upload is larger than the limit of {max_upload_mb:g} MB.", status=413
        )

    @app.get("/")
    def index() -> Response:
        return page()

    @app.post("/upload")
    def upload() -> Response:
        file = request.files.get("image")
        if file is None or not file.filename:
            return page(error="No file was uploaded: choose an image first.", status=400)
        try:  # the header only, from the spooled upload: a bad file is refused at once
            check_upload(file.stream, file.filename, max_pixels=max_pixels)
        except UploadError as err:
            log.info("refused %s: %s", file.filename, err)
            return page(error=str(err), status=err.status)
        if not slots.acquire(timeout=decode_wait_s):
            log.info("busy: %s waited %g s for a decoding slot", file.filename, decode_wait_s)
            response = page(
                error=f"The server is busy analysing other images; try again in "
                f"{retry_after_s} s.",
                status=503,
            )
            response.headers["Retry-After"] = str(retry_after_s)
            return response
        try:  # the bytes come into memory only once a slot is free
            data = file.stream.read()
            review = _analyse(predictor, data, file.filename, lock)
        except UploadError as err:
            log.info("refused %s: %s", file.filename, err)
            return page(error=str(err), status=err.status)
        finally:
            slots.release()
        token = secrets.token_urlsafe(12)
        with lock:
            results[token] = review
            while len(results) > KEEP_RESULTS:
                results.popitem(last=False)
        return redirect(url_for("result_page", token=token), code=303)

    def get(token: str) -> Review:
        review = results.get(token)
        if review is None:
            abort(404, "no such result (only the last uploads are kept)")
        return review

    @app.get("/results/<token>")
    def result_page(token: str) -> Response:
        review = get(token)
        cells = [{**c, "prob": c[f"proba_{c['label']}"]} for c in review.rois.to_dict("records")]
        # cells to review first, least confident first; then the rest in ROI order
        flagged = [c.get("review") is True for c in cells]
        order = sorted(range(len(cells)), key=lambda i: (not flagged[i],
                       cells[i]["prob"] if flagged[i] else 0.0, cells[i]["roi"]))  # fmt: skip
        cells = [cells[i] for i in order]
        n_review = sum(flagged)
        body = render_template_string(_RESULT, r=review, p=predictor, token=token, cells=cells,
                                      n_review=n_review)  # fmt: skip
        return page(body, title=f": {review.filename}")

    @app.get("/results/<token>/overlay.png")
    def result_overlay(token: str) -> Response:
        return Response(get(token).overlay_png, mimetype="image/png")

    @app.get("/results/<token>.csv")
    def result_csv(token: str) -> Response:
        review = get(token)
        table = spreadsheet_safe(review.rois, ("image",))
        return Response(
            table.to_csv(index=False),
            mimetype="text/csv",
            headers={"Content-Disposition": content_disposition(review.filename)},
        )

    return app


def content_disposition(filename: str) -> str:
    """``Content-Disposition`` of an upload's CSV, for any file name (RFC 6266 / RFC 5987).

    An ASCII ``filename`` (other characters, quotes and backslashes replaced
    by ``_``) for old clients, and ``filename*`` with the UTF-8 name
    percent-encoded: ``血液_fält.png`` -> ``血液_fält_cells.csv``.
    """
    name = (Path(filename).stem or "upload") + "_cells.csv"
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


def _analyse(predictor: Predictor, data: bytes, filename: str, lock: threading.Lock) -> Review:
    """Decode an upload as leukflow reads any image, then predict it."""
    try:
        rgb, _note = decode_image(io.BytesIO(data), name=filename)
    except InvalidInputError as err:
        raise UploadError(400, f"cannot use this image ({err.reason}): {err}") from err
    with lock:
        pred = next(predict_images(predictor, [(filename, rgb)]))
    small, rois = _downscaled(rgb, pred.rois, KEPT_OVERLAY_PIXELS)
    del rgb
    overlay = draw_overlay(small, rois, positive_label=predictor.positive_label)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return Review(filename, pred.image, pred.rois, buffer.getvalue())


def _downscaled(
    rgb: np.ndarray, rois: pd.DataFrame, max_pixels: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Shrink the image to at most ``max_pixels`` and scale its ROI boxes alike."""
    h, w = rgb.shape[:2]
    if h * w <= max_pixels:
        return rgb, rois
    factor = (max_pixels / (h * w)) ** 0.5
    size = (max(1, int(w * factor)), max(1, int(h * factor)))
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    rois = rois.copy()
    for col, scale in (("x0", size[0] / w), ("x1", size[0] / w), ("y0", size[1] / h),
                       ("y1", size[1] / h)):  # fmt: skip
        if col in rois:
            rois[col] = (rois[col] * scale).round().astype(int)
    return small, rois


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``app`` with Werkzeug's threaded server until interrupted."""
    from werkzeug.serving import make_server

    server = make_server(host, port, app, threaded=True)
    log.info("review page on http://%s:%d/ (Ctrl-C stops it)", host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

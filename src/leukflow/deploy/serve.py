"""Serve: a local review page for a trained run (``leukflow serve``).

Upload a smear field or a single-cell image; the page shows the segmented
cells outlined on the image, each cell's class and probability, the
image-level call, and offers the per-cell CSV. The models are loaded once
(:func:`leukflow.deploy.predict.load_predictor`) and every upload goes through
:func:`leukflow.deploy.predict.predict_images`, exactly as ``leukflow predict`` does.

Uploads are limited in bytes, type (PNG, JPEG, TIFF, BMP, checked by content
and not only by name) and pixels; a bad file gets the upload page back with a
message and a 4xx status. Results are kept in memory for the last few uploads
only. The page is meant for one person on their own machine: it binds to
127.0.0.1 by default and runs Werkzeug's threaded server.
"""

from __future__ import annotations

import io
import logging
import secrets
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from flask import Flask, Response, abort, redirect, render_template_string, request, url_for
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from leukflow.data.io import InvalidInputError, open_image, read_image
from leukflow.deploy.predict import IMAGE_SUFFIXES, Predictor, draw_overlay, predict_images

log = logging.getLogger(__name__)

#: Pillow formats accepted, whatever the file is called.
ACCEPTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_PIXELS = 40_000_000
#: Uploads whose results stay available (page, overlay, CSV); older ones are dropped.
KEEP_RESULTS = 32


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
<label>Smear field or cell image (PNG, JPEG, TIFF, BMP; at most {{ max_mb }} MB and
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
{% if r.image.reason %}<br>No cell found: {{ r.image.reason }}{% endif %}</p>
<p><a id="csv" href="{{ url_for('result_csv', token=token) }}" download>Download the
per-cell CSV</a></p>
<img class="overlay" alt="segmented cells" src="{{ url_for('result_overlay', token=token) }}">
<table id="cells"><tr><th>cell</th><th>box x0, y0, x1, y1</th><th>class</th>
<th>probability</th><th>P({{ p.positive_label }})</th></tr>
{% for c in cells %}<tr><td>{{ c.roi }}</td><td>{{ c.x0 }}, {{ c.y0 }}, {{ c.x1 }},
{{ c.y1 }}</td><td>{{ c.label }}</td><td>{{ '%.3f'|format(c.prob) }}</td>
<td>{{ '%.3f'|format(c.score) }}</td></tr>{% endfor %}
</table>
"""


class UploadError(ValueError):
    """An upload that cannot be analysed, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_upload(data: bytes, filename: str, *, max_pixels: int) -> None:
    """Refuse an upload by type or pixel count before it is decoded.

    Parameters
    ----------
    data : bytes
        The file's content.
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
    if not data:
        raise UploadError(400, f"{filename or 'the upload'}: the file is empty")
    if suffix not in IMAGE_SUFFIXES:
        raise UploadError(
            415,
            f"{filename}: expected an image file ({', '.join(IMAGE_SUFFIXES)}); "
            f"got {suffix or 'a name without suffix'}",
        )
    try:
        with open_image(io.BytesIO(data), name=filename, max_pixels=max_pixels) as im:
            fmt = im.format
    except InvalidInputError as err:
        status = 413 if err.reason == "too_large" else 400
        raise UploadError(status, str(err)) from err
    if fmt not in ACCEPTED_FORMATS:
        raise UploadError(
            415, f"{filename}: expected one of {', '.join(ACCEPTED_FORMATS)}; got a {fmt} image"
        )


def create_app(
    predictor: Predictor,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_pixels: int = DEFAULT_MAX_PIXELS,
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

    Returns
    -------
    flask.Flask
        Routes: ``/`` (upload form), ``POST /upload``, ``/results/<token>``
        (page), ``/results/<token>/overlay.png``, ``/results/<token>.csv``.
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    results: OrderedDict[str, Review] = OrderedDict()
    lock = threading.Lock()  # one prediction at a time: the models are shared

    def page(body: str = "", error: str = "", title: str = "", status: int = 200) -> Response:
        html = render_template_string(
            _BASE, p=predictor, body=body, error=error, title=title, style=_STYLE,
            max_mb=f"{max_upload_mb:g}", max_pixels=max_pixels,
            accept=",".join(IMAGE_SUFFIXES),
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
        data = file.read()
        try:
            check_upload(data, file.filename, max_pixels=max_pixels)
            review = _analyse(predictor, data, file.filename, lock)
        except UploadError as err:
            log.info("refused %s: %s", file.filename, err)
            return page(error=str(err), status=err.status)
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
        body = render_template_string(_RESULT, r=review, p=predictor, token=token, cells=cells)
        return page(body, title=f": {review.filename}")

    @app.get("/results/<token>/overlay.png")
    def result_overlay(token: str) -> Response:
        return Response(get(token).overlay_png, mimetype="image/png")

    @app.get("/results/<token>.csv")
    def result_csv(token: str) -> Response:
        review = get(token)
        name = Path(review.filename).stem or "upload"
        return Response(
            review.rois.to_csv(index=False),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}_cells.csv"'},
        )

    return app


def _analyse(predictor: Predictor, data: bytes, filename: str, lock: threading.Lock) -> Review:
    """Decode an upload as leukflow reads any image, then predict it."""
    suffix = Path(filename).suffix.lower()
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            rgb = read_image(tmp.name)
        except InvalidInputError as err:
            message = str(err).replace(tmp.name, filename)
            raise UploadError(400, f"cannot use this image ({err.reason}): {message}") from err
    with lock:
        pred = next(predict_images(predictor, [(filename, rgb)]))
    overlay = draw_overlay(rgb, pred.rois, positive_label=predictor.positive_label)
    buffer = io.BytesIO()
    Image.fromarray(overlay).save(buffer, format="PNG")
    return Review(filename, pred.image, pred.rois, buffer.getvalue())


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

"""File formats: images, tables, ROI crop stores, embedding stores, checkpoints.

Every other module works on arrays and DataFrames; this is the only place that
knows how they sit on disk. Writers are atomic: they write to a temporary
sibling and rename it into place, so a killed job never leaves a half-written
file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np
import pandas as pd
import zarr
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

#: Fields above this many pixels are refused as possible decompression bombs.
MAX_IMAGE_PIXELS = 100_000_000


class InvalidInputError(ValueError):
    """A file that cannot be used, with a machine-readable ``reason`` code.

    Parameters
    ----------
    reason : str
        Short code written to ``rejects.csv`` (``unreadable``, ``empty_file``...).
    message : str
        Human-readable explanation naming the file.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` on success.

    Works for files and directories (zarr stores). On an exception the
    temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


#: Columns that stay text in CSV tables even when they look like numbers
#: (patient "007", class folders "0"/"1").
TEXT_COLUMNS = (
    "image_id", "roi_id", "dataset", "path", "label", "pred", "patient",
    "reason", "message", "classifier", "encoder", "level",
)  # fmt: skip


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` atomically as parquet or CSV, chosen by the file suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            raise ValueError(f"write_table: unsupported suffix {path.suffix!r} for {path}")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a parquet or CSV table written by :func:`write_table`."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    raise ValueError(f"read_table: unsupported suffix {path.suffix!r} for {path}")


# ---------------------------------------------------------------------- images


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


#: Image formats leukflow decodes: Pillow format name -> the file suffixes that name it.
#: Ingest (the dataset listers), ``leukflow predict`` and ``leukflow serve`` share this
#: list, and the decoder is held to it (``Image.open(..., formats=...)``): a file of
#: another format under an accepted name is ``unsupported_format``, never handed to
#: whatever decoder Pillow finds. GIF is refused on purpose: it keeps at most 256
#: colours, so the stain colours the classifiers learn from would already be altered.
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "TIFF": (".tif", ".tiff"),
    "BMP": (".bmp",),
}
#: Suffixes of the accepted formats (lower case).
IMAGE_SUFFIXES = frozenset(s for suffixes in IMAGE_FORMATS.values() for s in suffixes)
#: Suffixes of image formats leukflow refuses. A file with one is still an image
#: candidate, so it ends as a rejected image (``unsupported_format``), never skipped.
REFUSED_IMAGE_SUFFIXES = frozenset(
    (".gif", ".webp", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".jpx", ".jxl", ".ico",
     ".psd", ".tga", ".pcx", ".ppm", ".pgm", ".pbm", ".pnm", ".dib", ".jfif", ".jpe", ".svs",
     ".ndpi", ".czi", ".dcm")
)  # fmt: skip
#: Every suffix that makes a file an image candidate (accepted or refused).
CANDIDATE_SUFFIXES = IMAGE_SUFFIXES | REFUSED_IMAGE_SUFFIXES


def is_image_candidate(path: str | Path) -> bool:
    """Whether a file's suffix names an image, of an accepted format or not."""
    return Path(path).suffix.lower() in CANDIDATE_SUFFIXES


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an RGB array.

    Grey, palette, RGBA, CMYK, 16-bit, 48-bit and float images are converted to
    8-bit RGB (alpha is dropped); :func:`read_image_noted` also says so.

    Parameters
    ----------
    path : str or Path
        Image file of a format in :data:`IMAGE_FORMATS`.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` uint8 RGB array.

    Raises
    ------
    InvalidInputError
        With reason ``missing_file``, ``empty_file``, ``not_an_image``,
        ``unsupported_format``, ``too_large``, ``unreadable`` or ``unsupported_mode``.
    """
    return read_image_noted(path)[0]


def read_image_noted(path: str | Path) -> tuple[np.ndarray, str]:
    """Read an image as :func:`read_image` does, with a note on any conversion.

    Returns
    -------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB array.
    note : str
        ``""`` for single-page 8-bit RGB files, else what was done, e.g.
        ``"converted from I;16"`` or ``"page 1 of 3"`` (``; ``-separated).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError("missing_file", f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InvalidInputError("empty_file", f"{path}: file is empty (0 bytes)")
    return decode_image(path, name=str(path))


def decode_image(
    source: str | Path | BinaryIO, *, name: str, max_pixels: int | None = None
) -> tuple[np.ndarray, str]:
    """Decode an image file or an upload's bytes to 8-bit RGB, with a note on any change.

    Parameters
    ----------
    source : str, Path or binary file object
        The image file, or its bytes as a file object.
    name : str
        How messages name the file.
    max_pixels : int, optional
        See :func:`open_image`.

    Returns
    -------
    rgb, note
        As :func:`read_image_noted`.
    """
    with open_image(source, name=name, max_pixels=max_pixels) as im:
        notes = []
        mode = im.mode
        with _decode_errors(name):
            n_frames = getattr(im, "n_frames", 1)
            if n_frames > 1:  # a multi-page TIFF or animated PNG: the first, said so
                im.seek(0)
                notes.append(f"{'page' if im.format == 'TIFF' else 'frame'} 1 of {n_frames}")
            im.load()
            bits = _bits_per_sample(im)
        try:
            rgb, converted = _to_rgb8(im, name)
        except InvalidInputError:
            raise
        except Exception as err:  # any conversion failure is a reason code
            raise InvalidInputError(
                "unsupported_mode",
                f"{name}: cannot convert mode {mode} to RGB ({_clean(err, name)})",
            ) from err
        if mode == "RGB" and bits > 8:
            # Pillow unpacks 16-bit RGB to its high byte: a scaling by 1/256, never a wrap
            notes.append(f"scaled from {3 * bits}-bit RGB to 8 bits per channel")
        elif converted:
            notes.append(converted)
    return rgb, "; ".join(notes)


def _bits_per_sample(im: Image.Image) -> int:
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return 8
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return max(int(b) for b in bits) if bits else 8


@contextlib.contextmanager
def open_image(
    source: str | Path | BinaryIO, *, name: str, max_pixels: int | None = None
) -> Iterator[Image.Image]:
    """Open an image lazily, refusing bombs, other formats and broken headers before any decode.

    Parameters
    ----------
    source : str, Path or binary file object
        The image file, or its bytes as a file object (an upload).
    name : str
        How messages name the file.
    max_pixels : int, optional
        Largest width x height accepted; :data:`MAX_IMAGE_PIXELS` by default.

    Yields
    ------
    PIL.Image.Image
        The opened, not yet decoded image; its format is one of :data:`IMAGE_FORMATS`.

    Raises
    ------
    InvalidInputError
        ``too_large`` for more than ``max_pixels`` pixels, whether Pillow's own
        bomb check or leukflow's fires first; ``unsupported_format`` for an image
        of a format not in :data:`IMAGE_FORMATS`, whatever its name;
        ``not_an_image`` when no decoder recognises the file; ``unreadable`` for a
        header that breaks the decoder.
    """
    with _decode_errors(name):
        try:
            im = Image.open(source, formats=tuple(IMAGE_FORMATS))
        except UnidentifiedImageError:
            raise _unidentified(source, name) from None
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        if im.width * im.height > max_pixels:
            raise InvalidInputError(
                "too_large",
                f"{name}: {im.width}x{im.height} = {im.width * im.height:,} pixels is above "
                f"the limit of {max_pixels:,} (possible decompression bomb)",
            )
        yield im
    finally:
        im.close()


def _unidentified(source: str | Path | BinaryIO, name: str) -> InvalidInputError:
    """Say why no accepted decoder took a file, from its first bytes only (nothing decoded).

    Each Pillow plugin's signature test looks at the first 16 bytes, as
    ``Image.open`` does; no decoder of a refused format ever runs.
    """
    try:
        if isinstance(source, str | Path):
            with open(source, "rb") as f:
                prefix = f.read(16)
        else:
            source.seek(0)
            prefix = source.read(16)
    except OSError as err:
        return InvalidInputError("unreadable", f"{name}: cannot read ({err.strerror})")
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is None or not accept(prefix):
                continue
        except Exception:  # a signature test failing on odd bytes says nothing
            continue
        if fmt in IMAGE_FORMATS:
            return InvalidInputError(
                "unreadable",
                f"{name}: starts like a {fmt} file but its header cannot be decoded "
                "(damaged, or a layout the decoder does not support, such as float RGB)",
            )
        return InvalidInputError(
            "unsupported_format",
            f"{name}: a {fmt} image; expected one of {', '.join(IMAGE_FORMATS)} "
            "(convert it to PNG or TIFF from the original)",
        )
    return InvalidInputError(
        "not_an_image",
        f"{name}: not an image file (no {'/'.join(IMAGE_FORMATS)} decoder knows it)",
    )


#: Python object reprs in decoder messages (``<_io.BytesIO object at 0x7f...>``) say
#: nothing to a user and leak internals; they are replaced by the file's name.
_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def _clean(message: object, name: str) -> str:
    return _OBJECT_REPR.sub(name, str(message))


@contextlib.contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """Turn whatever a decoder raises on a crafted or damaged file into a reason code."""
    try:
        yield
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as err:
        raise InvalidInputError(
            "too_large", f"{name}: {_clean(err, name)} (possible decompression bomb)"
        ) from err
    except UnidentifiedImageError as err:
        raise InvalidInputError("not_an_image", f"{name}: not an image file") from err
    except MemoryError as err:
        raise InvalidInputError("too_large", f"{name}: decoding needs too much memory") from err
    # Decoders of damaged files raise more than OSError (struct.error, IndexError,
    # ZeroDivisionError...); none of it may stop a run, so all of it is a reason code.
    except Exception as err:
        raise InvalidInputError(
            "unreadable",
            f"{name}: cannot decode image ({type(err).__name__}: {_clean(err, name)})",
        ) from err


def _to_rgb8(im: Image.Image, name: str) -> tuple[np.ndarray, str]:
    """8-bit RGB pixels and a note on the conversion (``""`` for 8-bit RGB)."""
    if im.mode in ("I;16", "I;16B", "I;16L"):  # scale to the image's own maximum
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.max() > 0 else 1.0
        grey = np.round(arr / top * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2), f"converted from {im.mode}"
    if im.mode in ("I", "F"):  # signed or float: the image's own range onto 0..255
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise InvalidInputError(
                "unsupported_mode",
                f"{name}: a {'float' if im.mode == 'F' else '32-bit'} image holding NaN or "
                "infinite values; no scaling to 8 bits is faithful",
            )
        lo, hi = min(float(arr.min()), 0.0), float(arr.max())
        scale = 255 / (hi - lo) if hi > lo else 0.0
        grey = np.clip(np.round((arr - lo) * scale), 0, 255).astype(np.uint8)
        kind = "float" if im.mode == "F" else "32-bit integer"
        return (
            np.repeat(grey[..., None], 3, axis=2),
            f"converted from {im.mode} ({kind}, {lo:g}..{hi:g} scaled to 0..255)",
        )
    if im.mode == "RGB":  # no converted copy: a large field is held once less
        return np.asarray(im, dtype=np.uint8), ""
    return np.asarray(im.convert("RGB"), dtype=np.uint8), f"converted from {im.mode}"


def write_image(rgb: np.ndarray, path: str | Path) -> None:
    """Write a uint8 RGB array as PNG (or any format the suffix names)."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format=Image.registered_extensions()[Path(path).suffix])


def read_voc_boxes(path: str | Path, name: str = "WBC") -> pd.DataFrame:
    """Read the boxes of one object class from a Pascal VOC annotation file.

    Returns
    -------
    pandas.DataFrame
        ``x0, y0, x1, y1`` in pixels, one row per object named ``name``.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise InvalidInputError(
            "unreadable", f"{path}: cannot parse VOC annotation ({err})"
        ) from err
    rows = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if (obj.findtext("name") or "").strip() != name or box is None:
            continue
        corners = [box.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
        rows.append(dict(zip(("x0", "y0", "x1", "y1"), map(float, corners), strict=True)))
    return pd.DataFrame(rows, columns=["x0", "y0", "x1", "y1"])


# ------------------------------------------------------------ ROI crop stores


def write_crops(crops: np.ndarray, path: str | Path, attrs: Mapping[str, Any]) -> None:
    """Write ROI crops held in memory as one store (see :class:`CropStoreWriter`).

    Parameters
    ----------
    crops : numpy.ndarray
        ``(n_rois, S, S, 3)`` uint8.
    path : str or Path
        Store directory (``.zarr``).
    attrs : mapping
        JSON-serialisable metadata kept with the array.
    """
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(
            f"write_crops: expected (n, S, S, 3) uint8 crops; got {crops.shape} {crops.dtype}"
        )
    with CropStoreWriter(path, crops.shape[1], attrs) as store:
        store.append(crops)


def same_attrs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two attribute mappings are equal once stored (as JSON: tuples are lists)."""
    plain = lambda m: json.loads(json.dumps(dict(m), sort_keys=True, default=str))  # noqa: E731
    return plain(a) == plain(b)


def link_rows(source: str | Path, target: str | Path, keep_rows: int) -> int:
    """Make ``target`` a zarr v3 store of ``source``'s first ``keep_rows`` rows, by hard links.

    Every array of ``source`` (a store of one array or a group) keeps rows
    ``[0, keep_rows)`` along its first axis: chunk files wholly inside are
    hard-linked (no byte copied or rewritten), the one chunk cut by
    ``keep_rows`` and the metadata files are copied (an append rewrites
    them), later chunks are left out. ``source`` is never written, so an
    append to ``target`` that is killed leaves it as it was.

    Returns
    -------
    int
        Bytes copied (the linked ones are not counted).
    """
    source, target = Path(source), Path(target)
    copied = 0
    for meta in sorted(source.rglob("zarr.json")):
        rel = meta.parent.relative_to(source)
        node = json.loads(meta.read_text())
        (target / rel).mkdir(parents=True, exist_ok=True)
        shutil.copy2(meta, target / rel / "zarr.json")
        copied += meta.stat().st_size
        if node.get("node_type") != "array":
            continue
        rows = node["chunk_grid"]["configuration"]["chunk_shape"][0]
        encoding = node["chunk_key_encoding"]
        if encoding["name"] != "default" or encoding["configuration"]["separator"] != "/":
            raise ValueError(f"{meta}: link_rows reads '/'-separated chunk keys only")
        chunks = meta.parent / "c"
        for chunk in chunks.rglob("*") if chunks.is_dir() else []:
            if not chunk.is_file():
                continue
            start = int(chunk.relative_to(chunks).parts[0]) * rows
            if start >= keep_rows:
                continue
            dest = target / chunk.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if start + rows <= keep_rows:
                os.link(chunk, dest)
            else:
                shutil.copy2(chunk, dest)
                copied += chunk.stat().st_size
    return copied


class _StagedStore:
    """A zarr store built under a temporary name and renamed onto ``path`` when complete.

    With ``base``, the staged store starts as ``base``'s first ``keep_rows``
    rows (:func:`link_rows`) and rows are appended after them: a store grows
    without rewriting what it held.

    :meth:`close` (or leaving a ``with`` block without an error) writes what
    is buffered and renames; :meth:`abort` (or an error in the block) drops
    the unfinished store, so a killed job leaves no store under its final name
    that a later run would trust.
    """

    def __init__(self, path: str | Path, base: str | Path | None = None, keep_rows: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._staged = str(self._tmp / self.path.name)
        self.keep_rows = keep_rows if base is not None else 0
        if base is not None:
            link_rows(base, self._staged, keep_rows)

    def _flush(self) -> None:
        """Write every buffered row (each writer buffers its own)."""

    def close(self) -> None:
        """Write what is buffered and move the finished store onto its final name."""
        self._flush()
        if self.path.is_dir():
            shutil.rmtree(self.path)
        os.replace(self._staged, self.path)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def abort(self) -> None:
        """Drop the unfinished store."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class CropStoreWriter(_StagedStore):
    """Append ROI crops to a zarr v3 array chunk by chunk, never all in memory.

    The store is built under a temporary name and renamed onto ``path`` by
    :meth:`close` (or on leaving a ``with`` block without an error), so a
    killed job leaves no store that a later run would trust.

    Parameters
    ----------
    path : str or Path
        Store directory (``.zarr``).
    roi_size_px : int
        Side of the square crops.
    attrs : mapping
        JSON-serialisable metadata kept with the array.
    base, keep_rows : optional
        Start from the first ``keep_rows`` crops of the store ``base`` (same
        crop size and attrs), hard-linked: only the new rows are written.
    """

    def __init__(
        self,
        path: str | Path,
        roi_size_px: int,
        attrs: Mapping[str, Any],
        *,
        base: str | Path | None = None,
        keep_rows: int = 0,
    ):
        super().__init__(path, base, keep_rows)
        shape = (0, roi_size_px, roi_size_px, 3)
        if base is not None:
            array = zarr.open_array(self._staged, mode="r+")
            if array.shape[1:] != shape[1:] or not same_attrs(array.attrs, attrs):
                raise ValueError(f"{base}: not a crop store of {shape[1:]} crops with these attrs")
            self._rows = RowAppender.resume(array, keep_rows)
            return
        self._rows = RowAppender(
            zarr.create_array(
                store=self._staged,
                shape=shape,
                chunks=(256, *shape[1:]),
                dtype="uint8",
                attributes=dict(attrs),
                zarr_format=3,
            )
        )

    @property
    def n_rows(self) -> int:
        """Rows written to the array (buffered ones not yet)."""
        return self._rows.n_rows

    def append(self, crops: np.ndarray) -> None:
        """Add ``(n, S, S, 3)`` uint8 crops after those already written.

        Rows are buffered and written a whole zarr chunk at a time: appending
        to a partly filled chunk would decompress and rewrite it each time.
        """
        shape = self._rows.array.shape
        if crops.shape[1:] != shape[1:] or crops.dtype != np.uint8:
            raise ValueError(
                f"CropStoreWriter.append: expected (n, {shape[1]}, "
                f"{shape[2]}, 3) uint8 crops; got {crops.shape} {crops.dtype}"
            )
        self._rows.append(crops)

    def _flush(self) -> None:
        self._rows.flush()


def read_crops(path: str | Path) -> np.ndarray:
    """Read all ROI crops of a store written by :func:`write_crops`."""
    return np.asarray(zarr.open_array(str(path), mode="r")[:])


# ---------------------------------------------------------- embedding stores


class EmbeddingStoreWriter(_StagedStore):
    """The one writer of an embedding store: float32 ``(n_rois, dim)`` arrays in a zarr v3 group.

    Arrays are filled row block by row block (never whole in memory), chunked
    along rows and compressed (zstd). The group is built under a temporary
    name and renamed onto ``path`` by :meth:`close`, so a store under its
    final name is always complete.

    Parameters
    ----------
    path : str or Path
        Store directory (``.zarr``).
    attrs : mapping
        JSON-serialisable group attributes.
    """

    def __init__(
        self,
        path: str | Path,
        attrs: Mapping[str, Any],
        *,
        base: str | Path | None = None,
        keep_rows: int = 0,
    ):
        super().__init__(path, base, keep_rows)
        self.arrays: dict[str, RowAppender] = {}
        if base is None:
            self.group = zarr.open_group(self._staged, mode="w", zarr_format=3)
            self.group.attrs.update(dict(attrs))
            return
        # the caller vouches that the base's rows hold (e.g. the same frozen model)
        self.group = zarr.open_group(self._staged, mode="r+")
        self.group.attrs.put(dict(attrs))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*snakemake_timestamp")
            found = {n: a for n, a in self.group.arrays()}
            if "probs" in self.group:
                found |= {f"probs/{n}": a for n, a in self.group["probs"].arrays()}
        self.arrays = {n: RowAppender.resume(a, keep_rows) for n, a in found.items()}

    def add_array(self, name: str, dim: int, attrs: Mapping[str, Any]) -> RowAppender:
        """Create an empty ``(0, dim)`` float32 array; rows are added with ``append``.

        ``name`` may sit in a sub-group: ``probs/fold_0``. On a store grown
        from a ``base`` that holds ``name`` with the same ``dim``, the base's
        array (its attrs replaced by ``attrs``), to append to.
        """
        found = self.arrays.get(name)
        if found is not None and self.keep_rows and found.array.shape[1] == dim:
            found.array.attrs.put(dict(attrs))
            return found
        if name in self.arrays:
            raise ValueError(f"EmbeddingStoreWriter: array {name!r} already exists")
        rows = max(256, (1 << 20) // max(dim, 1))  # about 4 MiB per chunk
        parent, _, leaf = name.rpartition("/")
        group = self.group.require_group(parent) if parent else self.group
        array = group.create_array(
            leaf,
            shape=(0, dim),
            chunks=(rows, dim),
            dtype="float32",
            compressors=zarr.codecs.ZstdCodec(level=3),
            attributes=dict(attrs),
        )
        self.arrays[name] = RowAppender(array)
        return self.arrays[name]

    def _flush(self) -> None:
        for appender in self.arrays.values():
            appender.flush()


class RowAppender:
    """Append rows to a zarr array along its first axis, a whole chunk at a time.

    Appending to a partly filled chunk would decompress and rewrite it each
    time, so rows are buffered until a chunk is full or :meth:`flush`.
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.n_rows = 0
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    @classmethod
    def resume(cls, array: zarr.Array, keep_rows: int) -> RowAppender:
        """Append to ``array`` after its first ``keep_rows`` rows (later rows are dropped)."""
        if keep_rows > array.shape[0]:
            raise ValueError(
                f"{array.name}: {array.shape[0]} rows, fewer than {keep_rows} to keep"
            )
        array.resize((keep_rows, *array.shape[1:]))
        appender = cls(array)
        appender.n_rows = keep_rows
        return appender

    def append(self, rows: np.ndarray) -> None:
        """Add rows (cast to the array's dtype) after those already written."""
        rows = np.asarray(rows, dtype=self.array.dtype)
        if rows.shape[1:] != self.array.shape[1:]:
            expected = ", ".join(map(str, self.array.shape[1:]))
            raise ValueError(
                f"append to {self.array.name}: expected (n, {expected}) rows; got {rows.shape}"
            )
        self._pending.append(rows)
        self._n_pending += len(rows)
        # flush at the end of a chunk (of the first, when resumed mid-chunk)
        if self.n_rows % self.array.chunks[0] + self._n_pending >= self.array.chunks[0]:
            self.flush()

    def flush(self) -> None:
        """Write every buffered row."""
        if not self._n_pending:
            return
        block = np.concatenate(self._pending)
        self.array.resize((self.n_rows + len(block), *self.array.shape[1:]))
        self.array[self.n_rows :] = block
        self.n_rows += len(block)
        self._pending, self._n_pending = [], 0


def write_embeddings(
    arrays: Mapping[str, np.ndarray],
    path: str | Path,
    attrs: Mapping[str, Any],
    array_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write in-memory ``(n_rois, dim)`` arrays as one store (see :class:`EmbeddingStoreWriter`).

    Parameters
    ----------
    arrays : mapping of str to numpy.ndarray
        Array name (``fold_0``...) to ``(n_rois, dim)`` embeddings.
    path : str or Path
        Store directory (``.zarr``), replaced atomically.
    attrs : mapping
        Group attributes (architecture, input size, version...).
    array_attrs : mapping, optional
        Array name -> its own attributes (weights hash, normalisation...).
    """
    with EmbeddingStoreWriter(path, attrs) as store:
        for name, emb in arrays.items():
            emb = np.asarray(emb, dtype=np.float32)
            if emb.ndim != 2:
                raise ValueError(f"write_embeddings: {name} must be 2-D; got {emb.shape}")
            store.add_array(name, emb.shape[1], (array_attrs or {}).get(name, {})).append(emb)


def open_embeddings(path: str | Path) -> dict[str, zarr.Array]:
    """Open an embedding store read-only: array name -> lazily sliced zarr array."""
    group = zarr.open_group(str(path), mode="r")
    with warnings.catch_warnings():
        # Snakemake marks directory outputs with a .snakemake_timestamp file.
        warnings.filterwarnings("ignore", message=".*snakemake_timestamp")
        return dict(group.arrays())


def open_probabilities(path: str | Path) -> dict[str, zarr.Array]:
    """Open the head probabilities of a store: array name -> ``(n_rois, n_classes)`` array.

    Empty when the encoder has no trained head (``frozen``, ``hog``); columns
    follow each array's ``classes`` attribute.
    """
    group = zarr.open_group(str(path), mode="r")
    if "probs" not in group:
        return {}
    return dict(group["probs"].arrays())


def embeddings_attrs(path: str | Path) -> dict[str, Any]:
    """Return the group attributes of an embedding store (architecture, training, leaky...)."""
    return dict(zarr.open_group(str(path), mode="r").attrs)


def fold_embeddings(path: str | Path, folds: Sequence[int]) -> dict[int, zarr.Array]:
    """Each fold's embedding array: ``fold_<k>``, or the shared ``all`` array for every fold.

    Stores of encoders trained once (``all_labels``) or not at all
    (``frozen``) hold one ``all`` array that serves every fold.
    """
    arrays = open_embeddings(path)
    if "all" in arrays:
        return dict.fromkeys(folds, arrays["all"])
    missing = [k for k in folds if f"fold_{k}" not in arrays]
    if missing:
        raise InvalidInputError(
            "missing_fold", f"{path}: no embeddings for folds {missing}; has {sorted(arrays)}"
        )
    return {k: arrays[f"fold_{k}"] for k in folds}

"""Ingest: dataset folders as downloaded -> one manifest table and a rejects table.

Every candidate file ends in exactly one of the two tables: the manifest (image
id, dataset, path, sha256, label, patient, width, height, mask path,
annotations) or the rejects (path, reason code, message). Nothing vanishes
silently. How each dataset is laid out and labelled is the business of its
adapter in :mod:`leukflow.data.datasets` (:data:`LISTERS`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from leukflow.core.parallel import parallel_map
from leukflow.data import cache
from leukflow.data.datasets import (
    NO_ANNOTATIONS,
    RECORD_COLUMNS,
    ignored_files,
    image_folder,
    list_dataset,
)
from leukflow.data.io import (
    InvalidInputError,
    atomic_path,
    read_image,
    read_image_noted,
    sha256_file,
)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "image_id", "dataset", "path", "root", "sha256", "label", "patient", "width", "height",
    "mask_path", "annotations", "note", "pixel_sha256", "thumbnail",
]  # fmt: skip
MANIFEST_DTYPES = {
    c: {"width": "int64", "height": "int64", "thumbnail": "object"}.get(c, "str")
    for c in MANIFEST_COLUMNS
}
REJECT_COLUMNS = ["dataset", "path", "reason", "message"]

#: Cache folder of ingest's per-image measurements (see :mod:`leukflow.data.cache`).
INGEST_CACHE = cache.namespace("ingest", {}, cache.INGEST_SOURCES)

#: Keys of a dataset spec that only the demo drawing uses; ingest ignores them.
DEMO_ONLY_KEYS = {"n_fields", "fields_per_patient", "seed"}
#: Keys of a dataset spec that ingest reads besides ``format`` and ``root``.
OPTION_KEYS = {"masks", "label", "label_map"}


def inspect_image(
    path: Path,
    mask: Path | None,
    *,
    min_size_px: int,
    cache_dir: str | Path | None = None,
    sha256: str = "",
) -> dict[str, Any]:
    """Decode, hash and measure one image, and check its mask's size.

    Parameters
    ----------
    path : Path
        The image file.
    mask : Path or None
        Its mask file, if any.
    min_size_px : int
        Images narrower or lower than this are rejected as ``too_small``.
    cache_dir : str or Path, optional
        Per-image cache (:mod:`leukflow.data.cache`): an image whose file hash was
        measured before is not decoded again.
    sha256 : str, optional
        The file's SHA-256 when known (:func:`known_hashes`: same path, size
        and mtime as when it was hashed); otherwise the file is hashed.

    Returns
    -------
    dict
        ``sha256`` (of the file), ``pixel_sha256`` (of the decoded RGB pixels),
        ``width``, ``height``, ``note`` (mode conversion) and ``thumbnail``
        (:func:`image_thumbnail`: 64x64 grey, uint8
        bytes, for the duplicate search).

    Raises
    ------
    InvalidInputError
        For an unusable image or mask (see :func:`leukflow.data.io.read_image`),
        ``too_small`` or ``mask_size_mismatch``.
    """
    try:
        sha = sha256 or sha256_file(path)
    except OSError:  # read_image_noted below names the reason
        sha = ""
    entry = cache.entry_path(cache_dir, INGEST_CACHE, sha) if (cache_dir and sha) else None
    hit = cache.load_arrays(entry) if entry is not None else None
    if hit is not None:
        arrays, found = hit
        found["thumbnail"] = arrays["thumbnail"].tobytes()
    else:
        rgb, note = read_image_noted(path)
        found = {
            "pixel_sha256": hashlib.sha256(f"{rgb.shape}".encode() + rgb.tobytes()).hexdigest(),
            "width": rgb.shape[1],
            "height": rgb.shape[0],
            "note": note,
            "thumbnail": image_thumbnail(rgb).tobytes(),
        }
        if entry is not None:
            meta = {k: v for k, v in found.items() if k != "thumbnail"}
            thumb = np.frombuffer(found["thumbnail"], dtype=np.uint8)
            cache.save_arrays(entry, {"thumbnail": thumb}, meta)
    h, w = found["height"], found["width"]
    if min(h, w) < min_size_px:
        raise InvalidInputError(
            "too_small", f"{path}: {w}x{h} pixels, below min_size_px={min_size_px}"
        )
    if mask is not None:
        _check_mask(path, mask, (h, w))
    return {"sha256": sha, **found}


def _inspect_or_reason(task: tuple[Path, Path | None, int, str, str]) -> dict[str, Any]:
    path, mask, min_size_px, cache_dir, sha = task
    try:
        return inspect_image(
            path, mask, min_size_px=min_size_px, cache_dir=cache_dir or None, sha256=sha
        )
    except InvalidInputError as err:
        return {"reason": err.reason, "message": str(err)}


def ingest_images(
    records: pd.DataFrame,
    *,
    dataset: str,
    root: str | Path,
    min_size_px: int,
    n_workers: int = 1,
    cache_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Open, hash and measure every listed image, in parallel.

    Parameters
    ----------
    records : pandas.DataFrame
        Columns ``path`` (relative to ``root``), ``label``, ``patient``, and
        optionally ``mask_path`` (relative to ``root``; empty for none) and
        ``annotations`` (JSON text), as :mod:`leukflow.data.datasets` listers return.
    dataset : str
        Dataset name, the prefix of every image id.
    root : str or Path
        The folder that ``path`` and ``mask_path`` are relative to.
    min_size_px : int
        Images narrower or lower than this are rejected as ``too_small``.
    n_workers : int
        Worker processes decoding images (the rule's ``threads``).
    cache_dir : str or Path, optional
        See :func:`inspect_image`.

    Returns
    -------
    manifest, rejects : pandas.DataFrame
        With :data:`MANIFEST_COLUMNS` and :data:`REJECT_COLUMNS`. A mask whose
        height and width differ from its image's is rejected as
        ``mask_size_mismatch``; an unusable mask rejects its image with the
        mask's reason (``missing_file``, ``unreadable``...).
    """
    root = Path(root)
    records = records.copy()
    for column, none in (("mask_path", ""), ("annotations", NO_ANNOTATIONS)):
        if column not in records:
            records[column] = none
        records[column] = records[column].astype(object).where(records[column].notna(), none)
    records = records.reindex(columns=RECORD_COLUMNS)
    bad = []
    listed = []
    for rec in records.itertuples(index=False):
        if pd.isna(rec.path) or str(rec.path).strip() == "":
            bad.append({"path": rec.path, "reason": "missing_file",
                        "message": f"{root}: a listed image has no path"})  # fmt: skip
        elif pd.isna(rec.label) or str(rec.label).strip() == "":
            bad.append({"path": rec.path, "reason": "missing_label",
                        "message": f"{root / rec.path}: empty label"})  # fmt: skip
        else:
            listed.append(rec)
    hashes = known_hashes(cache_dir, [root / rec.path for rec in listed])
    tasks = [
        (
            root / rec.path,
            root / rec.mask_path if rec.mask_path else None,
            min_size_px,
            str(cache_dir or ""),
            known,
        )
        for rec, known in zip(listed, hashes, strict=True)
    ]
    ok = []
    real_root = root.resolve()
    inspected = list(parallel_map(_inspect_or_reason, tasks, n_workers, desc=f"ingest {dataset}"))
    remember_hashes(cache_dir, [t[0] for t in tasks], [f.get("sha256", "") for f in inspected])
    for rec, found in zip(listed, inspected, strict=True):
        if "reason" in found:
            log.warning("rejected: %s", found["message"])
            bad.append({"path": rec.path, **found})
            continue
        target = (root / rec.path).resolve()
        if not target.is_relative_to(real_root):
            # a folder's symlink out is the user's own choice: kept, never silently
            outside = f"symlink to {target}, outside the dataset folder"
            found = {**found, "note": "; ".join(n for n in (found["note"], outside) if n)}
            log.warning("%s: %s", root / rec.path, outside)
        ok.append(
            {
                "image_id": f"{dataset}/{Path(rec.path).with_suffix('').as_posix()}",
                "path": rec.path,
                "label": str(rec.label),
                # an image without a patient id is a group of its own
                "patient": rec.path if pd.isna(rec.patient) else str(rec.patient),
                "mask_path": str(rec.mask_path),
                "annotations": str(rec.annotations),
                **found,
            }
        )
    manifest = pd.DataFrame(ok).assign(dataset=dataset, root=str(root))
    rejects = pd.DataFrame(bad, columns=["path", "reason", "message"]).assign(dataset=dataset)
    # typed even when empty, so that concatenating datasets keeps the dtypes
    manifest = manifest.reindex(columns=MANIFEST_COLUMNS).astype(MANIFEST_DTYPES)
    return manifest, rejects[REJECT_COLUMNS]


def _file_index(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "ingest" / "files.parquet"


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def known_hashes(cache_dir: str | Path | None, paths: list[Path]) -> list[str]:
    """Return the SHA-256 of each file an earlier ingest hashed, unchanged since ("" if not).

    A file counts as unchanged when its path, size and mtime are those it had
    when hashed (``results_dir/cache/ingest/files.parquet``): ingest then
    neither reads nor decodes it again.
    """
    index = _file_index(cache_dir) if cache_dir else None
    if index is None or not index.exists():
        return [""] * len(paths)
    try:
        table = pd.read_parquet(index).set_index("path")
    except (OSError, ValueError, KeyError) as err:
        log.warning("%s: unreadable (%s); hashing every file", index, err)
        return [""] * len(paths)
    known = []
    for path in paths:
        row = table.loc[str(path)] if str(path) in table.index else None
        same = row is not None and _stat(path) == (row["size"], row["mtime_ns"])
        known.append(str(row["sha256"]) if same else "")
    return known


def remember_hashes(cache_dir: str | Path | None, paths: list[Path], shas: list[str]) -> None:
    """Record each hashed file's path, size, mtime and SHA-256 for :func:`known_hashes`."""
    if not cache_dir:
        return
    rows = [(str(p), *st, sha) for p, sha in zip(paths, shas, strict=True)
            if sha and (st := _stat(p)) is not None]  # fmt: skip
    new = pd.DataFrame(rows, columns=["path", "size", "mtime_ns", "sha256"])
    index = _file_index(cache_dir)
    if index.exists():
        try:
            old = pd.read_parquet(index)
            new = pd.concat([old[~old["path"].isin(new["path"])], new], ignore_index=True)
        except (OSError, ValueError, KeyError):
            pass
    with atomic_path(index) as tmp:
        new.to_parquet(tmp, index=False)


def _check_mask(image: Path, mask: Path, shape: tuple[int, int]) -> None:
    try:
        mh, mw = read_image(mask).shape[:2]
    except InvalidInputError as err:
        raise InvalidInputError(err.reason, f"{image}: its mask is unusable: {err}") from err
    if (mh, mw) != shape:
        h, w = shape
        raise InvalidInputError(
            "mask_size_mismatch",
            f"{image}: image is {w}x{h} pixels but its mask {mask} is {mw}x{mh}",
        )


def ingest_datasets(
    datasets: Mapping[str, Mapping[str, Any]],
    *,
    min_size_px: int,
    n_workers: int = 1,
    cache_dir: str | Path | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ingest several datasets into one manifest and one rejects table.

    Parameters
    ----------
    datasets : mapping
        Dataset name -> ``{"format": ..., "root": ...}`` plus the optional
        dataset options ``masks``, ``label`` and ``label_map`` (see
        :func:`leukflow.data.datasets.list_dataset`). The demo-only keys
        ``n_fields``, ``fields_per_patient`` and ``seed`` are ignored, so a
        validated config entry can be passed as it is.
    min_size_px, n_workers, cache_dir
        See :func:`ingest_images`.

    Returns
    -------
    manifest, rejects : pandas.DataFrame
        With :data:`MANIFEST_COLUMNS` and :data:`REJECT_COLUMNS`. For format
        ``manifest`` the ``root`` column is the CSV's folder, which ``path``
        is relative to.
    """
    manifests, rejects = [], []
    ignored: dict[str, int] = {}
    for name, spec in datasets.items():
        unknown = set(spec) - {"format", "root"} - OPTION_KEYS - DEMO_ONLY_KEYS
        if unknown:
            raise ValueError(
                f"ingest_datasets: dataset {name}: unknown keys {sorted(unknown)}; expected "
                f"format, root and {sorted(OPTION_KEYS)}"
            )
        options = {k: spec[k] for k in OPTION_KEYS if k in spec}
        records, listed_bad = list_dataset(spec["format"], spec["root"], **options)
        root = image_folder(spec["format"], spec["root"])
        manifest, bad = ingest_images(
            records, dataset=name, root=root, min_size_px=min_size_px, n_workers=n_workers,
            cache_dir=cache_dir,
        )  # fmt: skip
        manifests.append(manifest)
        rejects += [bad, listed_bad.assign(dataset=name)[REJECT_COLUMNS]]
        accounted = {
            *manifest["path"], *manifest["mask_path"], *bad["path"].astype(str),
            *listed_bad["path"].astype(str),
        }  # fmt: skip
        for suffix, n in ignored_files(
            spec["format"], spec["root"], accounted, masks=spec.get("masks")
        ).items():
            ignored[suffix] = ignored.get(suffix, 0) + n
        if manifest["image_id"].duplicated().any():
            dup = manifest.loc[manifest["image_id"].duplicated(), "path"].tolist()[:5]
            raise InvalidInputError(
                "duplicate_id", f"dataset {name}: several files map to one image id: {dup}"
            )
        log.info(
            "%s: %d images ingested, %d rejected", name, len(manifest), len(bad) + len(listed_bad)
        )
    rejected = pd.concat([r for r in rejects if len(r)] or [rejects[0]], ignore_index=True)
    manifest = pd.concat(manifests, ignore_index=True)
    log.info("%s", count_summary(manifest, rejected, ignored=ignored))
    return manifest, rejected


def count_summary(
    manifest: pd.DataFrame, rejects: pd.DataFrame, *, ignored: Mapping[str, int] | None = None
) -> str:
    """One line for the end of ingest.

    ``kept N, rejected M by reason (...), noted K ...``, then, when some
    files under the datasets are neither images nor files their adapters read,
    ``; ignored 3 other files: .txt 2, .db 1``: every file is accounted for.
    """
    reasons = ", ".join(f"{r}: {n}" for r, n in rejects["reason"].value_counts().items())
    noted = int((manifest["note"] != "").sum())
    line = (
        f"kept {len(manifest)}, rejected {len(rejects)} by reason ({reasons or 'none'}), "
        f"noted {noted} (conversions to 8-bit RGB, TIFF pages, links out: see the note column)"
    )
    if ignored:
        by_suffix = ", ".join(f"{s} {n}" for s, n in ignored.items())
        line += f"; ignored {sum(ignored.values())} other files: {by_suffix}"
    return line


#: Side of the grey thumbnail stored for the duplicate search (uint8, row-major).
THUMBNAIL_PX = 64


def image_thumbnail(rgb: np.ndarray, size_px: int = THUMBNAIL_PX) -> np.ndarray:
    """Grey thumbnail of the whole image, squeezed to a square.

    Squeezing (rather than padding) commutes with flips and 90-degree
    rotations, so a turned copy gives the turned thumbnail.

    Parameters
    ----------
    rgb : numpy.ndarray
        ``(H, W, 3)`` uint8 image.
    size_px : int
        Side of the thumbnail.

    Returns
    -------
    numpy.ndarray
        ``(size_px, size_px)`` uint8, ITU-R 601 luma, area-averaged.
    """
    grey = Image.fromarray(rgb).convert("L")
    return np.asarray(grey.resize((size_px, size_px), Image.Resampling.BOX), dtype=np.uint8)

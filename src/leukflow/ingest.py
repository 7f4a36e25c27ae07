"""Ingest: dataset folders as downloaded -> one manifest table and a rejects table.

Every candidate file ends in exactly one of the two tables: the manifest (image
id, dataset, path, sha256, label, patient, width, height) or the rejects (path,
reason code, message). Nothing vanishes silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from leukflow.io import InvalidInputError, read_image, sha256_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

MANIFEST_COLUMNS = [
    "image_id", "dataset", "path", "root", "sha256", "label", "patient", "width", "height",
]  # fmt: skip
REJECT_COLUMNS = ["dataset", "path", "reason", "message"]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def list_demo(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List a demo dataset (``labels.csv`` with image, label, patient).

    Returns
    -------
    records : pandas.DataFrame
        Columns ``path`` (relative to ``root``), ``label``, ``patient``.
    unlabelled : pandas.DataFrame
        Image files under ``root`` that ``labels.csv`` does not list (rejects).
    """
    root = Path(root)
    labels = pd.read_csv(root / "labels.csv", dtype=str)
    missing = {"image", "label", "patient"} - set(labels.columns)
    if missing:
        raise InvalidInputError(
            "bad_label_table", f"{root / 'labels.csv'}: missing columns {sorted(missing)}"
        )
    records = labels.rename(columns={"image": "path"})[["path", "label", "patient"]]
    return records, _unlisted(root, set(records["path"]))


def list_folders(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List a dataset with one sub-folder per class; each image is its own patient."""
    root = Path(root)
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in _image_files(class_dir):
            rel = f.relative_to(root).as_posix()
            rows.append({"path": rel, "label": class_dir.name, "patient": rel})
    records = pd.DataFrame(rows, columns=["path", "label", "patient"])
    return records, _unlisted(root, set(records["path"]))


def _unlisted(root: Path, listed: set[str]) -> pd.DataFrame:
    rows = [
        {"path": rel, "reason": "missing_label", "message": f"{root / rel}: no label for image"}
        for rel in (f.relative_to(root).as_posix() for f in _image_files(root))
        if rel not in listed
    ]
    return pd.DataFrame(rows, columns=["path", "reason", "message"])


LISTERS = {"demo": list_demo, "folders": list_folders}


def ingest_images(
    records: pd.DataFrame, *, dataset: str, root: str | Path, min_size_px: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Open, hash and measure every listed image.

    Parameters
    ----------
    records : pandas.DataFrame
        Columns ``path`` (relative to ``root``), ``label``, ``patient``.
    dataset : str
        Dataset name, the prefix of every image id.
    root : str or Path
        Dataset folder.
    min_size_px : int
        Images narrower or lower than this are rejected as ``too_small``.

    Returns
    -------
    manifest, rejects : pandas.DataFrame
        With :data:`MANIFEST_COLUMNS` and :data:`REJECT_COLUMNS`.
    """
    root = Path(root)
    ok, bad = [], []
    for rec in tqdm(records.itertuples(index=False), total=len(records), desc=f"ingest {dataset}"):
        try:
            if pd.isna(rec.path) or str(rec.path).strip() == "":
                raise InvalidInputError("missing_file", f"{root}: a listed image has no path")
            path = root / rec.path
            if pd.isna(rec.label) or str(rec.label).strip() == "":
                raise InvalidInputError("missing_label", f"{path}: empty label")
            rgb = read_image(path)
            h, w = rgb.shape[:2]
            if min(h, w) < min_size_px:
                raise InvalidInputError(
                    "too_small", f"{path}: {w}x{h} pixels, below min_size_px={min_size_px}"
                )
        except InvalidInputError as err:
            log.warning("rejected: %s", err)
            bad.append({"path": rec.path, "reason": err.reason, "message": str(err)})
            continue
        ok.append(
            {
                "image_id": f"{dataset}/{Path(rec.path).with_suffix('').as_posix()}",
                "path": rec.path,
                "sha256": sha256_file(path),
                "label": str(rec.label),
                # an image without a patient id is a group of its own
                "patient": rec.path if pd.isna(rec.patient) else str(rec.patient),
                "width": w,
                "height": h,
            }
        )
    manifest = pd.DataFrame(ok).assign(dataset=dataset, root=str(root))
    rejects = pd.DataFrame(bad, columns=["path", "reason", "message"]).assign(dataset=dataset)
    return manifest.reindex(columns=MANIFEST_COLUMNS), rejects[REJECT_COLUMNS]


def ingest_datasets(
    datasets: Mapping[str, Mapping[str, str]], *, min_size_px: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Ingest several datasets into one manifest and one rejects table.

    Parameters
    ----------
    datasets : mapping
        Dataset name -> ``{"format": ..., "root": ...}``.
    min_size_px : int
        See :func:`ingest_images`.
    """
    manifests, rejects = [], []
    for name, spec in datasets.items():
        records, unlabelled = LISTERS[spec["format"]](spec["root"])
        manifest, bad = ingest_images(
            records, dataset=name, root=spec["root"], min_size_px=min_size_px
        )
        manifests.append(manifest)
        rejects += [bad, unlabelled.assign(dataset=name)[REJECT_COLUMNS]]
        if manifest["image_id"].duplicated().any():
            dup = manifest.loc[manifest["image_id"].duplicated(), "path"].tolist()[:5]
            raise InvalidInputError(
                "duplicate_id", f"dataset {name}: several files map to one image id: {dup}"
            )
        log.info("%s: %d images ingested, %d rejected", name, len(manifest), len(bad))
    rejected = pd.concat([r for r in rejects if len(r)] or [rejects[0]], ignore_index=True)
    return pd.concat(manifests, ignore_index=True), rejected

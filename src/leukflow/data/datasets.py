"""Dataset adapters: each public dataset read exactly as downloaded, no renaming.

An adapter (a *lister*) knows one dataset's folder layout, file names and label
files. ``lister(root, **options)`` returns two tables:

``records``
    One row per image it can label, with :data:`RECORD_COLUMNS`: ``path``
    (relative to the dataset folder), ``label``, ``patient`` (the CV group),
    ``mask_path`` (relative to the dataset folder, ``""`` when none) and
    ``annotations`` (a JSON string, see :func:`encode_annotations`).
``rejects``
    One row per image file it must refuse (``path``, ``reason``, ``message``):
    ``missing_label`` for an image that its dataset does not label,
    ``outside_root`` for a path read from a file (a ``manifest`` CSV, the demo's
    ``labels.csv``) that points outside the dataset's folder,
    ``unreadable`` for an image whose annotation file cannot be parsed.

Listers only read names and label/annotation files; opening, hashing and
measuring the images (and checking mask sizes) is :mod:`leukflow.data.ingest`'s job.
:func:`list_dataset` runs a lister and then the dataset's ``label_map``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from leukflow.data.io import InvalidInputError, is_image_candidate, read_voc_boxes

log = logging.getLogger(__name__)

#: Stems (lower case, before any suffix) of a dataset's own documents: README,
#: licence, citation. They belong to the dataset; ingest does not count them as ignored.
DOCUMENT_STEMS = ("readme", "license", "licence", "copying", "citation", "notice")

RECORD_COLUMNS = ["path", "label", "patient", "mask_path", "annotations"]
LIST_REJECT_COLUMNS = ["path", "reason", "message"]

#: ``annotations`` of an image that has none.
NO_ANNOTATIONS = "{}"

#: ALL-IDB1 and ALL-IDB2 file names: ``ImNNN_L``, L = 1 ALL, 0 healthy.
ALLIDB_NAME = re.compile(r"Im\d+_(?P<code>[01])", re.IGNORECASE)
ALLIDB_LABELS = {"1": "ALL", "0": "healthy"}

#: C-NMC 2019 class folders inside each ``fold_N``.
CNMC_LABELS = {"all": "ALL", "hem": "healthy"}

#: segmentation_WBC (Zheng 2018) class codes.
ZHENG_LABELS = {
    "1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil",
}  # fmt: skip
ZHENG_FOLDER = re.compile(r"Dataset \d+")
ZHENG_LABEL_COLUMNS = ("class label", "class")  # Dataset 1 / Dataset 2 headers

#: Columns of a user's manifest CSV (format ``manifest``); patient and mask optional.
MANIFEST_CSV_COLUMNS = ["path", "label", "patient", "mask"]

#: Label of every BCCD image when the dataset option ``label`` is not given.
BCCD_DEFAULT_LABEL = "unlabelled"

#: Dataset options, and the formats each applies to.
FORMAT_OPTIONS = {"masks": ("allidb2",), "label": ("bccd",)}


# ------------------------------------------------------------------ helpers


def _image_files(folder: Path, exclude: Callable[[Path], bool] | None = None) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and is_image_candidate(p) and not (exclude is not None and exclude(p))
    )


def _records(rows: Iterable[Mapping[str, object]]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=RECORD_COLUMNS)


def _rejects(rows: Iterable[Mapping[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=LIST_REJECT_COLUMNS)


def _reject(path: str, err: InvalidInputError) -> dict[str, str]:
    return {"path": path, "reason": err.reason, "message": str(err)}


def _unlisted(
    root: Path,
    listed: Collection[str],
    *,
    exclude: Callable[[Path], bool] | None = None,
) -> pd.DataFrame:
    """Image files under ``root`` that the dataset does not label: ``missing_label``."""
    rows = [
        {"path": rel, "reason": "missing_label", "message": f"{root / rel}: no label for image"}
        for rel in (f.relative_to(root).as_posix() for f in _image_files(root, exclude))
        if rel not in listed
    ]
    return _rejects(rows)


def _finish(
    root: Path,
    rows: list[dict[str, object]],
    bad: list[dict[str, str]],
    *,
    exclude: Callable[[Path], bool] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return the records, and the lister's own rejects then the unlabelled images."""
    records = _records(rows)
    listed = set(records["path"].dropna()) | {r["path"] for r in bad}
    unlisted = _unlisted(root, listed, exclude=exclude)
    rejects = pd.concat([t for t in (_rejects(bad), unlisted) if len(t)] or [unlisted])
    return records, rejects.reset_index(drop=True)


def _number(value: float | str) -> int | float:
    number = float(value)
    return int(number) if number.is_integer() else number


def encode_annotations(
    *,
    boxes: Sequence[Sequence[float]] | None = None,
    points: Sequence[Sequence[float]] | None = None,
) -> str:
    """Encode box or point annotations as the manifest's ``annotations`` JSON string.

    Parameters
    ----------
    boxes : sequence of (x0, y0, x1, y1), optional
        Boxes in image pixels.
    points : sequence of (x, y), optional
        Points in image pixels (e.g. blast centres).

    Returns
    -------
    str
        ``{"boxes": [[x0, y0, x1, y1], ...]}``, ``{"points": [[x, y], ...]}`` or
        ``{}`` when neither is given. Whole numbers are written as integers. An
        empty list means "annotated, nothing there"; ``{}`` means "not annotated".
    """
    if boxes is not None and points is not None:
        raise ValueError("encode_annotations: give boxes or points, not both")
    if boxes is not None:
        return json.dumps({"boxes": [[_number(v) for v in box] for box in boxes]})
    if points is not None:
        return json.dumps({"points": [[_number(v) for v in point] for point in points]})
    return NO_ANNOTATIONS


def read_xyc(path: str | Path) -> list[list[int | float]]:
    """Read an ALL-IDB ``.xyc`` file: one ``x y`` blast centre per line.

    Blank lines are skipped; an empty file has no points.

    Raises
    ------
    InvalidInputError
        ``unreadable``, naming the file and line, for a line that is not two numbers.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError("unreadable", f"{path}: cannot read ({err})") from err
    points = []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError
            points.append([_number(v) for v in fields])
        except ValueError:
            raise InvalidInputError(
                "unreadable",
                f"{path}: line {lineno}: expected two numbers 'x y'; got {line.strip()!r}",
            ) from None
    return points


def _stem_index(root: Path, suffix: str) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for p in sorted(root.rglob(f"*{suffix}")):
        if p.is_file():
            index.setdefault(p.stem, []).append(p)
    return index


def _companion(image: Path, candidates: list[Path]) -> Path | None:
    """Pick the file of ``image``'s stem beside it, else the only one elsewhere."""
    beside = [c for c in candidates if c.parent == image.parent]
    if beside:
        return beside[0]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        log.warning("%s: several files could annotate it, none used: %s", image, candidates)
    return None


# ------------------------------------------------------------------ listers


def list_demo(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List a demo dataset (``labels.csv`` with image, label, patient).

    Returns
    -------
    records : pandas.DataFrame
        :data:`RECORD_COLUMNS`; ``path`` relative to ``root``.
    rejects : pandas.DataFrame
        Image files under ``root`` that ``labels.csv`` does not list
        (``missing_label``), and rows whose image resolves outside ``root``
        (``outside_root``: ``..``, an absolute path elsewhere, a symlink out).
    """
    root = Path(root)
    csv = root / "labels.csv"
    labels = pd.read_csv(csv, dtype=str)
    missing = {"image", "label", "patient"} - set(labels.columns)
    if missing:
        raise InvalidInputError("bad_label_table", f"{csv}: missing columns {sorted(missing)}")
    rows, bad = [], []
    for rec in labels.itertuples(index=False):
        if pd.isna(rec.image) or not str(rec.image).strip():
            rows.append(_row(rec.image, rec.label, patient=rec.patient))  # ingest: missing_file
            continue
        rel = _inside(root, str(rec.image).strip())
        if rel is None:
            bad.append(_outside(csv, rec.image, root))
            continue
        rows.append(_row(rel, rec.label, patient=rec.patient))
    return _finish(root, rows, bad)


def _outside(table: Path, path: object, base: Path, what: str = "image") -> dict[str, str]:
    return {
        "path": str(path),
        "reason": "outside_root",
        "message": f"{table}: {what} {str(path)!r} resolves outside the dataset's folder "
        f"{str(base)!r}",
    }


def list_folders(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List a dataset with one sub-folder per class; each image is its own patient."""
    root = Path(root)
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in _image_files(class_dir):
            rel = f.relative_to(root).as_posix()
            rows.append(_row(rel, class_dir.name))
    return _finish(root, rows, [])


def _row(
    rel: str,
    label: str,
    *,
    patient: str | None = None,
    mask_path: str = "",
    annotations: str = NO_ANNOTATIONS,
) -> dict[str, object]:
    # without a patient id an image is a group of its own
    return {
        "path": rel,
        "label": label,
        "patient": rel if patient is None else patient,
        "mask_path": mask_path,
        "annotations": annotations,
    }


def list_allidb1(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List ALL-IDB1: ``ImNNN_L.jpg`` smears (L = 1 ``ALL``, 0 ``healthy``).

    An ``ImNNN_L.xyc`` file of blast centres, beside the image or (as in the
    ``im/`` + ``xyc/`` download) the only one of that stem under ``root``,
    becomes ``{"points": [[x, y], ...]}``. ALL-IDB1 gives no patient ids, so
    each image is its own group.
    """
    root = Path(root)
    xyc = _stem_index(root, ".xyc")
    rows, bad = [], []
    for f in _image_files(root):
        match = ALLIDB_NAME.fullmatch(f.stem)
        if match is None or f.suffix.lower() not in {".jpg", ".jpeg"}:
            continue  # not an ALL-IDB1 name: missing_label
        rel = f.relative_to(root).as_posix()
        annotations = NO_ANNOTATIONS
        coords = _companion(f, xyc.get(f.stem, []))
        if coords is not None:
            try:
                annotations = encode_annotations(points=read_xyc(coords))
            except InvalidInputError as err:
                bad.append(_reject(rel, err))
                continue
        rows.append(_row(rel, ALLIDB_LABELS[match["code"]], annotations=annotations))
    return _finish(root, rows, bad)


def list_allidb2(
    root: str | Path, *, masks: str | Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List ALL-IDB2: ``ImNNN_L.tif`` single-cell crops (L = 1 ``ALL``, 0 ``healthy``).

    Parameters
    ----------
    root : str or Path
        Folder holding the crops (searched recursively).
    masks : str or Path, optional
        Folder of expert masks (white background, nucleus RGB (0, 255, 255),
        cytoplasm (0, 0, 255)), absolute or relative to the working directory;
        a mask is matched to its image by file stem. Files inside it are never
        image candidates, even when it lies under ``root``.
    """
    root = Path(root)
    mask_index: dict[str, list[Path]] = {}
    exclude = None
    if masks is not None:
        masks = Path(masks)
        if not masks.is_dir():
            raise InvalidInputError(
                "missing_file", f"allidb2 option masks: expected a folder; got {str(masks)!r}"
            )
        for m in _image_files(masks):
            mask_index.setdefault(m.stem, []).append(m)
        masks_real = masks.resolve()

        def exclude(p: Path) -> bool:
            return p.resolve().is_relative_to(masks_real)

    rows = []
    for f in _image_files(root, exclude):
        match = ALLIDB_NAME.fullmatch(f.stem)
        if match is None or f.suffix.lower() not in {".tif", ".tiff"}:
            continue
        rel = f.relative_to(root).as_posix()
        found = mask_index.get(f.stem, [])
        if len(found) > 1:
            log.warning("%s: several masks match, using the first: %s", f, found)
        mask_path = Path(os.path.relpath(found[0], root)).as_posix() if found else ""
        rows.append(_row(rel, ALLIDB_LABELS[match["code"]], mask_path=mask_path))
    return _finish(root, rows, [], exclude=exclude)


def list_cnmc(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List the C-NMC 2019 training tree ``fold_N/{all,hem}/*.bmp``.

    Folder ``all`` -> ``ALL``, ``hem`` -> ``healthy``. The patient is the second
    underscore-separated field of the name: ``UID_11_10_1_all.bmp`` -> ``11``,
    ``UID_H10_43_1_hem.bmp`` -> ``H10``. A name without one is rejected
    (``missing_patient``): guessing would let one patient's cells leak across folds.
    """
    root = Path(root)
    rows, bad = [], []
    for fold in sorted(p for p in root.glob("fold_*") if p.is_dir()):
        for folder, label in CNMC_LABELS.items():
            for f in _image_files(fold / folder):
                rel = f.relative_to(root).as_posix()
                fields = f.stem.split("_")
                if len(fields) < 3 or fields[0] != "UID" or not fields[1]:
                    bad.append(
                        {
                            "path": rel,
                            "reason": "missing_patient",
                            "message": f"{root / rel}: expected a C-NMC name "
                            f"UID_<patient>_<n>_<n>_{folder}; got {f.name!r}",
                        }
                    )
                    continue
                rows.append(_row(rel, label, patient=fields[1]))
    return _finish(root, rows, bad)


def list_bccd(root: str | Path, *, label: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List BCCD (Pascal VOC): ``JPEGImages/*.jpg`` with ``Annotations/<stem>.xml``.

    The WBC boxes become ``{"boxes": [[x0, y0, x1, y1], ...]}`` (an empty list
    when the annotation has none; ``{}`` when an image has no annotation file).
    BCCD has no diagnosis, so every image gets ``label`` (default
    ``unlabelled``); each image is its own group.
    """
    root = Path(root)
    label = BCCD_DEFAULT_LABEL if label is None else label
    images = root / "JPEGImages"
    if not images.is_dir():
        raise InvalidInputError(
            "bad_layout",
            f"bccd: expected the Pascal VOC folders JPEGImages/ and Annotations/ under root; "
            f"got {str(root)!r}, which has no JPEGImages/",
        )
    rows, bad = [], []
    for f in _image_files(images):
        rel = f.relative_to(root).as_posix()
        xml = root / "Annotations" / f"{f.stem}.xml"
        annotations = NO_ANNOTATIONS
        if xml.is_file():
            try:
                boxes = read_voc_boxes(xml, name="WBC")
            except InvalidInputError as err:
                bad.append(_reject(rel, err))
                continue
            annotations = encode_annotations(boxes=boxes.to_numpy().tolist())
        rows.append(_row(rel, label, annotations=annotations))
    return _finish(root, rows, bad)


def _zheng_parts(root: Path) -> list[tuple[Path, Path]]:
    """(image folder, label CSV) pairs: ``Dataset N`` folders under or at ``root``."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and ZHENG_FOLDER.fullmatch(p.name))
    if folders:
        return [(f, root / f"Class Labels of {f.name}.csv") for f in folders]
    if ZHENG_FOLDER.fullmatch(root.name):
        csv = f"Class Labels of {root.name}.csv"
        return [(root, root / csv if (root / csv).is_file() else root.parent / csv)]
    raise InvalidInputError(
        "bad_layout",
        f"zheng: expected 'Dataset N' folders under root, or root to be one; got {str(root)!r}",
    )


def _zheng_labels(csv: Path) -> dict[int, str]:
    """Image number -> class code (as text) from ``Class Labels of Dataset N.csv``."""
    if not csv.is_file():
        raise InvalidInputError("bad_label_table", f"{csv}: no such label file")
    table = pd.read_csv(csv, dtype=str, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    label_col = next((c for c in ZHENG_LABEL_COLUMNS if c in table.columns), None)
    if "image ID" not in table.columns or label_col is None:
        raise InvalidInputError(
            "bad_label_table",
            f"{csv}: expected columns 'image ID' and one of {list(ZHENG_LABEL_COLUMNS)}; "
            f"got {list(table.columns)}",
        )
    table = table.dropna(subset=["image ID"])
    ids, codes = table["image ID"], table[label_col]
    return {int(i): str(c).strip() for i, c in zip(ids, codes, strict=True)}


def list_zheng(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List segmentation_WBC (Zheng 2018): ``Dataset N/NNN.bmp`` with masks ``NNN.png``.

    ``root`` is the folder holding ``Dataset 1``, ``Dataset 2`` and their
    ``Class Labels of Dataset N.csv`` files, or one ``Dataset N`` folder (its
    CSV inside it or beside it). Class codes 1..5 -> neutrophil, lymphocyte,
    monocyte, eosinophil, basophil. The PNG masks are never image candidates;
    each image is its own group.
    """
    root = Path(root)
    parts = _zheng_parts(root)
    folders = {folder.resolve() for folder, _ in parts}

    def is_mask(p: Path) -> bool:
        return p.suffix.lower() == ".png" and p.parent.resolve() in folders

    rows, bad = [], []
    for folder, csv in parts:
        labels = _zheng_labels(csv)
        for f in sorted(folder.glob("*.bmp")):
            rel = f.relative_to(root).as_posix()
            code = labels.get(int(f.stem)) if f.stem.isdigit() else None
            if code is None:
                continue  # no label row: missing_label
            if code not in ZHENG_LABELS:
                bad.append(
                    {
                        "path": rel,
                        "reason": "missing_label",
                        "message": f"{root / rel}: class {code!r} in {csv.name} is not one of "
                        f"{sorted(ZHENG_LABELS)}",
                    }
                )
                continue
            mask = f.with_suffix(".png")
            mask_path = mask.relative_to(root).as_posix() if mask.is_file() else ""
            rows.append(_row(rel, ZHENG_LABELS[code], mask_path=mask_path))
    return _finish(root, rows, bad, exclude=is_mask)


def _inside(base: Path, path: str) -> str | None:
    """Return ``path`` (relative to ``base`` or absolute) relative to ``base``; None if outside.

    Symlinks are followed for the check, so a link pointing outside is outside.
    The name kept is the one written (a link inside keeps its own name) unless
    normalising it would name another file; then it is the resolved path.
    """
    full = Path(path) if os.path.isabs(path) else base / path
    target, real_base = full.resolve(), base.resolve()
    if not target.is_relative_to(real_base):
        return None
    lexical = Path(os.path.normpath(os.path.abspath(full)))
    if lexical.is_relative_to(os.path.abspath(base)):
        rel = lexical.relative_to(os.path.abspath(base))
        if (base / rel).resolve() == target:
            return rel.as_posix()
    return target.relative_to(real_base).as_posix()


def list_manifest(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List a user's CSV: columns ``path``, ``label``, optional ``patient``, ``mask``.

    Here ``root`` is the CSV file itself; relative paths resolve against its
    folder, and returned paths are relative to that folder. A path that
    resolves outside it (``..``, an absolute path elsewhere, a symlink pointing
    out) is rejected as ``outside_root``. Images in the folder that the CSV
    does not list are ``missing_label``; the masks it lists are not candidates.
    """
    csv = Path(root)
    base = csv.parent
    table = pd.read_csv(csv, dtype=str, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise InvalidInputError("bad_label_table", f"{csv}: missing columns {sorted(missing)}")
    ignored = sorted(set(table.columns) - set(MANIFEST_CSV_COLUMNS))
    if ignored:
        log.warning("%s: columns %s ignored; expected %s", csv, ignored, MANIFEST_CSV_COLUMNS)
    table = table.reindex(columns=MANIFEST_CSV_COLUMNS)
    rows, bad, masks = [], [], set()
    for rec in table.itertuples(index=False):
        if pd.isna(rec.path) or not str(rec.path).strip():
            rows.append(_row(rec.path, rec.label, patient=rec.patient))  # ingest: missing_file
            continue
        rel = _inside(base, str(rec.path).strip())
        mask_rel = ""
        if rel is not None and not pd.isna(rec.mask) and str(rec.mask).strip():
            mask_rel = _inside(base, str(rec.mask).strip())
        if rel is None or mask_rel is None:
            what = "image" if rel is None else f"mask {str(rec.mask)!r} of image"
            bad.append(_outside(csv, rec.path, base, what))
            continue
        masks.add(mask_rel)
        rows.append(_row(rel, rec.label, patient=rec.patient, mask_path=mask_rel))
    records, rejects = _finish(base, rows, bad, exclude=lambda p: _rel(p, base) in masks)
    # a missing patient stays missing here: ingest makes the image its own group
    return records, rejects


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


LISTERS: dict[str, Callable[..., tuple[pd.DataFrame, pd.DataFrame]]] = {
    "demo": list_demo,
    "folders": list_folders,
    "allidb1": list_allidb1,
    "allidb2": list_allidb2,
    "cnmc": list_cnmc,
    "bccd": list_bccd,
    "zheng": list_zheng,
    "manifest": list_manifest,
}


def image_folder(fmt: str, root: str | Path) -> Path:
    """Return the folder that a dataset's ``path`` and ``mask_path`` are relative to.

    ``root`` itself, except for format ``manifest``, whose ``root`` is the CSV
    file: there it is the CSV's folder.
    """
    return Path(root).parent if fmt == "manifest" else Path(root)


def dataset_files(spec: Mapping[str, object]) -> list[str]:
    """Every file a dataset's ingest reads, for the workflow to watch.

    All files (not hidden ones) under the dataset's image folder, its mask
    folder when it has one, and a ``manifest`` dataset's CSV: adding, removing
    or editing any of them makes Snakemake ingest again, while the per-image
    cache keeps that cheap. Listing 20,000 files takes well under a second.
    """
    root = Path(str(spec["root"]))
    files = [str(root)] if root.is_file() else []
    folders = [image_folder(str(spec["format"]), root)]
    if spec.get("masks"):
        folders.append(Path(str(spec["masks"])))
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return files


def count_images(files: Iterable[str]) -> int:
    """How many of ``files`` have an image suffix (an upper bound on a dataset's images)."""
    return sum(is_image_candidate(f) for f in files)


def is_dataset_document(rel: str) -> bool:
    """Whether a file is one of a dataset's own documents (README, licence...)."""
    stem = Path(rel).name.lower().split(".")[0]
    return stem.startswith(DOCUMENT_STEMS)


def adapter_uses(fmt: str, rel: str) -> bool:
    """Whether the adapter of format ``fmt`` reads the file ``rel`` (relative to the image folder).

    Label tables, annotation and mask files and the dataset's own documents;
    ingest counts every other non-image file as ignored, so none passes unseen.
    """
    path = Path(rel)
    name, suffix = path.name, path.suffix.lower()
    if is_dataset_document(rel):
        return True
    uses: dict[str, Callable[[], bool]] = {
        "demo": lambda: rel == "labels.csv",
        "allidb1": lambda: suffix == ".xyc",
        "bccd": lambda: path.parts[:1] == ("Annotations",) and suffix == ".xml",
        "zheng": lambda: (
            re.fullmatch(r"Class Labels of Dataset \d+\.csv", name) is not None
            or (suffix == ".png" and ZHENG_FOLDER.fullmatch(path.parent.name) is not None)
        ),
    }
    check = uses.get(fmt)
    return bool(check and check())


def ignored_files(
    fmt: str, root: str | Path, accounted: Collection[str], *, masks: str | Path | None = None
) -> dict[str, int]:
    """Count, by suffix, the files under a dataset that nothing used: no image, no adapter file.

    Parameters
    ----------
    fmt : str
        The dataset's format.
    root : str or Path
        The dataset's ``root`` (for ``manifest``: the CSV file).
    accounted : collection of str
        Paths relative to the image folder that ingest kept or rejected, and their masks.
    masks : str or Path, optional
        ``allidb2``'s mask folder; its files are the adapter's.

    Returns
    -------
    dict
        Suffix (lower case; ``(none)`` for a name without one) -> number of files,
        most frequent first; ``(linked folder)`` counts symlinked folders, whose
        files no lister walks.
    """
    folder = image_folder(fmt, root)
    used = set(accounted)
    if fmt == "manifest":
        used.add(Path(root).name)
    masks_real = Path(masks).resolve() if masks else None
    counts: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        # the listers do not descend into linked folders: each is counted, not lost
        linked = sum(os.path.islink(os.path.join(dirpath, d)) for d in dirnames)
        if linked:
            counts["(linked folder)"] = counts.get("(linked folder)", 0) + linked
        for f in filenames:
            full = Path(dirpath) / f
            rel = full.relative_to(folder).as_posix()
            if rel in used or adapter_uses(fmt, rel):
                continue
            if masks_real is not None and full.resolve().is_relative_to(masks_real):
                continue
            suffix = full.suffix.lower() or "(none)"
            counts[suffix] = counts.get(suffix, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def apply_label_map(
    records: pd.DataFrame, label_map: Mapping[object, str] | None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rename labels so that several datasets share one label set.

    Parameters
    ----------
    records : pandas.DataFrame
        A lister's records.
    label_map : mapping
        Original label -> new label (keys are compared as text, so a YAML
        ``1: ALL`` maps the label ``"1"``). Empty or None: labels are kept.

    Returns
    -------
    records, rejects : pandas.DataFrame
        Records with mapped labels; images whose label is not in a non-empty
        map are rejected (``label_not_in_map``). An empty label is left for
        ingest to reject as ``missing_label``.
    """
    if not label_map:
        return records, _rejects([])
    mapping = {str(k): str(v) for k, v in label_map.items()}
    empty = records["label"].isna() | (records["label"].astype(str).str.strip() == "")
    unknown = ~empty & ~records["label"].astype(str).isin(mapping)
    rejects = _rejects(
        {
            "path": rec.path,
            "reason": "label_not_in_map",
            "message": f"{rec.path}: label {rec.label!r} is not in label_map "
            f"(keys {sorted(mapping)})",
        }
        for rec in records[unknown].itertuples(index=False)
    )
    kept = records[~unknown].copy()
    kept["label"] = kept["label"].where(empty[~unknown], kept["label"].astype(str).map(mapping))
    return kept.reset_index(drop=True), rejects


def list_dataset(
    fmt: str,
    root: str | Path,
    *,
    masks: str | Path | None = None,
    label: str | None = None,
    label_map: Mapping[object, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List one dataset with its adapter, then apply its ``label_map``.

    Parameters
    ----------
    fmt : str
        A key of :data:`LISTERS`.
    root : str or Path
        The dataset folder (for ``manifest``: the CSV file).
    masks : str or Path, optional
        ``allidb2`` only: folder of expert masks.
    label : str, optional
        ``bccd`` only: the label of every image (default ``unlabelled``).
    label_map : mapping, optional
        See :func:`apply_label_map`.

    Returns
    -------
    records, rejects : pandas.DataFrame
        :data:`RECORD_COLUMNS` and :data:`LIST_REJECT_COLUMNS`.
    """
    if fmt not in LISTERS:
        raise ValueError(f"list_dataset: expected a format in {sorted(LISTERS)}; got {fmt!r}")
    options = {k: v for k, v in {"masks": masks, "label": label}.items() if v is not None}
    for key in options:
        if fmt not in FORMAT_OPTIONS[key]:
            raise ValueError(
                f"list_dataset: option {key!r} applies to format {FORMAT_OPTIONS[key]} only; "
                f"got format {fmt!r}"
            )
    records, rejects = LISTERS[fmt](root, **options)
    records, unmapped = apply_label_map(records, label_map)
    parts = [t for t in (rejects, unmapped) if len(t)]
    return records, pd.concat(parts, ignore_index=True) if parts else _rejects([])

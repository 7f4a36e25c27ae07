"""The batch ledger: which images each segmentation batch holds, append-only.

A dataset's images are segmented in batches of about ``segmentation.batch_size``
images (one ``segment_batch`` job each). The ledger,
``results_dir/segment/<dataset>/batches.csv`` (columns ``image_id``,
``batch``, ``path`` and ``mask``, the image and mask files, in the order
images joined), remembers each batch's members from run to run:

- an image keeps its batch for as long as it is listed;
- new images (in sorted id order) fill the one **open** batch, the last one,
  up to ``batch_size``, then start new batches; every other batch is
  **sealed** and never takes new images;
- a removed image leaves its batch (which then runs again, without it).

So adding 5% of images re-runs one or two ``segment_batch`` jobs, not all of
them: a batch job depends on its own members' files only. A dataset seen for
the first time gets its sorted ids cut into consecutive batches.

The run plan (``workflow/rules/common.smk``) works the ledger out when the
DAG is built from the ledger on disk and the dataset's listing, without
writing it; ingest writes the same ledger (:func:`plan_ledger` gives the
same answer to both), so ``snakemake -n`` writes nothing.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from leukflow.data.datasets import image_folder, list_dataset
from leukflow.data.io import CANDIDATE_SUFFIXES

LEDGER_COLUMNS = ["image_id", "batch", "path", "mask"]
#: Keys of a dataset spec that its listing reads besides ``format`` and ``root``.
_LIST_OPTIONS = ("masks", "label", "label_map")


def read_ledger_table(path: str | Path) -> pd.DataFrame:
    """Read a ledger file as a table (:data:`LEDGER_COLUMNS`); empty when there is none yet.

    Raises
    ------
    ValueError
        The file is not a ledger (names the file and the problem).
    """
    path = Path(path)
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER_COLUMNS})
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0] == LEDGER_COLUMNS[:2]:  # without its files: listed again
        rows = [LEDGER_COLUMNS, *([*row, "", ""] for row in rows[1:])]
    if not rows or rows[0] != LEDGER_COLUMNS:
        raise ValueError(f"{path}: expected columns {LEDGER_COLUMNS}; got {rows[:1]}")
    table = pd.DataFrame(rows[1:], columns=LEDGER_COLUMNS)
    try:
        table["batch"] = table["batch"].astype(int)
    except ValueError as err:
        raise ValueError(f"{path}: not a batch ledger ({err})") from err
    return table


def read_ledger(path: str | Path) -> dict[str, int]:
    """Image id -> batch, in the order images joined; empty when there is no ledger yet."""
    table = read_ledger_table(path)
    return dict(zip(table["image_id"], table["batch"].astype(int).tolist(), strict=True))


def write_ledger(ledger: Mapping[str, int], listed: pd.DataFrame, path: str | Path) -> None:
    """Write ``ledger`` with its images' files (``listed``: :func:`listed_images`) atomically."""
    path = Path(path)
    files = listed.set_index("image_id").reindex(list(ledger)).fillna("")
    rows = [[i, b, p, m] for (i, b), p, m in
            zip(ledger.items(), files["path"], files["mask"], strict=True)]  # fmt: skip
    if path.exists() and read_ledger_table(path).astype(str).values.tolist() == [
        [str(v) for v in row] for row in rows
    ]:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(LEDGER_COLUMNS)
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_ledger(
    previous: Mapping[str, int], image_ids: Sequence[str], batch_size: int
) -> dict[str, int]:
    """Update a ledger to a listing: old images keep their batch, new ones fill the open one.

    Parameters
    ----------
    previous : mapping
        The ledger of the last run (:func:`read_ledger`), empty for none.
    image_ids : sequence of str
        Every image listed now.
    batch_size : int
        Images per batch; a batch holding this many is sealed.

    Returns
    -------
    dict
        Image id -> batch: the old entries still listed, in their order, then
        the new images in sorted order.
    """
    if batch_size < 1:
        raise ValueError(f"update_ledger: batch_size must be >= 1; got {batch_size}")
    listed = set(image_ids)
    ledger = {i: b for i, b in previous.items() if i in listed}
    sizes: dict[int, int] = {}
    for b in ledger.values():
        sizes[b] = sizes.get(b, 0) + 1
    last = max(previous.values(), default=-1)
    # the last batch is the open one unless full (an emptied last batch is reused)
    batch = last if last >= 0 and sizes.get(last, 0) < batch_size else last + 1
    for image_id in sorted(listed - set(ledger)):
        if sizes.get(batch, 0) >= batch_size:
            batch += 1
        ledger[image_id] = batch
        sizes[batch] = sizes.get(batch, 0) + 1
    return ledger


def members(ledger: Mapping[str, int]) -> list[list[str]]:
    """Each batch's image ids, batches ``0..n-1`` (an emptied batch is an empty list)."""
    batches: list[list[str]] = [[] for _ in range(max(ledger.values(), default=-1) + 1)]
    for image_id, batch in ledger.items():
        batches[batch].append(image_id)
    return batches


def image_id(dataset: str, path: str) -> str:
    """Return an image's id: ``<dataset>/<path without suffix>`` (path relative to its folder)."""
    return f"{dataset}/{Path(path).with_suffix('').as_posix()}"


def listed_images(name: str, spec: Mapping[str, Any]) -> pd.DataFrame:
    """List a dataset's images now: ``image_id``, ``path`` and ``mask`` (absolute, or "").

    The listing ingest starts from (its adapter, then the label map), less the
    records ingest rejects before opening a file (no path, no label): the
    files a batch job reads.
    """
    options = {k: spec[k] for k in _LIST_OPTIONS if k in spec}
    records, _ = list_dataset(spec["format"], spec["root"], **options)
    folder = image_folder(spec["format"], spec["root"])
    ok = records["path"].notna() & records["label"].notna()
    records = records[ok & (records["path"].astype(str).str.strip() != "")]
    records = records[records["label"].astype(str).str.strip() != ""]
    masks = records["mask_path"] if "mask_path" in records else pd.Series("", records.index)
    return pd.DataFrame(
        {
            "image_id": [image_id(name, p) for p in records["path"]],
            "path": [str(folder / p) for p in records["path"]],
            "mask": [str(folder / m) if isinstance(m, str) and m else "" for m in masks],
        }
    )


def plan_ledger(
    name: str,
    spec: Mapping[str, Any],
    batch_size: int,
    path: str | Path,
    files: Sequence[str] | None = None,
) -> tuple[dict[str, int], pd.DataFrame]:
    """Work out a dataset's ledger (from the one at ``path`` and its listing); and the listing.

    With ``files``, the dataset's files now (``dataset_files``): when every
    image file among them is one the ledger holds, and every file the ledger
    holds is among them, the ledger stands as it is and the dataset is not
    listed again (its adapter is slow on large datasets), so that
    ``snakemake -n`` stays fast when nothing is new.
    """
    table = read_ledger_table(path)
    if files is not None and len(table) and _holds_the_same_files(table, files):
        ledger = dict(zip(table["image_id"], table["batch"].tolist(), strict=True))
        return ledger, table[["image_id", "path", "mask"]]
    listed = listed_images(name, spec)
    ledger = update_ledger(read_ledger(path), listed["image_id"].tolist(), batch_size)
    return ledger, listed


def _holds_the_same_files(table: pd.DataFrame, files: Sequence[str]) -> bool:
    held = set(table["path"]) | (set(table["mask"]) - {""})
    present = set(files)
    images = {f for f in files if os.path.splitext(f)[1].lower() in CANDIDATE_SUFFIXES}
    return held <= present and images <= held


def write_ledgers(
    datasets: Mapping[str, Mapping[str, Any]],
    manifest: pd.DataFrame,
    paths: Mapping[str, str],
    batch_size: int,
) -> None:
    """Write every dataset's ledger after ingest, as the run plan worked it out.

    A demo dataset's (drawn by the workflow, never grown) holds its manifest's
    sorted ids cut in order, what its batch jobs take from the manifest.
    """
    for name, spec in datasets.items():
        if spec["format"] != "demo":
            write_ledger(*plan_ledger(name, spec, batch_size, paths[name]), paths[name])
            continue
        rows = manifest[manifest["dataset"] == name]
        files = [str(Path(r) / p) for r, p in zip(rows["root"], rows["path"], strict=True)]
        listed = pd.DataFrame({"image_id": rows["image_id"], "path": files, "mask": ""})
        write_ledger(
            update_ledger({}, listed["image_id"].tolist(), batch_size), listed, paths[name]
        )

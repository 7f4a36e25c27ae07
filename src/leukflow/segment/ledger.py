"""The batch ledger: which images each segmentation batch holds, append-only.

A dataset's images are segmented in batches of about ``segmentation.batch_size``
images (one ``segment_batch`` job each). The ledger,
``results_dir/segment/<dataset>/batches.csv`` (columns ``image_id``,
``batch``, in the order images joined), remembers each batch's members from
run to run:

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

LEDGER_COLUMNS = ["image_id", "batch"]
#: Keys of a dataset spec that its listing reads besides ``format`` and ``root``.
_LIST_OPTIONS = ("masks", "label", "label_map")


def read_ledger(path: str | Path) -> dict[str, int]:
    """Image id -> batch, in the order images joined; empty when there is no ledger yet.

    Raises
    ------
    ValueError
        The file is not a ledger (names the file and the problem).
    """
    path = Path(path)
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != LEDGER_COLUMNS:
            raise ValueError(f"{path}: expected columns {LEDGER_COLUMNS}; got {header}")
        try:
            return {image_id: int(batch) for image_id, batch in reader}
        except ValueError as err:
            raise ValueError(f"{path}: not a batch ledger ({err})") from err


def write_ledger(ledger: Mapping[str, int], path: str | Path) -> None:
    """Write ``ledger`` to ``path`` atomically (a temporary file renamed), when it changed."""
    path = Path(path)
    if list(read_ledger(path).items()) == list(ledger.items()):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(LEDGER_COLUMNS)
            writer.writerows(ledger.items())
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
    name: str, spec: Mapping[str, Any], batch_size: int, path: str | Path
) -> tuple[dict[str, int], pd.DataFrame]:
    """Work out a dataset's ledger (from the one at ``path`` and its listing); and the listing."""
    listed = listed_images(name, spec)
    return update_ledger(read_ledger(path), listed["image_id"].tolist(), batch_size), listed

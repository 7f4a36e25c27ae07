"""Stores that grow: appending to the ROI crop and embedding stores instead of rewriting them.

Snakemake removes a job's outputs before it runs, so the store a job appends
to cannot be its own output. Each finished store therefore leaves a
**mirror** under ``results_dir/cache/stores/<name>/``: ``store/``, the same
files as hard links (no byte copied), and ``parts.json``, what the store's
rows were made from. The next job builds its store from the mirror's rows
that still hold (:func:`leukflow.data.io.link_rows`: hard links again, and a
copy of the one chunk cut) and writes only the rows after them.

The mirror is read, never written, by an append, and replaced only after the
new store is in place: a job killed at any moment leaves the old store
readable and the next run resumable. A mirror that is missing, unreadable or
made with other attributes counts as empty (the store is written whole), so
the cache can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from leukflow.data.io import CropStoreWriter, same_attrs

log = logging.getLogger(__name__)

#: The file of a mirror that says what its store's rows were made from.
PARTS_FILE = "parts.json"


def mirror_dir(cache_dir: str | Path, name: str) -> Path:
    """Return the mirror of store ``name`` (e.g. ``segment/<dataset>/crops.zarr``)."""
    return Path(cache_dir) / "stores" / name


def load_mirror(mirror: str | Path) -> tuple[Path | None, dict[str, Any]]:
    """Return the mirror's store and parts record; ``(None, {})`` when there is none to trust."""
    mirror = Path(mirror)
    try:
        meta = json.loads((mirror / PARTS_FILE).read_text())
    except (OSError, ValueError) as err:
        if mirror.exists():
            log.warning("%s: unreadable store mirror (%s); writing the store whole", mirror, err)
        return None, {}
    if not _is_parts_record(meta):
        log.warning("%s: a parts record leukflow did not write; writing the store whole", mirror)
        return None, {}
    store = mirror / "store"
    return (store, meta) if store.is_dir() else (None, {})


def _is_parts_record(meta: Any) -> bool:
    """Whether ``meta`` has the shape :func:`save_mirror` writes: a cache is read, not trusted."""
    if not isinstance(meta, dict) or not isinstance(meta.get("attrs", {}), dict):
        return False
    rows, parts = meta.get("rows", []), meta.get("parts", [])
    return (
        isinstance(rows, list) and all(isinstance(r, str) for r in rows)
        and isinstance(parts, list)
        and all(isinstance(q, list) and len(q) == 2 and isinstance(q[0], str)
                and isinstance(q[1], int) and q[1] >= 0 for q in parts)
    )  # fmt: skip


def save_mirror(store: str | Path, mirror: str | Path, meta: Mapping[str, Any]) -> None:
    """Replace the mirror by hard links to ``store``'s files and ``meta`` as its parts record."""
    store, mirror = Path(store), Path(mirror)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{mirror.name}.", dir=mirror.parent))
    try:
        for path in store.rglob("*"):
            if path.is_file() and path.name != ".snakemake_timestamp":
                dest = tmp / "store" / path.relative_to(store)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, dest)
        (tmp / PARTS_FILE).write_text(json.dumps(meta, default=str))
        if mirror.exists():
            shutil.rmtree(mirror)
        os.replace(tmp, mirror)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def files_digest(paths: Iterable[str | Path]) -> str:
    """Digest the files at ``paths`` (folders: every file inside) by name, size and mtime.

    A job that wrote a file again changes its digest; a file left alone keeps it.
    """
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file() and path.name != ".snakemake_timestamp":
                st = path.stat()
                digest.update(f"{path.relative_to(root.parent)}\0{st.st_size}\0"
                              f"{st.st_mtime_ns}\n".encode())  # fmt: skip
    return digest.hexdigest()


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common prefix of two sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], dtype=object) != np.asarray(b[:n], dtype=object))
    return int(differ[0]) if len(differ) else n


def grow_crops(
    path: str | Path,
    parts: Sequence[tuple[str, str | Path]],
    *,
    roi_size_px: int,
    attrs: Mapping[str, Any],
    mirror: str | Path,
    block_rows: int = 4096,
) -> dict[str, int]:
    """Write the crop store ``path`` as the concatenation of ``parts``' crop stores.

    Parameters
    ----------
    path : str or Path
        The store to write (atomically, see :class:`~leukflow.data.io.CropStoreWriter`).
    parts : sequence of (str, path)
        Per part (a segmentation batch), in order: a digest of what made it
        (:func:`files_digest`) and its crop store.
    roi_size_px, attrs
        As for :class:`~leukflow.data.io.CropStoreWriter`.
    mirror : str or Path
        The store's mirror (:func:`mirror_dir`): the parts it holds with the
        same digests, from the first on, are linked, not written.

    Returns
    -------
    dict
        ``parts_kept``, ``rows_kept`` (linked from the mirror), ``rows_written``.
    """
    base, meta = load_mirror(mirror)
    old = meta.get("parts", []) if same_attrs(meta.get("attrs", {}), attrs) else []
    kept = common_prefix([d for d, _ in parts], [d for d, _ in old])
    keep_rows = sum(n for _, n in old[:kept])
    record = [list(p) for p in old[:kept]]
    with CropStoreWriter(
        path, roi_size_px, attrs, base=base if kept else None, keep_rows=keep_rows
    ) as store:
        for digest, source in parts[kept:]:
            part = zarr.open_array(str(source), mode="r")
            for start in range(0, part.shape[0], block_rows):
                store.append(part[start : start + block_rows])
            record.append([digest, int(part.shape[0])])
    save_mirror(path, mirror, {"attrs": dict(attrs), "parts": record})
    stats = {"parts_kept": kept, "rows_kept": keep_rows, "rows_written": store.n_rows - keep_rows}
    log.info("%s: %s", path, stats)
    return stats

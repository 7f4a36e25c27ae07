"""Per-image results keyed by content, so that a re-run redoes only what changed.

Ingest's decode and measurements, a field's segmentation (ROI records,
crops, the per-image row, kmeans scores) and a frozen encoder's embeddings of
a field's ROIs are stored under
``results_dir/cache/`` in files named by the SHA-256 of the image file (and
of its mask, when the method reads masks) inside a folder named by a hash of
everything else that produced them: the parameters and the source code of the
functions that computed them. Adding images therefore costs only the new
images; editing an image's content (same name) misses the cache; changing a
parameter or the code starts a new folder.

Entries hold no path or image id (renaming a file costs nothing) and no
pickles (``numpy.savez`` arrays and JSON text). They are written to a
temporary name and renamed, so a killed job leaves no half entry; an entry
that cannot be read is treated as absent and computed again. The cache can be
deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

import leukflow

log = logging.getLogger(__name__)

#: Sources whose code decides segmentation results (relative to the package).
SEGMENT_SOURCES = ("segment/methods.py", "segment/rois.py", "segment/masks.py", "data/io.py")
#: Sources whose code decides ingest's measurements.
INGEST_SOURCES = ("data/ingest.py", "data/io.py")
#: Sources whose code decides a frozen encoder's embeddings of given crops.
EMBED_SOURCES = ("learn/embed.py", "learn/models.py", "learn/nets.py", "learn/hog.py")


@cache
def code_digest(sources: tuple[str, ...]) -> str:
    """SHA-256 of leukflow's version and the source files that compute a result."""
    digest = hashlib.sha256(leukflow.__version__.encode())
    base = Path(leukflow.__file__).parent
    for source in sources:
        digest.update(source.encode() + b"\0" + (base / source).read_bytes())
    return digest.hexdigest()


def namespace(stage: str, params: Mapping[str, Any], sources: tuple[str, ...]) -> str:
    """Folder name of a stage's entries: the stage, then a hash of params and code."""
    text = json.dumps(params, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode() + code_digest(sources).encode()).hexdigest()
    return f"{stage}/{key[:16]}"


def entry_path(cache_dir: str | Path, space: str, *digests: str, suffix: str = ".npz") -> Path:
    """Path of one entry: ``<cache_dir>/<space>/<first 2 hex>/<digests joined by _>``."""
    name = "_".join(d for d in digests if d)
    return Path(cache_dir) / space / name[:2] / f"{name}{suffix}"


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write ``arrays`` plus ``meta`` (as JSON text) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, meta=np.array(json.dumps(meta, default=_plain)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """Read an entry written by :func:`save_arrays`; ``None`` when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "meta"}
            meta = json.loads(str(npz["meta"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        log.warning("%s: unreadable cache entry (%s); computing it again", path, err)
        return None
    return arrays, meta


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a cache entry")

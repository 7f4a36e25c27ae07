"""Provenance: what produced a result folder, written beside the results.

``RESULTS_DIR/provenance.json`` holds the resolved configuration (every
default filled in), leukflow's version and the git commit of the workflow,
the versions of the packages that compute, the manifest's hash and per-dataset
image counts, and the seeds. ``leukflow predict`` reads the configuration back
from it, so a trained model is always applied with the parameters that
trained it.

The file has no timestamp: two runs of the same commit on the same images
with the same configuration write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

import leukflow
from leukflow.core.runlog import package_versions
from leukflow.data.io import InvalidInputError, atomic_path

PROVENANCE_FILE = "provenance.json"
#: What the config schema allows as a dataset, encoder or classifier name. A
#: results folder made by someone else is untrusted: these names become path
#: parts under it, so one that could climb out (``../x``) is refused on reading.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def git_commit(source_dir: str | Path) -> str:
    """Return the git commit of ``source_dir`` (``-dirty`` if files changed) or ``unknown``."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(source_dir), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def manifest_digest(manifest: pd.DataFrame) -> dict[str, Any]:
    """Hash the images a run used (dataset, path, content hash); count them per dataset."""
    keys = manifest.sort_values(["dataset", "path"])[["dataset", "path", "sha256"]]
    digest = hashlib.sha256()
    for row in keys.itertuples(index=False):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    counts = manifest.groupby("dataset").size()
    return {
        "manifest_sha256": digest.hexdigest(),
        "images_per_dataset": {str(k): int(v) for k, v in counts.items()},
    }


def find_seeds(config: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """Every ``seed``-named key in the config, by its dotted path."""
    seeds: dict[str, int] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            seeds.update(find_seeds(value, f"{path}."))
        elif "seed" in str(key) and isinstance(value, int):
            seeds[path] = value
    return seeds


def build_provenance(
    config: Mapping[str, Any], manifest: pd.DataFrame, source_dir: str | Path
) -> dict[str, Any]:
    """Collect the provenance of a run on ``manifest`` with the resolved ``config``."""
    return {
        "leukflow_version": leukflow.__version__,
        "git_commit": git_commit(source_dir),
        "packages": package_versions(),
        **manifest_digest(manifest),
        "seeds": find_seeds(config),
        "config": json.loads(json.dumps(config, default=str)),
    }


def write_provenance(provenance: Mapping[str, Any], path: str | Path) -> None:
    """Write ``provenance`` as sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def read_provenance(results_dir: str | Path) -> dict[str, Any]:
    """Read the provenance of a result folder; a clear error when it has none.

    Raises
    ------
    FileNotFoundError
        The folder has no ``provenance.json``.
    InvalidInputError
        ``unreadable`` for a file that is not JSON; ``bad_provenance`` when a
        dataset, encoder or classifier name is not a plain name
        (:data:`SAFE_NAME`), as a crafted file's could be.
    """
    path = Path(results_dir) / PROVENANCE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no provenance file; is {results_dir} a leukflow results folder "
            "from a finished run?"
        )
    try:
        provenance = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidInputError("unreadable", f"{path}: not a JSON file ({err})") from err
    config = provenance.get("config") if isinstance(provenance, dict) else None
    for section in ("datasets", "encoders", "classifiers"):
        names = config.get(section) if isinstance(config, dict) else None
        bad = [str(n) for n in (names or {}) if not SAFE_NAME.fullmatch(str(n))]
        if bad:
            raise InvalidInputError(
                "bad_provenance",
                f"{path}: {section} names {bad} are not plain names (letters, digits, "
                "_ and -); they would name paths outside the results folder",
            )
    return provenance

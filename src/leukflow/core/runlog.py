"""Logging set-up for the workflow's scripts and the command line.

The library itself only calls ``logging.getLogger(__name__)``; this module is
what a script calls first, so that its log file opens with what produced it.
"""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import leukflow

#: The packages that compute: their versions open every log and go into provenance.json.
PACKAGES = [
    "numpy",
    "scipy",
    "pandas",
    "scikit-learn",
    "scikit-image",
    "dask",
    "zarr",
    "torch",
    "torchvision",
    "snakemake",
]


def start_log(
    step: str, log_path: str | Path | None = None, params: Mapping[str, Any] | None = None
) -> logging.Logger:
    """Send log records to ``log_path`` (and stderr); log the step's params and versions.

    Parameters
    ----------
    step : str
        Name of the rule or command, used as the logger name.
    log_path : str or Path, optional
        The rule's log file.
    params : mapping, optional
        Parameters to record at the top of the log.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    log = logging.getLogger(f"leukflow.{step}")
    log.info(
        "leukflow %s, python %s on %s",
        leukflow.__version__,
        platform.python_version(),
        platform.node(),
    )
    versions = package_versions()
    log.info("packages: %s", ", ".join(f"{p}=={versions[p]}" for p in PACKAGES))
    for key, value in (params or {}).items():
        log.info("param %s = %r", key, value)
    return log


def package_versions() -> dict[str, str]:
    """Return the versions of Python and of :data:`PACKAGES` (``absent`` when not installed)."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions

"""Headless Chromium for tests: screenshots of pages and the DOM after scripts ran.

Debian's ``chromium`` package (``.ci/browser.sh`` installs it on CI); tests
that need it call :func:`chromium_or_skip`.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium binary ($LEUKFLOW_CHROMIUM first), or None."""
    names = [os.environ.get("LEUKFLOW_CHROMIUM", ""), *CANDIDATES]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def chromium_or_skip() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no chromium binary found (apt-get install chromium, or .ci/browser.sh; "
            "or set LEUKFLOW_CHROMIUM)"
        )
    return binary


def _run(binary: str, url: str, *args: str, budget_ms: int = 5000) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--no-first-run", f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", *args, url]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def screenshot(url: str, png: Path, *, size: tuple[int, int] = (1200, 1000)) -> np.ndarray:
    """Load ``url`` in headless Chromium, save a screenshot to ``png``, return its pixels."""
    binary = chromium_or_skip()
    run = _run(binary, url, f"--window-size={size[0]},{size[1]}", f"--screenshot={png}")
    assert png.is_file(), f"chromium wrote no screenshot of {url}: {run.stderr[-2000:]}"
    return np.asarray(Image.open(png).convert("RGB"))


def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran, as HTML text."""
    binary = chromium_or_skip()
    run = _run(binary, url, "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def assert_not_blank(pixels: np.ndarray, *, min_colours: int = 50, min_changed: float = 0.02):
    """A rendered page: many colours, and a share of pixels that differ from the background."""
    flat = pixels.reshape(-1, 3)
    colours = len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0))
    values, counts = np.unique(flat, axis=0, return_counts=True)
    background = values[counts.argmax()]
    changed = float((flat != background).any(1).mean())
    assert colours >= min_colours, f"screenshot has only {colours} colours: blank?"
    assert changed >= min_changed, f"only {changed:.1%} of the screenshot differs from background"
    return colours, changed

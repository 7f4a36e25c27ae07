"""Figures: leukflow draws to PNG files only, with matplotlib's Agg backend.

The backend is chosen here, once, when the first figure is made (not when a
module is imported, so importing leukflow leaves a notebook's backend alone
until leukflow draws).
"""

from __future__ import annotations

import functools
from typing import Any

import matplotlib


@functools.cache
def use_file_backend() -> None:
    """Select the Agg backend (files, no display); later calls do nothing."""
    matplotlib.use("Agg")


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """:func:`matplotlib.pyplot.subplots` on the file backend."""
    use_file_backend()
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)

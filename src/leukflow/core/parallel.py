"""Process-parallel maps that use exactly the cores a Snakemake job was given."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

T = TypeVar("T")

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_worker() -> None:
    """Pin BLAS/OpenMP to one thread: one process per core, no oversubscription.

    The environment variables reach libraries loaded later; threadpoolctl
    limits the pools that numpy and scikit-learn have already started.
    """
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    threadpool_limits(limits=1)


def parallel_map(
    func: Callable[[Any], T],
    items: Sequence[Any],
    n_workers: int,
    *,
    desc: str | None = None,
    chunksize: int = 16,
) -> Iterator[T]:
    """Yield ``func(item)`` for every item, in order, on ``n_workers`` processes.

    Results stream back chunk by chunk, so memory does not grow with the
    number of items beyond one result each. ``n_workers <= 1`` runs in this
    process. A progress bar shows when attached to a terminal.
    """
    bar = tqdm(total=len(items), desc=desc, disable=None)
    if n_workers <= 1 or len(items) <= chunksize:
        for item in items:
            yield func(item)
            bar.update()
    else:
        with ProcessPoolExecutor(n_workers, initializer=single_threaded_worker) as pool:
            for result in pool.map(func, items, chunksize=chunksize):
                yield result
                bar.update()
    bar.close()

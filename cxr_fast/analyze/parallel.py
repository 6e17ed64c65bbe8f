"""How the analysis uses the machine's cores.

- numpy work (the AUROC kernel, the subject-weight products) runs in threads: it releases the
  GIL. `workers()` is how many.
- statsmodels fits are Python-bound: they run in a separate process (`process_pool`), beside
  the threads, so a 2-core machine does both at once.
- BLAS itself stays single-threaded (`single_threaded_blas`). The matrix products here are
  small (images x 1,000 resamples x a few columns); OpenBLAS still splits them across threads,
  and on a shared machine those threads spin against each other: on 2 busy cores a
  (1001 x 800) @ (800 x 4) product took 32 ms instead of 0.7 ms. threadpoolctl (installed with
  scikit-learn) limits the pool for the duration of a call; without it this is a no-op and
  only speed differs.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)

MAX_WORKERS = 8  # beyond this the per-task arrays, not the cores, bound the analysis


def workers() -> int:
    """Cores this process may use (its CPU affinity, as Slurm and taskset set it), at most MAX_WORKERS."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(usable, MAX_WORKERS))


# Below this many (model x image) prediction rows a worker process costs more than it saves:
# starting one is a fresh interpreter importing the analysis (~2 s of CPU).
PROCESS_MIN_ROWS = 500_000


def processes_pay(rows: int) -> bool:
    """Whether work over `rows` prediction rows is worth handing to worker processes."""
    return workers() > 1 and rows >= PROCESS_MIN_ROWS


def process_pool(workers: int, *, preload: tuple[str, ...]) -> ProcessPoolExecutor:
    """`workers` processes forked from a fresh server process with the `preload` modules
    imported once (forking this process, which holds BLAS and pool threads, can deadlock).
    The caller's main module must be import-safe (an `if __name__ == "__main__"` guard)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    return ProcessPoolExecutor(workers, mp_context=context)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def blas_single_threaded(function: F) -> F:
    """Decorator form of single_threaded_blas (nested use is harmless)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]

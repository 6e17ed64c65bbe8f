"""Run the analysis with single-threaded BLAS.

The matrix products here are small (images x 1,000 resamples x a few columns). OpenBLAS
still splits them across threads, and on a shared machine those threads spin against each
other: on 2 busy cores a (1001 x 800) @ (800 x 4) product took 32 ms instead of 0.7 ms.
threadpoolctl (installed with scikit-learn) limits the pool for the duration of a call;
without it this is a no-op and only speed differs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


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

"""Run an iterator on a background thread, a few items ahead of its consumer.

The DALI loader's input callback runs on the thread that schedules the pipeline: the
training thread. Reading a batch's JPEG bytes (`os.pread`, which releases the GIL) and
drawing its augmentation parameters there would add that time to every step; here it
overlaps the step instead.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")
_ITEM, _END, _ERROR = range(3)
_POLL_SECONDS = 0.1  # how often a blocked producer checks whether it was closed


class Prefetched(Iterator[T]):
    """The items of `items`, in order, produced by a daemon thread up to `depth` ahead.

    An exception in the producer is raised by the consumer's `next()`, at that item's place.
    `close()` stops the producer (an abandoned pass must not keep reading).
    """

    def __init__(self, items: Iterator[T], depth: int = 2, *, name: str = "prefetch"):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._produce, args=(items,), name=name, daemon=True)
        self._thread.start()

    def _produce(self, items: Iterator[T]) -> None:
        try:
            for item in items:
                if not self._put((_ITEM, item)):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            self._put((_ERROR, error))
            return
        self._put((_END, None))

    def _put(self, entry: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._ended:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self._ended = True
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        self._closed.set()
        self._ended = True
        self._thread.join()

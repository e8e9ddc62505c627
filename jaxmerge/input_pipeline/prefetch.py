"""A background thread that prepares batches ahead of the training loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

_END = object()


def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(items: Iterator, out: queue.Queue, stop: threading.Event):
    # A free function: the thread must not hold the Prefetcher, or it would never be collected.
    try:
        for item in items:
            if not _put(out, stop, item):
                return
        _put(out, stop, _END)
    except BaseException as e:  # handed to the consumer, raised by __next__
        _put(out, stop, e)


class Prefetcher:
    """Iterates `items` on a daemon thread, at most `size` items ahead; re-raises its errors.

    The thread starts at construction, so the first batch is being prepared while the caller
    sets up. `close()` (also on garbage collection) stops it at its next hand-over.
    """

    def __init__(self, items: Iterator, size: int):
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=_produce,
            args=(items, self._queue, self._stop),
            daemon=True,
            name="input_pipeline_prefetch",
        )
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            self.close()
            raise item
        return item

    def close(self):
        """Stops the background thread."""
        self._stop.set()

    def __del__(self):
        self._stop.set()


def maybe_prefetch(items: Iterator, size: int) -> Iterator:
    """`Prefetcher(items, size)`, or `items` itself when size is 0."""
    return Prefetcher(items, size) if size > 0 else items

"""Pacing a base's fingerprint behind the merge that reads the same file, so the disk serves each byte once.

A merge into a fresh base hashes the base's fingerprint on a thread beside it (`ops.merge_placed`), in the order
the base stores its tensors, the merge's own order (`checkpoint.PER_TENSOR`). SHA-256 runs several times faster than
the merge, so a hash left to itself reads far ahead; where the base does not fit in the free memory, the pages it
read are gone again before the merge gets to them, and the disk reads them twice (the 23.8 GB Flux.1-dev base from a
cold page cache: 42 GB read). Paced, the hash reads a stored tensor only once the merge has started on it: the two
then read each tensor together, and whichever comes second finds the pages in the cache.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_local = threading.local()


class ReadPace:
    """Which stored tensors the leading reader (the merge) has started on; a paced reader waits for its next one
    until the leader starts it, or until the leader is done (`release`: finished or failed, so never forever)."""

    def __init__(self) -> None:
        self._started: set[str] = set()
        self._open = True
        self._changed = threading.Condition()

    def started(self, key: str) -> None:
        with self._changed:
            self._started.add(key)
            self._changed.notify_all()

    def release(self) -> None:
        """No more waiting: the leader has read all it will."""
        with self._changed:
            self._open = False
            self._changed.notify_all()

    def wait_for(self, key: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: key in self._started or not self._open)


@contextlib.contextmanager
def paced(pace: ReadPace) -> Iterator[None]:
    """Fingerprints hashed on this thread inside the block read each stored tensor only as `pace` allows."""
    _local.pace = pace
    try:
        yield
    finally:
        _local.pace = None


def when_allowed(key: str, read: Callable[[], T]) -> Callable[[], T]:
    """`read` (the bytes of stored tensor `key`, or some of its rows), called once this thread's pace allows it."""

    def go() -> T:
        pace: ReadPace | None = getattr(_local, "pace", None)
        if pace is not None:
            pace.wait_for(key)
        return read()

    return go

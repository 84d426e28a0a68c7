"""A background writer thread with a pool of reusable block buffers: compute overlaps the writes.

A merge is a copy with a little arithmetic; writing to the page cache is its largest cost. The
main thread reads and computes one row block into a pool buffer and queues it; this thread writes
it (`write` releases the GIL) and hands the buffer back. A bounded pool keeps memory at a few
blocks whatever the tensor size, and reusing buffers avoids a page fault per fresh allocation.
Byte ranges the merge leaves untouched are copied in the kernel (`os.copy_file_range`), never
through user space. Each finished file is fsynced on a second thread: an fsync waits for the disk
(a second or so for a few GB), and on the writer thread it would stall the writes of the next
file, and through the full pool the computing, for all that time.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError

POOL = 4  # buffers in flight: one being filled, the rest queued or being written
CHUNK = 1 << 30  # bytes per copy_file_range / write call (Linux caps one call near 2 GiB)


class WriteQueue:
    """Writes queued blocks and byte ranges to file descriptors, in order, on one thread.

    Use as a context manager; `drain()` waits for everything queued and re-raises the first
    error the thread met (a full disk, a truncated source), which every later call raises too.
    """

    def __init__(self, block_bytes: int, pool: int = POOL) -> None:
        self.block_bytes = block_bytes
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        for _ in range(pool):
            self._free.put(torch.empty(block_bytes, dtype=torch.uint8))
        self._jobs: queue.Queue[tuple[Callable[[], Any], bool] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._idle = threading.Event()
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="loractl-fsync")
        self._syncs: list[Future[None]] = []
        self._thread = threading.Thread(target=self._loop, name="loractl-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> WriteQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self._jobs.put(None)
        self._thread.join()
        self._syncer.shutdown()  # every descriptor closed before the caller discards its files

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A free uint8 buffer of at least `nbytes` (waits for one); pass it as `write`'s owner to return it."""
        self._raise()
        if nbytes > self.block_bytes:
            return torch.empty(nbytes, dtype=torch.uint8)  # a whole-tensor block (DoRA over columns)
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                self._raise()

    def write(self, fd: int, block: torch.Tensor, owner: torch.Tensor | None = None) -> None:
        """Queue `block`'s bytes for `fd`; `owner` (a `buffer`) goes back to the pool once written."""
        self._raise()
        data = memoryview(block.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]

        def job() -> None:
            for i in range(0, len(data), CHUNK):
                write_all(fd, data[i : i + CHUNK])
            if owner is not None and owner.numel() == self.block_bytes:
                self._free.put(owner)

        self._jobs.put((job, False))

    def copy(self, fd: int, src: str | os.PathLike[str], offset: int, nbytes: int) -> None:
        """Queue a kernel-side copy of `nbytes` of `src` from `offset` to `fd`'s current position."""
        self._raise()
        self._jobs.put((lambda: copy_range(src, offset, nbytes, fd), False))

    def call(self, fn: Callable[[], Any], *, always: bool = False) -> None:
        """Queue any call (an fsync) to run after everything queued before it; `always` runs it even
        after an error (a close: a descriptor is never closed while writes to it are pending)."""
        if not always:
            self._raise()
        self._jobs.put((fn, always))

    def finish(self, fd: int) -> None:
        """Queue fsync-then-close of `fd`, after every write queued to it, on the fsync thread (the
        writes of the next file go on meanwhile); `drain` waits for it. It runs even after an error
        (then without the fsync): a descriptor is never left open."""

        def hand_over() -> None:
            self._syncs.append(self._syncer.submit(_sync_close, fd, self._error is None))

        self._jobs.put((hand_over, True))

    def drain(self) -> None:
        """Wait until every queued job and fsync is done; re-raise the first error of either thread."""
        self._idle.clear()
        self._jobs.put((self._idle.set, True))
        while not self._idle.wait(0.1):
            self._raise()
        self._raise()
        for done in self._syncs:
            done.result()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, always = item
            if self._error is None or always:  # after an error, `drain` and every call raise it
                try:
                    job()
                except BaseException as e:  # re-raised on the main thread
                    self._error = self._error or e


def _sync_close(fd: int, sync: bool) -> None:
    try:
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def copy_range(src: str | os.PathLike[str], offset: int, nbytes: int, fd: int) -> None:
    """Append `nbytes` of `src` from `offset` to `fd`: `copy_file_range`, else plain reads and writes."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        while done < nbytes:
            n = _copy_some(f.fileno(), fd, offset + done, min(CHUNK, nbytes - done))
            if n == 0:
                raise FormatError(f"unexpected end of file after {done} of {nbytes} bytes (truncated?)", path=Path(src))
            done += n


def _copy_some(src: int, dst: int, offset: int, count: int) -> int:
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src, dst, count, offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    data = os.pread(src, min(count, 1 << 24), offset)
    write_all(dst, memoryview(data))
    return len(data)


def write_all(fd: int, data: memoryview) -> None:
    """Write every byte of `data` to `fd` (os.write may write less than asked)."""
    while len(data):
        n = os.write(fd, data)
        data = data[n:]


# errnos after which copy_file_range cannot work here (old kernel, other filesystems): copy by hand
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}

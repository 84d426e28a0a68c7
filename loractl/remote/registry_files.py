"""Reading what a registry hands over, as data from a stranger: bounded, regular files, inside it.

A hostile registry (a `file://` directory, or a Hub cache filled from a hostile server) can make
an object a link to `/dev/zero` or a FIFO, or state a size and then hold more. Every read here
opens the file once, checks it is a regular file inside the registry's directory, and reads no
more than the size its record states (or a cap), so nothing it says can exhaust the machine.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .base import CHUNK
from .errors import RegistryDamagedError, RemoteFileNotFoundError

MAX_TEXT_BYTES = 16 << 20  # a model card is kilobytes


def open_object(path: Path, root: Path | None, what: str) -> int:
    """A read-only descriptor of the regular file `path` (links followed only while they stay in `root`)."""
    real = path.resolve()
    if root is not None and not real.is_relative_to(root.resolve()):
        raise RegistryDamagedError(f"{what} is a link out of the registry (to {real})", path=path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)  # a FIFO must not block the open
    except FileNotFoundError:
        raise RemoteFileNotFoundError(f"{what} is missing from the registry", path=path) from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise RegistryDamagedError(f"{what} is a link loop", path=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RegistryDamagedError(f"{what} is not a regular file (a device, FIFO or directory)", path=path)
    return fd


def read_bounded(path: Path, root: Path | None, what: str, limit: int, size: int | None = None) -> bytes:
    """The bytes of `path`: exactly `size` when the record states one, and never more than `limit`."""
    fd = open_object(path, root, what)
    try:
        held = os.fstat(fd).st_size
        if size is not None and held != size:
            raise RegistryDamagedError(f"{what} holds {held} bytes, its record says {size}", path=path)
        if held > limit:
            raise RegistryDamagedError(f"{what} is {held} bytes, over the cap of {limit}", path=path)
        data = os.read(fd, held + 1)  # one byte more: a file that grew while read is refused
        if len(data) != held:
            raise RegistryDamagedError(f"{what} changed while it was read", path=path)
        return data
    finally:
        os.close(fd)


def copy_exact(source: Path, root: Path | None, what: str, size: int, dest: Path) -> None:
    """Copy the `size` bytes of `source` to a new file `dest`, checked before reading (a longer or
    shorter object is refused) and never reading more; write errors name `dest`, read errors `what`."""
    fd = open_object(source, root, what)
    try:
        held = os.fstat(fd).st_size
        if held != size:
            raise RegistryDamagedError(f"{what} holds {held} bytes, its record says {size}", path=source)
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            done = 0
            while done < size:
                block = memoryview(os.read(fd, min(CHUNK, size - done)))
                if not block:
                    raise RegistryDamagedError(f"{what} changed while it was read", path=source)
                done += len(block)
                while block:
                    block = block[_write(out, block, dest) :]
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _write(fd: int, data: memoryview, dest: Path) -> int:
    try:
        return os.write(fd, data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fspath(dest)) from None

"""One training run at a time per OUTPUT: an exclusive lock on `OUTPUT.train/lock` while a run writes there.

Two `loractl train` runs into one OUTPUT would append to one `metrics.jsonl` and replace each other's
checkpoints (one run's `step-000020` by the other's), and a later `--resume` would mix them. The lock is an
flock, which the kernel drops when its process ends, killed or not: a crashed run leaves no stale lock, and
the file's pid is only there for the message. A filesystem that cannot lock (some network or FUSE mounts)
runs unlocked, as every run did before.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ..errors import UsageError

LOCK_NAME = "lock"
_CANNOT_LOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (creating the directory); a UsageError if another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_NAME).open("a+") as lock:
        if _locked(lock, run_dir):
            lock.seek(0)
            lock.truncate()
            lock.write(f"{os.getpid()}\n")
            lock.flush()
        yield


def clear_run_dir(run_dir: Path) -> None:
    """Remove an earlier run's files from `run_dir` (`--force`), keeping the lock this run holds."""
    for entry in run_dir.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def _locked(lock: IO[str], run_dir: Path) -> bool:
    """Take the lock without waiting: True when held, False where the filesystem cannot lock."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        raise UsageError(
            f"{run_dir} is in use by another train run" + (f" (pid {holder})" if holder.isdigit() else ""),
            hint="wait for that run to end, or train into another OUTPUT",
        ) from None
    except OSError as e:
        if e.errno not in _CANNOT_LOCK:
            raise
        return False
    return True

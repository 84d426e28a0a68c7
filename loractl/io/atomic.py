"""Atomic outputs: write under a temporary sibling name, rename only when complete.

A crash, a full disk or an exception leaves the final path untouched (absent, or the old
content when `force` replaces it); the temporary is removed on failure and ignored by
everything else (its name starts with '.' and contains `TMP_MARKER`). Temporaries carry
the writer's pid (`.<name>.loractl-tmp-<pid>-<hex>`), so a process killed with SIGKILL
leaves nothing the next write into the same directory cannot clean up (`_clean_stale`).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError, OutputWriteError, UsageError

TMP_MARKER = ".loractl-tmp-"
_STALE = re.compile(re.escape(TMP_MARKER) + r"(\d+)-(old-)?[0-9a-f]+$")
# errno values that mean "no room": a full disk, a quota, or the RLIMIT_FSIZE file-size limit.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@contextmanager
def atomic_output(final: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill (file or directory); rename it to `final` on success."""
    final = Path(final)
    _clean_stale(final)
    if final.exists() and not force:
        raise OutputExistsError(f"output {final} already exists", hint="choose another path or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final)
    except OSError as e:
        if e.errno not in _NO_ROOM:
            raise
        raise OutputWriteError(
            f"no room to write {final} ({e.strerror}); nothing was written",
            hint="free disk space, or raise the file-size limit (ulimit -f), then run again",
        ) from e
    finally:
        _remove(tmp)


def ensure_distinct(output: str | Path, inputs: list[str | Path]) -> None:
    """Refuse an output path that is, or lies inside or around, one of the inputs."""
    out = Path(output).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise UsageError(f"output {output} would overwrite the input {inp}", hint="write the output somewhere else")


def _replace(tmp: Path, final: Path) -> None:
    if final.is_dir() and not final.is_symlink():
        old = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-old-{secrets.token_hex(4)}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _clean_stale(final: Path) -> None:
    """Remove the temporaries killed writers left beside `final` (any output there: their pids are dead).

    A kill between the two renames of `_replace` leaves the old directory aside and nothing at
    its final path: it is put back, so that path holds the old content as if the run never started.
    """
    if not final.parent.is_dir():
        return
    for leftover in sorted(final.parent.glob(f".*{TMP_MARKER}*")):
        m = _STALE.search(leftover.name)
        if m is None or _alive(int(m[1])):
            continue
        origin = final.parent / leftover.name[1 : leftover.name.index(TMP_MARKER)]
        if m[2] and not origin.exists() and not origin.is_symlink():
            os.replace(leftover, origin)
        else:
            _remove(leftover)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()

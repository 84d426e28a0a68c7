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
from . import interrupt

TMP_MARKER = ".loractl-tmp-"
_STALE = re.compile(re.escape(TMP_MARKER) + r"(\d+)-(old-)?[0-9a-f]+$")
# errno values that mean "no room": a full disk, a quota, or the RLIMIT_FSIZE file-size limit.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# Why an output cannot be written, and what to do: (what, hint) by errno.
_CANNOT_WRITE = {
    errno.EROFS: ("the file system is read-only", "write the output to a writable location"),
    errno.EACCES: ("permission denied", "write the output to a directory you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write the output to a directory you can write to"),
    errno.ENOTDIR: (
        "a file is in the way of a directory on the path",
        "choose an output path whose parents are directories",
    ),
    errno.EEXIST: (
        "a file is in the way of a directory on the path",
        "choose an output path whose parents are directories",
    ),
    errno.EISDIR: ("a directory is in the way of the file", "choose another output path, or remove that directory"),
}
WRITE_ERRNOS = frozenset({*_NO_ROOM, *_CANNOT_WRITE})


@contextmanager
def atomic_output(final: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill (file or directory); rename it to `final` on success."""
    final = Path(final)
    tmp = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _prepare(final)
        if final.exists() and not force:
            raise OutputExistsError(f"output {final} already exists", hint="choose another path or pass --force")
        yield tmp
        interrupt.check()  # a Ctrl-C swallowed while writing: never commit
        _fsync_tree(tmp)
        _replace(tmp, final)
    except OSError as e:
        if not _is_ours(e, final):
            raise
        raise write_error(e, final) from e
    finally:
        _remove(tmp)


def write_error(e: OSError, final: Path) -> OutputWriteError:
    """The one-line error (and hint) for an OSError that stopped writing `final`; nothing is left behind."""
    where = f" ({e.filename})" if e.filename and Path(e.filename) != final else ""
    if e.errno in _NO_ROOM:
        return OutputWriteError(
            f"no room to write {final} ({e.strerror}); nothing was written",
            hint="free disk space, or raise the file-size limit (ulimit -f), then run again",
        )
    what, hint = _CANNOT_WRITE.get(e.errno or 0, (e.strerror or str(e), "check the output path"))
    return OutputWriteError(f"cannot write {final}: {what}{where}; nothing was written", hint=hint)


def os_error(e: OSError) -> OutputWriteError:
    """The one-line error for a file-system failure outside `atomic_output` (the CLI's last resort)."""
    what, hint = _CANNOT_WRITE.get(e.errno or 0, (e.strerror or str(e), "check the path and the disk"))
    if e.errno in _NO_ROOM:
        what, hint = f"no room ({e.strerror})", "free disk space, or raise the file-size limit (ulimit -f)"
    return OutputWriteError(what, path=os.fsdecode(e.filename) if e.filename else None, hint=hint)


def check_writable(final: str | Path) -> None:
    """Fail now, not after a long run, if `final` cannot be written; creates nothing that stays.

    A temporary directory is made and removed in the nearest existing ancestor of `final`.
    """
    final = Path(final)
    existing = next(p for p in (final.parent, *final.parent.parents) if p.exists() or p.is_symlink())
    probe = existing / f".{final.name}{TMP_MARKER}{os.getpid()}-probe"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        _create_probe(probe)
    except OSError as e:
        raise write_error(e, final) from e
    finally:
        _remove(probe)


def _create_probe(probe: Path) -> None:
    probe.mkdir()


def _prepare(final: Path) -> None:
    """Clean what killed writers left beside the output (it may put an old output back); create its parents."""
    _clean_stale(final)
    final.parent.mkdir(parents=True, exist_ok=True)


def _is_ours(e: OSError, final: Path) -> bool:
    """An error of writing (no file named, or one at or beside the output), not of reading an input."""
    if e.errno not in WRITE_ERRNOS:
        return False
    if not e.filename:
        return True
    parent = final.parent.resolve()
    path = Path(os.fsdecode(e.filename)).resolve()
    return path == parent or path.is_relative_to(parent) or parent.is_relative_to(path)


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

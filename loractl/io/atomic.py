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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError, OutputWriteError, UsageError
from . import interrupt

TMP_MARKER = ".loractl-tmp-"
_STALE = re.compile(re.escape(TMP_MARKER) + r"(\d+)-(old-)?[0-9a-f]+$")
# A temporary's name, `.NAME.loractl-tmp-PID-HEX` (or `-old-HEX`, `-probe`): NAME is what the user named.
_TEMPORARY = re.compile(r"\.(.+?)" + re.escape(TMP_MARKER) + r"\d+-(?:old-[0-9a-f]+|[0-9a-f]+|probe)")
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
# Only when creating the temporary itself: a directory that takes no new files (/proc, /sys).
_CANNOT_CREATE = ("the directory takes no new files", "write the output to an ordinary writable directory")


@contextmanager
def atomic_output(final: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill (file or directory); rename it to `final` on success."""
    final = Path(final)
    tmp = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _prepare(final)
        if final.exists() and not force:
            raise OutputExistsError(final)
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


def user_path(path: str | Path) -> Path:
    """`path` as the user named it: each temporary on it (`.NAME.loractl-tmp-…`, nested too) read as NAME."""
    parts = []
    for part in Path(path).parts:
        while m := _TEMPORARY.fullmatch(part):
            part = m[1]
        parts.append(part)
    return Path(*parts)


def write_error(e: OSError, final: Path) -> OutputWriteError:
    """The one-line error (and hint) for an OSError that stopped writing `final`; nothing is left behind.

    It names the user's paths, never a temporary: `final` may be an outer writer's temporary.
    """
    final = user_path(final)
    shown = user_path(os.fsdecode(e.filename)) if e.filename else final
    where = f" ({shown})" if shown != final else ""
    if e.errno in _NO_ROOM:
        return OutputWriteError(
            f"no room to write {final} ({e.strerror}); nothing was written",
            hint="free disk space, or raise the file-size limit (ulimit -f), then run again",
        )
    what, hint = _CANNOT_WRITE.get(e.errno or 0, (e.strerror or str(e), "check the output path"))
    if e.errno == errno.ENOENT and shown == final:  # the temporary could not be made in an existing directory
        what, hint = _CANNOT_CREATE
    return OutputWriteError(f"cannot write {final}: {what}{where}; nothing was written", hint=hint)


def os_error(e: OSError) -> OutputWriteError:
    """The one-line error for a file-system failure outside `atomic_output` (the CLI's last resort)."""
    what, hint = _CANNOT_WRITE.get(e.errno or 0, (e.strerror or str(e), "check the path and the disk"))
    if e.errno in _NO_ROOM:
        what, hint = f"no room ({e.strerror})", "free disk space, or raise the file-size limit (ulimit -f)"
    return OutputWriteError(what, path=user_path(os.fsdecode(e.filename)) if e.filename else None, hint=hint)


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
        on_probe = e.filename is not None and Path(os.fsdecode(e.filename)) == probe
        raise write_error(OSError(e.errno, e.strerror, os.fspath(final)) if on_probe else e, final) from e
    finally:
        _remove(probe)


def _create_probe(probe: Path) -> None:
    probe.mkdir()


def _prepare(final: Path) -> None:
    """Clean what killed writers left beside the output (it may put an old output back); create its parents."""
    _clean_stale(final)
    final.parent.mkdir(parents=True, exist_ok=True)


def _is_ours(e: OSError, final: Path) -> bool:
    """An error of writing (no file named, or one at or beside the output), not of reading an input.

    Any error on the temporary itself is one (creating it in /proc fails with ENOENT).
    """
    if e.filename and user_path(Path(os.fsdecode(e.filename)).absolute()) == user_path(final.absolute()):
        return True
    if e.errno not in WRITE_ERRNOS:
        return False
    if not e.filename:
        return True
    parent = final.parent.resolve()
    path = Path(os.fsdecode(e.filename)).resolve()
    return path == parent or path.is_relative_to(parent) or parent.is_relative_to(path)


def check_output(output: str | Path, inputs: Sequence[str | Path], *, force: bool) -> None:
    """Refuse before any work (and without torch) an output that is an input, or that exists without `force`."""
    ensure_distinct(output, list(inputs))
    if Path(output).exists() and not force:
        raise OutputExistsError(output)


def ensure_distinct(output: str | Path, inputs: list[str | Path]) -> None:
    """Refuse an output path that is, or lies inside or around, one of the inputs."""
    out = Path(output).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise UsageError(f"output {output} would overwrite the input {inp}", hint="write the output somewhere else")


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a directory at `final`, or a file where a directory goes, is set aside first."""
    if (final.is_dir() or (tmp.is_dir() and final.exists())) and not final.is_symlink():
        old = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-old-{secrets.token_hex(4)}"
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
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

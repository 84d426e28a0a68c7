"""Atomic outputs: write under a temporary sibling name, rename only when complete.

A crash, a full disk or an exception leaves the final path untouched (absent, or the old
content when `force` replaces it); the temporary is removed on failure and ignored by
everything else (its name starts with '.' and contains `TMP_MARKER`). Temporaries carry
the writer's pid (`.<name>.loractl-tmp-<pid>-<hex>`), so a process killed with SIGKILL
leaves nothing the next write into the same directory cannot clean up (`_clean_stale`).

This module is the output policy of every writer: `refuse_existing` is the one "output
exists" check, `claim` the one final rename (without `force` it never replaces anything, so
of several writers racing for one path exactly one succeeds), `io_errors` the one wrapper
that turns an OSError into a one-line error.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from functools import cache
from pathlib import Path

from ..errors import LoractlError, OutputExistsError, OutputWriteError, UsageError
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
def atomic_output(final: str | Path, *, force: bool = False, completes: bool = True) -> Iterator[Path]:
    """Yield a temporary path to fill (file or directory); rename it to `final` on success.

    `completes`: `final` is the command's output, so once it is in place the command has
    succeeded and a later Ctrl-C no longer interrupts it (`interrupt.completing`). A step
    on the way (a training checkpoint) passes False.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _prepare(final)
        refuse_existing(final, force=force)
        yield tmp
        interrupt.check()  # a Ctrl-C swallowed while writing: never commit
        _fsync_tree(tmp)
        with interrupt.completing() if completes else nullcontext():
            claim(tmp, final, force=force)
    except OSError as e:
        if not _is_ours(e, final):
            raise
        raise write_error(e, final) from e
    finally:
        _remove(tmp)


def refuse_existing(output: str | Path, *, force: bool) -> None:
    """The one "output exists" check: `OutputExistsError` for anything at `output` (a dangling link too)."""
    if not force and (Path(output).exists() or Path(output).is_symlink()):
        raise OutputExistsError(user_path(output))


def claim(tmp: Path, final: Path, *, force: bool) -> None:
    """Put the finished `tmp` at `final`: replacing what is there with `force`, else only if nothing is.

    Without `force` the rename itself is the check (`renameat2(RENAME_NOREPLACE)`, or a `link`
    / `mkdir` claim where the kernel or file system lacks it), so of several writers that found
    `final` free at their start, one wins and every other gets `OutputExistsError`.
    """
    if force:
        _replace(tmp, final)
    elif not _rename_noreplace(tmp, final):
        raise OutputExistsError(user_path(final))


@contextmanager
def io_errors(output: str | Path) -> Iterator[None]:
    """The one I/O-error wrapper: an OSError inside becomes a one-line `LoractlError` (see `io_error`)."""
    try:
        yield
    except OSError as e:
        raise io_error(e, output) from e


def io_error(e: OSError, output: str | Path) -> LoractlError:
    """`e` as one line: a failure to write `output` (`write_error`), else one naming the file it happened on."""
    if _is_ours(e, Path(output)):
        return write_error(e, Path(output))
    if e.errno in WRITE_ERRNOS:
        return os_error(e)
    return LoractlError(
        f"I/O error: {e.strerror or e}",
        path=user_path(os.fsdecode(e.filename)) if e.filename else user_path(output),
        hint="check that the inputs are readable and the output's disk has room; nothing was written",
    )


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
    """Refuse before any work (and without torch) an output that is an input, or that exists without `force`.

    An early courtesy only: `claim` decides at the end, when several writers race for `output`.
    """
    ensure_distinct(output, list(inputs))
    refuse_existing(output, force=force)


def ensure_distinct(output: str | Path, inputs: list[str | Path]) -> None:
    """Refuse an output path that is, or lies inside or around, one of the inputs."""
    out = Path(output).resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise UsageError(f"output {output} would overwrite the input {inp}", hint="write the output somewhere else")


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a directory at `final`, or anything where a directory goes, is set aside first.

    A symbolic link at `final` is replaced as a link (its target is never written nor removed).
    """
    there = final.exists() or final.is_symlink()
    if (final.is_dir() and not final.is_symlink()) or (tmp.is_dir() and there):
        old = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-old-{secrets.token_hex(4)}"
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


# renameat2's flag (linux/fs.h); AT_FDCWD: paths relative to the working directory.
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
# errnos after which renameat2 cannot be used here (no such call, or a file system without the flag)
_NO_RENAMEAT2 = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}


def _rename_noreplace(tmp: Path, final: Path) -> bool:
    """Rename `tmp` to `final` unless something is there (False then); atomic against other writers."""
    call = _renameat2()
    if call is not None:
        if call(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(final), _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in _NO_RENAMEAT2:
            raise OSError(code, os.strerror(code), os.fspath(final))
    return _claim_by_link(tmp, final)


def _claim_by_link(tmp: Path, final: Path) -> bool:
    """Without renameat2: a file is hard-linked at `final` (refused if taken); a directory claims
    `final` with `mkdir`, a file on a file system without hard links with an exclusive create, then
    replaces what it made (a kill between the two leaves that empty directory or file).
    """
    try:
        if tmp.is_dir():
            final.mkdir()
        else:
            try:
                os.link(tmp, final)
                tmp.unlink()
                return True
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.replace(tmp, final)
    except FileExistsError:
        return False
    return True


@cache
def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's `renameat2` (glibc 2.28+), or None where this libc lacks it."""
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's among them
    call = getattr(libc, "renameat2", None)
    if call is not None:
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        call.restype = ctypes.c_int
    return call


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

"""Atomic outputs: write under a temporary sibling name, rename only when complete.

A crash, a full disk or an exception leaves the final path untouched (absent, or the old
content when `force` replaces it); the temporary is removed on failure and ignored by
everything else (its name starts with '.' and contains `TMP_MARKER`).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputExistsError, UsageError

TMP_MARKER = ".loractl-tmp-"


@contextmanager
def atomic_output(final: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill (file or directory); rename it to `final` on success."""
    final = Path(final)
    if final.exists() and not force:
        raise OutputExistsError(f"output {final} already exists", hint="choose another path or pass --force")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final)
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
        old = final.parent / f".{final.name}{TMP_MARKER}old-{secrets.token_hex(4)}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


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

"""Base fingerprints remembered per file identity, so a second command on the same base hashes nothing.

A fingerprint (see `checkpoint.Checkpoint.fingerprint`; its definition does not change here) is
stored under a key made of what it was taken over: the files' (device, inode, size, mtime_ns),
the tensor names, and what kind of fingerprint it is. A file rewritten, replaced or touched gets
another key, so a stale value is never found; a value found is checked again by the caller when
it disagrees with an adapter's record (`fresh=True`), so the cache can only ever save work.

The directory is `$LORACTL_CACHE_DIR`, else the user cache directory (`$XDG_CACHE_HOME/loractl`,
`~/.cache/loractl`; `~/Library/Caches/loractl` on macOS; `%LOCALAPPDATA%/loractl/Cache` on
Windows), in `fingerprints/`. Any failure to read or write it only means hashing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T", str, dict[str, str])
VERSION = 1  # bump when a fingerprint's definition changes


def cache_dir() -> Path:
    """Where fingerprints are kept (see the module docstring)."""
    if env := os.environ.get("LORACTL_CACHE_DIR"):
        return Path(env) / "fingerprints"
    if sys.platform == "darwin":
        root = Path.home() / "Library" / "Caches" / "loractl"
    elif sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA", Path.home())) / "loractl" / "Cache"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loractl"
    return root / "fingerprints"


def remembered(
    kind: str, files: Iterable[Path], names: Iterable[str], compute: Callable[[], T], *, fresh: bool = False
) -> T:
    """`compute()`, or the value it gave before for the same files (unchanged) and names; `fresh` computes
    (and keeps) it whatever is remembered. A falsy value (a hash abandoned half way) is not kept."""
    key = identity(kind, files, names)
    found = recall(key) if not fresh else None
    if found is not None:
        return found  # type: ignore[return-value]
    value = compute()
    remember(key, value)
    return value


def recall(key: str | None) -> str | dict[str, str] | None:
    """The value kept under `key` (`identity`), if any: for callers that hash in a pass of their own."""
    return _read(key) if key else None


def remember(key: str | None, value: str | dict[str, str]) -> None:
    """Keep `value` under `key` (taken before the files were read); a falsy value is not kept."""
    if key and value:
        _write(key, value)


def identity(kind: str, files: Iterable[Path], names: Iterable[str]) -> str | None:
    """The key of a value of `kind` over `names` in `files` as they are now; None when a file cannot be stat'ed."""
    stats = []
    try:
        for path in files:
            s = path.stat()
            stats.append((str(path.resolve()), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns))
    except OSError:
        return None
    doc = json.dumps([VERSION, kind, sorted(stats), sorted(names)], separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


def _read(key: str) -> str | dict[str, str] | None:
    try:
        value = json.loads((cache_dir() / f"{key}.json").read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(value, str) or (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        return value
    return None


def _write(key: str, value: str | dict[str, str]) -> None:
    """Atomically (a temporary sibling renamed); a cache that cannot be written is no error."""
    directory = cache_dir()
    tmp = directory / f".{key}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"value": value}))
        tmp.replace(directory / f"{key}.json")
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

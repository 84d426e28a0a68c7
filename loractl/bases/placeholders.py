"""Header fields written before their value is known, filled in place before the output is committed.

A merge's provenance record sits in the output's header (a safetensors file's metadata, a GGUF's KV
pairs), which is written first, but the base fingerprint it carries takes a pass of its own over the
base (GBs of SHA-256). Hashing beside the merge instead of before it needs the field written early
and its value written late: the record goes out with a random token of the value's exact length, and
`fill` overwrites every copy of it once the value is known. Same length, so no byte moves; a token is
256 random bits, so it never matches anything but itself.
"""

from __future__ import annotations

import mmap
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

TOKEN_LENGTH = 64  # hex digits: a SHA-256 digest's


def token() -> str:
    """A fresh placeholder for a value of `TOKEN_LENGTH` hex digits."""
    return secrets.token_hex(TOKEN_LENGTH // 2)


def fill(outputs: Iterable[Path], values: Mapping[str, str]) -> None:
    """Overwrite each token of `values` with its value, in the headers of the files under `outputs` (files
    or directories, still under their temporary names); every token must be found at least once."""
    pending = {t.encode(): v.encode() for t, v in values.items()}
    if any(len(t) != len(v) for t, v in pending.items()):
        raise ValueError("a placeholder's value must have the placeholder's length")
    found: set[bytes] = set()
    for path in _files(outputs):
        found |= _fill_file(path, _header_extent(path), pending)
    if missing := set(pending) - found:
        raise RuntimeError(f"{len(missing)} placeholder(s) not found in the output's headers")


def _files(outputs: Iterable[Path]) -> Iterable[Path]:
    for out in outputs:
        yield from (sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out])


def _header_extent(path: Path) -> int:
    """How many leading bytes of `path` can hold a record: a GGUF's KV pairs and tensor infos, a safetensors
    file's header, a JSON file whole; 0 for anything else (tokenizers, weights in other formats). Told by the
    bytes, not the name: an output is still under its temporary name."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"GGUF":
        from .gguf_header import read_header

        return read_header(path).data_offset
    if len(head) == 9 and head[8:] == b"{" and (n := int.from_bytes(head[:8], "little")) <= size - 8:
        return 8 + n
    return size if head.lstrip()[:1] in (b"{", b"[") else 0


def _fill_file(path: Path, extent: int, pending: Mapping[bytes, bytes]) -> set[bytes]:
    extent = min(extent, path.stat().st_size)
    if not extent:
        return set()
    found = set()
    with path.open("r+b") as f, mmap.mmap(f.fileno(), extent) as view:
        for placeholder, value in pending.items():
            at = view.find(placeholder)
            while at >= 0:
                view[at : at + len(value)] = value
                found.add(placeholder)
                at = view.find(placeholder, at + len(value))
        view.flush()
    return found

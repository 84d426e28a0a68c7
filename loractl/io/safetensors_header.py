"""Parse and check a safetensors header without importing torch.

The header carries every name, dtype and shape, so `inspect` and planning read only
these bytes: on a multi-GB file that is a millisecond, against seconds for `import torch`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, TruncatedFileError
from .values import tensor_name

# Caps a hostile header meets before any work proportional to what it declares.
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
MAX_TENSORS = 200_000  # a single-file MoE model has tens of thousands; parsing 200,000 entries takes ~200 MB
MAX_ENTRY_BYTES = 2048  # one tensor's entry: a name of up to 1,024 characters, dtype, shape, offsets
MAX_METADATA_BYTES = 16 << 20  # kohya's training metadata (tag frequencies) reaches a few MB
MAX_NDIM = 8
MAX_DEPTH = 4  # a real header nests 3 deep: {name: {"shape": [...]}}; metadata is {str: str}
_ESCAPES = re.compile(rb"\\.", re.DOTALL)
_STRINGS = re.compile(rb'"[^"]*"')  # once escapes are gone: no alternation, so no backtracking stack
_NOT_WRITTEN = "no training or conversion library writes such a header: the file is damaged or made to attack readers"
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a header; `offsets` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, checked header: tensors in file order, metadata, data section start."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and check a safetensors header: lengths, offsets, dtypes and shapes.

    Raises:
        FormatError: the file is truncated, its header lies, or it is not safetensors.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            file_size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if not prefix:
                raise TruncatedFileError("empty file (0 bytes)", path=path)
            if len(prefix) < 8:
                raise TruncatedFileError(f"truncated: {file_size} bytes, too short for a safetensors header", path)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"header length {n} exceeds the cap of {MAX_HEADER_BYTES} bytes", path=path)
            if 8 + n > file_size:
                raise TruncatedFileError(
                    f"truncated: the header declares {n} header bytes, the file holds {file_size - 8}", path
                )
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"cannot read file: {e.strerror}", path=path) from e
    return _parse(path, raw, file_size)


def _parse(path: Path, raw: bytes, file_size: int) -> SafetensorsHeader:
    _check_shape_of_json(path, raw)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"header is not valid JSON ({str(e)[:80]})", path=path) from None
    if not isinstance(doc, dict):
        raise FormatError("header is not a JSON object", path=path)
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ must map strings to strings", path=path)
    if len(doc) > MAX_TENSORS:
        raise FormatError(f"{len(doc)} tensors exceed the cap of {MAX_TENSORS}", path=path)
    data_start = 8 + len(raw)
    tensors = {name: _entry(path, name, v) for name, v in doc.items()}
    _check_layout(path, tensors, file_size - data_start)
    return SafetensorsHeader(path, tensors, metadata, data_start, file_size)


def _check_shape_of_json(path: Path, raw: bytes) -> None:
    """Caps on nesting depth and entry count, checked on the raw bytes before `json.loads` builds anything.

    Escapes are dropped, then everything but quotes and brackets, then strings (C-speed passes
    whose memory is linear in the header, however long its strings); every pass then deletes the
    innermost bracket pairs, so pairs left after `MAX_DEPTH` passes nest deeper than the cap.
    """
    # Quotes and brackets only; then the strings, most of them empty now (a C-speed replace), the few
    # holding brackets by a pattern whose matches are counted first (each match costs memory).
    structure = _ESCAPES.sub(b"", raw).translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    bracketed = structure.count(b'"') // 2
    if bracketed > MAX_TENSORS:
        raise FormatError(f"header holds about {bracketed} strings with brackets inside", path=path, hint=_NOT_WRITTEN)
    brackets = _STRINGS.sub(b"", structure)
    entries = brackets.count(b"{") - 1  # one object per tensor (and one for __metadata__)
    if entries > MAX_TENSORS + 1:
        raise FormatError(
            f"header declares about {entries} tensors, over the cap of {MAX_TENSORS}", path=path, hint=_NOT_WRITTEN
        )
    if len(raw) > entries * MAX_ENTRY_BYTES + MAX_METADATA_BYTES:
        raise FormatError(
            f"header of {len(raw)} bytes for about {entries} tensors: over the metadata cap of {MAX_METADATA_BYTES}",
            path=path,
            hint=_NOT_WRITTEN,
        )
    for _ in range(MAX_DEPTH):
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    if b"[]" in brackets or b"{}" in brackets:
        raise FormatError(
            f"header nests deeper than the cap of {MAX_DEPTH} levels",
            path=path,
            hint="a safetensors header is {name: {dtype, shape, data_offsets}} plus string metadata",
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _entry(path: Path, name: str, v: Any) -> TensorInfo:
    where = f"tensor {tensor_name(name, path)!r}"
    if not isinstance(v, dict):
        raise FormatError(f"{where}: header entry is not an object", path=path)
    dtype, shape, offsets = v.get("dtype"), v.get("shape"), v.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}", path=path)
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)
    ):
        raise FormatError(f"{where}: invalid shape {str(shape)[:60]}", path=path)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise FormatError(f"{where}: invalid data_offsets {str(offsets)[:60]}", path=path)
    info = TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))
    if info.nbytes != info.numel * DTYPE_SIZES[dtype]:
        raise FormatError(
            f"{where}: offsets span {info.nbytes} bytes but {dtype}{list(shape)} needs {info.numel * DTYPE_SIZES[dtype]}",
            path=path,
        )
    return info


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Tensors must tile the data section exactly: no gaps, overlaps or bytes past the end."""
    end = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].offsets):
        if info.offsets[0] != end:
            raise FormatError(f"tensor {name!r}: data offsets {list(info.offsets)} overlap or leave a gap", path=path)
        end = info.offsets[1]
    if end > data_size:
        raise TruncatedFileError(f"truncated: the header declares {end} data bytes, the file holds {data_size}", path)
    if end < data_size:
        raise FormatError(f"{data_size - end} trailing bytes after the last tensor", path=path)


def damage(path: Path) -> TruncatedFileError | None:
    """Why `path` (a file, or the safetensors files in a directory) is empty or truncated; None if it is not.

    Format detection skips files it cannot parse; this names the damage instead of "unknown format".
    """
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    for f in files:
        if f.stat().st_size and not is_safetensors(f) and f.suffix != ".safetensors":
            continue  # not safetensors at all: some other format's file
        try:
            read_header(f)
        except TruncatedFileError as e:
            return e
        except FormatError:
            continue
    return None


def is_safetensors(path: str | Path) -> bool:
    """Cheap sniff: a plausible header length followed by '{'."""
    try:
        with Path(path).open("rb") as f:
            prefix = f.read(9)
    except OSError:
        return False
    if len(prefix) < 9:
        return False
    (n,) = struct.unpack("<Q", prefix[:8])
    return 0 < n <= MAX_HEADER_BYTES and prefix[8:9] == b"{"

"""A GGUF file's header read lean: the KV entries a merge needs, every tensor's info, and byte spans.

gguf-py's `GGUFReader` builds a numpy view per array element and maps the whole file: parsing a
SmolLM2 header (49k tokens and merges) costs it ~170 MB before any tensor is read, and tensors read
through its map stay resident. This reader walks the header once from the file (little-endian GGUF
v2/v3: magic, version, tensor and KV counts, typed KV values, tensor infos, then the data at
`general.alignment`), keeps scalars, strings and short arrays outside `tokenizer.*` as values, and
for every entry only its byte span: a writer copies the KV section byte for byte. Tensor bytes are
read with `pread`, a block of rows at a time, never mapped.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
KEPT_ARRAY = 4096  # arrays this long or shorter are kept as lists (outside tokenizer.*)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class TensorEntry:
    """One tensor info: its name, dims in ggml order (innermost first), type, and bytes in the file."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # absolute, in its file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy (row-major) order, as Hugging Face stores the weight."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        from ..formats.gguf.names import require_gguf

        return str(require_gguf().GGMLQuantizationType(self.type_id).name)


@dataclass(frozen=True)
class GgufHeader:
    path: Path
    header: bytes  # the file's bytes up to the end of the tensor infos
    fields: dict[str, Any]  # key → value (None for a long or tokenizer array, kept only as bytes)
    spans: dict[str, tuple[int, int]]  # key → its entry's bytes in `header`
    kv_end: int  # where the tensor infos start
    tensors: list[TensorEntry]
    alignment: int
    data_offset: int

    def kv_bytes(self, without: str) -> tuple[bytes, int]:
        """The KV section's bytes, every entry but `without`, and how many entries they hold."""
        span = self.spans.get(without)
        if span is None:
            return self.header[24 : self.kv_end], len(self.spans)
        return self.header[24 : span[0]] + self.header[span[1] : self.kv_end], len(self.spans) - 1


class _Cursor:
    """Reads the header from the file as it goes, in chunks; every read checked against the file's size."""

    def __init__(self, f: Any, size: int, path: Path) -> None:
        self.f, self.size, self.path = f, size, path
        self.buf = bytearray()
        self.pos = 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError("not a readable GGUF file (its header runs past the end)", path=self.path)
        while self.pos + n > len(self.buf):
            self.buf += self.f.read(max(1 << 20, self.pos + n - len(self.buf)))

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self) -> bytes:
        n = self.unpack("<Q")
        self.need(n)
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos])

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.unpack("<Q")
            self.need(n)
            self.pos += n


def read_header(path: Path) -> GgufHeader:
    """The header of the GGUF file at `path`; `FormatError` naming the problem for anything else."""
    try:
        with path.open("rb") as f:
            return _parse(_Cursor(f, os.fstat(f.fileno()).st_size, path))
    except FileNotFoundError:
        raise FormatError("file not found", path=path) from None


def _parse(c: _Cursor) -> GgufHeader:
    path = c.path
    c.need(4)
    if bytes(c.buf[:4]) != MAGIC:
        raise FormatError("not a GGUF file (no GGUF magic)", path=path)
    c.pos = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise FormatError(f"not a readable GGUF file (version {version}; loractl reads little-endian v2 and v3)",
                          path=path)  # fmt: skip
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > c.size or n_kv > c.size:
        raise FormatError(f"not a readable GGUF file ({n_tensors} tensors, {n_kv} KV entries)", path=path)
    fields: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(n_kv):
        start = c.pos
        key = _text(c.string(), path)
        value = _value(c, c.unpack("<I"), keep=not key.startswith("tokenizer."))
        if key in spans:
            raise FormatError(f"not a readable GGUF file (KV entry {key!r} twice)", path=path)
        fields[key], spans[key] = value, (start, c.pos)
    kv_end = c.pos
    alignment = fields.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"not a readable GGUF file (general.alignment {alignment!r})", path=path)
    infos = []
    for _ in range(n_tensors):
        name = _text(c.string(), path)
        n_dims = c.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise FormatError(f"not a readable GGUF file (tensor {name!r} has {n_dims} dimensions)", path=path)
        dims = tuple(c.unpack("<Q") for _ in range(n_dims))
        infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
    data_offset = -(-c.pos // alignment) * alignment
    tensors = [_tensor(path, c.size, data_offset, *info) for info in infos]
    if len({t.name for t in tensors}) != len(tensors):
        raise FormatError("not a readable GGUF file (a tensor name twice)", path=path)
    return GgufHeader(path, bytes(c.buf[: c.pos]), fields, spans, kv_end, tensors, alignment, data_offset)


def _tensor(path: Path, size: int, data_offset: int, name: str, dims: tuple[int, ...], type_id: int,
            offset: int) -> TensorEntry:  # fmt: skip
    from ..formats.gguf.names import require_gguf

    gguf = require_gguf()
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise FormatError(f"not a readable GGUF file (tensor {name!r} of unknown type {type_id})", path=path) from None
    count = math.prod(dims)
    if dims[0] % block:
        raise FormatError(f"not a readable GGUF file (tensor {name!r}: rows of {dims[0]} values in blocks of {block})",
                          path=path)  # fmt: skip
    n_bytes = count // block * type_size
    if data_offset + offset + n_bytes > size:
        raise FormatError(f"not a readable GGUF file (tensor {name!r} runs past the end of the file)", path=path)
    return TensorEntry(name, dims, type_id, data_offset + offset, n_bytes)


def _value(c: _Cursor, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return c.unpack(_SCALARS[kind])
    if kind == STRING:
        return _text(c.string(), c.path)
    if kind != ARRAY:
        raise FormatError(f"not a readable GGUF file (KV value type {kind})", path=c.path)
    item, count = c.unpack("<I"), c.unpack("<Q")
    if count > c.size:
        raise FormatError(f"not a readable GGUF file (an array of {count} values)", path=c.path)
    if not keep or count > KEPT_ARRAY:  # only its bytes: skipped, never materialised
        if item == STRING:
            c.skip_strings(count)
        elif item in _SCALARS:
            n = struct.calcsize(_SCALARS[item]) * count
            c.need(n)
            c.pos += n
        else:
            for _ in range(count):
                _value(c, item, keep=False)
        return None
    return [_value(c, item, keep) for _ in range(count)]


def _text(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"not a readable GGUF file (a string that is not UTF-8: {raw[:40]!r})", path=path) from None


def read_range(path: Path, offset: int, nbytes: int) -> bytes:
    """`nbytes` of the file from `offset` (a block of a tensor's rows), read, not mapped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < nbytes:
            chunk = os.pread(fd, nbytes - len(out), offset + len(out))
            if not chunk:
                raise FormatError("the file ended inside a tensor (changed while read?)", path=path)
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)

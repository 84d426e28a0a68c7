"""A streaming safetensors writer: header first, then tensors one at a time.

safetensors' own `save_file` needs every tensor in memory at once; a merge of a 70B
model cannot afford that. The header only needs names, dtypes and shapes, which a plan
knows before any tensor is computed, so tensors are appended as they are produced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import LoractlError
from .safetensors_header import DTYPE_SIZES

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about a tensor before its bytes exist."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def data_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Widest dtypes first, then by name: keeps every tensor aligned, and the bytes deterministic."""
    return sorted(specs, key=lambda s: (-DTYPE_SIZES[s.dtype], s.name))


class StreamWriter:
    """Writes one safetensors file; call `write` once per spec, in `data_order`."""

    def __init__(self, path: Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._pending = data_order(specs)
        self._next = 0
        self._f: BinaryIO = path.open("wb")
        self._f.write(_header_bytes(self._pending, metadata))

    @property
    def order(self) -> list[TensorSpec]:
        return list(self._pending)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor; it must be the next one in order, with the planned dtype and shape."""
        from .tensor_bytes import tensor_to_bytes

        spec = self._pending[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape:
            raise LoractlError(f"internal: expected tensor {spec.name} {spec.shape}, got {name} {tuple(tensor.shape)}")
        data = tensor_to_bytes(tensor, spec.dtype)
        self._f.write(data)
        self._next += 1

    def abort(self) -> None:
        """Close after a failure; the caller's atomic output discards the file."""
        self._f.close()

    def close(self) -> None:
        """Finish the file; raises if some planned tensor was never written."""
        self._f.close()
        if self._next != len(self._pending):
            missing = self._pending[self._next].name
            raise LoractlError(f"internal: {self.path.name} closed before tensor {missing} was written")


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad like safetensors so data starts 8-aligned
    return len(raw).to_bytes(8, "little") + raw


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a whole dict of tensors to one safetensors file (not atomic by itself)."""
    from .tensor_bytes import dtype_code

    writer = StreamWriter(
        path, [TensorSpec(k, dtype_code(t.dtype), tuple(t.shape)) for k, t in tensors.items()], metadata
    )
    try:
        for spec in writer.order:
            writer.write(spec.name, tensors[spec.name])
    except BaseException:
        writer.abort()
        raise
    writer.close()

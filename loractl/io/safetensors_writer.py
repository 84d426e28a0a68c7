"""A streaming safetensors writer: header first, then tensors one at a time.

safetensors' own `save_file` needs every tensor in memory at once; a merge of a 70B
model cannot afford that. The header only needs names, dtypes and shapes, which a plan
knows before any tensor is computed, so tensors are appended as they are produced: whole,
as row blocks (no buffer of the tensor's size ever exists), or as a byte range of another
file copied in the kernel. Given a `WriteQueue`, the writes run on its thread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

from ..errors import LoractlError
from .safetensors_header import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

    from .write_queue import WriteQueue


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


@dataclass(frozen=True)
class FileRange:
    """A tensor's bytes as they lie in another file: copied, never read into memory."""

    path: Path
    offset: int
    nbytes: int


Block = tuple["torch.Tensor", Union["torch.Tensor", None]]
"""Some of a tensor's rows, in its dtype, and the `WriteQueue.buffer` they live in (or None)."""
TensorData = Union["torch.Tensor", FileRange, Iterable[Block]]


class StreamWriter:
    """Writes one safetensors file; call `write` once per spec, in `data_order`."""

    def __init__(
        self,
        path: Path,
        specs: Iterable[TensorSpec],
        metadata: dict[str, str] | None = None,
        queue: WriteQueue | None = None,
    ) -> None:
        self.path = path
        self._pending = data_order(specs)
        self._next = 0
        self._queue = queue
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._closed = False
        self._put(memoryview(_header_bytes(self._pending, metadata)))

    @property
    def order(self) -> list[TensorSpec]:
        return list(self._pending)

    def write(self, name: str, data: TensorData) -> None:
        """Append one tensor (whole, a `FileRange`, or `Block`s of rows); it must be the next one
        in order, with the planned dtype and shape (blocks: the planned byte count)."""
        import torch

        spec = self._pending[self._next]
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else spec.shape
        if name != spec.name or shape != spec.shape:
            raise LoractlError(f"internal: expected tensor {spec.name} {spec.shape}, got {name} {shape}")
        if isinstance(data, torch.Tensor):
            self._put_block(data, spec.dtype, None)
        elif isinstance(data, FileRange):
            self._copy(data, spec)
        else:
            done = 0
            for block, owner in data:
                self._put_block(block, spec.dtype, owner)
                done += block.numel() * block.element_size()
            if done != spec.nbytes:
                raise LoractlError(f"internal: {spec.name} got {done} of {spec.nbytes} bytes")
        self._next += 1

    def abort(self) -> None:
        """Close after a failure (after the queued writes to it); the caller's atomic output discards the file."""
        if not self._closed:
            self._closed = True
            fd = self._fd
            if self._queue is None:
                os.close(fd)
            else:
                self._queue.call(lambda: os.close(fd), always=True)

    def close(self) -> None:
        """Finish the file, fsynced (by the queue, beside the writes and computing of the next file);
        raises if some planned tensor was never written."""
        if self._next != len(self._pending):
            self.abort()
            missing = self._pending[self._next].name
            raise LoractlError(f"internal: {self.path.name} closed before tensor {missing} was written")
        self._closed = True
        if self._queue is not None:
            self._queue.finish(self._fd)
            return
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def _put_block(self, block: torch.Tensor, dtype: str, owner: torch.Tensor | None) -> None:
        from .tensor_bytes import tensor_to_bytes

        if self._queue is None:
            self._put(tensor_to_bytes(block, dtype))
        else:
            self._queue.write(self._fd, _checked(block, dtype), owner)

    def _copy(self, src: FileRange, spec: TensorSpec) -> None:
        from .write_queue import copy_range

        if src.nbytes != spec.nbytes:
            raise LoractlError(f"internal: {spec.name} is {spec.nbytes} bytes, the source range {src.nbytes}")
        if self._queue is None:
            copy_range(src.path, src.offset, src.nbytes, self._fd)
        else:
            self._queue.copy(self._fd, src.path, src.offset, src.nbytes)

    def _put(self, data: memoryview) -> None:
        from .write_queue import write_all

        write_all(self._fd, data)


def _checked(block: torch.Tensor, dtype: str) -> torch.Tensor:
    """`block` as a contiguous CPU tensor of `dtype`, kept alive until the queue has written it."""
    from .tensor_bytes import torch_dtype

    if block.dtype != torch_dtype(dtype):
        raise LoractlError(f"internal: tensor is {block.dtype}, header says {dtype}")
    return block.detach().cpu().contiguous()


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

"""Reading a checkpoint for a streaming merge: row blocks into a reused buffer, or a byte range.

`Checkpoint.get` returns a fresh tensor each time, which is right for callers that keep it; a merge
drops every block as soon as the writer has it, and allocating (and page-faulting) fresh memory
per tensor cost more than reading it. Here rows are read straight into one reused buffer of a few
MB, so no buffer of a whole tensor exists; tensors written unchanged are not read at all but
handed to the writer as a `FileRange`, which the kernel copies.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import FormatError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_header import DTYPE_SIZES
from ..io.safetensors_writer import FileRange
from ..io.tensor_bytes import torch_dtype

MAX_READ = 1 << 30  # one read() call at most (Linux caps a single read near 2 GiB)


class Buffer:
    """A byte buffer that grows to the largest request and hands out typed views of its start."""

    def __init__(self) -> None:
        self._data = torch.empty(0, dtype=torch.uint8)

    def view(self, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over the buffer's first bytes; valid until the next call."""
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if self._data.numel() < nbytes:
            self._data = torch.empty(nbytes, dtype=torch.uint8)
        return self._data[:nbytes].view(torch_dtype(dtype)).view(shape)


class ReusingReader:
    """Reads row blocks of base tensors into one reused buffer; use as a context manager."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.buffer = Buffer()
        self._files: dict[Path, BinaryIO] = {}

    def __enter__(self) -> ReusingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the tensor viewed as (rows, -1), in the reused buffer: valid until the next call."""
        shard, info = self.ckpt.shard_of(name), self.ckpt.info(name)
        cols = matrix_shape(info.shape)[1]
        block = self.buffer.view(info.dtype, (stop - start, cols))
        if block.numel():
            f = self._files.get(shard) or self._files.setdefault(shard, shard.open("rb", buffering=0))
            f.seek(self.ckpt.headers[shard].data_start + info.offsets[0] + start * cols * DTYPE_SIZES[info.dtype])
            _read_exactly(f, memoryview(block.reshape(-1).view(torch.uint8).numpy()), shard)  # type: ignore[arg-type]
        return block

    def file_range(self, name: str) -> FileRange:
        """Where the tensor's bytes lie, for a copy that never reads them into memory."""
        shard, info = self.ckpt.shard_of(name), self.ckpt.info(name)
        return FileRange(shard, self.ckpt.headers[shard].data_start + info.offsets[0], info.nbytes)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor viewed as a matrix of its first dimension (a scalar is one row)."""
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def _read_exactly(f: BinaryIO, buf: memoryview, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done : done + MAX_READ])  # type: ignore[attr-defined]
        if not n:
            raise FormatError(f"unexpected end of file after {done} of {len(buf)} bytes (truncated?)", path=path)
        done += n

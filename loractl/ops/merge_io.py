"""Reused buffers for streaming a checkpoint: one read buffer, one output buffer, no fresh memory per tensor.

`Checkpoint.get` returns a fresh tensor each time, which is right for callers that keep it; a merge
drops every tensor as soon as the writer has it, and allocating (and page-faulting) hundreds of MB
per tensor cost more than reading them. Here each tensor is read straight into one buffer, and
merged tensors are computed into another, both sized for the largest tensor and reused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import FormatError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_header import DTYPE_SIZES
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
    """Reads one tensor at a time into a reused buffer; use as a context manager."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.buffer = Buffer()
        self._files: dict[Path, BinaryIO] = {}

    def __enter__(self) -> ReusingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files.values():
            f.close()

    def read(self, name: str) -> torch.Tensor:
        """The tensor's data in the reused buffer: valid until the next `read`."""
        shard, info = self.ckpt.shard_of(name), self.ckpt.info(name)
        tensor = self.buffer.view(info.dtype, info.shape)
        if tensor.numel():
            f = self._files.get(shard) or self._files.setdefault(shard, shard.open("rb", buffering=0))
            f.seek(self.ckpt.headers[shard].data_start + info.offsets[0])
            _read_exactly(f, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), shard)  # type: ignore[arg-type]
        return tensor


def _read_exactly(f: BinaryIO, buf: memoryview, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done : done + MAX_READ])  # type: ignore[attr-defined]
        if not n:
            raise FormatError(f"unexpected end of file after {done} of {len(buf)} bytes (truncated?)", path=path)
        done += n

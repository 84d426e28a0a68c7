"""One safetensors file of a base written again with some tensors merged: what single-file bases share.

Every tensor keeps its name, dtype, shape and place in the writer's order; the ones no adapter touches are
copied as byte ranges in the kernel (never read into memory), the merged ones go through the `TensorSink` a
block of rows at a time and are rounded to their dtype. The file's metadata is kept, with loractl's
provenance added.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..io.checkpoint import Checkpoint
    from ..io.safetensors_writer import Block, StreamWriter
    from ..io.write_queue import WriteQueue
    from .protocol import TensorSink

    Target = Callable[[int, int], tuple[Block, torch.Tensor]]


def rewrite_file(
    ckpt: Checkpoint, shard: Path, out: Path, metadata: dict[str, str], merged: Collection[str], sink: TensorSink
) -> None:
    """`shard` (one file of `ckpt`) written to `out` with `metadata` added and the tensors `merged` merged."""
    from ..io.safetensors_writer import StreamWriter, TensorSpec
    from ..io.write_queue import WriteQueue

    header = ckpt.headers[shard]
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in header.tensors.items()]
    # the writes on a thread of their own, beside the merge; buffers for the blocks in flight and two being written
    with WriteQueue(sink.block_elements * 4, pool=sink.blocks_in_flight + 2) as queue:
        writer = StreamWriter(out, specs, {**header.metadata, **metadata}, queue)
        _write_all(ckpt, writer, merged, sink, queue)
        queue.drain()


def _write_all(
    ckpt: Checkpoint, writer: StreamWriter, merged: Collection[str], sink: TensorSink, queue: WriteQueue
) -> None:
    from ..io.tensor_bytes import torch_dtype
    from .protocol import CastRows

    try:
        for spec in writer.order:
            if spec.name not in merged:
                writer.write(spec.name, ckpt.file_range(spec.name))
                continue

            dtype = torch_dtype(spec.dtype)

            def target(_: int, numel: int, dtype: torch.dtype = dtype) -> tuple[Block, torch.Tensor]:
                """A buffer of the queue's for `numel` values to cast into (back to its pool once written)."""
                owner = queue.buffer(numel * dtype.itemsize)
                out = owner[: numel * dtype.itemsize].view(dtype)
                return (out, owner), out

            def store(start: int, rows: torch.Tensor, target: Target = target) -> tuple[Block, torch.Tensor]:
                """A cast into a buffer of the queue's: thread-safe."""
                block, out = target(start, rows.numel())
                return block, out.view(rows.shape).copy_(rows)

            rows, into = partial(ckpt.get_rows, spec.name), CastRows(partial(ckpt.read_rows_into, spec.name), target)
            writer.write(spec.name, sink.blocks(spec.name, rows, store, into=into))
    except BaseException:
        writer.abort()
        raise
    writer.close()

"""One safetensors file of a base written again with some tensors merged: what single-file bases share.

Every tensor keeps its name, dtype, shape and place in the writer's order; the ones no adapter touches are
copied as byte ranges in the kernel (never read into memory), the merged ones go through the `TensorSink`
and are rounded to their dtype. The file's metadata is kept, with loractl's provenance added.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..io.checkpoint import Checkpoint
    from .protocol import TensorSink


def rewrite_file(
    ckpt: Checkpoint, shard: Path, out: Path, metadata: dict[str, str], merged: Collection[str], sink: TensorSink
) -> None:
    """`shard` (one file of `ckpt`) written to `out` with `metadata` added and the tensors `merged` merged."""
    from ..io.safetensors_writer import FileRange, StreamWriter, TensorSpec
    from ..io.tensor_bytes import torch_dtype

    header = ckpt.headers[shard]
    specs = [TensorSpec(n, i.dtype, i.shape) for n, i in header.tensors.items()]
    writer = StreamWriter(out, specs, {**header.metadata, **metadata})
    try:
        for spec in writer.order:
            if spec.name in merged:
                tensor = sink.merged(spec.name, ckpt.get(spec.name).float()).to(torch_dtype(spec.dtype))
                sink.stored(spec.name, tensor.float())
                writer.write(spec.name, tensor)
            else:
                info = header.tensors[spec.name]
                writer.write(spec.name, FileRange(shard, header.data_start + info.offsets[0], info.nbytes))
    except BaseException:
        writer.abort()
        raise
    writer.close()

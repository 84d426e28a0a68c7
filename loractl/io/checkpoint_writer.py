"""Sharded checkpoint output in the transformers layout, produced one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from .checkpoint import INDEX_NAME, SINGLE_NAME
from .safetensors_writer import StreamWriter, TensorData, TensorSpec

if TYPE_CHECKING:
    from .write_queue import WriteQueue

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' → 5_000_000_000, '500MiB' → 524_288_000 (the units transformers accepts)."""
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGTIB")
    unit = s[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise UsageError(f"invalid size {text!r}", hint="write e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive")
    return int(value)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    produce: Callable[[str], TensorData],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    queue: WriteQueue | None = None,
) -> list[Path]:
    """Write `specs` into `out_dir`, calling `produce(name)` for each tensor just before it is written.

    One shard is named `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json`. `out_dir` should be an `atomic_output` temporary. With a
    `queue`, writes and each shard's fsync run on its thread; all are done when this returns.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    for file_name, shard in zip(names, shards, strict=True):
        writer = StreamWriter(out_dir / file_name, shard, metadata, queue)
        try:
            for spec in writer.order:
                writer.write(spec.name, produce(spec.name))
                weight_map[spec.name] = file_name
                if on_tensor:
                    on_tensor(spec.name)
        except BaseException:
            writer.abort()
            raise
        writer.close()
    if queue is not None:
        queue.drain()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]

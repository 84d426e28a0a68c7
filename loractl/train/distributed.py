"""Many processes: torchrun's environment → a process group, DDP wrapping, sums across ranks.

Under `torchrun` (WORLD_SIZE > 1) the group is gloo on CPU and nccl on GPU; alone, every
function here is a cheap no-op, so the loop reads the same for one process or many.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LoractlError, UsageError


@dataclass(frozen=True)
class World:
    """This process's place: `rank` of `size`, and the device it computes on."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> World:
    """Join torchrun's process group when there is one (idempotent); pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = device or (f"cuda:{local}" if cuda else "cpu")
    if size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank, dist.get_world_size() if dist.is_initialized() else 1, chosen)


def wrap(model: nn.Module, world: World) -> nn.Module:
    """DistributedDataParallel over the trainable (LoRA) parameters when there are several ranks."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.device(world.device).index] if world.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def sum_across(values: Sequence[float], world: World) -> list[float]:
    """Element-wise sums over all ranks (float64), e.g. token counts and loss sums."""
    if world.size == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def launch(nproc: int, args: Sequence[str]) -> int:
    """Re-run `loractl train ARGS` under torchrun with `nproc` processes on this machine; its exit code."""
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "loractl", "train", *args]  # fmt: skip
    try:
        return subprocess.call(cmd)
    except OSError as e:
        raise LoractlError(f"cannot start torchrun: {e.strerror}", hint="run torchrun yourself") from None


def gather(obj: object, world: World) -> list[object]:
    """`obj` from every rank, in rank order (for per-rank RNG states in checkpoints)."""
    if world.size == 1:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out

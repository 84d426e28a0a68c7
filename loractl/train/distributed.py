"""Many processes: torchrun's environment → a process group, DDP or FSDP wrapping, sums across ranks.

Under `torchrun` (WORLD_SIZE > 1; `loractl train --nproc N` starts it, `cli/_torchrun.py`) the group
is gloo on CPU and nccl on GPU; alone, every
function here is a cheap no-op, so the loop reads the same for one process or many. FSDP
(`fsdp=True`) shards the base over the ranks instead of replicating it, for bases that do
not fit one device.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..adapter import Adapter, AdapterMeta
from ..errors import UsageError
from .export import feed_base_weight, lora_layers, lora_module
from .lora_layers import LoraLinear


@dataclass(frozen=True)
class World:
    """This process's place: `rank` of `size`, and the device it computes on."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> World:
    """Join torchrun's process group when there is one (idempotent); pick this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local)
    cuda = chosen.startswith("cuda")
    if size > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank, dist.get_world_size() if dist.is_initialized() else 1, chosen)


def pick_device(device: str, local_rank: int = 0) -> str:
    """`auto` → CUDA when torch sees one, else the CPU; `cuda` → this rank's GPU (`cuda:LOCAL_RANK`).

    An explicit device torch cannot use is refused here, before the base is loaded.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA device", hint="use --device cpu (or auto)")
        return f"cuda:{local_rank}"
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: torch sees no Apple GPU (MPS)", hint="use --device cpu (or auto)")
    return device


def wrap(model: nn.Module, world: World, *, fsdp: bool = False) -> nn.Module:
    """DistributedDataParallel (or FSDP) over the trainable (LoRA) parameters when there are several ranks.

    FSDP wraps each decoder layer (transformers' `_no_split_modules`) as its own unit, so only one
    layer's base weights are gathered at a time; `use_orig_params` lets frozen and LoRA
    parameters share a unit and keeps the optimizer on the LoRA parameters alone. A 4-bit base
    (QLoRA-FSDP) is sharded like any other when its packed bytes are stored in a float dtype.
    """
    if world.size == 1:
        return model
    cuda = world.device.startswith("cuda")
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        check_one_dtype(model)
        layers = {type(m) for m in decoder_layers(model)}
        # An explicit device: without one, FSDP refuses to run on a machine with no accelerator (gloo on CPU).
        return FullyShardedDataParallel(
            model, use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy(layers), device_id=torch.device(world.device)
        )
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.device(world.device).index] if cuda else None)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers never splits across devices (`_no_split_modules`: its decoder layers)."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in model.modules() if type(m).__name__ in names]


def check_one_dtype(model: nn.Module) -> None:
    """Refuse what FSDP cannot flatten: each unit's parameters become one flat tensor of one dtype, and the
    LoRA factors are float32, so the base must be float32 too (its 4-bit bytes stored as float32)."""
    others = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()} - {"float32"})
    if others:
        raise UsageError(
            f"--fsdp needs a float32 base, but this one holds {', '.join(others)} parameters: FSDP flattens "
            "each decoder layer's parameters into one tensor of one dtype, and the LoRA factors are float32",
            hint="add --base-dtype fp32 (with --quantize nf4 the packed weights are then stored as float32), "
            "or drop --fsdp (DDP)",
        )


def check_fsdp(world: World) -> None:
    """Refuse FSDP where it cannot run: one process."""
    if world.size == 1:
        raise UsageError(
            "--fsdp needs a distributed launch (world size 1 here)",
            hint="add --nproc N (N ≥ 2), or run under torchrun; drop --fsdp for one process",
        )


def gather_adapter(net: nn.Module, world: World) -> Adapter | None:
    """The trained adapter on rank 0 (None elsewhere), gathering one FSDP unit at a time; every rank calls it.

    No process ever holds more than one unit's (one decoder layer's) full weights: each unit is gathered in
    turn on rank 0, its LoRA factors copied and its adapted weights fed to the base fingerprint. Units go in
    the sorted order of their layers' names, which is the fingerprint's own order (a decoder layer's names
    are contiguous when sorted), so the fingerprint equals the one-process one; None if a model's names
    interleave across units.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    layers = lora_layers(net)
    owner: dict[int, nn.Module] = {}
    for unit in (m for m in net.modules() if isinstance(m, FullyShardedDataParallel)):  # outer units first
        owner.update({id(m): unit for m in unit.modules() if isinstance(m, LoraLinear)})
    groups: dict[int, list[str]] = {}
    for name in sorted(layers):
        groups.setdefault(id(owner[id(layers[name])]), []).append(name)
    units = {id(u): u for u in owner.values()}
    order = sorted(groups, key=lambda k: groups[k][0])
    h, modules, cuda = hashlib.sha256(), {}, world.device.startswith("cuda")
    for key in order:
        with FullyShardedDataParallel.summon_full_params(
            units[key], recurse=False, writeback=False, rank0_only=True, offload_to_cpu=cuda
        ):
            if world.is_main:
                for name in groups[key]:
                    modules[name] = lora_module(layers[name])
                    feed_base_weight(h, name, layers[name])
    if not world.is_main:
        return None
    in_order = [name for key in order for name in groups[key]] == sorted(layers)
    return Adapter(modules=modules, meta=AdapterMeta(base_fingerprint="sha256:" + h.hexdigest() if in_order else None))


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


def broadcast(obj: object, world: World) -> object:
    """Rank 0's `obj` on every rank (e.g. the temporary path rank 0 chose)."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: object, world: World) -> list[object]:
    """`obj` from every rank, in rank order (for per-rank RNG states in checkpoints)."""
    if world.size == 1:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out

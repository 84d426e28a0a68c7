"""One optimizer step and one loss evaluation, on a `TrainState`.

Loss is the mean cross-entropy over every label token of a global batch (all micro-batches of
all ranks), so batch 8 × 1 process, batch 4 × 2 accumulation steps and batch 4 × 2 processes
take the same step up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import TrainConfig
from .data import IGNORE, Example, by_length, collate
from .distributed import World
from .export import unwrap
from .state import TrainState

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(config: TrainConfig, world: World) -> AbstractContextManager[Any]:
    """The forward pass's autocast for `--precision`, or nothing for fp32."""
    dtype = AUTOCAST_DTYPES.get(config.precision)
    return torch.autocast(torch.device(world.device).type, dtype=dtype) if dtype is not None else nullcontext()


def loss_sum(net: nn.Module, batch: dict[str, torch.Tensor], config: TrainConfig, world: World) -> torch.Tensor:
    """Summed token cross-entropy of `batch` through the loss module `net`, under the configured autocast.

    No attention mask: rows are right-padded and attention is causal, so no token that takes a loss
    ever sees padding, and attention keeps its causal fast path (SDPA `is_causal`, no mask tensor).
    Packed rows pass `position_ids` instead, which restart at each example.
    """
    device = torch.device(world.device)
    extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
    with autocast(config, world):
        loss: torch.Tensor = net(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device), **extra)
    return loss


def optimizer_step(
    state: TrainState, batches: list[dict[str, torch.Tensor]], targets: float, config: TrainConfig
) -> tuple[float, float | None]:
    """Accumulate gradients of the global-batch mean loss, clip, step; (mean loss, grad norm)."""
    world, net, scaler, optimizer = state.world, state.net, state.scaler, state.optimizer
    weight = world.size / max(targets, 1.0)  # DDP averages over ranks; this turns it into a global mean
    total = 0.0
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1 or world.size == 1
        with nullcontext() if sync else net.no_sync():  # type: ignore[operator]
            loss = loss_sum(net, batch, config, world)
            scaler.scale(loss * weight).backward()  # type: ignore[no-untyped-call]
        total += float(loss.detach())
    grad_norm = None
    if config.max_grad_norm:
        scaler.unscale_(optimizer)
        if config.fsdp:  # FSDP's own clip: the norm over every rank's shards
            norm = net.clip_grad_norm_(config.max_grad_norm)  # type: ignore[operator]
        else:
            norm = torch.nn.utils.clip_grad_norm_(state.params, config.max_grad_norm)
        grad_norm = float(norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    (total,) = distributed.sum_across([total], world)
    return total / max(targets, 1.0), grad_norm


def mean_loss(net: nn.Module, data: Sequence[Example], config: TrainConfig, world: World, pad_id: int) -> float:
    """Mean loss per label token over `data`, no dropout or gradients; every rank runs as many batches.

    FSDP gathers each layer in lockstep, so a rank out of examples still runs one, uncounted.
    """
    was_training = unwrap(net).training
    net.eval()
    mine = by_length(list(data)[world.rank :: world.size])  # batches of similar rows: little padding computed
    rounds = -(-len(data) // world.size // config.batch_size) if data else 0  # rank 0 has the most examples
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, rounds * config.batch_size, config.batch_size):
            rows = mine[i : i + config.batch_size]
            batch = collate(rows or list(data[:1]), pad_id)
            if rows:
                total, count = total + float(loss_sum(net, batch, config, world)), count + count_targets(batch)
            else:
                loss_sum(net, batch, config, world)
    net.train(was_training)
    total, count = distributed.sum_across([total, count], world)
    return total / count if count else math.nan


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens of a batch that take a loss (the first position predicts nothing)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())

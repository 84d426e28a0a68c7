"""`TrainState`: everything a run changes as it goes, in one object the loop and checkpoints share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import World


@dataclass
class Position:
    """How far a run is: optimizer steps done and input tokens seen (over all ranks)."""

    step: int = 0
    tokens: int = 0


@dataclass
class TrainState:
    """The user's `model`, its wrapped loss module `net`, the LoRA `params` and their optimizer and scaler.

    `net` is what the step runs (DDP- or FSDP-wrapped across ranks); `model` is what checkpoints
    and the final adapter read. A checkpoint restores `params`, `optimizer`, `scaler`, `position`.
    """

    model: nn.Module
    net: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    world: World
    position: Position = field(default_factory=Position)

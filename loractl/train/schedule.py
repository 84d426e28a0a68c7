"""What a step uses, as pure functions of the step number: its learning rate and its examples.

Because neither depends on anything but (config, step), a checkpoint only has to store the
step to restore both, and DDP ranks agree on them without talking.
"""

from __future__ import annotations

import math

import torch

from .config import TrainConfig
from .distributed import World


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, total - config.warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    return config.lr


class BatchOrder:
    """Which examples each step uses: a seeded shuffle per epoch, cut into global batches.

    A step's global batch is dealt round-robin to ranks, then cut into micro-batches; it depends
    only on (seed, step, global batch size), which is what makes resume and DDP exact.
    """

    def __init__(self, num_examples: int, config: TrainConfig, world: World) -> None:
        self.n, self.seed, self.world = num_examples, config.seed, world
        self.batch, self.accum = config.batch_size, config.grad_accum
        self._perms: dict[int, list[int]] = {}

    def micro_batches(self, step: int) -> list[list[int]]:
        size = self.batch * self.accum * self.world.size
        indices = [self._index(p) for p in range(step * size, (step + 1) * size)]
        mine = indices[self.world.rank :: self.world.size]
        return [mine[k * self.batch : (k + 1) * self.batch] for k in range(self.accum)]

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=generator).tolist()}
        return self._perms[epoch][position % self.n]

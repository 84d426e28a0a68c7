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


# A forward's fixed cost in padded tokens' worth (per-layer node and thread overhead, and the
# smaller, less efficient matmuls): a length group is split off only when it saves more padding.
# Measured: on the 30-layer SmolLM2 shape (one thread), 8 rows of 128 tokens as four 2-row forwards
# took 1.0 s more than as one (5.8 s), ≈ 60 tokens' worth per extra forward.
GROUP_COST_TOKENS = 64


def length_groups(rows: list[int], lengths: list[int]) -> list[list[int]]:
    """`rows` (example indices, `lengths` their token counts) cut into groups of similar length, longest first.

    Each group is collated to its own longest row, so a micro-batch of ragged rows computes (almost) no
    padding; every example still takes its loss in the same step, so the step's summed loss and
    gradients are the same sums, only added in another order. The cut minimises padded tokens plus
    `GROUP_COST_TOKENS` per group (a small dynamic program: a micro-batch has few rows).
    """
    order = sorted(range(len(rows)), key=lambda k: -lengths[k])
    sizes = [lengths[k] for k in order]
    best = [0.0] + [math.inf] * len(order)  # best[j]: cost of the first j rows (longest first)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # rows i..j-1 in one group, padded to sizes[i]
            cost = best[i] + (j - i) * sizes[i] + GROUP_COST_TOKENS
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = len(order)
    while j:
        groups.append([rows[k] for k in order[cut[j] : j]])
        j = cut[j]
    return groups[::-1]

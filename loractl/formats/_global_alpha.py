"""Formats with one alpha per file (GGUF, torchtune, loralib): per-module scales folded into B.

Such a format computes every module's scale as `alpha / r` from one stored alpha. A module
whose scale differs gets B multiplied by `scale · r / alpha` (computed in float64, cast once):
ΔW is unchanged up to one rounding of B, and modules that already agree keep B bit for bit.
Formats that also have one rank zero-pad A's rows and B's columns, which is exact.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..adapter import Adapter, LoraModule
from ..errors import LoractlError, UsageError
from .peft.config import most_common


def common_alpha(adapter: Adapter, rank: int | None = None) -> float:
    """The alpha that leaves the most modules' B untouched: the most common `scale · r` (never 0)."""
    values = [m.scale * (rank or m.rank) for _, m in sorted(adapter.modules.items())]
    alpha = float(most_common(values, 1.0))
    return alpha if alpha != 0.0 else 1.0


def fold_to_alpha(adapter: Adapter, alpha: float, rank: int | None = None) -> Adapter:
    """`adapter` with every module's scale `alpha / r` (r its own rank, or `rank` after zero-padding)."""
    if alpha == 0.0:
        raise UsageError("alpha 0 cannot express a LoRA scale", hint="pass a non-zero --alpha")
    modules = {name: _fold(m, alpha, rank or m.rank) for name, m in adapter.modules.items()}
    return replace(adapter, modules=modules)


def max_rank(adapter: Adapter) -> int:
    """The largest rank, the one a single-rank format pads to."""
    return max((m.rank for m in adapter.modules.values()), default=1)


def _fold(m: LoraModule, alpha: float, rank: int) -> LoraModule:
    if rank < m.rank:
        raise LoractlError(f"internal: cannot pad rank {m.rank} down to {rank}")
    a, b = _pad(m.A, 0, rank), _pad(m.B, 1, rank)
    scale = alpha / rank
    if scale != m.scale:
        b = (b.double() * (m.scale / scale)).to(m.B.dtype)
    return replace(m, A=a, B=b, scale=scale, alpha=alpha, scale_rule="alpha/r")


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)

"""Data-derived figures of adapter modules, computed from the factors (never forming ΔW)."""

from __future__ import annotations

import math

import torch

from .adapter import Adapter, LoraModule
from .ops.linalg import factored_frobenius


def delta_norm(m: LoraModule) -> float:
    """‖scale·B·A‖_F from the factors (see `linalg.factored_frobenius`)."""
    return abs(m.scale) * factored_frobenius(m.B.detach().flatten(1), m.A.detach().flatten(1))


def nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf values (0 for integer tensors), counted in blocks of 2^24 elements (a few tens of MB of
    temporaries whatever the tensor's size); float8 is counted in float32 (it has no isfinite kernel)."""
    if not t.is_floating_point():
        return 0
    blocks = torch.split(t.reshape(-1), 1 << 24)
    return sum(int((~torch.isfinite(b.float() if b.element_size() == 1 else b)).sum().item()) for b in blocks)


def module_stats(m: LoraModule) -> tuple[float, int]:
    """(‖ΔW‖_F, NaN/Inf count) of one module."""
    bad = sum(nonfinite(t) for t in m.tensors().values())
    return (delta_norm(m) if bad == 0 else math.nan), bad


def full_nonfinite(adapter: Adapter) -> int:
    """NaN/Inf values across an adapter's full tensors."""
    return sum(nonfinite(t) for t in adapter.full_tensors.values())

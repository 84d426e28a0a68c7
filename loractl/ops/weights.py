"""The per-adapter weights of `merge` and `combine`, checked once (torch-free: merge plans read it)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import UsageError


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One finite weight per adapter, in order; every weight 1.0 when `weights` is None."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise UsageError(
            f"{len(weights)} weights for {count} adapters",
            hint="give --weight once per adapter, in the same order, or not at all (every weight 1.0)",
        )
    if not all(math.isfinite(w) for w in weights):
        raise UsageError(f"weights must be finite, got {list(weights)}")
    return [float(w) for w in weights]

"""The scale formula, in one torch-free place so header-only readers can share it."""

from __future__ import annotations

import math


def scale_from_alpha(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA's scale: alpha/r, or alpha/√r for rsLoRA (computed in float64)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank

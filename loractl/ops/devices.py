"""`--device auto|cpu|cuda|mps`: where the arithmetic of merge, extract, resize and combine runs.

Only the arithmetic moves; reading, writing and every reported figure stay on the CPU in float64
where they were, so a device changes speed, not results (beyond float32 rounding in the SVDs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..choices import DEVICES
from ..errors import UsageError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """The torch device `name` asks for; `auto` is CUDA, else MPS, else the CPU.

    Raises `UsageError` for an unknown name or a device this machine does not have.
    """
    import torch

    kind = name.split(":")[0].lower()
    if kind not in DEVICES:
        raise UsageError(f"unknown device {name!r}", hint=f"choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _has_mps() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda asked for, but torch sees no CUDA GPU here", hint="use --device cpu or auto")
    if kind == "mps" and not _has_mps():
        raise UsageError("device mps asked for, but torch sees no Apple GPU here", hint="use --device cpu or auto")
    return torch.device(name.lower())


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work runs: `device`, except Apple's GPU (MPS has no float64), which leaves it on the CPU."""
    import torch

    return torch.device("cpu") if device.type == "mps" else device


def _has_mps() -> bool:
    import torch

    return bool(torch.backends.mps.is_available())

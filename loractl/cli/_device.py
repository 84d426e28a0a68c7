"""The --device option shared by merge, extract, resize and combine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..choices import DEVICES

F = TypeVar("F", bound=Callable[..., Any])


def device_option(func: F) -> F:
    """--device auto|cpu|cuda|mps (validated by `loractl.ops.devices.resolve_device`, which needs torch)."""
    return click.option(
        "--device",
        default="cpu",
        show_default=True,
        help=f"Where the arithmetic runs: {', '.join(d + ('[:N]' if d == 'cuda' else '') for d in DEVICES)}.",
    )(func)

"""The --device option shared by merge, extract, resize and combine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def device_option(func: F) -> F:
    """--device auto|cpu|cuda|mps (validated by `loractl.ops.devices.resolve_device`, which needs torch)."""
    return click.option(
        "--device",
        default="cpu",
        show_default=True,
        help="Where the arithmetic runs: auto, cpu, cuda[:N], mps.",
    )(func)

"""The options every adapter-reading command shares, and their `ReadOptions`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..formats.options import ReadOptions

F = TypeVar("F", bound=Callable[..., Any])


def read_options(f: F) -> F:
    """Add --from, --alpha, --scale and --allow-pickle (commands add their own --base)."""
    for option in reversed(
        [
            click.option(
                "--from", "source_format", default=None, metavar="FORMAT", help="Input format (default: detected)."
            ),
            click.option(
                "--alpha", type=float, default=None, help="Alpha for formats that do not store one (loralib)."
            ),
            click.option(
                "--scale", type=float, default=None, help="Scale for formats that do not store one (old mlx .npz)."
            ),
            click.option("--allow-pickle", is_flag=True, help="Allow pickle inputs (loaded with weights_only=True)."),
        ]
    ):
        f = option(f)
    return f


def to_read_options(base: str | None, alpha: float | None, scale: float | None, allow_pickle: bool) -> ReadOptions:
    from ..formats.options import ReadOptions

    return ReadOptions(allow_pickle=allow_pickle, base=Path(base) if base else None, alpha=alpha, scale=scale)

"""The options of every command that reads an adapter, defined once: --from, --allow-pickle, --alpha,
--scale and --base, always under these parameter names, so a hint that names one is never wrong."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..formats.options import ReadOptions

F = TypeVar("F", bound=Callable[..., Any])

ALPHA_HELP = "Alpha for formats that do not store one (loralib, torchtune .pt)."


def input_options(*, base: bool = True, alpha_help: str = ALPHA_HELP) -> Callable[[F], F]:
    """Add --from, --allow-pickle, --alpha, --scale and --base (not where BASE is an argument: merge).

    The parameters are `source_format`, `allow_pickle`, `alpha`, `scale` and `base`.
    """
    options = [
        click.option(
            "--from", "source_format", default=None, metavar="FORMAT", help="Input format (default: detected)."
        ),
        click.option("--allow-pickle", is_flag=True, help="Allow pickle inputs (loaded with weights_only=True)."),
        click.option("--alpha", type=float, default=None, help=alpha_help),
        click.option(
            "--scale", type=float, default=None, help="Scale for formats that do not store one (old mlx .npz)."
        ),
    ]
    if base:
        options.append(
            click.option(
                "--base",
                type=click.Path(exists=True),
                default=None,
                help="Base checkpoint: resolves kohya/GGUF names, RoPE head counts, loralib widths.",
            )
        )

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def to_read_options(
    base: str | Path | None, alpha: float | None, scale: float | None, allow_pickle: bool
) -> ReadOptions:
    """The `ReadOptions` the input options describe."""
    from ..formats.options import ReadOptions

    return ReadOptions(allow_pickle=allow_pickle, base=Path(base) if base else None, alpha=alpha, scale=scale)
